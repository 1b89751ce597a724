"""Runs the stage(s) named by config.stage, after validating the config.

Each stage's wall time goes into WORKDIR/times.json (summed over the attempts that trained,
so a resumed stage counts all of them); `stage=all` ends with the report and says where it
is.
"""

from __future__ import annotations

import importlib
import json
import os
import tempfile
import time

import jax

from jaxgpt import sharding
from jaxgpt import config as config_lib
from jaxgpt.stages import RECIPE
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
  names = recipe(cfg) if cfg.stage == 'all' else (cfg.stage,)
  # One that cannot hold its state, or names a missing tokenizer, fails before the workdir.
  preflight.check(cfg, names, mesh, config_file)
  os.makedirs(workdir, exist_ok=True)
  _check_writable(workdir)
  results = {}
  for name in names:
    start = time.monotonic()
    results[name] = _stage_module(name).run(cfg, workdir)
    if getattr(results[name], 'steps_run', 1):  # a finished stage redone adds nothing
      record_time(workdir, name, time.monotonic() - start)
  if cfg.stage == 'all':
    from jaxgpt.evals import report  # pylint: disable=import-outside-toplevel
    start = time.monotonic()
    report.write_report(cfg, workdir, config_file)
    record_time(workdir, 'report', time.monotonic() - start, replace=True)
    if jax.process_index() == 0:
      print(f'[all] done. Read {os.path.join(workdir, "report.md")}; talk to a model: '
            f'python -m jaxgpt.cli.chat --workdir {workdir} --stage sft', flush=True)
  return results


def recipe(cfg) -> tuple[str, ...]:
  """The stages `stage=all` runs: config.recipe, or the default recipe."""
  return tuple(cfg.recipe) or RECIPE


def record_time(workdir: str, name: str, seconds: float, *, replace: bool = False) -> None:
  """Adds (or, with `replace`, sets) `seconds` to name's entry of WORKDIR/times.json."""
  if jax.process_index() != 0:
    return
  path = os.path.join(workdir, 'times.json')
  times = {}
  if os.path.exists(path):
    with open(path, encoding='utf-8') as f:
      times = json.load(f)
  times[name] = round(seconds + (0.0 if replace else float(times.get(name, 0.0))), 1)
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(times, f, indent=1)
  os.replace(tmp, path)
