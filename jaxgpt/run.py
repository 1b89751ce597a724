"""Runs the stage(s) named by config.stage, after validating the config."""

from __future__ import annotations

import importlib
import os
import tempfile

import jax

from jaxgpt import sharding
from jaxgpt import config as config_lib
from jaxgpt.stages import PIPELINE
from jaxgpt import model as model_lib
from jaxgpt.aot import preflight
from jaxgpt.hf import importer as hf_import

def _stage_module(name: str):
  """The stage's module, imported when it runs (config validation already checked `name`)."""
  return importlib.import_module(f'jaxgpt.stages.{name}')


def _check_writable(workdir: str) -> None:
  """An unwritable workdir (read-only, no permission) fails now, not after the data."""
  try:
    with tempfile.TemporaryFile(dir=workdir):
      pass
  except OSError as e:
    raise OSError(e.errno, e.strerror, workdir) from None


def run(cfg, workdir: str, config_file: str = '') -> dict:
  """Validates the config, then runs each stage; returns {stage: loop.Result}.
  `config_file` (the experiment's path) only goes into messages."""
  jax.config.update('jax_threefry_partitionable', True)
  hf_import.adopt_init_settings(cfg, workdir)  # init_from a published model: its architecture
  config_lib.validate(cfg, jax.device_count())
  # A model the mesh cannot split fails now (abstractly), not after the data and tokenizer.
  mesh = sharding.make_mesh(cfg)
  model_lib.abstract_sharded_params(model_lib.ModelConfig.from_config(cfg), mesh)
  names = PIPELINE if cfg.stage == 'all' else (cfg.stage,)
  # One that cannot hold its state, or names a missing tokenizer, fails before the workdir.
  preflight.check(cfg, names, mesh, config_file)
  os.makedirs(workdir, exist_ok=True)
  _check_writable(workdir)
  results = {name: _stage_module(name).run(cfg, workdir) for name in names}
  if cfg.stage == 'all':
    from jaxgpt.evals import report  # pylint: disable=import-outside-toplevel
    report.write_report(cfg, workdir)
  return results
