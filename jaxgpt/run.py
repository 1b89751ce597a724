"""Runs the stage(s) named by config.stage, after validating the config."""

from __future__ import annotations

import importlib
import os

import jax

from jaxgpt import config as config_lib

# In recipe order; `all` runs them one after the other, each from the previous one.
PIPELINE = ('pretrain', 'sft', 'reward', 'ppo')


def _stage_module(name: str):
  """The stage's module, imported when it runs (config validation already checked `name`)."""
  return importlib.import_module(f'jaxgpt.stages.{name}')


def run(cfg, workdir: str) -> dict:
  """Validates the config, then runs each stage; returns {stage: loop.Result}."""
  jax.config.update('jax_threefry_partitionable', True)
  config_lib.validate(cfg, jax.device_count())
  os.makedirs(workdir, exist_ok=True)
  names = PIPELINE if cfg.stage == 'all' else (cfg.stage,)
  results = {name: _stage_module(name).run(cfg, workdir) for name in names}
  if cfg.stage == 'all':
    from jaxgpt import report  # pylint: disable=import-outside-toplevel
    report.write_report(cfg, workdir)
  return results
