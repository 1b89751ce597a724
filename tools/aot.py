r"""Fit before you pay: per-device memory, FLOPs and the largest batch of every program a
stage compiles, for a TPU slice you do not have (or for the devices you do).

    pip install -e '.[tpu-aot]'     # libtpu: compiling for TPUs from any Linux machine
    python tools/aot.py --config experiments/llama_7b.py --topology v5p-8
    python tools/aot.py --config experiments/gpt2_124m.py --topology v5e-1 --stage pretrain \
        --config.train.batch_size=64 --config.train.micro_batches=1
    python tools/aot.py --config experiments/tiny.py --stage ppo      # this machine's devices

--topology: a Cloud TPU slice (v5p-8, v5e-8, v6e-8, v4-8, v2-8, v5e-1, v6e-1, larger
v5p / v5e / v6e / v4 slices) or 'local'. Each program of the stage is compiled for it and
the compiler's memory analysis printed as a markdown table, per device: the parameters
and optimizer state the stage holds, the program's temporaries, the total it needs next to
the device's memory, its model FLOPs and the step time at --mfu of the device's peak.
Under the table, for the sampler's programs: the bytes one decode step moves between
devices (the collectives of the per-token loop, from the compiled HLO) and the weights
per device in the layout it decodes with (config.mesh.decode_rules; '()' decodes in the
training layout, for a before / after). Then the largest batch of the stage's main step
that fits, found by compiling (--search).
Nothing runs and nothing is allocated; a 7B step takes minutes to compile on 2 cores.
"""

from __future__ import annotations

import time

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from jaxgpt import errors, sharding
from jaxgpt import config as config_lib
from jaxgpt.aot import collectives
from jaxgpt.aot import compile_fit as aot
from jaxgpt.aot import targets as targets_lib
from jaxgpt.aot.plans import plan
from jaxgpt.stages import PIPELINE
from jaxgpt.train import metrics as metrics_lib

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment file.', lock_config=True)
_TOPOLOGY = flags.DEFINE_string('topology', 'local', "A TPU slice such as v5p-8, or 'local'.")
_STAGE = flags.DEFINE_enum('stage', None, list(PIPELINE) + ['all'],
                           'Stage to check (default: config.stage).')
_MFU = flags.DEFINE_float('mfu', 0.4, 'Model FLOPs utilisation the step times assume.')
_PEAK = flags.DEFINE_float('peak_tflops', 0.0, 'Peak TFLOP/s per device (0: the chip table, '
                           'config.train.peak_flops, or a matmul measured here).')
_STEPS = flags.DEFINE_list('steps', [], 'Compile only these programs (e.g. train,eval).')
_SEARCH = flags.DEFINE_bool('search', True, 'Search for the largest batch of the main step.')
_MAX_COMPILES = flags.DEFINE_integer('max_compiles', 8, 'Compiles the batch search may use.')
_DECODE_BATCH = flags.DEFINE_integer('decode_batch', 0, 'Sampler rows (0: the stage\'s own).')
_PROMPT_LEN = flags.DEFINE_integer('prompt_len', 0, 'Sampler prompt width (0: the longest '
                                   'that leaves room for the response).')
flags.mark_flag_as_required('config')


_bytes = metrics_lib.human_bytes


def _flops(x: float) -> str:
  for unit, scale in (('P', 1e15), ('T', 1e12), ('G', 1e9)):
    if x >= scale:
      return f'{x / scale:.3g} {unit}'
  return f'{x / 1e6:.3g} M'


def _seconds(x: float) -> str:
  for unit, scale in (('s', 1.0), ('ms', 1e-3)):
    if x >= scale:
      return f'{x / scale:.3g} {unit}'
  return f'{x / 1e-6:.3g} µs'


def peak_per_device(target, cfg) -> float:
  if _PEAK.value:
    return _PEAK.value * 1e12
  if target.peak_flops:
    return target.peak_flops
  if cfg.train.peak_flops:
    return cfg.train.peak_flops
  return metrics_lib.measure_peak_flops()  # CPU, or a GPU the table does not know


def table(p, rows, target, peak) -> list[str]:
  header = (f'| step | batch | params | opt state | temp | total | of {_bytes(target.hbm_bytes)} '
            f'| fits | FLOP/step | step @ {_MFU.value:.0%} MFU |')
  lines = [header, '|---|---|---|---|---|---|---|---|---|---|']
  for m in rows:
    fits = 'yes' if m.fits(target.hbm_bytes) else ('**no** (compiler)' if m.refused else '**no**')
    seconds = m.flops / (len(target.devices) * peak * _MFU.value)
    lines.append(f'| {m.step} | {m.shape} | {_bytes(p.params_bytes)} | {_bytes(p.opt_bytes)} '
                 f'| {_bytes(m.temp_bytes)} | {_bytes(m.total_bytes)} '
                 f'| {m.total_bytes / target.hbm_bytes:.0%} | {fits} | {_flops(m.flops)} '
                 f'| {_seconds(seconds)} |')
  return lines


def decode_lines(cfg, steps, rows) -> list[str]:
  """One line per sampler program: collective bytes per decode step, weights per device."""
  rules = tuple(tuple(r) for r in cfg.mesh.decode_rules) or '() (the training layout)'
  lines = []
  for s, m in zip(steps, rows):
    if s.decode_weight_bytes and m.decode_step is not None:
      lines.append(f'{s.name}: collective bytes per decode step (per device) '
                   f'{collectives.describe(m.decode_step)}; weights while decoding '
                   f'{_bytes(s.decode_weight_bytes)} per device '
                   f'(config.mesh.decode_rules={rules})')
  return [''] + lines if lines else []


def search(p, main, first, target) -> str:
  """The largest batch of `main` that fits, found by compiling; each compile is printed."""
  def show(m):
    verdict = 'fits' if m.fits(target.hbm_bytes) else 'does not fit'
    print(f'  {main.name} {m.shape}: {_bytes(m.total_bytes)}, {verdict}', flush=True)

  good, bad = aot.largest_batch(p, main, target.hbm_bytes, first, _MAX_COMPILES.value, show)
  if bad is None:
    found = f'at least {good} rows (each batch tried fit; raise --max_compiles to go on)'
  elif bad - good > main.unit:
    found = f'{good} rows fit and {bad} do not (--max_compiles reached before the exact size)'
  else:
    found = f'{good} rows ({bad} do not)'
  return (f'largest batch of the {main.name} step ({main.batch_field}, a multiple of '
          f'{main.unit}): {found}.')


def report_stage(cfg, stage, target, mesh, peak) -> None:
  p = plan(cfg, stage, mesh, _DECODE_BATCH.value, _PROMPT_LEN.value)
  steps = [s for s in p.steps if not _STEPS.value or s.name.split()[-1] in _STEPS.value
           or s.name in _STEPS.value]
  t = config_lib.stage_train_config(cfg, stage)
  memory = f', loss_chunk {t.loss_chunk}' if stage in ('pretrain', 'sft') else ''
  lora_rank = int(cfg.lora.rank) if stage != 'pretrain' else 0
  trained = (f'M parameters, LoRA rank {lora_rank} adapters trained' if lora_rank
             else 'M trained parameters')
  print(f'\n### {stage}: {p.n_params / 1e6:,.1f}{trained}; mesh '
        f'{aot.mesh_text(mesh)}; remat {cfg.model.remat}{memory}\n', flush=True)
  rows = []
  for s in steps:
    start = time.perf_counter()
    rows.append(aot.measure(p, s))
    print(f'  compiled {s.name} ({rows[-1].shape}) in {time.perf_counter() - start:.0f} s',
          flush=True)
  print('\n'.join([''] + table(p, rows, target, peak) + decode_lines(cfg, steps, rows) + ['']),
        flush=True)
  main = next((s for s in steps if s.batch_field), None)
  if _SEARCH.value and main is not None:
    print('\n' + search(p, main, next(m for m in rows if m.step == main.name), target),
          flush=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  logging.set_verbosity(logging.WARNING)  # jax logs each backend it does not find at INFO
  jax.config.update('jax_threefry_partitionable', True)
  cfg = _CONFIG.value
  target = targets_lib.get(_TOPOLOGY.value)
  config_lib.validate(cfg, len(target.devices))
  mesh = sharding.make_mesh(cfg, target.devices)
  peak = peak_per_device(target, cfg)
  print(f'{_TOPOLOGY.value} = {target.what}; per device {_bytes(target.hbm_bytes)} memory, '
        f'{peak / 1e12:.4g} TFLOP/s peak')
  for stage in aot.stages_of(cfg, _STAGE.value):
    report_stage(cfg, stage, target, mesh, peak)


if __name__ == '__main__':
  errors.run(main, 'aot')
