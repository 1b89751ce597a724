"""The KV cache: its layout, writes in place, and attention over its filled part.

Layout. Keys and values are each (L, X, S, H): layers, X = B*K rows times key/value
heads (row-major: x = b*K + k), slots, head width; or, per layer, a tuple of L (X, S, H)
arrays. Attention reads each (row, head)'s slots as one contiguous run of S*H values,
and the matmuls see one batch dimension X, so the cache feeds them without a reshape
(a reshape of the freshly written buffer made XLA CPU duplicate the write and copy the
cache every step).

Writes in place. The cache rides in the carry of the loop over layers, so each layer's
write updates that one buffer (a loop that stacked per-layer outputs would build a fresh
copy every step); the write comes before the reads (XLA copies a buffer that is read
before an in-place update of it). Slots need not be positions:

* `slot=None`: row b's token t goes to slot `positions_bt[b, t]` (a scatter; rows may
  be at different positions);
* `slot` (an int32 scalar): every row writes slots slot .. slot+t-1, one
  dynamic-update-slice. The sampler leaves right-padded prompts where they are and
  appends every row's new tokens at one shared slot; `pad = (pad_start_b, pad_stop)`
  marks the padding slots [pad_start_b, pad_stop) of row b, which nothing attends to.

Either way a row's t new tokens take consecutive slots, and positions (RoPE, learned
position embeddings) come from `positions_bt`, so a key's slot never changes a score.
A sliding-window layer (window W) sees only keys fewer than W positions before the query:
a key's position is its slot, less the row's padding when the slot lies past it.

Reads. The stacked cache is read in blocks of `BLOCK` slots up to the newest slot any
query sees, with an online softmax (running max and sum in float32), so the cost follows
the filled length, not the allocated one; XLA on GPU / TPU reads a block inside the
matmul. On CPU a slice is a copy, so there the sampler keeps one cache per layer and
reads each whole (1x the allocated slots instead of ~3x the filled ones).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

BLOCK = 128  # slots per attention block of a stacked cache: amortises a loop step


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
  """Every layer's keys and values: k, v each one (L, B*K, S, H) array (stacked) or a
  tuple of L (B*K, S, H) arrays (per layer, for a loop over layers unrolled in Python)."""
  k: Any
  v: Any

  @property
  def per_layer(self) -> bool:
    return isinstance(self.k, tuple)


def zeros(n_layers: int, batch: int, n_kv_heads: int, length: int, head_dim: int,
          dtype, per_layer: bool = False) -> KVCache:
  shape = (batch * n_kv_heads, length, head_dim)
  if per_layer:
    return KVCache(tuple(jnp.zeros(shape, dtype) for _ in range(n_layers)),
                   tuple(jnp.zeros(shape, dtype) for _ in range(n_layers)))
  return KVCache(jnp.zeros((n_layers,) + shape, dtype), jnp.zeros((n_layers,) + shape, dtype))


def repeat_rows(cache: KVCache, times: int, n_kv_heads: int) -> KVCache:
  """Every row's keys and values `times` times in consecutive rows: row b becomes rows
  b*times .. b*times+times-1 (a prompt prefilled once for a group sampling it)."""
  def repeat(x):  # (..., B*K, S, H) -> (..., B*times*K, S, H)
    x = x.reshape(x.shape[:-3] + (-1, n_kv_heads) + x.shape[-2:])
    x = jnp.repeat(x, times, axis=-4)
    return x.reshape(x.shape[:-4] + (-1,) + x.shape[-2:])
  return jax.tree.map(repeat, cache)


@dataclasses.dataclass(frozen=True)
class LayerCache:
  """One layer's view of the cache during a forward (lives inside a trace).

  layer: which layer (an int, or an int32 scalar inside a scan over a stacked cache);
  slot, pad: see the module doc.
  """
  cache: KVCache
  layer: Any
  slot: Any = None
  pad: Any = None

  def write_and_attend(self, q_btnh, k_btkh, v_btkh, positions_bt, *, scale=None,
                       window=None):
    """(y_btnh, updated view): the new keys and values stored, then the attention of the
    new queries over the cache slots at or before their own (and, with `window` > 0, fewer
    than `window` positions back). `scale`: of the scores (None: 1 / sqrt(h))."""
    b, t = positions_bt.shape
    if self.slot is None:
      slots_bt = positions_bt.astype(jnp.int32)
    else:
      slots_bt = jnp.broadcast_to(self.slot + jnp.arange(t, dtype=jnp.int32), (b, t))
    cache = KVCache(self._put(self.cache.k, k_btkh, slots_bt),
                    self._put(self.cache.v, v_btkh, slots_bt))
    near = None if window is None else (positions_bt, window)
    y_btnh = attention(q_btnh, cache, self.layer, slots_bt, self.pad, scale=scale, near=near)
    return y_btnh, dataclasses.replace(self, cache=cache)

  def _put(self, c, x_btkh, slots_bt):
    if isinstance(c, tuple):
      c = list(c)
      c[self.layer] = self._put_one(c[self.layer], x_btkh, slots_bt, ())
      return tuple(c)
    return self._put_one(c, x_btkh, slots_bt, (jnp.asarray(self.layer, jnp.int32),))

  def _put_one(self, c, x_btkh, slots_bt, layer_index):
    b, t, k, h = x_btkh.shape
    x_xth = jnp.swapaxes(x_btkh, 1, 2).reshape(b * k, t, h).astype(c.dtype)
    if self.slot is not None:  # every row at the same slots: one dynamic-update-slice
      zero = jnp.zeros((), jnp.int32)
      start = layer_index + (zero, jnp.asarray(self.slot, jnp.int32), zero)
      return jax.lax.dynamic_update_slice(c, x_xth.reshape((1,) * len(layer_index) + x_xth.shape),
                                          start)
    rows_x1 = jnp.arange(b * k, dtype=jnp.int32)[:, None]
    slots_xt = jnp.repeat(slots_bt, k, axis=0)
    return c.at[layer_index + (rows_x1, slots_xt)].set(x_xth)


def _visible(keys_c, first_new, slots_bt, pad, near=None):
  """(B, T, C) bool: key slots this block adds (>= first_new: a clamped last block counts
  nothing twice), at or before the query's slot, outside the row's padding, and with
  `near = (positions_bt, window)` where the window is > 0, fewer than `window` positions
  before the query."""
  keys_11c = keys_c[None, None, :]
  ok_btc = (keys_11c >= first_new) & (keys_11c <= slots_bt[:, :, None])
  key_pos_b1c = keys_11c
  if pad is not None:
    pad_start_b, pad_stop = pad
    ok_btc &= (keys_11c < pad_start_b[:, None, None]) | (keys_11c >= pad_stop)
    # Slots past the padding hold positions pad_start_b onwards.
    key_pos_b1c = jnp.where(keys_11c >= pad_stop,
                            keys_11c - pad_stop + pad_start_b[:, None, None], keys_11c)
  if near is not None:
    positions_bt, window = near
    reach = jnp.where(window > 0, window, jnp.iinfo(jnp.int32).max)
    ok_btc &= positions_bt[:, :, None].astype(jnp.int32) - key_pos_b1c < reach
  return ok_btc


def attention(q_btnh, cache: KVCache, layer, slots_bt, pad=None, *, scale=None, near=None):
  """Softmax attention of the queries at `slots_bt` over layer `layer` of the cache: the
  slots at or before each query's own, outside the row's `pad` (and inside the window of
  `near`, see `_visible`), scores times `scale` (None: 1 / sqrt(h)). Query heads are
  grouped over the K key/value heads (GQA); scores, the running max / sum and the output
  sum are float32."""
  b, t, n, h = q_btnh.shape
  keys = cache.k[layer] if cache.per_layer else cache.k
  x, s = keys.shape[-3], keys.shape[-2]
  k = x // b
  g = n // k
  c = s if cache.per_layer else min(BLOCK, s)
  # Queries grouped by (row, kv head): (B*K, G*T, H).
  q_xqh = jnp.transpose(q_btnh.reshape(b, t, k, g, h), (0, 2, 3, 1, 4)).reshape(x, g * t, h)
  q_xqh = q_xqh.astype(keys.dtype)
  scale = h ** -0.5 if scale is None else scale

  def read(start):
    if cache.per_layer:  # the layer's own buffers, whole: no slice to copy
      return cache.k[layer], cache.v[layer]
    zero = jnp.zeros((), jnp.int32)
    at = (jnp.asarray(layer, jnp.int32), zero, start, zero)
    return (jax.lax.dynamic_slice(cache.k, at, (1, x, c, h))[0],
            jax.lax.dynamic_slice(cache.v, at, (1, x, c, h))[0])

  def block(i, carry):
    m_xq, l_xq, acc_xqh = carry
    start = jnp.minimum(i * c, s - c)  # dynamic_slice would clamp the same way
    k_xch, v_xch = read(start)
    s_xqc = jnp.einsum('xqh,xch->xqc', q_xqh, k_xch, preferred_element_type=jnp.float32) * scale
    ok_btc = _visible(start + jnp.arange(c, dtype=jnp.int32), i * c, slots_bt, pad, near)
    ok_xqc = jnp.broadcast_to(ok_btc[:, None, None], (b, k, g, t, c)).reshape(x, g * t, c)
    s_xqc = jnp.where(ok_xqc, s_xqc, -jnp.inf)
    m_new_xq = jnp.maximum(m_xq, s_xqc.max(axis=-1))
    p_xqc = jnp.exp(s_xqc - m_new_xq[..., None])  # exp(-inf) = 0 where not visible
    correction_xq = jnp.exp(m_xq - m_new_xq)
    l_xq = l_xq * correction_xq + p_xqc.sum(axis=-1)
    pv_xqh = jnp.einsum('xqc,xch->xqh', p_xqc.astype(v_xch.dtype), v_xch,
                        preferred_element_type=jnp.float32)
    return m_new_xq, l_xq, acc_xqh * correction_xq[..., None] + pv_xqh

  # A finite floor, not -inf, so that a block with nothing visible yet gives exp(0) = 1
  # corrections instead of NaN. Slot 0 is visible to every query but a sliding-window
  # one's; such a query in a row's prompt padding may see nothing (l = 0, see below).
  init = (jnp.full((x, g * t), jnp.finfo(jnp.float32).min, jnp.float32),
          jnp.zeros((x, g * t), jnp.float32), jnp.zeros((x, g * t, h), jnp.float32))
  if c == s:  # one block, no loop (a loop whose slice XLA hoists would copy the cache)
    _, l_xq, acc_xqh = block(0, init)
  else:
    n_blocks = jnp.max(slots_bt) // c + 1
    _, l_xq, acc_xqh = jax.lax.fori_loop(0, n_blocks, block, init)
  y_xqh = acc_xqh / l_xq[..., None]
  if near is not None:  # a padding query that sees nothing: 0, not NaN (its keys and
    y_xqh = jnp.where(l_xq[..., None] > 0, y_xqh, 0.0)  # values feed no real query)
  y_bkgth = y_xqh.reshape(b, k, g, t, h)
  return jnp.transpose(y_bkgth, (0, 3, 1, 2, 4)).reshape(b, t, n, h).astype(q_btnh.dtype)
