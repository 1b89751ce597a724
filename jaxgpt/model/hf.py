"""Hugging Face <-> jaxgpt weights for `LlamaForCausalLM` and `GPT2LMHeadModel`.

Everything here is numpy: a Hugging Face state dict (from `model.state_dict()` or a
safetensors file; torch tensors are accepted and turned into numpy without importing
torch) becomes a jaxgpt parameter tree, and back. Place the tree on a mesh with
`jax.device_put(params, sharding.param_shardings(...))`.

  hf = transformers.AutoModelForCausalLM.from_pretrained(path)
  cfg.model.update(model_config_from_hf(hf.config))
  mcfg = ModelConfig.from_config(cfg)
  params = from_hf(hf.state_dict(), mcfg)
  ...
  hf.load_state_dict({k: torch.from_numpy(v) for k, v in to_hf(params, mcfg).items()})

Layouts. Hugging Face `nn.Linear` weights are (out, in); jaxgpt kernels are einsum-shaped
(in, ...out) with the layers stacked on a leading axis: q (L, d, n, h), k/v (L, d, k, h),
o (L, n, h, d), gate/up (L, d, f), down (L, f, d). GPT-2's `Conv1D` weights are already
(in, out) and `c_attn` packs q, k and v along its output. RoPE is the rotate-half layout
in both projects, so LLaMA q/k weights map without a permutation. The scalar head
(reward / value) has no Hugging Face counterpart and is never converted.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

FAMILIES = ('llama', 'gpt2')
# Buffers some checkpoints carry that are not parameters.
_IGNORED_SUFFIXES = ('.attn.bias', '.attn.masked_bias', 'rotary_emb.inv_freq')
# GPT-2 activations that are the tanh approximation of GELU (what jaxgpt computes).
_TANH_GELUS = ('gelu_new', 'gelu_pytorch_tanh')


class ConversionError(ValueError):
  """A state dict or config does not match the jaxgpt model; the message names the key."""


# -- config ------------------------------------------------------------------------------

def _get(hf_config, name, default=None):
  if isinstance(hf_config, Mapping):
    return hf_config.get(name, default)
  return getattr(hf_config, name, default)


def model_config_from_hf(hf_config) -> dict[str, Any]:
  """config.model fields for a Hugging Face `LlamaConfig` / `GPT2Config` (object or dict).

  Use as `cfg.model.update(model_config_from_hf(hf.config))`. Fails, naming the
  setting, on architectures jaxgpt does not implement.
  """
  model_type = _get(hf_config, 'model_type')
  if model_type == 'llama':
    d, n = int(_get(hf_config, 'hidden_size')), int(_get(hf_config, 'num_attention_heads'))
    n_kv = _get(hf_config, 'num_key_value_heads') or n
    head_dim = _get(hf_config, 'head_dim') or d // n
    for flag in ('attention_bias', 'mlp_bias'):
      if _get(hf_config, flag, False):
        raise ConversionError(f'hf config {flag}=True: jaxgpt LLaMA has no projection biases.')
    act = _get(hf_config, 'hidden_act', 'silu')
    if act != 'silu':
      raise ConversionError(f"hf config hidden_act='{act}': jaxgpt LLaMA uses SwiGLU ('silu').")
    # transformers 5 keeps RoPE settings in `rope_parameters`; 4.x in rope_theta/rope_scaling.
    rope = _get(hf_config, 'rope_parameters') or {}
    scaling = _get(hf_config, 'rope_scaling') or {}
    rope_type = rope.get('rope_type') or scaling.get('rope_type') or scaling.get('type')
    if rope_type not in (None, 'default'):
      raise ConversionError(
          f"hf config rope type '{rope_type}': jaxgpt implements only default RoPE.")
    theta = rope.get('rope_theta') or _get(hf_config, 'rope_theta') or 10000.0
    return dict(
        family='llama', vocab_size=int(_get(hf_config, 'vocab_size')), d_model=d,
        n_layers=int(_get(hf_config, 'num_hidden_layers')), n_heads=n, n_kv_heads=int(n_kv),
        head_dim=0 if head_dim * n == d else int(head_dim),
        d_ff=int(_get(hf_config, 'intermediate_size')),
        max_seq_len=int(_get(hf_config, 'max_position_embeddings')),
        rope_theta=float(theta), norm_eps=float(_get(hf_config, 'rms_norm_eps')))
  if model_type == 'gpt2':
    act = _get(hf_config, 'activation_function', 'gelu_new')
    if act not in _TANH_GELUS:
      raise ConversionError(
          f"hf config activation_function='{act}': jaxgpt GPT-2 uses tanh GELU {_TANH_GELUS}.")
    if not _get(hf_config, 'scale_attn_weights', True) or _get(
        hf_config, 'scale_attn_by_inverse_layer_idx', False):
      raise ConversionError('hf config: jaxgpt GPT-2 scales attention by 1/sqrt(head_dim) only '
                            '(scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False).')
    d, n = int(_get(hf_config, 'n_embd')), int(_get(hf_config, 'n_head'))
    return dict(
        family='gpt2', vocab_size=int(_get(hf_config, 'vocab_size')), d_model=d,
        n_layers=int(_get(hf_config, 'n_layer')), n_heads=n, n_kv_heads=n, head_dim=0,
        d_ff=int(_get(hf_config, 'n_inner') or 4 * d),
        max_seq_len=int(_get(hf_config, 'n_positions')),
        norm_eps=float(_get(hf_config, 'layer_norm_epsilon')))
  raise ConversionError(f"hf config model_type='{model_type}': supported are 'llama' and 'gpt2'.")


# -- helpers -----------------------------------------------------------------------------

def _model_config(mcfg):
  """A `ModelConfig`, from itself or from a full experiment ConfigDict."""
  if hasattr(mcfg, 'model') and not hasattr(mcfg, 'family'):
    from jaxgpt.model.transformer import ModelConfig
    return ModelConfig.from_config(mcfg)
  if mcfg.family not in FAMILIES:
    raise ConversionError(f"family '{mcfg.family}' must be one of {FAMILIES}.")
  return mcfg


def _to_numpy(x) -> np.ndarray:
  if hasattr(x, 'detach'):  # a torch tensor; torch itself is never imported here
    x = x.detach().cpu()
    if str(x.dtype) == 'torch.bfloat16':
      x = x.float()
    x = x.numpy()
  return np.asarray(x)


class _Reader:
  """Takes keys out of a state dict, checking each shape and remembering what was used."""

  def __init__(self, state_dict, prefix_hint):
    self.sd = state_dict
    self.used = set()
    self.prefix_hint = prefix_hint

  def __call__(self, key, shape):
    if key not in self.sd:
      raise ConversionError(
          f"state dict has no key '{key}' (expected shape {tuple(shape)}); "
          f'is this a {self.prefix_hint} state dict of the same size?')
    x = _to_numpy(self.sd[key])
    if tuple(x.shape) != tuple(shape):
      raise ConversionError(
          f"state dict key '{key}' has shape {tuple(x.shape)}, expected {tuple(shape)}.")
    self.used.add(key)
    return x

  def check_all_used(self):
    left = sorted(k for k in self.sd
                  if k not in self.used and not k.endswith(_IGNORED_SUFFIXES))
    if left:
      raise ConversionError(
          f'state dict keys the jaxgpt {self.prefix_hint} model has no place for: {left[:8]}'
          + (f' (+{len(left) - 8} more)' if len(left) > 8 else ''))


def _cast(tree, dtype):
  if isinstance(tree, dict):
    return {k: _cast(v, dtype) for k, v in tree.items()}
  return np.asarray(tree).astype(dtype)


def _leaf(params, *path):
  x = params
  for k in path:
    if k not in x:
      raise ConversionError(f"jaxgpt params have no entry {'/'.join(path)}.")
    x = x[k]
  return np.asarray(x)


# -- Hugging Face -> jaxgpt ---------------------------------------------------------------

def from_hf(state_dict: Mapping[str, Any], mcfg, *, strict: bool = True) -> dict:
  """A jaxgpt parameter tree (numpy, in `mcfg.param_dtype`) from a Hugging Face state dict.

  `mcfg` is a `ModelConfig` (or the experiment ConfigDict) built from
  `model_config_from_hf`. With `strict`, a key the model has no place for is an error
  (e.g. an untied GPT-2 head or LLaMA projection biases). A LLaMA state dict without
  `lm_head.weight` (tied embeddings, saved once) gets the embedding as its head.
  """
  mcfg = _model_config(mcfg)
  if mcfg.family == 'llama':
    params = _llama_from_hf(state_dict, mcfg, strict)
  else:
    params = _gpt2_from_hf(state_dict, mcfg, strict)
  return _cast(params, np.dtype(mcfg.param_dtype))


def _stack(n_layers, fn):
  """{name: (L, ...)} from fn(i) -> {name: array} for each layer."""
  per_layer = [fn(i) for i in range(n_layers)]
  return {name: np.stack([p[name] for p in per_layer]) for name in per_layer[0]}


def _llama_from_hf(state_dict, c, strict):
  d, n, k, h, f, v = c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.d_ff, c.vocab_size
  sd = dict(state_dict)
  if 'lm_head.weight' not in sd and 'model.embed_tokens.weight' in sd:
    sd['lm_head.weight'] = sd['model.embed_tokens.weight']  # tied embeddings, saved once
  read = _Reader(sd, 'LlamaForCausalLM')

  def layer(i):
    p = f'model.layers.{i}.'
    return {
        'q': read(p + 'self_attn.q_proj.weight', (n * h, d)).T.reshape(d, n, h),
        'k': read(p + 'self_attn.k_proj.weight', (k * h, d)).T.reshape(d, k, h),
        'v': read(p + 'self_attn.v_proj.weight', (k * h, d)).T.reshape(d, k, h),
        'o': read(p + 'self_attn.o_proj.weight', (d, n * h)).T.reshape(n, h, d),
        'gate': read(p + 'mlp.gate_proj.weight', (f, d)).T,
        'up': read(p + 'mlp.up_proj.weight', (f, d)).T,
        'down': read(p + 'mlp.down_proj.weight', (d, f)).T,
        'attn_norm': read(p + 'input_layernorm.weight', (d,)),
        'mlp_norm': read(p + 'post_attention_layernorm.weight', (d,)),
    }

  s = _stack(c.n_layers, layer)
  params = {
      'embed': read('model.embed_tokens.weight', (v, d)),
      'blocks': {
          'attn': {name: {'kernel': s[name]} for name in ('q', 'k', 'v', 'o')},
          'attn_norm': {'scale': s['attn_norm']},
          'mlp': {name: {'kernel': s[name]} for name in ('gate', 'up', 'down')},
          'mlp_norm': {'scale': s['mlp_norm']},
      },
      'final_norm': {'scale': read('model.norm.weight', (d,))},
      'lm_head': {'kernel': read('lm_head.weight', (v, d)).T},
  }
  if strict:
    read.check_all_used()
  return params


def _gpt2_from_hf(state_dict, c, strict):
  d, n, h, f, v, t = c.d_model, c.n_heads, c.head_dim, c.d_ff, c.vocab_size, c.max_seq_len
  if n * h != d:
    raise ConversionError(f'GPT-2 needs n_heads * head_dim == d_model, got {n} * {h} != {d}.')
  read = _Reader(state_dict, 'GPT2LMHeadModel')

  def layer(i):
    p = f'transformer.h.{i}.'
    w_qkv = read(p + 'attn.c_attn.weight', (d, 3 * d))   # Conv1D: (in, out)
    b_qkv = read(p + 'attn.c_attn.bias', (3 * d,))
    w_q, w_k, w_v = (w.reshape(d, n, h) for w in np.split(w_qkv, 3, axis=1))
    b_q, b_k, b_v = (b.reshape(n, h) for b in np.split(b_qkv, 3))
    return {
        'q': w_q, 'k': w_k, 'v': w_v, 'q_b': b_q, 'k_b': b_k, 'v_b': b_v,
        'o': read(p + 'attn.c_proj.weight', (d, d)).reshape(n, h, d),
        'o_b': read(p + 'attn.c_proj.bias', (d,)),
        'up': read(p + 'mlp.c_fc.weight', (d, f)), 'up_b': read(p + 'mlp.c_fc.bias', (f,)),
        'down': read(p + 'mlp.c_proj.weight', (f, d)),
        'down_b': read(p + 'mlp.c_proj.bias', (d,)),
        'ln1': read(p + 'ln_1.weight', (d,)), 'ln1_b': read(p + 'ln_1.bias', (d,)),
        'ln2': read(p + 'ln_2.weight', (d,)), 'ln2_b': read(p + 'ln_2.bias', (d,)),
    }

  s = _stack(c.n_layers, layer)
  embed = read('transformer.wte.weight', (v, d))
  if 'lm_head.weight' in state_dict:
    head = read('lm_head.weight', (v, d))
    if strict and not np.array_equal(head, embed):
      raise ConversionError("state dict key 'lm_head.weight' differs from "
                            "'transformer.wte.weight': jaxgpt GPT-2 ties its output head.")
  params = {
      'embed': embed,
      'pos_embed': read('transformer.wpe.weight', (t, d)),
      'blocks': {
          'attn': {name: {'kernel': s[name], 'bias': s[name + '_b']}
                   for name in ('q', 'k', 'v', 'o')},
          'attn_norm': {'scale': s['ln1'], 'bias': s['ln1_b']},
          'mlp': {name: {'kernel': s[name], 'bias': s[name + '_b']} for name in ('up', 'down')},
          'mlp_norm': {'scale': s['ln2'], 'bias': s['ln2_b']},
      },
      'final_norm': {'scale': read('transformer.ln_f.weight', (d,)),
                     'bias': read('transformer.ln_f.bias', (d,))},
  }
  if strict:
    read.check_all_used()
  return params


# -- jaxgpt -> Hugging Face ---------------------------------------------------------------

def to_hf(params, mcfg, *, dtype=None) -> dict[str, np.ndarray]:
  """A Hugging Face state dict (numpy, C-contiguous) from a jaxgpt parameter tree.

  Loads with `hf_model.load_state_dict({k: torch.from_numpy(v) ...}, strict=True)`.
  `dtype` casts every array (e.g. np.float32 for torch, which has no ml_dtypes bfloat16).
  A 'scalar_head' entry, if any, is left out.
  """
  mcfg = _model_config(mcfg)
  out = _llama_to_hf(params, mcfg) if mcfg.family == 'llama' else _gpt2_to_hf(params, mcfg)
  return {k: np.ascontiguousarray(x if dtype is None else x.astype(dtype))
          for k, x in out.items()}


def _llama_to_hf(params, c):
  d, n, k, h = c.d_model, c.n_heads, c.n_kv_heads, c.head_dim
  blk = lambda *path: _leaf(params, 'blocks', *path)  # noqa: E731
  q, kk, v, o = (blk('attn', name, 'kernel') for name in ('q', 'k', 'v', 'o'))
  gate, up, down = (blk('mlp', name, 'kernel') for name in ('gate', 'up', 'down'))
  ln1, ln2 = blk('attn_norm', 'scale'), blk('mlp_norm', 'scale')
  out = {'model.embed_tokens.weight': _leaf(params, 'embed')}
  for i in range(c.n_layers):
    p = f'model.layers.{i}.'
    out[p + 'self_attn.q_proj.weight'] = q[i].reshape(d, n * h).T
    out[p + 'self_attn.k_proj.weight'] = kk[i].reshape(d, k * h).T
    out[p + 'self_attn.v_proj.weight'] = v[i].reshape(d, k * h).T
    out[p + 'self_attn.o_proj.weight'] = o[i].reshape(n * h, d).T
    out[p + 'mlp.gate_proj.weight'] = gate[i].T
    out[p + 'mlp.up_proj.weight'] = up[i].T
    out[p + 'mlp.down_proj.weight'] = down[i].T
    out[p + 'input_layernorm.weight'] = ln1[i]
    out[p + 'post_attention_layernorm.weight'] = ln2[i]
  out['model.norm.weight'] = _leaf(params, 'final_norm', 'scale')
  out['lm_head.weight'] = _leaf(params, 'lm_head', 'kernel').T
  return out


def _gpt2_to_hf(params, c):
  d, n, h = c.d_model, c.n_heads, c.head_dim
  blk = lambda *path: _leaf(params, 'blocks', *path)  # noqa: E731
  w = {name: blk('attn', name, 'kernel') for name in ('q', 'k', 'v', 'o')}
  b = {name: blk('attn', name, 'bias') for name in ('q', 'k', 'v', 'o')}
  embed = _leaf(params, 'embed')
  out = {'transformer.wte.weight': embed, 'transformer.wpe.weight': _leaf(params, 'pos_embed')}
  for i in range(c.n_layers):
    p = f'transformer.h.{i}.'
    out[p + 'ln_1.weight'] = blk('attn_norm', 'scale')[i]
    out[p + 'ln_1.bias'] = blk('attn_norm', 'bias')[i]
    out[p + 'attn.c_attn.weight'] = np.concatenate(
        [w[name][i].reshape(d, n * h) for name in ('q', 'k', 'v')], axis=1)
    out[p + 'attn.c_attn.bias'] = np.concatenate(
        [b[name][i].reshape(n * h) for name in ('q', 'k', 'v')])
    out[p + 'attn.c_proj.weight'] = w['o'][i].reshape(n * h, d)
    out[p + 'attn.c_proj.bias'] = b['o'][i]
    out[p + 'ln_2.weight'] = blk('mlp_norm', 'scale')[i]
    out[p + 'ln_2.bias'] = blk('mlp_norm', 'bias')[i]
    out[p + 'mlp.c_fc.weight'] = blk('mlp', 'up', 'kernel')[i]
    out[p + 'mlp.c_fc.bias'] = blk('mlp', 'up', 'bias')[i]
    out[p + 'mlp.c_proj.weight'] = blk('mlp', 'down', 'kernel')[i]
    out[p + 'mlp.c_proj.bias'] = blk('mlp', 'down', 'bias')[i]
  out['transformer.ln_f.weight'] = _leaf(params, 'final_norm', 'scale')
  out['transformer.ln_f.bias'] = _leaf(params, 'final_norm', 'bias')
  out['lm_head.weight'] = embed
  return out
