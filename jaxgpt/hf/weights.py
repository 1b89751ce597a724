"""Hugging Face <-> jaxgpt weights, in memory, one layer at a time: LLaMA 1-3, Mistral,
Qwen 2 / 3, Gemma 3 (one LLaMA-like layout whose optional tensors follow the model's
switches) and GPT-2.

Everything here is numpy. The mapping is written per layer (`layer_from_hf`, `layer_to_hf`)
plus the tensors outside the layers (`globals_from_hf`, `globals_to_hf`), so a converter
can stream a checkpoint through host memory one layer at a time (`jaxgpt.hf.importer`,
`jaxgpt.hf.exporter`); `from_hf` / `to_hf` apply it to a whole state dict at once:

  hf = transformers.AutoModelForCausalLM.from_pretrained(path)
  cfg.model.update(model_config_from_hf(hf.config))
  params = from_hf(hf.state_dict(), ModelConfig.from_config(cfg))
  hf.load_state_dict({k: torch.from_numpy(v) for k, v in to_hf(params, mcfg).items()})

Layouts. Hugging Face `nn.Linear` weights are (out, in); jaxgpt kernels are einsum-shaped
(in, ...out) with the layers stacked on a leading axis: q (L, d, n, h), k/v (L, d, k, h),
o (L, n, h, d), gate/up (L, d, f), down (L, f, d). GPT-2's `Conv1D` weights are already
(in, out) and `c_attn` packs q, k and v along its output. RoPE is the rotate-half layout
in both projects, so q/k weights map without a permutation. Norm weights map as stored
(Gemma's (1 + w) norms keep w). Optional tensors come with the switches: q/k/v biases
(`bias='qkv'`, Qwen 2), `self_attn.q_norm` / `k_norm` (`qk_norm`), and with `post_norms`
(Gemma 3) four norms a layer, where `post_attention_layernorm` norms the attention output
(without, it is the norm before the MLP).

The config side (config.json <-> config.model) is `jaxgpt.hf.config_map`.

Vocabulary. jaxgpt's table has `padded_vocab_size` rows: the Hugging Face rows, then the
rows of tokens added to the tokenizer (`vocab_size` > the checkpoint's rows; initialised
to the mean of the existing rows), then zero padding up to `vocab_multiple` (masked out
of the logits). `to_hf` keeps the first `vocab_size` rows.

Heads. A tied model (`tie_word_embeddings`: GPT-2 always, Gemma 3 and small Llama 3.2 /
Qwen models) reads logits from the embedding and has no 'lm_head' entry. The scalar head
of a reward model exports as the `score` of a `*ForSequenceClassification` model
(`head='score'`).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np

from jaxgpt.hf.config_map import (ARCH_FIELDS, ConversionError, HF_MODEL_TYPE,  # noqa: F401
                                  MODEL_TYPES, hf_class_name, hf_config_from_model,
                                  model_config, model_config_from_hf)

# Buffers some checkpoints carry that are not parameters.
_IGNORED_SUFFIXES = ('.attn.bias', '.attn.masked_bias', 'rotary_emb.inv_freq')
_model_config = model_config


def to_numpy(x) -> np.ndarray:
  """numpy from numpy or a torch tensor (torch itself is never imported here)."""
  if hasattr(x, 'detach'):
    x = x.detach().cpu()
    if str(x.dtype) == 'torch.bfloat16':
      x = x.float()
    x = x.numpy()
  return np.asarray(x)


Read = Callable[[str, tuple], np.ndarray]  # (key, shape; None = any size) -> array


class DictReader:
  """`Read` over an in-memory state dict: checks each shape, remembers what was used."""

  def __init__(self, state_dict, what):
    self.sd = state_dict
    self.used = set()
    self.what = what

  def __contains__(self, key):
    return key in self.sd

  def __call__(self, key, shape):
    if key not in self.sd:
      raise ConversionError(
          f"state dict has no key '{key}' (expected shape {_shape_text(shape)}); "
          f'is this a {self.what} state dict of the same size?')
    x = to_numpy(self.sd[key])
    check_shape(key, x.shape, shape, 'state dict key')
    self.used.add(key)
    return x

  def check_all_used(self):
    check_all_used(self.sd.keys(), self.used, f'state dict keys the jaxgpt {self.what} model')


def _shape_text(shape) -> str:
  return '(' + ', '.join('*' if s is None else str(s) for s in shape) + (
      ',)' if len(shape) == 1 else ')')


def check_shape(key, got, want, what) -> None:
  if len(got) != len(want) or any(w is not None and g != w for g, w in zip(got, want)):
    raise ConversionError(f"{what} '{key}' has shape {tuple(got)}, expected "
                          f'{_shape_text(want)}.')


def check_all_used(keys, used, what) -> None:
  left = sorted(k for k in keys if k not in used and not k.endswith(_IGNORED_SUFFIXES))
  if left:
    raise ConversionError(f'{what} has no place for: {left[:8]}'
                          + (f' (+{len(left) - 8} more)' if len(left) > 8 else ''))


def _gpt2_layout(c) -> bool:
  """GPT-2's tensor layout (fused Conv1D q/k/v under 'transformer.'); every other model
  type has the LLaMA-like one under 'model.'."""
  return HF_MODEL_TYPE[c.family] == 'gpt2'


def _prefix(c) -> str:
  return 'transformer.' if _gpt2_layout(c) else 'model.'


def embed_key(c) -> str:
  return 'transformer.wte.weight' if _gpt2_layout(c) else 'model.embed_tokens.weight'


# -- vocabulary rows ----------------------------------------------------------------------

def grow_vocab(x_vd: np.ndarray, c, key: str) -> np.ndarray:
  """(rows, d) Hugging Face rows -> (padded_vocab_size, d): rows of tokens added to the
  tokenizer get the mean of the existing rows, padding rows get zeros."""
  rows = x_vd.shape[0]
  if rows > c.vocab_size:
    raise ConversionError(
        f"'{key}' has {rows} rows but config.model.vocab_size={c.vocab_size}; set it to "
        f'at least {rows} (the model\'s vocabulary).')
  out = np.zeros((c.padded_vocab_size, x_vd.shape[1]), x_vd.dtype)
  out[:rows] = x_vd
  if c.vocab_size > rows:
    out[rows:c.vocab_size] = x_vd.mean(0, dtype=np.float32).astype(x_vd.dtype)  # no f32 copy
  return out


# -- Hugging Face -> jaxgpt ---------------------------------------------------------------

def layer_from_hf(read: Read, mcfg, i: int) -> dict[tuple[str, ...], np.ndarray]:
  """Layer i's jaxgpt arrays (paths under 'blocks', without the layer axis)."""
  c = _model_config(mcfg)
  if _gpt2_layout(c):
    return _gpt2_layer(read, c, i)
  return {path: (read(key, hf_shape).T if matrix else read(key, hf_shape)).reshape(shape)
          for path, key, hf_shape, shape, matrix in _layer_tensors(c, i)}


def globals_from_hf(read: Read, mcfg, *, has_key=None):
  """Yields (path, array) for the jaxgpt arrays outside the layers (final norm, embedding,
  head), vocab grown and padded, one at a time so a streaming caller holds one of them.
  `has_key(key)` says whether the checkpoint holds a key (for a tied head saved once)."""
  c = _model_config(mcfg)
  d = c.d_model
  p = _prefix(c)
  if _gpt2_layout(c):
    yield ('pos_embed',), read(p + 'wpe.weight', (c.max_seq_len, d))
    yield ('final_norm', 'scale'), read(p + 'ln_f.weight', (d,))
    yield ('final_norm', 'bias'), read(p + 'ln_f.bias', (d,))
  else:
    yield ('final_norm', 'scale'), read(p + 'norm.weight', (d,))
  if c.tied:
    if has_key is not None and has_key('lm_head.weight'):
      head = read('lm_head.weight', (None, d))
      if not np.array_equal(head, read(embed_key(c), (None, d))):
        raise ConversionError(
            f"'lm_head.weight' differs from '{embed_key(c)}' but the model ties them "
            + ('(GPT-2 always does).' if _gpt2_layout(c) else
               '(config.json tie_word_embeddings=true -> config.model.tie_embeddings).'))
      del head
  elif c.lm_head:
    if has_key is not None and not has_key('lm_head.weight'):
      raise ConversionError(
          "no key 'lm_head.weight': the checkpoint has no output head of its own, but "
          'config.model.tie_embeddings=False (config.json tie_word_embeddings=false); a '
          'model that ties them must say tie_word_embeddings=true.')
    yield ('lm_head', 'kernel'), grow_vocab(read('lm_head.weight', (None, d)), c,
                                            'lm_head.weight').T
  yield ('embed',), grow_vocab(read(embed_key(c), (None, d)), c, embed_key(c))


def _layer_tensors(c, i):
  """(jaxgpt path, Hugging Face key, its shape, the jaxgpt shape, is a matrix) of layer i's
  tensors in the LLaMA-like layout. A matrix is the Hugging Face (out, in) weight
  transposed, then reshaped; a vector (bias, norm) is only reshaped."""
  d, n, k, h, f = c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.d_ff
  p = f'model.layers.{i}.'
  a = p + 'self_attn.'
  out = [
      (('attn', 'q', 'kernel'), a + 'q_proj.weight', (n * h, d), (d, n, h), True),
      (('attn', 'k', 'kernel'), a + 'k_proj.weight', (k * h, d), (d, k, h), True),
      (('attn', 'v', 'kernel'), a + 'v_proj.weight', (k * h, d), (d, k, h), True),
      (('attn', 'o', 'kernel'), a + 'o_proj.weight', (d, n * h), (n, h, d), True),
      (('mlp', 'gate', 'kernel'), p + 'mlp.gate_proj.weight', (f, d), (d, f), True),
      (('mlp', 'up', 'kernel'), p + 'mlp.up_proj.weight', (f, d), (d, f), True),
      (('mlp', 'down', 'kernel'), p + 'mlp.down_proj.weight', (d, f), (f, d), True),
  ]
  if c.bias == 'qkv':
    out += [(('attn', name, 'bias'), a + f'{name}_proj.bias', (heads * h,), (heads, h), False)
            for name, heads in (('q', n), ('k', k), ('v', k))]
  if c.qk_norm:
    out += [(('attn', f'{name}_norm', 'scale'), a + f'{name}_norm.weight', (h,), (h,), False)
            for name in 'qk']
  norms = ((('attn_norm', 'input_layernorm'), ('attn_post_norm', 'post_attention_layernorm'),
            ('mlp_norm', 'pre_feedforward_layernorm'),
            ('mlp_post_norm', 'post_feedforward_layernorm')) if c.post_norms else
           (('attn_norm', 'input_layernorm'), ('mlp_norm', 'post_attention_layernorm')))
  out += [((ours, 'scale'), p + f'{theirs}.weight', (d,), (d,), False) for ours, theirs in norms]
  return out


def _gpt2_layer(read, c, i):
  d, n, h, f = c.d_model, c.n_heads, c.head_dim, c.d_ff
  if n * h != d:
    raise ConversionError(f'GPT-2 needs n_heads * head_dim == d_model, got {n} * {h} != {d}.')
  p = f'transformer.h.{i}.'
  w_qkv = read(p + 'attn.c_attn.weight', (d, 3 * d))   # Conv1D: (in, out)
  b_qkv = read(p + 'attn.c_attn.bias', (3 * d,))
  out = {}
  for name, w, b in zip('qkv', np.split(w_qkv, 3, axis=1), np.split(b_qkv, 3)):
    out[('attn', name, 'kernel')] = w.reshape(d, n, h)
    out[('attn', name, 'bias')] = b.reshape(n, h)
  out.update({
      ('attn', 'o', 'kernel'): read(p + 'attn.c_proj.weight', (d, d)).reshape(n, h, d),
      ('attn', 'o', 'bias'): read(p + 'attn.c_proj.bias', (d,)),
      ('mlp', 'up', 'kernel'): read(p + 'mlp.c_fc.weight', (d, f)),
      ('mlp', 'up', 'bias'): read(p + 'mlp.c_fc.bias', (f,)),
      ('mlp', 'down', 'kernel'): read(p + 'mlp.c_proj.weight', (f, d)),
      ('mlp', 'down', 'bias'): read(p + 'mlp.c_proj.bias', (d,)),
      ('attn_norm', 'scale'): read(p + 'ln_1.weight', (d,)),
      ('attn_norm', 'bias'): read(p + 'ln_1.bias', (d,)),
      ('mlp_norm', 'scale'): read(p + 'ln_2.weight', (d,)),
      ('mlp_norm', 'bias'): read(p + 'ln_2.bias', (d,)),
  })
  return out


def set_path(tree: dict, path: tuple[str, ...], value) -> None:
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def from_hf(state_dict: Mapping[str, Any], mcfg, *, strict: bool = True) -> dict:
  """A jaxgpt parameter tree (numpy, in `mcfg.param_dtype`) from a Hugging Face state dict.

  `mcfg` is a `ModelConfig` (or the experiment ConfigDict) built from
  `model_config_from_hf`. With `strict`, a key the model has no place for is an error
  (e.g. LLaMA projection biases).
  """
  c = _model_config(mcfg)
  dtype = np.dtype(c.param_dtype)
  read = DictReader(state_dict, hf_class_name(c))
  params: dict = {}
  for path, x in globals_from_hf(read, c, has_key=read.__contains__):
    set_path(params, path, x.astype(dtype))
  layers = [layer_from_hf(read, c, i) for i in range(c.n_layers)]
  for path in layers[0]:
    set_path(params, ('blocks',) + path, np.stack([l[path] for l in layers]).astype(dtype))
  if strict:
    read.check_all_used()
  return params


# -- jaxgpt -> Hugging Face ---------------------------------------------------------------

Get = Callable[[tuple], np.ndarray]  # jaxgpt path -> array (host numpy)


def layer_to_hf(get: Get, mcfg, i: int) -> dict[str, np.ndarray]:
  """Layer i's Hugging Face tensors; `get(path)` returns layer i's slice of
  params['blocks'][path]."""
  c = _model_config(mcfg)
  d, n, h = c.d_model, c.n_heads, c.head_dim
  if not _gpt2_layout(c):
    return {key: (get(path).reshape(hf_shape[::-1]).T if matrix else get(path).reshape(hf_shape))
            for path, key, hf_shape, _, matrix in _layer_tensors(c, i)}
  p = f'transformer.h.{i}.'
  return {
      p + 'ln_1.weight': get(('attn_norm', 'scale')),
      p + 'ln_1.bias': get(('attn_norm', 'bias')),
      p + 'attn.c_attn.weight': np.concatenate(
          [get(('attn', name, 'kernel')).reshape(d, n * h) for name in 'qkv'], axis=1),
      p + 'attn.c_attn.bias': np.concatenate(
          [get(('attn', name, 'bias')).reshape(n * h) for name in 'qkv']),
      p + 'attn.c_proj.weight': get(('attn', 'o', 'kernel')).reshape(n * h, d),
      p + 'attn.c_proj.bias': get(('attn', 'o', 'bias')),
      p + 'ln_2.weight': get(('mlp_norm', 'scale')),
      p + 'ln_2.bias': get(('mlp_norm', 'bias')),
      p + 'mlp.c_fc.weight': get(('mlp', 'up', 'kernel')),
      p + 'mlp.c_fc.bias': get(('mlp', 'up', 'bias')),
      p + 'mlp.c_proj.weight': get(('mlp', 'down', 'kernel')),
      p + 'mlp.c_proj.bias': get(('mlp', 'down', 'bias')),
  }


def globals_to_hf(get: Get, mcfg, *, head: str = 'lm',
                  tied_copies: bool = True) -> dict[str, np.ndarray]:
  """The Hugging Face tensors outside the layers, padding rows stripped. `head='score'`
  gives the sequence-classification `score.weight` from the scalar head (its bias must be
  folded in by the caller, see `jaxgpt.hf.exporter`). Without `tied_copies` a tied head is
  not written twice (what safetensors files hold)."""
  c = _model_config(mcfg)
  v, p = c.vocab_size, _prefix(c)
  embed = get(('embed',))[:v]
  out = {embed_key(c): embed}
  if _gpt2_layout(c):
    out[p + 'wpe.weight'] = get(('pos_embed',))
    out[p + 'ln_f.weight'] = get(('final_norm', 'scale'))
    out[p + 'ln_f.bias'] = get(('final_norm', 'bias'))
  else:
    out[p + 'norm.weight'] = get(('final_norm', 'scale'))
  if head == 'score':
    out['score.weight'] = get(('scalar_head', 'kernel'))[None, :]
  elif not c.tied:
    out['lm_head.weight'] = get(('lm_head', 'kernel'))[:, :v].T
  elif tied_copies:
    out['lm_head.weight'] = embed
  return out


def _leaf(params, path):
  x = params
  for k in path:
    if not isinstance(x, Mapping) or k not in x:
      raise ConversionError(f"jaxgpt params have no entry {'/'.join(path)}.")
    x = x[k]
  return np.asarray(x)


def to_hf(params, mcfg, *, dtype=None, head: str = 'lm') -> dict[str, np.ndarray]:
  """A Hugging Face state dict (numpy, C-contiguous) from a jaxgpt parameter tree.

  Loads with `hf_model.load_state_dict({k: torch.from_numpy(v) ...}, strict=True)`.
  `dtype` casts every array (e.g. np.float32 for torch, which has no ml_dtypes bfloat16).
  The scalar head is left out unless `head='score'`.
  """
  c = _model_config(mcfg)
  out = globals_to_hf(lambda path: _leaf(params, path), c, head=head)
  for i in range(c.n_layers):
    out.update(layer_to_hf(lambda path: _leaf(params, ('blocks',) + path)[i], c, i))
  return {k: np.ascontiguousarray(x if dtype is None else x.astype(dtype))
          for k, x in out.items()}
