"""Console progress, DIR/<stage>/metrics.jsonl, TensorBoard events; tokens/s and MFU.

MFU = achieved model FLOP/s / peak FLOP/s. Model FLOPs are analytic (XLA's
cost_analysis counts a scanned layer once): 6 N per token for the matmuls of the
forward and backward passes (4 for a frozen parameter under LoRA; the output head only
on the positions that have a loss) plus 12 L d_attn T per token for attention scores
and values (PaLM, appendix B). The peak is config.train.peak_flops per device, or
measured at start with a large matmul on all local devices at once.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np


def flops_per_token(mcfg, seq_len: int, n_params: int, *, trained_params: int | None = None,
                    head_positions: int = 0) -> float:
  """Training FLOPs per token: 6 N (non-embedding-lookup params) + attention (over the
  whole row, or over its window in a sliding-window layer).

  trained_params: with LoRA, the adapters' count; every other parameter (the output head
  too) is frozen and costs 4 a token, not 6: the forward and the input's gradient, no
  weight gradient. head_positions: the positions of a row the output head runs on
  (config.train.loss_positions; 0: all)."""
  lookup = 0 if mcfg.tied else mcfg.padded_vocab_size * mcfg.d_model
  matmul_params = n_params - lookup  # a tied table is also the output matmul
  per_param = 6 if trained_params is None else 4
  matmuls = per_param * matmul_params + (6 - per_param) * (trained_params or 0)
  if 0 < head_positions < seq_len:
    matmuls -= per_param * mcfg.padded_vocab_size * mcfg.d_model * (1 - head_positions / seq_len)
  windows = mcfg.layer_windows or (0,) * mcfg.n_layers
  keys = sum(min(w, seq_len) if w else seq_len for w in windows)
  attn = 12 * mcfg.n_heads * mcfg.head_dim * keys
  return matmuls + attn


def measure_peak_flops(dtype=jnp.float32, n: int = 1024, repeats: int = 5) -> float:
  """FLOP/s of a batched matmul spread over every local device (all cores busy)."""
  devices = jax.local_devices()
  mesh = jax.make_mesh((len(devices),), ('d',), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=devices)
  sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('d'))
  a = jax.device_put(jnp.ones((len(devices), n, n), dtype), sh)
  # Summed in float32 as the model's projections are (layers.einsum_f32_sums): a bf16
  # result would run XLA:CPU's float32 dot, not its bf16 one, and read as a low peak.
  f = jax.jit(lambda a: jnp.einsum('bij,bjk->bik', a, a,
                                   preferred_element_type=jnp.float32).astype(dtype),
              out_shardings=sh)
  f(a).block_until_ready()
  best = math.inf
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2 * n ** 3 * len(devices) / best


def human_bytes(x: float) -> str:
  """e.g. '12.6 GiB', '51.2 MiB': the largest unit of which x is at least a tenth."""
  for unit, scale in (('GiB', 2 ** 30), ('MiB', 2 ** 20), ('KiB', 2 ** 10)):
    if x >= 0.1 * scale:
      return f'{x / scale:.1f} {unit}'
  return f'{x:.0f} B'


def _fmt_time(seconds: float) -> str:
  seconds = int(seconds)
  if seconds >= 3600:
    return f'{seconds // 3600}h{seconds % 3600 // 60:02d}m'
  return f'{seconds // 60}m{seconds % 60:02d}s'


def drop_rows_after(path: str, step: int) -> None:
  """Removes the rows of a JSONL log whose 'step' is past `step`: a run that stopped
  after logging them but before its next checkpoint redoes those steps on resume, so
  each step is logged once. A torn last line (a kill mid-write) goes too."""
  if not os.path.exists(path):
    return
  with open(path, 'rb') as f:
    lines = f.readlines()

  def kept(line: bytes) -> bool:
    try:
      return int(json.loads(line)['step']) <= step
    except (ValueError, KeyError, TypeError):
      return False

  keep = [line for line in lines if kept(line)]
  if len(keep) == len(lines):
    return
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'wb') as f:
    f.writelines(keep)
  os.replace(tmp, path)  # atomic: a kill now leaves the old or the new file


class MetricsWriter:
  """Writes one JSON object per log step (and per evaluation) and a progress line.

  Only process 0 writes files; every process keeps quiet otherwise. A run resumed at
  `start_step` first drops what an earlier attempt logged after it (metrics.jsonl,
  samples.jsonl; TensorBoard hides those events through its purge step), so every
  step appears once.
  """

  def __init__(self, directory: str, *, stage: str, total_steps: int, start_step: int):
    self.stage = stage
    self.total_steps = total_steps
    self.start_step = start_step
    self.start_time = time.monotonic()
    self.is_main = jax.process_index() == 0
    self._tb = None
    self._jsonl = None
    self._samples = None  # samples.jsonl, opened at the first sample (no empty files)
    self._directory = directory
    if self.is_main:
      os.makedirs(directory, exist_ok=True)
      for name in ('metrics.jsonl', 'samples.jsonl'):
        drop_rows_after(os.path.join(directory, name), start_step)
      self._jsonl = open(os.path.join(directory, 'metrics.jsonl'), 'a', encoding='utf-8')
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
      self._tb = SummaryWriter(directory, purge_step=start_step + 1)

  def write(self, step: int, metrics: dict) -> None:
    if not self.is_main:
      return
    row = {'step': int(step)}
    for k, v in metrics.items():
      v = float(np.asarray(v))
      row[k] = v
      self._tb.add_scalar(f'{self.stage}/{k}', v, step)
    self._jsonl.write(json.dumps(row) + '\n')
    self._jsonl.flush()

  def progress(self, step: int, metrics: dict, show: tuple[str, ...] = ()) -> None:
    """One console line: bar, loss, tokens/s, MFU, the `show` metrics, ETA."""
    if not self.is_main:
      return
    done = step - self.start_step
    elapsed = time.monotonic() - self.start_time
    eta = elapsed / max(done, 1) * (self.total_steps - step)
    width = 20
    filled = int(width * step / max(self.total_steps, 1))
    bar = '#' * filled + '.' * (width - filled)
    parts = [f'[{self.stage}] {step:>6d}/{self.total_steps} [{bar}]']
    if 'loss' in metrics:
      parts.append(f'loss {float(metrics["loss"]):.4f}')
    if 'tokens_per_sec' in metrics:
      parts.append(f'{float(metrics["tokens_per_sec"]):,.0f} tok/s')
    if 'mfu' in metrics:
      parts.append(f'MFU {100 * float(metrics["mfu"]):.1f}%')
    parts += [f'{k} {float(metrics[k]):.3g}' for k in show if k in metrics]
    parts.append(f'ETA {_fmt_time(eta)}')
    print(' | '.join(parts), flush=True)

  def log_text(self, line: str) -> None:
    if self.is_main:
      print(line, flush=True)

  def samples(self, step: int, pairs: list[tuple[str, str]]) -> None:
    """Sample completions: printed, and kept in samples.jsonl."""
    if not self.is_main:
      return
    if self._samples is None:
      self._samples = open(os.path.join(self._directory, 'samples.jsonl'), 'a', encoding='utf-8')
    for prompt, completion in pairs:
      print(f'  > {prompt!r} -> {completion!r}', flush=True)
      self._samples.write(json.dumps({'step': step, 'prompt': prompt,
                                      'completion': completion}) + '\n')
      self._tb.add_text(f'{self.stage}/samples', f'{prompt} → {completion}', step)
    self._samples.flush()

  def close(self) -> None:
    if self.is_main:
      self._jsonl.close()
      if self._samples is not None:
        self._samples.close()
      self._tb.close()
    sys.stdout.flush()
