"""The decoder-only transformer shared by every stage and every family (GPT-2, LLaMA 1-3,
Mistral, Qwen 2 / 3, Gemma 3: presets of the switches in `ModelConfig`, see
`jaxgpt.model.families`).

Layers are stored stacked along a leading 'layers' axis whatever `scan_layers`
says: the switch only picks `jax.lax.scan` (one compiled body) or an unrolled
Python loop, so checkpoints and parameter trees are the same either way. What differs
between layers (a sliding-window or a global layer, and so its RoPE base) is not a
parameter but data the loop carries: each layer's window, an int32 from the config,
scanned along with the layer's parameters, so a scanned stack still compiles one body.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxgpt import sharding
from jaxgpt import config as config_lib
from jaxgpt.model import families, kv_cache
from jaxgpt.model.layers import Block, PROJ_NAMES, Proj, _param, norm

_REMAT_POLICIES = {
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots_saveable': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # Keep the q/k/v/out and MLP projection outputs; recompute norms, RoPE, attention and
    # the MLP hidden (f wide, the largest activation, one elementwise op from saved ones).
    'save_proj': jax.checkpoint_policies.save_only_these_names(*PROJ_NAMES),
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Resolved, hashable model settings (a static attribute of every module)."""
  family: str
  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  head_dim: int
  d_ff: int
  max_seq_len: int
  rope_theta: float
  norm_eps: float
  dtype: Any
  param_dtype: Any
  scan_layers: bool
  remat: str
  init_std: float
  attention: str
  rules: tuple
  scalar_head: bool = False
  lm_head: bool = True      # False: a reward / value model, which never reads logits
  tie_embeddings: bool = False  # llama: logits from the embedding table (gpt2 always ties)
  vocab_multiple: int = 1   # table rows padded to a multiple; ids >= vocab_size are padding
  decode_dtype: Any = None  # the sampler's weights, compute and KV cache; None: dtype
  decode_rules: tuple | None = None  # the sampler's rules table; None: rules
  # Architecture switches, resolved from config.model.family's preset and the config
  # (jaxgpt.model.families); the defaults are LLaMA's.
  norm: str = 'rmsnorm'       # rmsnorm | layernorm
  norm_plus_one: bool = False
  post_norms: bool = False
  qk_norm: bool = False
  positions: str = 'rope'     # rope | learned
  bias: str = 'none'          # none | qkv | all
  mlp: str = 'gated'          # gated | plain
  mlp_activation: str = 'silu'
  embed_scale: bool = False
  window_pattern: str = 'S'
  sliding_window: int = 0
  local_rope_theta: float = 0.0
  rope_scaling: str = ''
  rope_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_len: int = 8192
  attn_scale_dim: float = 0.0
  # LoRA adapters (jaxgpt.model.lora): rank 0 is none; set by a training stage from
  # config.lora, never by a checkpoint reader (readers get merged weights).
  lora_rank: int = 0
  lora_alpha: float = 0.0
  lora_targets: tuple = ()

  @property
  def padded_vocab_size(self) -> int:
    """Rows of the embedding / output head: vocab_size rounded up to vocab_multiple."""
    return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple

  @property
  def tied(self) -> bool:
    return self.tie_embeddings

  @property
  def attn_scale(self) -> float | None:
    """The attention scores' scale; None: 1 / sqrt(head_dim)."""
    return self.attn_scale_dim ** -0.5 if self.attn_scale_dim else None

  @property
  def layer_windows(self) -> tuple[int, ...] | None:
    """Each layer's attention window (0: global); None when every layer is global."""
    return families.layer_windows(self.n_layers, self.sliding_window, self.window_pattern,
                                  self.max_seq_len)

  @classmethod
  def from_config(cls, cfg, *, scalar_head=False, lm_head=True) -> 'ModelConfig':
    """Build from the full experiment config (model fields + mesh rules)."""
    m = cfg.model
    if m.vocab_multiple < 1:
      raise config_lib.ConfigError(
          f'config.model.vocab_multiple={m.vocab_multiple} must be >= 1 (1: no padding).')
    switches = families.validate(m)
    return cls(
        family=m.family, vocab_size=m.vocab_size, d_model=m.d_model, n_layers=m.n_layers,
        n_heads=m.n_heads, n_kv_heads=switches.pop('n_kv_heads'),
        head_dim=config_lib.head_dim(m), d_ff=m.d_ff, max_seq_len=m.max_seq_len,
        rope_theta=float(m.rope_theta), norm_eps=float(m.norm_eps),
        dtype=jnp.dtype(m.dtype), param_dtype=jnp.dtype(m.param_dtype),
        scan_layers=bool(m.scan_layers), remat=m.remat, init_std=float(m.init_std),
        attention=m.attention, rules=sharding.rules_tuple(cfg.mesh.rules),
        scalar_head=scalar_head, lm_head=lm_head, vocab_multiple=int(m.vocab_multiple),
        decode_dtype=jnp.dtype(m.decode_dtype) if m.decode_dtype else None,
        decode_rules=_decode_rules(cfg), sliding_window=int(m.sliding_window),
        local_rope_theta=float(m.local_rope_theta), rope_scaling=m.rope_scaling,
        rope_factor=float(m.rope_factor), rope_low_freq_factor=float(m.rope_low_freq_factor),
        rope_high_freq_factor=float(m.rope_high_freq_factor),
        rope_original_max_len=int(m.rope_original_max_len),
        attn_scale_dim=float(m.attn_scale_dim), **switches)

  @classmethod
  def for_stage(cls, cfg, stage: str) -> 'ModelConfig':
    """The model a stage's checkpoint holds: the reward model has a scalar head and no LM
    head; PPO's policy has a value head when config.ppo.value_from='policy'."""
    if stage == 'reward':
      return cls.from_config(cfg, scalar_head=True, lm_head=False)
    return cls.from_config(cfg, scalar_head=stage in ('ppo', 'ppo_checker') and
                           cfg.ppo.value_from == 'policy')


class Transformer(nnx.Module):
  """Token embedding, a stack of blocks, final norm, LM head and an optional scalar head."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = _param(rngs, (cfg.padded_vocab_size, cfg.d_model), ('vocab', 'embed'),
                        cfg.init_std, cfg.param_dtype)
    self.pos_embed = (_param(rngs, (cfg.max_seq_len, cfg.d_model), ('positions', 'embed'),
                             cfg.init_std / 2, cfg.param_dtype)
                      if cfg.positions == 'learned' else None)

    @nnx.split_rngs(splits=cfg.n_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: 'layers'})
    def make_blocks(rngs):
      return Block(cfg, rngs=rngs)

    self.blocks = make_blocks(rngs)
    self.final_norm = norm(cfg, cfg.d_model, rngs)
    # GPT-2 (and a tied LLaMA) reads logits from the input embedding; a reward model has none.
    self.lm_head = None if cfg.tied or not cfg.lm_head else Proj(
        'btd,dv->btv', (cfg.d_model, cfg.padded_vocab_size), ('embed', 'vocab'),
        std=cfg.init_std, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    # Reward model / value function: one scalar per position read from the final hidden
    # state; N(0, 1/sqrt(d+1)) keeps the initial scores O(1) whatever the width.
    self.scalar_head = Proj('btd,d->bt', (cfg.d_model,), ('embed',), bias_shape=(),
                            bias_axes=(), std=(cfg.d_model + 1) ** -0.5, dtype=jnp.float32,
                            param_dtype=cfg.param_dtype, rngs=rngs) if cfg.scalar_head else None

  # -- pieces ---------------------------------------------------------------------------

  def embed_tokens(self, tokens_bt, positions_bt):
    # Gather from an explicitly all-gathered table: a gather from a table sharded on
    # both axes makes XLA replicate it implicitly anyway, with a warning.
    table_vd = sharding.constrain(self.embed[...].astype(self.cfg.dtype), (None, None),
                                  self.cfg.rules)
    x_btd = jnp.take(table_vd, tokens_bt, axis=0)
    if self.cfg.embed_scale:  # Gemma: sqrt(d) rounded to the compute dtype, as transformers
      x_btd = x_btd * jnp.asarray(self.cfg.d_model ** 0.5, jnp.float32).astype(x_btd.dtype)
    if self.pos_embed is not None:
      x_btd = x_btd + jnp.take(self.pos_embed[...], positions_bt, axis=0).astype(self.cfg.dtype)
    return sharding.constrain(x_btd, ('act_batch', 'act_seq', 'act_embed'), self.cfg.rules)

  def logits(self, h_btd):
    """float32 logits from final hidden states."""
    if not self.cfg.lm_head:
      raise ValueError('this model was built without an LM head (a reward or value model).')
    h_nd = h_btd.reshape(-1, h_btd.shape[-1])  # every position one row, as in layers.Proj
    if self.lm_head is None:
      w_vd = self.embed[...].astype(self.cfg.dtype)
      logits_nv = jnp.einsum('nd,vd->nv', h_nd, w_vd, preferred_element_type=jnp.float32)
    else:
      w_dv = self.lm_head.kernel[...].astype(self.cfg.dtype)
      logits_nv = jnp.einsum('nd,dv->nv', h_nd, w_dv, preferred_element_type=jnp.float32)
    logits_btv = logits_nv.reshape(h_btd.shape[:-1] + logits_nv.shape[-1:])
    if self.cfg.padded_vocab_size > self.cfg.vocab_size:
      # Padding rows are no tokens: a large finite negative (not -inf, so p * log p stays
      # 0) keeps them out of the loss, the sampler and every log-prob.
      valid_v = jnp.arange(self.cfg.padded_vocab_size) < self.cfg.vocab_size
      logits_btv = jnp.where(valid_v, logits_btv, -1e9)
    return sharding.constrain(logits_btv, ('act_batch', 'act_seq', 'act_vocab'), self.cfg.rules)

  def scalars(self, h_btd):
    """float32 scalar per position (reward / value), from final hidden states."""
    return self.scalar_head(h_btd.astype(jnp.float32))

  def _run_blocks(self, x_btd, positions_bt, segment_ids_bt, cache=None, slot=None, pad=None,
                  layers=None):
    """Applies every block. `cache` (a `kv_cache.KVCache`, every layer's keys and values)
    rides in the loop carry, so each layer writes its own slice in place; `slot`, `pad`,
    `layers` as in `decode`. Returns (x_btd, cache)."""
    cfg = self.cfg
    graphdef, layer_params = nnx.split(self.blocks)
    windows = cfg.layer_windows
    windows_l = None if windows is None else np.asarray(windows, np.int32)

    def layer(carry, params_index_window):
      x_btd, cache = carry
      params, index, window = params_index_window
      view = None if cache is None else kv_cache.LayerCache(cache, index, slot, pad)
      y_btd, view = nnx.merge(graphdef, params)(x_btd, positions_bt, segment_ids_bt, view,
                                                window)
      return (y_btd, None if view is None else view.cache), None

    def window_of(i):
      return None if windows_l is None else windows_l[i]

    if cfg.remat != 'none' and cache is None:  # decoding takes no gradients
      layer = jax.checkpoint(layer, policy=_REMAT_POLICIES[cfg.remat],
                             prevent_cse=not cfg.scan_layers)
    if layers is not None:
      for i, params_i in enumerate(layers):
        (x_btd, cache), _ = layer((x_btd, cache), (params_i, i, window_of(i)))
      return x_btd, cache
    if cfg.scan_layers:
      indices = jnp.arange(cfg.n_layers, dtype=jnp.int32)
      return jax.lax.scan(layer, (x_btd, cache), (layer_params, indices, windows_l))[0]
    leaves, treedef = jax.tree.flatten(layer_params)
    per_layer = [unstack(a) for a in leaves]
    for i in range(cfg.n_layers):
      params_i = treedef.unflatten([a_l[i] for a_l in per_layer])
      (x_btd, cache), _ = layer((x_btd, cache), (params_i, i, window_of(i)))
    return x_btd, cache

  def scalar_at(self, h_btd, index_b):
    """float32 scalar of each row read at one position (e.g. its <|reward|> token)."""
    h_b1d = jnp.take_along_axis(h_btd, index_b.astype(jnp.int32)[:, None, None], axis=1)
    return self.scalars(h_b1d)[:, 0]

  # -- entry points ---------------------------------------------------------------------

  def hidden(self, tokens_bt, positions_bt=None, segment_ids_bt=None):
    """Final-norm hidden states (b, t, d) of a full forward pass."""
    if positions_bt is None:
      positions_bt = jnp.broadcast_to(jnp.arange(tokens_bt.shape[1]), tokens_bt.shape)
    x_btd = self.embed_tokens(tokens_bt, positions_bt)
    x_btd, _ = self._run_blocks(x_btd, positions_bt, segment_ids_bt, None)
    return self.final_norm(x_btd)

  def __call__(self, tokens_bt, positions_bt=None, segment_ids_bt=None):
    """float32 logits (b, t, v) of a full forward pass."""
    return self.logits(self.hidden(tokens_bt, positions_bt, segment_ids_bt))

  def score(self, tokens_bt, positions_bt, segment_ids_bt, readout_b):
    """Reward-model scores (b,): the scalar head at each row's readout token. Nothing
    after the readout can reach it (causal attention), and with segment ids padding on
    either side is invisible to it."""
    return self.scalar_at(self.hidden(tokens_bt, positions_bt, segment_ids_bt), readout_b)

  def decode(self, tokens_bt, positions_bt, cache, slot=None, pad=None, layers=None):
    """KV-cache forward: prefill (t > 1) or one step (t = 1); returns (hidden_btd, cache).

    `cache` is a `kv_cache.KVCache` from `init_cache`, updated in place (donate it or
    carry it in a loop). `slot=None`: row b's token t goes to cache slot
    positions_bt[b, t]; `slot` (int32 scalar): every row's tokens go to slots slot ..
    slot+t-1 in one dynamic-update-slice. `pad = (pad_start_b, pad_stop)`: slots of row
    b never attended (its prompt padding). See `jaxgpt.model.kv_cache`. `layers`: the
    blocks' parameters as one tree per layer (`split_layers`), run unrolled in place of
    the stacked ones.
    """
    x_btd = self.embed_tokens(tokens_bt, positions_bt)
    x_btd, cache = self._run_blocks(x_btd, positions_bt, None, cache, slot, pad, layers)
    return self.final_norm(x_btd), cache

  def hidden_after_prefix(self, prefix_gp, tokens_bn, positions_bn):
    """Final hidden states (b, n, d) of rows that share a prefix by groups: row b continues
    prefix b // (b / g) with `tokens_bn` at `positions_bn` (consecutive, the first at most
    p). The g prefixes are run once and their keys and values copied to their rows, so a
    group of K rows costs one prefix and K continuations instead of K whole rows; the
    prefix's slots from each row's first position on are not attended (they hold the
    padding, or another row's tokens), the row's own tokens are. Differentiable: a
    per-layer cache (unrolled layers) is read in one block, without a loop; a stacked
    one is read in a loop whose length depends on the data."""
    cfg = self.cfg
    g, p = prefix_gp.shape
    b, n = tokens_bn.shape
    cache = init_cache(cfg, g, p + n, dtype=cfg.dtype, per_layer=not cfg.scan_layers)
    _, cache = self.decode(prefix_gp, jnp.broadcast_to(jnp.arange(p), (g, p)), cache,
                           slot=jnp.int32(0))
    cache = kv_cache.repeat_rows(cache, b // g, cfg.n_kv_heads)
    h_bnd, _ = self.decode(tokens_bn, positions_bn, cache, slot=jnp.int32(p),
                           pad=(positions_bn[:, 0].astype(jnp.int32), p))
    return h_bnd


@jax.custom_vjp
def unstack(a_l):
  """The layers of a stacked (L, ...) parameter, as a tuple, for an unrolled layer loop.
  Its gradient is one stack of the L cotangents: indexing's own gradient pads each to
  (L, ...) and adds the L pads, which XLA:CPU fuses into one pass that evaluates all L
  pads at every element (L times the work of a copy; ~0.5 s of a 135M float32 step)."""
  return tuple(a_l[i] for i in range(a_l.shape[0]))


def _unstack_fwd(a_l):
  return unstack(a_l), None


def _unstack_bwd(_, cotangents):
  return (jnp.stack(cotangents),)


unstack.defvjp(_unstack_fwd, _unstack_bwd)


def _decode_rules(cfg) -> tuple | None:
  """config.mesh.rules with config.mesh.decode_rules in force; None when they change nothing."""
  rules = sharding.rules_tuple(cfg.mesh.rules)
  decode = sharding.with_overrides(rules, cfg.mesh.get('decode_rules', ()))
  return None if dict(decode) == dict(rules) else decode


def split_layers(params) -> tuple:
  """The blocks' stacked parameters as one tree per layer, for `decode(layers=...)`.

  Slice once, outside a decoding loop: on CPU a matmul cannot read one layer of the
  stack in place, so every pass of a loop over the stack would copy all the weights.
  """
  n_layers = jax.tree.leaves(params['blocks'])[0].shape[0]
  return tuple(jax.tree.map(lambda a, i=i: a[i], params['blocks']) for i in range(n_layers))


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype=None,
               per_layer: bool = False) -> kv_cache.KVCache:
  """Zeroed KV cache for `batch` rows of up to `length` slots: keys and values each
  (L, B*K, S, H) (`per_layer`: a tuple of L (B*K, S, H), for `decode(layers=...)`), in
  `dtype` (default: the decoding dtype). See `jaxgpt.model.kv_cache`."""
  return kv_cache.zeros(cfg.n_layers, batch, cfg.n_kv_heads, length, cfg.head_dim,
                        dtype or cfg.decode_dtype or cfg.dtype, per_layer)
