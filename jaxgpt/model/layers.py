"""Building blocks of the decoder: projections, norms, RoPE, attention, MLP, block.

Every parameter carries logical axis names (`sharding_names`); `jaxgpt.sharding`
maps them to mesh axes through the rules table in the config. Shapes are in the
names: b batch, t query positions, s key positions, d model width, n query heads,
k key/value heads, h head width, f MLP width, v vocabulary. Projection outputs carry
`checkpoint_name`s (PROJ_NAMES) that remat policies can save by name.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jaxgpt import sharding
from jaxgpt.model import attention_kernels

# Parameters are created unsharded and placed by jit(out_shardings=...) in
# jaxgpt.model.init, so flax must not try to shard them eagerly at creation.
nnx.use_eager_sharding(False)


# Every projection output a block names (for jax.checkpoint_policies.save_only_these_names).
PROJ_NAMES = ('attn_q_proj', 'attn_k_proj', 'attn_v_proj', 'attn_out_proj', 'mlp_gate_proj',
              'mlp_up_proj', 'mlp_down_proj')


def _param(rngs, shape, axes, std, dtype):
  if std == 'ones':
    value = jnp.ones(shape, dtype)
  elif std == 0.0:
    value = jnp.zeros(shape, dtype)
  else:
    value = std * jax.random.normal(rngs.params(), shape, dtype)
  return nnx.Param(value, out_sharding=axes)


class Proj(nnx.Module):
  """A linear map written as one einsum, with an optional bias.

  Parameters are kept in `param_dtype` and cast to the compute dtype at use.
  """

  def __init__(self, eqn, kernel_shape, kernel_axes, *, bias_shape=None, bias_axes=None,
               std, dtype, param_dtype, rngs):
    self.eqn = eqn
    self.dtype = dtype
    self.kernel = _param(rngs, kernel_shape, kernel_axes, std, param_dtype)
    self.bias = (_param(rngs, bias_shape, bias_axes, 0.0, param_dtype)
                 if bias_shape is not None else None)

  def __call__(self, x):
    y = jnp.einsum(self.eqn, x.astype(self.dtype), self.kernel[...].astype(self.dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


class Norm(nnx.Module):
  """RMSNorm (llama) or LayerNorm with bias (gpt2), computed in float32."""

  def __init__(self, d, *, kind, eps, param_dtype, rngs):
    self.kind, self.eps = kind, eps
    self.scale = _param(rngs, (d,), ('norm',), 'ones', param_dtype)
    self.bias = _param(rngs, (d,), ('norm',), 0.0, param_dtype) if kind == 'layernorm' else None

  def __call__(self, x_btd):
    x = x_btd.astype(jnp.float32)
    if self.kind == 'layernorm':
      x = x - x.mean(-1, keepdims=True)
    y = x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + self.eps) * self.scale[...]
    if self.bias is not None:
      y = y + self.bias[...]
    return y.astype(x_btd.dtype)


def rope(x_btnh, positions_bt, theta):
  """Rotary embedding, rotate-half layout (the Hugging Face LLaMA convention)."""
  h = x_btnh.shape[-1]
  inv_freq_h2 = 1.0 / theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h)
  angle_bth2 = positions_bt[..., None].astype(jnp.float32) * inv_freq_h2
  cos, sin = jnp.cos(angle_bth2)[:, :, None, :], jnp.sin(angle_bth2)[:, :, None, :]
  x = x_btnh.astype(jnp.float32)
  x1, x2 = x[..., : h // 2], x[..., h // 2:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_btnh.dtype)


class Attention(nnx.Module):
  """Multi-head attention with grouped key/value heads and an optional KV cache."""

  def __init__(self, cfg, *, rngs):
    d, n, h = cfg.d_model, cfg.n_heads, cfg.head_dim
    k = cfg.n_kv_heads
    bias = cfg.family == 'gpt2'
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    self.cfg = cfg
    self.q = Proj('btd,dnh->btnh', (d, n, h), ('embed', 'q_heads', 'head_dim'),
                  bias_shape=(n, h) if bias else None, bias_axes=('q_heads', 'head_dim'),
                  std=cfg.init_std, **kw)
    self.k = Proj('btd,dkh->btkh', (d, k, h), ('embed', 'kv_heads', 'head_dim'),
                  bias_shape=(k, h) if bias else None, bias_axes=('kv_heads', 'head_dim'),
                  std=cfg.init_std, **kw)
    self.v = Proj('btd,dkh->btkh', (d, k, h), ('embed', 'kv_heads', 'head_dim'),
                  bias_shape=(k, h) if bias else None, bias_axes=('kv_heads', 'head_dim'),
                  std=cfg.init_std, **kw)
    # 'N' (heads) sorts before 'h': jnp.einsum contracts its sorted letters in that order,
    # so the kernel is read as stored rather than transposed at every call.
    self.o = Proj('btNh,Nhd->btd', (n, h, d), ('q_heads', 'head_dim', 'embed'),
                  bias_shape=(d,) if bias else None, bias_axes=('embed',),
                  std=cfg.init_std / (2 * cfg.n_layers) ** 0.5, **kw)

  def __call__(self, x_btd, positions_bt, segment_ids_bt=None, cache=None):
    """Returns (y_btd, new_cache). `cache` is a `kv_cache.LayerCache` or None.

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
    if cfg.family == 'llama':
      q_btnh = rope(q_btnh, positions_bt, cfg.rope_theta)
      k_btkh = rope(k_btkh, positions_bt, cfg.rope_theta)

    if cache is not None:
      y_btnh, cache = cache.write_and_attend(q_btnh, k_btkh, v_btkh, positions_bt)
      return self.o(y_btnh), cache

    y_btnh = attention_kernels.attend(q_btnh, k_btkh, v_btkh, segment_ids_bt,
                                      attention=cfg.attention, rules=rules)
    return checkpoint_name(self.o(y_btnh), 'attn_out_proj'), None


class MLP(nnx.Module):
  """SwiGLU (llama) or GELU (gpt2) feed-forward."""

  def __init__(self, cfg, *, rngs):
    d, f = cfg.d_model, cfg.d_ff
    gpt2 = cfg.family == 'gpt2'
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    self.cfg = cfg
    self.gate = None if gpt2 else Proj('btd,df->btf', (d, f), ('embed', 'mlp'),
                                       std=cfg.init_std, **kw)
    self.up = Proj('btd,df->btf', (d, f), ('embed', 'mlp'),
                   bias_shape=(f,) if gpt2 else None, bias_axes=('mlp',), std=cfg.init_std, **kw)
    self.down = Proj('btf,fd->btd', (f, d), ('mlp', 'embed'),
                     bias_shape=(d,) if gpt2 else None, bias_axes=('embed',),
                     std=cfg.init_std / (2 * cfg.n_layers) ** 0.5, **kw)

  def __call__(self, x_btd):
    # Projection outputs are named for remat='save_proj'; the hidden h_btf is not (it is
    # one elementwise op away from them, so cheap to recompute and not worth its memory).
    up_btf = checkpoint_name(self.up(x_btd), 'mlp_up_proj')
    if self.gate is None:
      h_btf = jax.nn.gelu(up_btf, approximate=True)
    else:
      h_btf = jax.nn.silu(checkpoint_name(self.gate(x_btd), 'mlp_gate_proj')) * up_btf
    h_btf = sharding.constrain(h_btf, ('act_batch', 'act_seq', 'act_mlp'), self.cfg.rules)
    return checkpoint_name(self.down(h_btf), 'mlp_down_proj')


class Block(nnx.Module):
  """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

  def __init__(self, cfg, *, rngs):
    kind = 'layernorm' if cfg.family == 'gpt2' else 'rmsnorm'
    self.cfg = cfg
    self.attn_norm = Norm(cfg.d_model, kind=kind, eps=cfg.norm_eps,
                          param_dtype=cfg.param_dtype, rngs=rngs)
    self.attn = Attention(cfg, rngs=rngs)
    self.mlp_norm = Norm(cfg.d_model, kind=kind, eps=cfg.norm_eps,
                         param_dtype=cfg.param_dtype, rngs=rngs)
    self.mlp = MLP(cfg, rngs=rngs)

  def __call__(self, x_btd, positions_bt, segment_ids_bt=None, cache=None):
    a_btd, new_cache = self.attn(self.attn_norm(x_btd), positions_bt, segment_ids_bt, cache)
    x_btd = x_btd + a_btd
    x_btd = x_btd + self.mlp(self.mlp_norm(x_btd))
    x_btd = sharding.constrain(x_btd, ('act_batch', 'act_seq', 'act_embed'), self.cfg.rules)
    return x_btd, new_cache
