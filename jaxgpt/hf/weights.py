"""Hugging Face <-> jaxgpt weights for LLaMA / Mistral and GPT-2, in memory, one layer at a time.

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
in both projects, so LLaMA q/k weights map without a permutation.

Vocabulary. jaxgpt's table has `padded_vocab_size` rows: the Hugging Face rows, then the
rows of tokens added to the tokenizer (`vocab_size` > the checkpoint's rows; initialised
to the mean of the existing rows), then zero padding up to `vocab_multiple` (masked out
of the logits). `to_hf` keeps the first `vocab_size` rows.

Heads. A tied LLaMA (`tie_word_embeddings`) and GPT-2 read logits from the embedding and
have no 'lm_head' entry. The scalar head of a reward model exports as the `score` of a
`*ForSequenceClassification` model (`head='score'`).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np

FAMILIES = ('llama', 'gpt2')
# model_type in config.json -> jaxgpt family. Mistral is LLaMA without a sliding window.
MODEL_TYPES = {'llama': 'llama', 'mistral': 'llama', 'gpt2': 'gpt2'}
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
  """config.model fields for a Hugging Face LLaMA / Mistral / GPT-2 config (object or dict).

  Use as `cfg.model.update(model_config_from_hf(hf.config))`. Fails, naming the
  setting, on what jaxgpt does not implement (biases, rope scaling, a sliding window
  shorter than the context, an untied GPT-2 head, other architectures).
  """
  model_type = _get(hf_config, 'model_type')
  if model_type not in MODEL_TYPES:
    raise ConversionError(f"hf config model_type='{model_type}': supported are "
                          f"{', '.join(repr(t) for t in MODEL_TYPES)}.")
  if MODEL_TYPES[model_type] == 'llama':
    return _llama_config(hf_config, model_type)
  return _gpt2_config(hf_config)


def _llama_config(hf_config, model_type):
  d, n = int(_get(hf_config, 'hidden_size')), int(_get(hf_config, 'num_attention_heads'))
  n_kv = _get(hf_config, 'num_key_value_heads') or n
  head_dim = _get(hf_config, 'head_dim') or d // n
  context = int(_get(hf_config, 'max_position_embeddings'))
  for flag in ('attention_bias', 'mlp_bias'):
    if _get(hf_config, flag, False):
      raise ConversionError(f'hf config {flag}=True: jaxgpt LLaMA has no projection biases.')
  act = _get(hf_config, 'hidden_act', 'silu')
  if act != 'silu':
    raise ConversionError(f"hf config hidden_act='{act}': jaxgpt LLaMA uses SwiGLU ('silu').")
  window = _get(hf_config, 'sliding_window')
  if model_type == 'mistral' and window is not None and int(window) < context:
    raise ConversionError(
        f'hf config sliding_window={window} is smaller than the context '
        f'(max_position_embeddings={context}): jaxgpt attends to the whole context and has '
        'no sliding window, so the model would compute something else.')
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
      d_ff=int(_get(hf_config, 'intermediate_size')), max_seq_len=context,
      rope_theta=float(theta), norm_eps=float(_get(hf_config, 'rms_norm_eps')),
      tie_embeddings=bool(_get(hf_config, 'tie_word_embeddings', False)))


def _gpt2_config(hf_config):
  act = _get(hf_config, 'activation_function', 'gelu_new')
  if act not in _TANH_GELUS:
    raise ConversionError(
        f"hf config activation_function='{act}': jaxgpt GPT-2 uses tanh GELU {_TANH_GELUS}.")
  if not _get(hf_config, 'scale_attn_weights', True) or _get(
      hf_config, 'scale_attn_by_inverse_layer_idx', False):
    raise ConversionError('hf config: jaxgpt GPT-2 scales attention by 1/sqrt(head_dim) only '
                          '(scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False).')
  if not _get(hf_config, 'tie_word_embeddings', True):
    raise ConversionError('hf config tie_word_embeddings=False: jaxgpt GPT-2 always ties its '
                          'output head to the token embedding.')
  d, n = int(_get(hf_config, 'n_embd')), int(_get(hf_config, 'n_head'))
  return dict(
      family='gpt2', vocab_size=int(_get(hf_config, 'vocab_size')), d_model=d,
      n_layers=int(_get(hf_config, 'n_layer')), n_heads=n, n_kv_heads=n, head_dim=0,
      d_ff=int(_get(hf_config, 'n_inner') or 4 * d),
      max_seq_len=int(_get(hf_config, 'n_positions')),
      norm_eps=float(_get(hf_config, 'layer_norm_epsilon')), tie_embeddings=False)


def hf_config_from_model(mcfg, *, head: str = 'lm', special_ids: Mapping[str, Any] = (),
                         dtype: str = 'float32') -> dict[str, Any]:
  """config.json of the exported model: `head='lm'` a `*ForCausalLM`, 'score' a
  `*ForSequenceClassification` with one label (the reward model).

  `special_ids` holds bos/eos/pad token ids (Hugging Face names, e.g. 'eos_token_id').
  """
  c = _model_config(mcfg)
  kind = 'ForCausalLM' if head == 'lm' else 'ForSequenceClassification'
  out: dict[str, Any] = {'vocab_size': c.vocab_size, 'dtype': dtype}
  if c.family == 'llama':
    out.update(
        model_type='llama', architectures=['Llama' + kind], hidden_size=c.d_model,
        intermediate_size=c.d_ff, num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads,
        head_dim=c.head_dim, max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps,
        rope_parameters={'rope_type': 'default', 'rope_theta': c.rope_theta},
        rope_theta=c.rope_theta, hidden_act='silu', attention_bias=False, mlp_bias=False,
        tie_word_embeddings=bool(c.tie_embeddings))
  else:
    out.update(
        model_type='gpt2', architectures=['GPT2' + ('LMHeadModel' if head == 'lm' else kind)],
        n_embd=c.d_model, n_layer=c.n_layers, n_head=c.n_heads, n_inner=c.d_ff,
        n_positions=c.max_seq_len, layer_norm_epsilon=c.norm_eps,
        activation_function='gelu_new', tie_word_embeddings=True)
  if head == 'score':
    out.update(num_labels=1, id2label={'0': 'LABEL_0'}, label2id={'LABEL_0': 0})
  out.update({k: v for k, v in dict(special_ids).items() if v is not None})
  return out


# -- helpers -----------------------------------------------------------------------------

def _model_config(mcfg):
  """A `ModelConfig`, from itself or from a full experiment ConfigDict."""
  if hasattr(mcfg, 'model') and not hasattr(mcfg, 'family'):
    from jaxgpt.model.transformer import ModelConfig
    return ModelConfig.from_config(mcfg)
  if mcfg.family not in FAMILIES:
    raise ConversionError(f"family '{mcfg.family}' must be one of {FAMILIES}.")
  return mcfg


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


def hf_class_name(mcfg, head: str = 'lm') -> str:
  if mcfg.family == 'gpt2':
    return 'GPT2LMHeadModel' if head == 'lm' else 'GPT2ForSequenceClassification'
  return 'LlamaForCausalLM' if head == 'lm' else 'LlamaForSequenceClassification'


def _prefix(c) -> str:
  return 'model.' if c.family == 'llama' else 'transformer.'


def embed_key(c) -> str:
  return 'model.embed_tokens.weight' if c.family == 'llama' else 'transformer.wte.weight'


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
  return _llama_layer(read, c, i) if c.family == 'llama' else _gpt2_layer(read, c, i)


def globals_from_hf(read: Read, mcfg, *, has_key=None):
  """Yields (path, array) for the jaxgpt arrays outside the layers (final norm, embedding,
  head), vocab grown and padded, one at a time so a streaming caller holds one of them.
  `has_key(key)` says whether the checkpoint holds a key (for a tied head saved once)."""
  c = _model_config(mcfg)
  d = c.d_model
  p = _prefix(c)
  if c.family == 'gpt2':
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
            + ('(GPT-2 always does).' if c.family == 'gpt2' else
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


def _llama_layer(read, c, i):
  d, n, k, h, f = c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.d_ff
  p = f'model.layers.{i}.'
  return {
      ('attn', 'q', 'kernel'): read(p + 'self_attn.q_proj.weight', (n * h, d)).T.reshape(d, n, h),
      ('attn', 'k', 'kernel'): read(p + 'self_attn.k_proj.weight', (k * h, d)).T.reshape(d, k, h),
      ('attn', 'v', 'kernel'): read(p + 'self_attn.v_proj.weight', (k * h, d)).T.reshape(d, k, h),
      ('attn', 'o', 'kernel'): read(p + 'self_attn.o_proj.weight', (d, n * h)).T.reshape(n, h, d),
      ('mlp', 'gate', 'kernel'): read(p + 'mlp.gate_proj.weight', (f, d)).T,
      ('mlp', 'up', 'kernel'): read(p + 'mlp.up_proj.weight', (f, d)).T,
      ('mlp', 'down', 'kernel'): read(p + 'mlp.down_proj.weight', (d, f)).T,
      ('attn_norm', 'scale'): read(p + 'input_layernorm.weight', (d,)),
      ('mlp_norm', 'scale'): read(p + 'post_attention_layernorm.weight', (d,)),
  }


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
  d, n, k, h = c.d_model, c.n_heads, c.n_kv_heads, c.head_dim
  if c.family == 'llama':
    p = f'model.layers.{i}.'
    return {
        p + 'self_attn.q_proj.weight': get(('attn', 'q', 'kernel')).reshape(d, n * h).T,
        p + 'self_attn.k_proj.weight': get(('attn', 'k', 'kernel')).reshape(d, k * h).T,
        p + 'self_attn.v_proj.weight': get(('attn', 'v', 'kernel')).reshape(d, k * h).T,
        p + 'self_attn.o_proj.weight': get(('attn', 'o', 'kernel')).reshape(n * h, d).T,
        p + 'mlp.gate_proj.weight': get(('mlp', 'gate', 'kernel')).T,
        p + 'mlp.up_proj.weight': get(('mlp', 'up', 'kernel')).T,
        p + 'mlp.down_proj.weight': get(('mlp', 'down', 'kernel')).T,
        p + 'input_layernorm.weight': get(('attn_norm', 'scale')),
        p + 'post_attention_layernorm.weight': get(('mlp_norm', 'scale')),
    }
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
  if c.family == 'gpt2':
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
