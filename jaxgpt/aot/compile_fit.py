"""Fit before you pay: compile a stage's programs for some devices, without running them.

`measure` compiles one program (`jaxgpt.aot.plans.Step`) and reads the compiler's memory
analysis: per device, the arguments, outputs and temporaries of the program, plus the
long-lived state it does not take as an argument (the eval step does not take the
optimizer state, yet it stays in memory). A TPU compiler refuses a program that exceeds
the chip's memory; that refusal is read as "does not fit" with the size it reports.
`largest_batch` searches, by compiling, for the most rows the stage's main step fits.

`check_fits(cfg)` is the check a run makes before it allocates anything: it raises
`DoesNotFit` (a ConfigError: one line) when the parameters and optimizer state alone
exceed a device's memory (arithmetic only), or when the compiled train step does.

For the sampler's programs it also reads the collectives of one decode step from the
compiled HLO (`jaxgpt.aot.collectives`): the bytes the per-token loop moves between devices,
which the decode layout (config.mesh.decode_rules) exists to cut.

FLOPs are analytic (6 N per token plus attention, `jaxgpt.train.metrics.flops_per_token`):
XLA's cost analysis counts a scanned layer once.
"""

from __future__ import annotations

import dataclasses
import re

from jaxgpt import sharding
from jaxgpt import config as config_lib
from jaxgpt.aot import collectives
from jaxgpt.aot import targets as targets_lib
from jaxgpt.aot.plans import Plan, Step, plan
from jaxgpt.stages import RECIPE

GIB = targets_lib.GIB


class DoesNotFit(config_lib.ConfigError):
  """The run needs more memory per device than a device has; the message says how much."""


@dataclasses.dataclass
class Measured:
  """One compiled program, per device."""
  step: str
  rows: int
  shape: str
  argument_bytes: float        # what the compiler counts for the arguments
  temp_bytes: float
  total_bytes: float           # arguments + outputs not aliased to them + temporaries +
                               # code + long-lived state outside the arguments
  flops: float                 # model FLOPs of one call, all devices
  refused: str = ''            # the compiler's out-of-memory message, when it refused
  decode_step: collectives.Collectives | None = None  # a sampler's: one decode step's

  def fits(self, hbm_bytes: float) -> bool:
    return not self.refused and self.total_bytes <= hbm_bytes


_UNITS = {'K': 2 ** 10, 'M': 2 ** 20, 'G': 2 ** 30, 'T': 2 ** 40}
# What libtpu says when a program does not fit, e.g. "... the total memory required for
# HLO temporaries (226.15G) exceeds available HBM (95.74G)." or "Used 120.5G of 95.7G hbm".
_TEMPS_NEEDED = re.compile(r'required for HLO temporaries \(([\d.]+)([KMGT])')
_USED = re.compile(r'Used ([\d.]+)([KMGT]) of ([\d.]+)([KMGT]) hbm')


def _refusal(message: str):
  """(temporaries bytes or None, total bytes or None) from an out-of-memory compile error;
  None when the error is something else."""
  if 'RESOURCE_EXHAUSTED' not in message and 'out of memory' not in message.lower():
    return None
  temps, used = _TEMPS_NEEDED.search(message), _USED.search(message)
  if temps:
    return float(temps.group(1)) * _UNITS[temps.group(2)], None
  if used:
    return None, float(used.group(1)) * _UNITS[used.group(2)]
  return None


def measure(p: Plan, step: Step, rows: int | None = None) -> Measured:
  """Compiles `step` for `rows` (default: the stage's own) and reads its memory."""
  rows = rows or step.rows
  outside = p.state_bytes - step.state_bytes  # long-lived state it does not take
  lowered = step.lower(rows)
  base = {'step': step.name, 'rows': rows, 'shape': step.shape(rows), 'flops': step.flops(rows)}
  try:
    compiled = lowered.compile()
  except Exception as e:  # pylint: disable=broad-except  (the runtime's error type varies)
    refusal = _refusal(str(e))
    if refusal is None:
      raise
    temps, used = refusal
    line = next((x for x in str(e).splitlines() if 'memory' in x.lower()), str(e))[:300]
    base.update(argument_bytes=step.state_bytes, refused=line)
    if used is not None:
      return Measured(temp_bytes=0.0, total_bytes=used + outside, **base)
    return Measured(temp_bytes=temps, total_bytes=p.state_bytes + temps, **base)
  m = compiled.memory_analysis()
  total = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes +
           m.temp_size_in_bytes + m.generated_code_size_in_bytes + outside)
  if step.decode_weight_bytes:
    base['decode_step'] = collectives.decode_step_bytes(compiled)
  return Measured(argument_bytes=float(m.argument_size_in_bytes),
                  temp_bytes=float(m.temp_size_in_bytes), total_bytes=float(total), **base)


def largest_batch(p: Plan, step: Step, hbm_bytes: float, first: Measured,
                  max_compiles: int = 8, on_measure=None) -> tuple[int, int | None]:
  """(most rows that fit, fewest that did not or None) for `step`, by compiling: doubling
  from the stage's batch (or halving, when it does not fit), then bisecting to a multiple
  of `step.unit`. Stops after `max_compiles` compiles, so the bounds may be wider.
  `on_measure(Measured)` sees each compile's result."""
  unit = step.unit
  good, bad = (first.rows, None) if first.fits(hbm_bytes) else (0, first.rows)
  compiles = 0

  def fits(rows):
    nonlocal compiles
    compiles += 1
    m = measure(p, step, rows)
    if on_measure is not None:
      on_measure(m)
    return m.fits(hbm_bytes)

  while compiles < max_compiles:
    if bad is None:                       # still doubling
      rows = good * 2
      if rows > 2 ** 20:
        break
    elif good == 0 and bad > unit:        # halving down to a batch that fits
      rows = max(unit, bad // 2 // unit * unit)
    else:                                 # bisecting
      rows = (good + bad) // 2 // unit * unit
      if rows <= good:
        break
    if fits(rows):
      good = rows
    else:
      bad = rows
    if good == 0 and bad == unit:
      break
  return good, bad


def stages_of(cfg, stage: str | None = None) -> tuple[str, ...]:
  stage = stage or cfg.stage
  return (tuple(cfg.recipe) or RECIPE) if stage == 'all' else (stage,)


def mesh_text(mesh) -> str:
  return ' '.join(f'{k}={v}' for k, v in mesh.shape.items())


def _need_line(p: Plan, m: Measured, target, cfg) -> str:
  what = (f"{p.stage}'s {m.step} step ({m.shape}) needs {m.total_bytes / GIB:.1f} GiB per "
          f'device (parameters {p.params_bytes / GIB:.1f}, optimizer state '
          f'{p.opt_bytes / GIB:.1f}, temporaries {m.temp_bytes / GIB:.1f})')
  step = next(s for s in p.steps if s.name == m.step)
  hints = []
  if step.batch_field:
    hints.append(f'lower {step.batch_field}')
  if p.stage in ('pretrain', 'sft') and not cfg.train.loss_chunk:
    hints.append('set config.train.loss_chunk (e.g. 512)')
  if cfg.model.remat != 'full':
    hints.append("set config.model.remat='full'")
  hints.append('use more devices')
  return (f'{what}, more than the {target.hbm_bytes / GIB:.1f} GiB of a device here '
          f'({target.what}); ' + ', '.join(hints) + '.')


def check_fits(cfg, devices=None, *, compile_steps: bool | None = None,
               stage: str | None = None) -> list[Measured]:
  """Raise `DoesNotFit` (one line) if config.stage (each stage of 'all') cannot fit the
  devices (default: all of them), before anything is allocated. First by arithmetic:
  parameters + optimizer state per device. Then, when `compile_steps` (default: on
  accelerators, not CPU, where compiling costs more than it tells), by compiling each
  stage's main step. Returns what it compiled."""
  target = targets_lib.local_target(devices)
  config_lib.validate(cfg, len(target.devices))
  mesh = sharding.make_mesh(cfg, target.devices)
  if compile_steps is None:
    compile_steps = target.devices[0].platform != 'cpu'
  out = []
  for name in stages_of(cfg, stage):
    p = plan(cfg, name, mesh)
    if p.state_bytes > target.hbm_bytes:
      raise DoesNotFit(
          f'{name} needs {p.state_bytes / GIB:.1f} GiB per device for parameters and optimizer '
          f'state alone ({p.n_params / 1e9:.2f}B parameters, mesh {mesh_text(mesh)}), more '
          f'than the {target.hbm_bytes / GIB:.1f} GiB of a device here ({target.what}); use '
          'more devices or a smaller model.')
    if compile_steps:
      m = measure(p, p.steps[0])
      if not m.fits(target.hbm_bytes):
        raise DoesNotFit(_need_line(p, m, target, cfg))
      out.append(m)
  return out
