"""Fit before you pay: what a run checks after its config and before it allocates anything.

1. Memory. Every stage about to run needs, per device, at least its parameters and
   optimizer state (every model's, for PPO). Those come from `jax.eval_shape` of the train
   state and its shardings (`jaxgpt.aot.plans`: nothing is compiled or allocated, well
   under a second) and are set against what a device has: the runtime's `bytes_limit` on
   GPU and TPU, the host's available RAM split among this process's devices on CPU. Only
   a run that cannot hold even that is stopped; activations and temporaries come on top,
   and `tools/aot.py` compiles the steps to measure them. `config.preflight=False` skips
   this check (e.g. to rely on swap).
2. The tokenizer. A `config.tokenizer.path` that does not exist is named, with how to
   make one, before any data is read.

Each failure is one line (`aot.DoesNotFit` or `TokenizerMissing`, both ConfigErrors).
"""

from __future__ import annotations

import dataclasses
import os

import jax

from jaxgpt import config as config_lib
from jaxgpt.aot import compile_fit as aot
from jaxgpt.aot import plans as aot_plans
from jaxgpt.train.metrics import human_bytes


class TokenizerMissing(config_lib.ConfigError):
  """config.tokenizer.path names nothing; the message says how to make one."""


@dataclasses.dataclass(frozen=True)
class Budget:
  bytes: float                 # what one device can hold
  what: str                    # where the figure comes from, for the message


def _available_host_bytes() -> float:
  """MemAvailable (what can be allocated without swapping); total RAM where there is no
  /proc/meminfo."""
  try:
    with open('/proc/meminfo', encoding='ascii') as f:
      for line in f:
        if line.startswith('MemAvailable:'):
          return float(line.split()[1]) * 1024
  except OSError:
    pass
  return float(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES'))


def device_budget(devices=None) -> Budget | None:
  """Memory of one of this process's devices; None when the runtime does not say."""
  devices = list(devices if devices is not None else jax.local_devices())
  d = devices[0]
  if d.platform == 'cpu':  # CPU devices (emulated ones too) share the host's RAM
    n = len(devices)
    return Budget(_available_host_bytes() / n,
                  f'available host RAM / {n} CPU device{"s" if n > 1 else ""}')
  stats = d.memory_stats() or {}
  if not stats.get('bytes_limit'):
    return None
  return Budget(float(stats['bytes_limit']), f'{d.device_kind} bytes_limit')


def check_memory(cfg, mesh, stages, config_file: str = '', budget: Budget | None = None
                 ) -> list[aot_plans.Plan]:
  """Raise `aot.DoesNotFit` (one line) if a stage's parameters and optimizer state alone
  exceed a device's memory. Returns each stage's plan (`state_bytes`: what it needs)."""
  budget = budget or device_budget()
  plans = []
  for stage in stages:
    p = aot_plans.plan(cfg, stage, mesh)
    plans.append(p)
    if budget is not None and p.state_bytes > budget.bytes:
      devices = ' '.join(f'{k}={v}' for k, v in mesh.shape.items())
      aot_cmd = f'python tools/aot.py --config {config_file or "EXPERIMENT.py"} --topology v5p-8'
      raise aot.DoesNotFit(
          f'{stage} needs {human_bytes(p.state_bytes)} per device for parameters and optimizer state '
          f'alone ({p.n_params / 1e9:.2f}B parameters: {human_bytes(p.params_bytes)} + optimizer '
          f'{human_bytes(p.opt_bytes)}, mesh {devices}), but a device here has '
          f'{human_bytes(budget.bytes)} ({budget.what}); run on more or larger devices (check a '
          f'slice first, without it: {aot_cmd}), pick a smaller model, or set '
          'config.preflight=False to try anyway.')
  return plans


def check_tokenizer(cfg) -> None:
  """A named tokenizer exists (a .model file, or a Hugging Face tokenizer's file or
  directory); an empty path means the run trains one into WORKDIR."""
  path = cfg.tokenizer.path
  if not path or os.path.exists(path):
    return
  raise TokenizerMissing(
      f'config.tokenizer.path={path!r} does not exist (looked from {os.getcwd()}); make one '
      f'with `python tools/train_tokenizer.py --out {path} --vocab_size '
      f"{cfg.tokenizer.vocab_size} --input 'corpus/*.txt'` (no --input: the embedded corpus), "
      'point it at an existing LLaMA-layout tokenizer.model, or set '
      "--config.tokenizer.path='' to train one into WORKDIR/tokenizer.model on the first run.")


def check(cfg, stages, mesh, config_file: str = '') -> None:
  """Both checks, memory first: a model that cannot fit needs no tokenizer."""
  if cfg.preflight:
    check_memory(cfg, mesh, stages, config_file)
  check_tokenizer(cfg)
