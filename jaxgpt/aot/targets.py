"""Where a run could go: a TPU slice by its Cloud name, compiled for without the hardware,
or the devices this process sees.

A TPU slice needs the `libtpu` package (`pip install -e '.[tpu-aot]'`): JAX then builds a
compile-only description of the slice (`jax.experimental.topologies`) whose devices a
mesh can be made of, and `jit(...).lower(...).compile()` compiles for that chip on a CPU
machine. Slice names follow Google Cloud: v5e / v6e count chips, v2 / v3 / v4 / v5p count
TensorCores (two a chip). Memory and FLOPs are per JAX device: a chip, except on v2 / v3
where JAX shows each core as a device with half the chip's memory.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import math
import os
import re

import jax

from jaxgpt import config as config_lib

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Family:
  """One TPU generation (its FAMILIES key is libtpu's name) and what a device of it has."""
  dims: int                   # 3: a 3-D torus (v4, v5p); 2: a 2-D one
  cores_in_name: bool         # the slice name counts TensorCores (two a chip), not chips
  hbm_gib: float              # usable HBM per device, as libtpu's compiler reports it
  peak_tflops: float          # bf16 dense peak per device (Google's published figure)
  chip_config: str = ''       # libtpu chip config: megacore (one device a chip) on v4 / v5p / v6e
  core_devices: bool = False  # v2 / v3: each TensorCore is a device


FAMILIES = {
    'v2': Family(2, True, 7.48, 22.5, core_devices=True),
    'v3': Family(2, True, 15.48, 61.5, core_devices=True),
    'v4': Family(3, True, 30.75, 275.0, chip_config='megacore'),
    'v5p': Family(3, True, 95.74, 459.0, chip_config='megachip_tccontrol'),
    'v5e': Family(2, False, 15.75, 197.0),
    'v6e': Family(2, False, 31.25, 918.0, chip_config='megachip_tccontrol'),
}
EXAMPLES = ('v5p-8', 'v5e-8', 'v6e-8', 'v4-8', 'v2-8', 'v5e-1', 'v6e-1')


@dataclasses.dataclass(frozen=True)
class Target:
  """Devices to compile for and what one of them holds."""
  name: str                   # 'v5p-8', or 'local' for this process's devices
  devices: tuple              # jax devices (compile-only ones for a TPU slice)
  device_kind: str
  hbm_bytes: float            # memory of one device
  peak_flops: float           # per device; 0 when unknown
  what: str                   # e.g. 'v5p:2x2x1: 4 x TPU v5'


def slice_shape(family: Family, chips: int) -> tuple[int, ...]:
  """The torus of `chips` chips the way Cloud lays it out: from 2x2(x1), double the
  smallest side (the last of equals) until it holds them all."""
  if chips == 1:
    return (1,) * family.dims
  shape = [2, 2] + [1] * (family.dims - 2)
  while math.prod(shape) < chips:
    smallest = min(shape)
    i = max(j for j, s in enumerate(shape) if s == smallest)
    shape[i] *= 2
  if math.prod(shape) != chips:
    raise config_lib.ConfigError(f'--topology: {chips} chips is not a TPU slice size (1 or a '
                                 'power of two from 4).')
  return tuple(shape)


def libtpu_installed() -> bool:
  return importlib.util.find_spec('libtpu') is not None


def _quiet_libtpu(name: str) -> None:
  """On a machine without TPUs, tell libtpu what it would ask the TPU VM's metadata
  server (it warns about each at length otherwise; compiling does not depend on them),
  and let several processes compile at once (libtpu locks the TPU, and there is none)."""
  if glob.glob('/dev/accel*') or glob.glob('/dev/vfio/[0-9]*'):
    return  # a TPU VM: libtpu finds its own
  os.environ.setdefault('TPU_ACCELERATOR_TYPE', name)
  os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')


def tpu_target(name: str) -> Target:
  """Compile-only devices of a Cloud TPU slice such as 'v5p-8'."""
  match = re.fullmatch(r'(v\d[a-z]?)-(\d+)', name)
  family = FAMILIES.get(match.group(1)) if match else None
  if family is None:
    raise config_lib.ConfigError(
        f"--topology={name!r}: not a TPU slice name like {', '.join(EXAMPLES)}, nor 'local'.")
  n = int(match.group(2))
  chips = n // 2 if family.cores_in_name else n
  if chips < 1 or (family.core_devices and n != 8):
    raise config_lib.ConfigError(f'--topology={name}: {match.group(1)} slices here are '
                                 f"{match.group(1)}-8{'' if family.core_devices else ' and up'}.")
  shape = slice_shape(family, chips)
  topology = f'{match.group(1)}:{"x".join(map(str, shape))}'
  kwargs = {}
  if family.chip_config:
    kwargs['chip_config_name'] = family.chip_config
  if chips <= 8 and family.dims == 2:  # one host holds up to 8 chips of a 2-D slice
    kwargs['chips_per_host_bounds'] = shape + (1,)
  if not libtpu_installed():
    raise config_lib.ConfigError(
        f"--topology={name} needs libtpu to compile for a TPU: pip install -e '.[tpu-aot]'.")
  _quiet_libtpu(name)
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  devices = topologies.get_topology_desc(platform='tpu', topology_name=topology,
                                         **kwargs).devices
  return Target(name=name, devices=tuple(devices), device_kind=devices[0].device_kind,
                hbm_bytes=family.hbm_gib * GIB, peak_flops=family.peak_tflops * 1e12,
                what=f'{topology}: {len(devices)} x {devices[0].device_kind}')


# bf16 dense peak per device for GPUs one rents (published figures), by device_kind prefix.
_GPU_PEAK_TFLOPS = (('NVIDIA H200', 989.0), ('NVIDIA H100', 989.0), ('NVIDIA A100', 312.0),
                    ('NVIDIA L4', 121.0), ('NVIDIA A10', 125.0), ('Tesla T4', 65.0))


def _host_memory_bytes() -> float:
  return float(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES'))


def local_target(devices=None) -> Target:
  """This process's devices; their memory from the runtime (the host's RAM, split evenly,
  for CPU devices) and their peak from the table above (0 when it does not know them)."""
  devices = tuple(devices if devices is not None else jax.devices())
  d = devices[0]
  stats = d.memory_stats() if d.platform != 'cpu' else None
  if stats and stats.get('bytes_limit'):
    hbm = float(stats['bytes_limit'])
  else:  # CPU devices share the host's memory (emulated ones split it)
    hbm = _host_memory_bytes() / sum(1 for x in devices if x.process_index == d.process_index)
  peak = next((t * 1e12 for prefix, t in _GPU_PEAK_TFLOPS if d.device_kind.startswith(prefix)),
              0.0)
  kind = d.device_kind if d.device_kind == d.platform else f'{d.device_kind} ({d.platform})'
  return Target(name='local', devices=devices, device_kind=d.device_kind, hbm_bytes=hbm,
                peak_flops=peak, what=f'{len(devices)} x {kind}')


def get(name: str) -> Target:
  """'local' (or '') -> this process's devices; else a TPU slice name."""
  return local_target() if name in ('', 'local') else tpu_target(name)
