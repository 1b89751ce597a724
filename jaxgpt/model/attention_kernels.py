"""Causal self-attention over whole rows (training, scoring): which kernel, and its glue.

`config.model.attention` names the kernel:

  xla     jax.nn.dot_product_attention's XLA path: a (b, n, t, s) score matrix; any device.
  cudnn   cuDNN flash attention (jax.nn.dot_product_attention(implementation='cudnn')):
          NVIDIA GPUs, bfloat16 / float16, head_dim a multiple of 8 up to 128, an even
          number of positions. Segment ids reach it as a (b, 1, t, t) mask (turned into
          a bias), which jax's public API offers; its packed-segment form is not public.
  splash  The Pallas TPU splash-attention kernel: blockwise, never materialises the
          scores, skips the blocks the causal mask empties. Off a TPU it runs in Pallas'
          interpreter (slow: for tests).
  auto    By the platform of the mesh's devices (the default backend without a mesh):
          splash on TPU, cudnn on GPU, xla otherwise, falling back to xla where the
          chosen kernel does not take the shape (logged with the reason).

Queries and keys carry shapes in their names: b rows, t positions, n query heads, k
key/value heads (GQA: query head j reads key/value head j // (n / k)), h head width.
The KV-cache decode path (`jaxgpt.model.kv_cache`) keeps its own attention.

Sliding windows. A layer's `window` (an int32 scalar, 0: global; traced inside a scan
over layers) lets position i see positions i - window + 1 .. i only. xla and cudnn take it
as a mask computed from the traced value; splash needs its mask at trace time, so it
builds a causal and a local kernel (window `sliding_window`, the one window size a model
has) and `lax.cond` picks one per layer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from absl import logging
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec as P

from jaxgpt import sharding
from jaxgpt import config as config_lib

KERNELS = config_lib.ATTENTION_KERNELS
SPLASH_BLOCK = 128   # splash tiles the sequence in blocks of a multiple of 128 (TPU lanes)
_logged = set()


def platform() -> str:
  """'tpu', 'gpu', 'cpu', ...: the devices the program being traced is for. A mesh of
  compile-only TPU devices (tools/aot.py) says 'tpu' on a CPU machine."""
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty and mesh.abstract_device is not None:
    return mesh.abstract_device.platform
  return jax.default_backend()


def choose(attention: str, platform_name: str, *, seq_len: int, head_dim: int,
           dtype) -> tuple[str, str]:
  """(kernel, why) for config.model.attention on a platform: 'xla', 'cudnn' or 'splash'."""
  if attention not in KERNELS:
    raise ValueError(f"config.model.attention='{attention}' must be one of {KERNELS}.")
  if attention != 'auto':
    return attention, f"config.model.attention='{attention}'"
  if platform_name == 'tpu':
    # Shorter rows are one block: padding them to 128 costs more than the XLA path.
    if seq_len < SPLASH_BLOCK:
      return 'xla', f'auto on TPU: {seq_len} positions, fewer than a splash block ({SPLASH_BLOCK})'
    return 'splash', 'auto on TPU'
  if platform_name in ('gpu', 'cuda'):
    if jnp.dtype(dtype) not in (jnp.dtype('bfloat16'), jnp.dtype('float16')):
      return 'xla', f'auto on GPU: cuDNN flash attention needs bfloat16 or float16, not {jnp.dtype(dtype)}'
    if head_dim % 8 or head_dim > 128:
      return 'xla', f'auto on GPU: cuDNN flash attention needs head_dim a multiple of 8 up to 128, not {head_dim}'
    if seq_len % 2:  # cuDNN's backward with a mask (segment ids) takes even lengths only
      return 'xla', f'auto on GPU: cuDNN flash attention needs an even number of positions, not {seq_len}'
    return 'cudnn', 'auto on GPU'
  return 'xla', f'auto on {platform_name}'


def _log_once(kernel: str, why: str, platform_name: str) -> None:
  if (kernel, why, platform_name) not in _logged:  # traced once per layer and per program
    _logged.add((kernel, why, platform_name))
    logging.info('attention kernel: %s (%s; platform %s)', kernel, why, platform_name)


def attend(q_btnh, k_btkh, v_btkh, segment_ids_bt, *, attention: str, rules=(), scale=None,
           window=None, sliding_window: int = 0):
  """Causal attention of every position over the earlier ones of its own segment (all
  of the row when `segment_ids_bt` is None) and, where `window` > 0, fewer than `window`
  positions back (`sliding_window`: the value it has there, for splash); scores times
  `scale` (None: 1/sqrt(h)). Returns y_btnh."""
  where = platform()
  kernel, why = choose(attention, where, seq_len=q_btnh.shape[1], head_dim=q_btnh.shape[-1],
                       dtype=q_btnh.dtype)
  _log_once(kernel, why, where)
  if kernel == 'splash':
    return splash_attention(q_btnh, k_btkh, v_btkh, segment_ids_bt, rules=rules,
                            interpret=where != 'tpu', scale=scale,
                            window=None if window is None else (window, sliding_window))
  mask = None
  if segment_ids_bt is not None:
    mask = (segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :])[:, None, :, :]
  if window is not None:
    i_t = jnp.arange(q_btnh.shape[1])
    reach = jnp.where(window > 0, window, q_btnh.shape[1])
    near_11tt = (i_t[:, None] - i_t[None, :] < reach)[None, None]
    mask = near_11tt if mask is None else mask & near_11tt
  return jax.nn.dot_product_attention(q_btnh, k_btkh, v_btkh, mask=mask, scale=scale,
                                      is_causal=True, implementation=kernel)


# -- splash ---------------------------------------------------------------------------

def _block(t: int) -> int:
  """The largest of 512 / 256 / 128 that divides t (a multiple of 128)."""
  return next(b for b in (512, 256, SPLASH_BLOCK) if t % b == 0)


def _splash_kernel(n_heads: int, t: int, interpret: bool, window: int = 0):
  """The splash kernel for one row: q (n, t, h), k and v (k, t, h), causal mask (with
  `window` > 0: each position sees itself and the window - 1 before it). Built at each
  trace (splash caches the mask's block tables; its arrays become constants of the
  program being traced, whatever devices that is for)."""
  b = _block(t)
  one = (splash.LocalMask((t, t), window_size=(window - 1, 0), offset=0) if window > 0
         else splash.CausalMask((t, t)))
  mask = splash.MultiHeadMask([one] * n_heads)
  sizes = splash.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b,
                            block_kv_dkv=b, block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
  return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                interpret=interpret)


def _splash_local(q_btnh, k_btkh, v_btkh, segment_ids_bt, window_and_size, interpret, scale):
  """Splash on the rows and heads this device holds (all of them without a mesh);
  `window_and_size` = (this layer's window (0: global), the model's window size) or None."""
  t, h = q_btnh.shape[1], q_btnh.shape[-1]
  # Pad the rows to whole blocks at the end: causal masking keeps every real query off
  # the padding, and the padded queries' outputs are cut off (so get no gradient).
  pad = -t % SPLASH_BLOCK
  widen = lambda x: jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))  # noqa: E731
  # splash does not scale the logits; scale q as jax.nn.dot_product_attention does.
  scale = h ** -0.5 if scale is None else scale
  q_bnth = widen(q_btnh * jnp.asarray(scale, q_btnh.dtype)).transpose(0, 2, 1, 3)
  k_bkth = widen(k_btkh).transpose(0, 2, 1, 3)
  v_bkth = widen(v_btkh).transpose(0, 2, 1, 3)
  seg_bt = None if segment_ids_bt is None else widen(segment_ids_bt.astype(jnp.int32))

  def rows(window):
    kernel = _splash_kernel(q_bnth.shape[1], t + pad, interpret, window)

    def one_row(q_nth, k_kth, v_kth, segment_ids_t):
      ids = None if segment_ids_t is None else splash.SegmentIds(q=segment_ids_t,
                                                                 kv=segment_ids_t)
      return kernel(q_nth, k_kth, v_kth, segment_ids=ids)

    return jax.vmap(one_row)(q_bnth, k_bkth, v_bkth, seg_bt)

  if window_and_size is None:
    y_bnth = rows(0)
  else:
    window, size = window_and_size
    y_bnth = jax.lax.cond(window > 0, lambda: rows(size), lambda: rows(0))
  return y_bnth.transpose(0, 2, 1, 3)[:, :t]


def splash_attention(q_btnh, k_btkh, v_btkh, segment_ids_bt=None, *, rules=(), interpret=False,
                     scale=None, window=None):
  """Splash attention; under a mesh, inside `jax.shard_map` (a Pallas kernel cannot be
  partitioned automatically): rows split as 'act_batch', heads as 'act_heads' /
  'act_kv_heads', every position of a row on one device. `window`: (this layer's window,
  0: global, may be traced; the model's window size, static) or None."""
  if window is None:
    layer_window, size = None, 0
  else:
    layer_window, size = jnp.asarray(window[0], jnp.int32), int(window[1])

  def local(q, k, v, seg, layer_window):
    pair = None if layer_window is None else (layer_window, size)
    return _splash_local(q, k, v, seg, pair, interpret, scale)

  if jax.sharding.get_abstract_mesh().empty:
    return local(q_btnh, k_btkh, v_btkh, segment_ids_bt, layer_window)
  spec = lambda *axes: sharding.logical_to_spec(axes, rules)  # noqa: E731
  q_spec = spec('act_batch', None, 'act_heads', None)
  kv_spec = spec('act_batch', None, 'act_kv_heads', None)
  seg_spec = P() if segment_ids_bt is None else spec('act_batch', None)
  # check_vma=False: pallas_call does not tell shard_map how its output varies.
  return jax.shard_map(local, in_specs=(q_spec, kv_spec, kv_spec, seg_spec, P()),
                       out_specs=q_spec, check_vma=False)(
                           q_btnh, k_btkh, v_btkh, segment_ids_bt, layer_window)
