"""Building blocks of the decoder: projections, norms, attention, MLP, block.

What a block computes is decided by the switches of `ModelConfig` (see
`jaxgpt.model.families`: norm kind and placement, q/k norms, biases, MLP gating and
activation, attention scale, a per-layer attention window), never by the family's name.

Every parameter carries logical axis names (`sharding_names`); `jaxgpt.sharding`
maps them to mesh axes through the rules table in the config. Shapes are in the
names: b batch, t query positions, s key positions, d model width, n query heads,
k key/value heads, h head width, f MLP width, v vocabulary. Projection outputs carry
`checkpoint_name`s (PROJ_NAMES) that remat policies can save by name.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jaxgpt import sharding
from jaxgpt.model import attention_kernels
from jaxgpt.model import rope

# Parameters are created unsharded and placed by jit(out_shardings=...) in
# jaxgpt.model.init, so flax must not try to shard them eagerly at creation.
nnx.use_eager_sharding(False)


# Every projection output a block names (for jax.checkpoint_policies.save_only_these_names).
PROJ_NAMES = ('attn_q_proj', 'attn_k_proj', 'attn_v_proj', 'attn_out_proj', 'mlp_gate_proj',
              'mlp_up_proj', 'mlp_down_proj')


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def einsum_f32_sums(eqn: str, x, w):
  """jnp.einsum of two low-precision (bf16) operands, summed in float32 and rounded back
  to x's dtype; its two gradients are computed the same way. XLA:CPU runs a bf16 dot on
  the matrix units (AMX) only when asked for a float32 result: a bf16 result, or the
  float32 cotangent jax's own transpose of a float32 result would feed the backward dots,
  turns it into a float32 dot ~4x slower. GPUs and TPUs sum in float32 inside the dot
  anyway, so this changes nothing there. Every letter of x must be in w or the output."""
  return jnp.einsum(eqn, x, w, preferred_element_type=jnp.float32).astype(x.dtype)


def _einsum_fwd(eqn, x, w):
  return einsum_f32_sums(eqn, x, w), (x, w)


def _einsum_bwd(eqn, residuals, g):
  x, w = residuals
  operands, out = eqn.split('->')
  x_letters, w_letters = operands.split(',')
  f32 = jnp.float32
  dx = jnp.einsum(f'{out},{w_letters}->{x_letters}', g, w, preferred_element_type=f32)
  dw = jnp.einsum(f'{x_letters},{out}->{w_letters}', x, g, preferred_element_type=f32)
  return dx.astype(x.dtype), dw.astype(w.dtype)


einsum_f32_sums.defvjp(_einsum_fwd, _einsum_bwd)


def _param(rngs, shape, axes, std, dtype):
  if std == 'ones':
    value = jnp.ones(shape, dtype)
  elif std == 0.0:
    value = jnp.zeros(shape, dtype)
  else:
    value = std * jax.random.normal(rngs.params(), shape, dtype)
  return nnx.Param(value, out_sharding=axes)


def kernel_inputs(eqn: str) -> int:
  """How many leading kernel dims `eqn` contracts, for a projection 'lead+in,in+out ->
  lead+out' ('btNh,Nhd->btd': 2); anything else is refused."""
  inputs, out = eqn.split('->')
  x, kernel = inputs.split(',')
  k_in = ''.join(c for c in kernel if c in x)
  lead = x[:len(x) - len(k_in)]
  if kernel[:len(k_in)] != k_in or not x.endswith(k_in) or out != lead + kernel[len(k_in):]:
    raise ValueError(f'{eqn!r} is not a projection (lead+in, in+out -> lead+out).')
  return len(k_in)


class Proj(nnx.Module):
  """A linear map, `eqn` naming its dims ('btd,dnh->btnh'; run as one matmul over
  tokens), with an optional bias and an optional LoRA adapter (`lora=(rank, alpha)`, see
  `jaxgpt.model.lora`).

  Parameters are kept in `param_dtype` and cast to the compute dtype at use.
  """

  def __init__(self, eqn, kernel_shape, kernel_axes, *, bias_shape=None, bias_axes=None,
               std, dtype, param_dtype, rngs, lora=None):
    self.eqn = eqn
    self.dtype = dtype
    self.kernel = _param(rngs, kernel_shape, kernel_axes, std, param_dtype)
    self.bias = (_param(rngs, bias_shape, bias_axes, 0.0, param_dtype)
                 if bias_shape is not None else None)
    self.n_in = n_in = kernel_inputs(eqn)
    a = b = None
    if lora is not None:
      rank, alpha = lora
      self.lora_scale = alpha / rank
      a = _param(rngs, kernel_shape[:n_in] + (rank,), kernel_axes[:n_in] + (None,),
                 float(np.prod(kernel_shape[:n_in])) ** -0.5, param_dtype)
      b = _param(rngs, (rank,) + kernel_shape[n_in:], (None,) + kernel_axes[n_in:], 0.0,
                 param_dtype)
    self.lora_a, self.lora_b = a, b

  def __call__(self, x):
    # One 2-D matmul of every token's features: the backward's weight gradient then
    # contracts one token axis. Written as the 3-D einsum 'btd,df->btf', it contracts
    # (b, t), which XLA:CPU lays out by transposing the incoming gradient, fused with the
    # elementwise work that made it (a strided write: ~15x that work's time).
    x = x.astype(self.dtype)
    lead, n_in = x.shape[:x.ndim - self.n_in], self.kernel.shape[:self.n_in]
    x_ti = x.reshape(-1, math.prod(n_in))
    einsum = jnp.einsum if self.dtype == jnp.float32 else einsum_f32_sums

    def matmul(x_ti, w):
      return einsum('ti,io->to', x_ti, w[...].astype(self.dtype).reshape(x_ti.shape[1], -1))

    y_to = matmul(x_ti, self.kernel)
    if self.lora_a is not None:
      y_to = y_to + self.lora_scale * matmul(matmul(x_ti, self.lora_a), self.lora_b)
    y = y_to.reshape(lead + self.kernel.shape[self.n_in:])
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


def _lora(cfg, target: str) -> dict:
  """Proj's `lora` argument for projection `target` of a model built from `cfg`."""
  if cfg.lora_rank and target in cfg.lora_targets:
    return {'lora': (cfg.lora_rank, cfg.lora_alpha)}
  return {}


class Norm(nnx.Module):
  """RMSNorm or LayerNorm with bias ('layernorm'), over the last axis, in float32.

  `plus_one` (Gemma): the RMSNorm scales by (1 + w), w stored as published, starting at 0.
  """

  def __init__(self, d, *, kind, eps, param_dtype, rngs, plus_one=False):
    self.kind, self.eps, self.plus_one = kind, eps, plus_one
    self.scale = _param(rngs, (d,), ('norm',), 0.0 if plus_one else 'ones', param_dtype)
    self.bias = _param(rngs, (d,), ('norm',), 0.0, param_dtype) if kind == 'layernorm' else None

  def __call__(self, x_btd):
    x = x_btd.astype(jnp.float32)
    if self.kind == 'layernorm':
      x = x - x.mean(-1, keepdims=True)
    scale = self.scale[...]
    if self.plus_one:
      scale = 1.0 + scale.astype(jnp.float32)
    y = x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + self.eps) * scale
    if self.bias is not None:
      y = y + self.bias[...]
    return y.astype(x_btd.dtype)


def norm(cfg, d, rngs):
  """The model's norm over `d` features (kind, epsilon and (1 + w) form from `cfg`)."""
  return Norm(d, kind=cfg.norm, eps=cfg.norm_eps, param_dtype=cfg.param_dtype, rngs=rngs,
              plus_one=cfg.norm_plus_one)


class Attention(nnx.Module):
  """Multi-head attention with grouped key/value heads and an optional KV cache; q/k/v
  biases (`bias` 'qkv' or 'all'), an output bias ('all'), per-head q/k norms (`qk_norm`)."""

  def __init__(self, cfg, *, rngs):
    d, n, h = cfg.d_model, cfg.n_heads, cfg.head_dim
    k = cfg.n_kv_heads
    bias = cfg.bias in ('qkv', 'all')
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    self.cfg = cfg
    self.q = Proj('btd,dnh->btnh', (d, n, h), ('embed', 'q_heads', 'head_dim'),
                  bias_shape=(n, h) if bias else None, bias_axes=('q_heads', 'head_dim'),
                  std=cfg.init_std, **kw, **_lora(cfg, 'q'))
    self.k = Proj('btd,dkh->btkh', (d, k, h), ('embed', 'kv_heads', 'head_dim'),
                  bias_shape=(k, h) if bias else None, bias_axes=('kv_heads', 'head_dim'),
                  std=cfg.init_std, **kw, **_lora(cfg, 'k'))
    self.v = Proj('btd,dkh->btkh', (d, k, h), ('embed', 'kv_heads', 'head_dim'),
                  bias_shape=(k, h) if bias else None, bias_axes=('kv_heads', 'head_dim'),
                  std=cfg.init_std, **kw, **_lora(cfg, 'v'))
    # 'N' (heads) sorts before 'h': jnp.einsum contracts its sorted letters in that order,
    # so the kernel is read as stored rather than transposed at every call.
    self.o = Proj('btNh,Nhd->btd', (n, h, d), ('q_heads', 'head_dim', 'embed'),
                  bias_shape=(d,) if cfg.bias == 'all' else None, bias_axes=('embed',),
                  std=cfg.init_std / (2 * cfg.n_layers) ** 0.5, **kw, **_lora(cfg, 'o'))
    self.q_norm = norm(cfg, h, rngs) if cfg.qk_norm else None
    self.k_norm = norm(cfg, h, rngs) if cfg.qk_norm else None

  def __call__(self, x_btd, positions_bt, segment_ids_bt=None, cache=None, window=None):
    """Returns (y_btd, new_cache). `cache` is a `kv_cache.LayerCache` or None. `window`:
    this layer's attention window (an int32 scalar, 0: global; may be traced), or None
    when the model has no sliding-window layers.

    With a cache, the new keys/values are written into it in place and queries attend
    to the filled cache slots at or before their own (see `jaxgpt.model.kv_cache`).
    """
    cfg, rules = self.cfg, self.cfg.rules
    q_btnh = sharding.constrain(checkpoint_name(self.q(x_btd), 'attn_q_proj'),
                                ('act_batch', 'act_seq', 'act_heads', None), rules)
    k_btkh = sharding.constrain(checkpoint_name(self.k(x_btd), 'attn_k_proj'),
                                ('act_batch', 'act_seq', 'act_kv_heads', None), rules)
    v_btkh = sharding.constrain(checkpoint_name(self.v(x_btd), 'attn_v_proj'),
                                ('act_batch', 'act_seq', 'act_kv_heads', None), rules)
    if self.q_norm is not None:
      q_btnh, k_btkh = self.q_norm(q_btnh), self.k_norm(k_btkh)
    if cfg.positions == 'rope':
      inv_freq_h2 = rope.layer_frequencies(cfg, window)
      q_btnh = rope.rotate(q_btnh, positions_bt, inv_freq_h2)
      k_btkh = rope.rotate(k_btkh, positions_bt, inv_freq_h2)

    if cache is not None:
      y_btnh, cache = cache.write_and_attend(q_btnh, k_btkh, v_btkh, positions_bt,
                                             scale=cfg.attn_scale, window=window)
      return self.o(y_btnh), cache

    y_btnh = attention_kernels.attend(q_btnh, k_btkh, v_btkh, segment_ids_bt,
                                      attention=cfg.attention, rules=rules,
                                      scale=cfg.attn_scale, window=window,
                                      sliding_window=cfg.sliding_window)
    return checkpoint_name(self.o(y_btnh), 'attn_out_proj'), None


ACTIVATIONS = {'silu': jax.nn.silu, 'gelu_tanh': lambda x: jax.nn.gelu(x, approximate=True)}


class MLP(nnx.Module):
  """Gated feed-forward, act(x W_gate) * (x W_up) (SwiGLU, GeGLU), or plain act(x W_up)
  (`mlp='plain'`, GPT-2); biases on both projections with `bias='all'`."""

  def __init__(self, cfg, *, rngs):
    d, f = cfg.d_model, cfg.d_ff
    bias = cfg.bias == 'all'
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    self.cfg = cfg
    self.gate = Proj('btd,df->btf', (d, f), ('embed', 'mlp'), std=cfg.init_std,
                     **kw, **_lora(cfg, 'gate')) if cfg.mlp == 'gated' else None
    self.up = Proj('btd,df->btf', (d, f), ('embed', 'mlp'),
                   bias_shape=(f,) if bias else None, bias_axes=('mlp',), std=cfg.init_std, **kw,
                   **_lora(cfg, 'up'))
    self.down = Proj('btf,fd->btd', (f, d), ('mlp', 'embed'),
                     bias_shape=(d,) if bias else None, bias_axes=('embed',),
                     std=cfg.init_std / (2 * cfg.n_layers) ** 0.5, **kw, **_lora(cfg, 'down'))

  def __call__(self, x_btd):
    # Projection outputs are named for remat='save_proj'; the hidden h_btf is not (it is
    # one elementwise op away from them, so cheap to recompute and not worth its memory).
    act = ACTIVATIONS[self.cfg.mlp_activation]
    up_btf = checkpoint_name(self.up(x_btd), 'mlp_up_proj')
    if self.gate is None:
      h_btf = act(up_btf)
    else:
      h_btf = act(checkpoint_name(self.gate(x_btd), 'mlp_gate_proj')) * up_btf
    h_btf = sharding.constrain(h_btf, ('act_batch', 'act_seq', 'act_mlp'), self.cfg.rules)
    return checkpoint_name(self.down(h_btf), 'mlp_down_proj')


class Block(nnx.Module):
  """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)); with
  `post_norms` (Gemma 3) the attention and MLP outputs are normed too before they are added."""

  def __init__(self, cfg, *, rngs):
    self.cfg = cfg
    self.attn_norm = norm(cfg, cfg.d_model, rngs)
    self.attn = Attention(cfg, rngs=rngs)
    self.mlp_norm = norm(cfg, cfg.d_model, rngs)
    self.mlp = MLP(cfg, rngs=rngs)
    self.attn_post_norm = norm(cfg, cfg.d_model, rngs) if cfg.post_norms else None
    self.mlp_post_norm = norm(cfg, cfg.d_model, rngs) if cfg.post_norms else None

  def __call__(self, x_btd, positions_bt, segment_ids_bt=None, cache=None, window=None):
    a_btd, new_cache = self.attn(self.attn_norm(x_btd), positions_bt, segment_ids_bt, cache,
                                 window)
    if self.attn_post_norm is not None:
      a_btd = self.attn_post_norm(a_btd)
    x_btd = x_btd + a_btd
    m_btd = self.mlp(self.mlp_norm(x_btd))
    if self.mlp_post_norm is not None:
      m_btd = self.mlp_post_norm(m_btd)
    x_btd = x_btd + m_btd
    x_btd = sharding.constrain(x_btd, ('act_batch', 'act_seq', 'act_embed'), self.cfg.rules)
    return x_btd, new_cache
