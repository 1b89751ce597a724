"""Test set-up: a CPU mesh of 8 emulated devices, set before JAX is imported."""

import os

# LLVM optimisation level 0 compiles the tiny test programs 3-4x faster; they are too
# small for run time to matter.
os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
    ' --xla_backend_optimization_level=0').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402

jax.config.update('jax_threefry_partitionable', True)
