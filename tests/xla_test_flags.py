"""XLA flags of every CPU program the tests compile, in-process (conftest.py) and in the
command lines they launch. No JAX import here: conftest.py sets them before JAX starts.

LLVM optimisation level 0 and XLA:CPU's element-wise emitters in place of its newer MLIR
fusion emitters compile the tiny test programs several times faster (the emitters alone:
a sharded train step's compile 1.5x); the programs are too small for run time to matter.
"""

FAST_COMPILE = '--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false'


def flags(devices: int | None = None) -> str:
  """XLA_FLAGS for a process with `devices` emulated CPU devices (None: one)."""
  count = f' --xla_force_host_platform_device_count={devices}' if devices else ''
  return FAST_COMPILE + count
