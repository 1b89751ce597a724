"""Where a compiled program's time goes: `jax.profiler` traces summed by kernel kind.

    kernel_profile.prepare(logdir)   # before JAX starts its backend
    ...
    kernel_profile.traced(run_once, f'{logdir}/step', 'one step')  # prints its top kernels

XLA:CPU records its kernels in a trace only with `--xla_cpu_enable_xprof_traceme=true`
(GPU and TPU traces carry theirs anyway). A kernel's kind is its HLO name without the
numeric suffix (`loop_add_fusion.12` -> `loop_add_fusion`), so the thirty layers' copies
of one fusion add up to one row. Seconds are summed over every thread that ran a kernel:
on a 2-core CPU a fully parallel second counts twice.
"""

from __future__ import annotations

import collections
import glob
import os
import re

import jax

CPU_TRACE_FLAG = '--xla_cpu_enable_xprof_traceme=true'


def prepare(logdir: str):
  """Make `logdir` now (a folder that cannot be made fails before any work, as an OSError
  naming it) and ask XLA:CPU to record each kernel in profiler traces, which takes effect
  only if JAX has not yet started its backend (XLA reads its flags once)."""
  os.makedirs(logdir, exist_ok=True)
  flags = os.environ.get('XLA_FLAGS', '')
  if CPU_TRACE_FLAG not in flags:
    os.environ['XLA_FLAGS'] = f'{flags} {CPU_TRACE_FLAG}'.strip()


def kernel_kind(hlo_op: str) -> str:
  return re.sub(r'\.\d+$', '', hlo_op)


def seconds_by_kind(logdir: str) -> list[tuple[str, float, int]]:
  """(kind, seconds, kernels) of every kernel in the traces under `logdir`, most seconds
  first."""
  paths = glob.glob(os.path.join(logdir, '**', '*.xplane.pb'), recursive=True)
  if not paths:
    raise FileNotFoundError(f'no profiler trace (*.xplane.pb) under {logdir}')
  seconds, counts = collections.Counter(), collections.Counter()
  for path in paths:
    for plane in jax.profiler.ProfileData.from_file(path).planes:
      for line in plane.lines:
        for event in line.events:
          op = dict(event.stats).get('hlo_op')
          if op is None:
            continue
          kind = kernel_kind(op)
          seconds[kind] += event.duration_ns * 1e-9
          counts[kind] += 1
  return [(kind, s, counts[kind]) for kind, s in seconds.most_common()]


def print_top(rows: list[tuple[str, float, int]], top: int = 10, title: str = 'kernels'):
  """The `top` kinds and the total, as a table of thread-seconds and shares."""
  total = sum(s for _, s, _ in rows) or 1.0
  print(f'{title}: top {min(top, len(rows))} of {len(rows)} kernel kinds '
        f'(thread-seconds, summed over threads)')
  print(f'{"kind":48s} {"seconds":>8s} {"share":>6s} {"kernels":>8s}')
  for kind, s, n in rows[:top]:
    print(f'{kind[:48]:48s} {s:8.3f} {100 * s / total:5.1f}% {n:8d}')
  print(f'{"all kernels":48s} {total:8.3f} {100.0:5.1f}% {sum(n for *_, n in rows):8d}')


def traced(fn, logdir: str, title: str):
  """fn() once under `jax.profiler.trace(logdir)`, then its top kernel kinds printed;
  returns fn's output."""
  with jax.profiler.trace(logdir):
    out = jax.block_until_ready(fn())
  print_top(seconds_by_kind(logdir), title=title)
  return out
