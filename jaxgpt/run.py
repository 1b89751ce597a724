"""Runs the stage(s) named by config.stage, after validating the config."""

from __future__ import annotations

import os

import jax

from jaxgpt import config as config_lib

# In recipe order; `all` runs them one after the other, each from the previous one.
PIPELINE = ('pretrain', 'sft', 'reward', 'ppo')


def _stage_module(name: str):
  if name == 'pretrain':
    from jaxgpt.stages import pretrain as module  # pylint: disable=import-outside-toplevel
  elif name == 'sft':
    from jaxgpt.stages import sft as module  # pylint: disable=import-outside-toplevel
  elif name == 'reward':
    from jaxgpt.stages import reward as module  # pylint: disable=import-outside-toplevel
  elif name == 'ppo':
    from jaxgpt.stages import ppo as module  # pylint: disable=import-outside-toplevel
  else:
    raise config_lib.ConfigError(
        f"config.stage='{name}': this stage is not implemented yet; use one of {PIPELINE}.")
  return module


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
