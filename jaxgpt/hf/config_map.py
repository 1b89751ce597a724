"""Hugging Face config.json <-> config.model: the one place a config.json is interpreted.

`model_config_from_hf` takes a config (a `transformers` config object, or the dict of a
config.json, old or new style, or one the GGUF reader builds) and returns every
config.model field a published model decides (`ARCH_FIELDS`): its sizes, its family
and the family's switches made explicit (`jaxgpt.model.families`). `hf_config_from_model`
writes the config.json of an exported model. Supported `model_type`s:

  llama        LLaMA 1-3 (RoPE scaling 'linear' or 'llama3'; tied or not)
  mistral      LLaMA with a sliding window on every layer
  qwen2        Qwen 2 / 2.5: biases on q, k, v
  qwen3        Qwen 3: RMSNorm on each head's q and k, head_dim of its own
  gemma3_text  Gemma 3 (Gemma3ForCausalLM): (1 + w) RMSNorms before and after attention
               and MLP, q/k norms, embeddings times sqrt(d), GeGLU (tanh), scores times
               query_pre_attn_scalar^-1/2, sliding-window layers with their own RoPE base
  gpt2         GPT-2

What jaxgpt does not implement is refused in one line naming the config.json field
(mixture-of-experts, logit soft-capping, other RoPE types, partial rotary, ...), rather
than imported as a model that computes something else.
"""

from __future__ import annotations

from typing import Any, Mapping

from jaxgpt.model import families

# model_type in config.json -> jaxgpt family, and back.
MODEL_TYPES = {'llama': 'llama', 'mistral': 'mistral', 'qwen2': 'qwen2', 'qwen3': 'qwen3',
               'gemma3_text': 'gemma3', 'gpt2': 'gpt2'}
HF_MODEL_TYPE = {family: model_type for model_type, family in MODEL_TYPES.items()}
# The class names' stem: '<stem>ForCausalLM', '<stem>ForSequenceClassification'.
_CLASS_STEMS = {'llama': ('Llama', 'Llama'), 'mistral': ('Mistral', 'Mistral'),
                'qwen2': ('Qwen2', 'Qwen2'), 'qwen3': ('Qwen3', 'Qwen3'),
                'gemma3': ('Gemma3', 'Gemma3Text')}
# Architectures people bring that jaxgpt does not implement, with what it lacks.
_NOT_IMPLEMENTED = {
    'mixtral': 'mixture-of-experts, num_local_experts',
    'qwen2_moe': 'mixture-of-experts, num_experts', 'qwen3_moe': 'mixture-of-experts, num_experts',
    'gemma2': 'attention and final logit soft-capping, attn_logit_softcapping',
    'gemma3': "multimodal; its text model is model_type 'gemma3_text', Gemma3ForCausalLM",
}
# config.model fields a published model decides; the rest (dtypes, scan, remat) are the run's.
ARCH_FIELDS = ('family', 'vocab_size', 'd_model', 'n_layers', 'n_heads', 'n_kv_heads',
               'head_dim', 'd_ff', 'max_seq_len', 'rope_theta', 'norm_eps',
               'tie_embeddings') + tuple(families.BASE) + (
                   'sliding_window', 'local_rope_theta', 'rope_scaling', 'rope_factor',
                   'rope_low_freq_factor', 'rope_high_freq_factor', 'rope_original_max_len',
                   'attn_scale_dim')
# Neutral values of the fields a family leaves to its members' sizes.
_NEUTRAL = dict(sliding_window=0, local_rope_theta=0.0, rope_scaling='', rope_factor=1.0,
                rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                rope_original_max_len=8192, attn_scale_dim=0.0)
# hidden_act values that are what jaxgpt's activations compute.
_ACTIVATIONS = {'silu': 'silu', 'swish': 'silu', 'gelu_pytorch_tanh': 'gelu_tanh',
                'gelu_new': 'gelu_tanh'}
_TANH_GELUS = ('gelu_new', 'gelu_pytorch_tanh')
_ROPE_TYPES = ('default', 'linear', 'llama3')
_SLIDING, _FULL = 'sliding_attention', 'full_attention'


class ConversionError(ValueError):
  """A state dict or config does not match the jaxgpt model; the message names the key."""


def _get(hf_config, name, default=None):
  if isinstance(hf_config, Mapping):
    value = hf_config.get(name, default)
  else:
    value = getattr(hf_config, name, default)
  return default if value is None else value


def _refuse(field: str, value, why: str):
  return ConversionError(f'hf config {field}={value!r}: {why}')


# -- config.json -> config.model ---------------------------------------------------------

def model_config_from_hf(hf_config) -> dict[str, Any]:
  """Every `ARCH_FIELDS` value of config.model for a Hugging Face config (object or
  dict): `cfg.model.update(model_config_from_hf(hf.config))`. Fails in one line naming the
  config.json field on what jaxgpt does not implement."""
  model_type = _get(hf_config, 'model_type')
  if model_type not in MODEL_TYPES:
    lacks = f' ({_NOT_IMPLEMENTED[model_type]})' if model_type in _NOT_IMPLEMENTED else ''
    raise ConversionError(f"hf config model_type={model_type!r}{lacks}: supported are "
                          f"{', '.join(repr(t) for t in MODEL_TYPES)}.")
  for field in ('num_experts', 'num_local_experts'):
    if _get(hf_config, field, 0) > 1:
      raise _refuse(field, _get(hf_config, field), 'jaxgpt has no mixture-of-experts layers.')
  family = MODEL_TYPES[model_type]
  out = dict(families.preset(family), **_NEUTRAL)
  if family == 'gpt2':
    out.update(_gpt2_config(hf_config))
  else:
    out.update(_decoder_config(hf_config, model_type))
  out['family'] = family
  return {k: out[k] for k in ARCH_FIELDS}


def _decoder_config(hf, model_type: str) -> dict[str, Any]:
  """The LLaMA-like families: sizes, then what each model_type adds."""
  d, n = int(_get(hf, 'hidden_size')), int(_get(hf, 'num_attention_heads'))
  head_dim = int(_get(hf, 'head_dim') or d // n)
  n_layers = int(_get(hf, 'num_hidden_layers'))
  gemma = model_type == 'gemma3_text'
  act_field = 'hidden_activation' if gemma else 'hidden_act'
  act = _get(hf, act_field, 'gelu_pytorch_tanh' if gemma else 'silu')
  if act not in _ACTIVATIONS:
    raise _refuse(act_field, act, f'jaxgpt implements {tuple(_ACTIVATIONS)}.')
  biased = ('attention_bias', 'mlp_bias') if model_type in ('llama', 'qwen3', 'gemma3_text') else ()
  for flag in biased:
    if _get(hf, flag, False):
      raise _refuse(flag, True, 'jaxgpt has no output-projection or MLP biases in this family.')
  out = dict(
      vocab_size=int(_get(hf, 'vocab_size')), d_model=d, n_layers=n_layers, n_heads=n,
      n_kv_heads=int(_get(hf, 'num_key_value_heads') or n),
      head_dim=0 if head_dim * n == d else head_dim,
      d_ff=int(_get(hf, 'intermediate_size')),
      max_seq_len=int(_get(hf, 'max_position_embeddings')),
      norm_eps=float(_get(hf, 'rms_norm_eps')),
      tie_embeddings=bool(_get(hf, 'tie_word_embeddings', gemma)),
      mlp_activation=_ACTIVATIONS[act])
  out.update(_rope(hf, gemma))
  out.update(_windows(hf, model_type, n_layers))
  if gemma:
    out.update(_gemma3(hf))
  return out


def _rope_params(hf, layer_type=None, theta_field='rope_theta') -> dict:
  """One kind of layer's RoPE settings, from transformers 5's `rope_parameters` (flat, or
  per layer type) or 4.x's rope_theta / rope_scaling."""
  params = dict(_get(hf, 'rope_parameters', {}))
  if layer_type is not None and (_SLIDING in params or _FULL in params):
    return dict(params.get(layer_type) or {})
  if params and layer_type is None:
    return params
  out = dict(_get(hf, 'rope_scaling', {})) if layer_type != _SLIDING else {}
  if 'type' in out and 'rope_type' not in out:
    out['rope_type'] = out.pop('type')
  if _get(hf, theta_field) is not None:
    out['rope_theta'] = _get(hf, theta_field)
  return out


def _rope(hf, gemma: bool) -> dict[str, Any]:
  glob = _rope_params(hf, _FULL if gemma else None)
  rope_type = glob.get('rope_type') or 'default'
  if rope_type not in _ROPE_TYPES:
    raise _refuse('rope_parameters.rope_type', rope_type,
                  f'jaxgpt implements RoPE types {_ROPE_TYPES}.')
  for params in (glob, _rope_params(hf, _SLIDING, 'rope_local_base_freq') if gemma else {}):
    if float(params.get('partial_rotary_factor', 1.0)) != 1.0:
      raise _refuse('partial_rotary_factor', params['partial_rotary_factor'],
                    'jaxgpt rotates the whole head.')
  def need(key):
    if glob.get(key) is None:
      raise _refuse(f'rope_parameters.{key}', None, f"RoPE type '{rope_type}' needs it.")
    return glob[key]

  out = dict(rope_theta=float(glob.get('rope_theta') or (1e6 if gemma else 1e4)))
  if rope_type != 'default':
    out.update(rope_scaling=rope_type, rope_factor=float(need('factor')))
  if rope_type == 'llama3':
    out.update(rope_low_freq_factor=float(need('low_freq_factor')),
               rope_high_freq_factor=float(need('high_freq_factor')),
               rope_original_max_len=int(need('original_max_position_embeddings')))
  if gemma:
    local = _rope_params(hf, _SLIDING, 'rope_local_base_freq')
    if (local.get('rope_type') or 'default') != 'default':
      raise _refuse('rope_parameters.sliding_attention.rope_type', local['rope_type'],
                    "jaxgpt's sliding-window layers use default RoPE with their own base.")
    out['local_rope_theta'] = float(local.get('rope_theta') or 1e4)
  return out


def _layer_types(hf, model_type: str, n_layers: int) -> list[str]:
  """Each layer's 'sliding_attention' / 'full_attention', as transformers decides it."""
  types = _get(hf, 'layer_types')
  if types:
    return list(types)
  if model_type == 'gemma3_text':
    every = int(_get(hf, 'sliding_window_pattern', 6))
    return [_SLIDING if (i + 1) % every else _FULL for i in range(n_layers)]
  if model_type in ('qwen2', 'qwen3'):
    if not _get(hf, 'use_sliding_window', False) or _get(hf, 'sliding_window') is None:
      return [_FULL] * n_layers
    first = int(_get(hf, 'max_window_layers', 0))
    return [_SLIDING if i >= first else _FULL for i in range(n_layers)]
  if model_type == 'mistral' and _get(hf, 'sliding_window') is not None:
    return [_SLIDING] * n_layers
  return [_FULL] * n_layers


def _windows(hf, model_type: str, n_layers: int) -> dict[str, Any]:
  """sliding_window and window_pattern (the shortest pattern that repeats to the layers)."""
  types = _layer_types(hf, model_type, n_layers)
  if len(types) != n_layers or not set(types) <= {_SLIDING, _FULL}:
    raise _refuse('layer_types', types, f'expected {n_layers} of {(_SLIDING, _FULL)}.')
  window = _get(hf, 'sliding_window')
  if model_type in ('qwen2', 'qwen3') and not _get(hf, 'use_sliding_window', False):
    window = None
  if _SLIDING not in types or window is None:
    return {}
  letters = ''.join('S' if t == _SLIDING else 'G' for t in types)
  period = next(p for p in range(1, n_layers + 1)
                if all(letters[i] == letters[i % p] for i in range(n_layers)))
  return dict(sliding_window=int(window), window_pattern=letters[:period])


def _gemma3(hf) -> dict[str, Any]:
  for field in ('final_logit_softcapping', 'attn_logit_softcapping'):
    if _get(hf, field) is not None:
      raise _refuse(field, _get(hf, field), 'jaxgpt has no logit soft-capping (Gemma 3 '
                    'leaves it null).')
  if _get(hf, 'use_bidirectional_attention', False):
    raise _refuse('use_bidirectional_attention', True, 'jaxgpt decoders are causal.')
  return dict(attn_scale_dim=float(_get(hf, 'query_pre_attn_scalar', 256)))


def _gpt2_config(hf) -> dict[str, Any]:
  act = _get(hf, 'activation_function', 'gelu_new')
  if act not in _TANH_GELUS:
    raise ConversionError(
        f"hf config activation_function='{act}': jaxgpt GPT-2 uses tanh GELU {_TANH_GELUS}.")
  if not _get(hf, 'scale_attn_weights', True) or _get(hf, 'scale_attn_by_inverse_layer_idx',
                                                      False):
    raise ConversionError('hf config: jaxgpt GPT-2 scales attention by 1/sqrt(head_dim) only '
                          '(scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False).')
  if not _get(hf, 'tie_word_embeddings', True):
    raise ConversionError('hf config tie_word_embeddings=False: jaxgpt GPT-2 always ties its '
                          'output head to the token embedding.')
  d, n = int(_get(hf, 'n_embd')), int(_get(hf, 'n_head'))
  return dict(
      vocab_size=int(_get(hf, 'vocab_size')), d_model=d, n_layers=int(_get(hf, 'n_layer')),
      n_heads=n, n_kv_heads=n, head_dim=0, d_ff=int(_get(hf, 'n_inner') or 4 * d),
      max_seq_len=int(_get(hf, 'n_positions')), rope_theta=10000.0,
      norm_eps=float(_get(hf, 'layer_norm_epsilon')), tie_embeddings=True)


# -- config.model -> config.json ---------------------------------------------------------

def model_config(mcfg):
  """A `ModelConfig`, from itself or from a full experiment ConfigDict."""
  if hasattr(mcfg, 'model') and not hasattr(mcfg, 'family'):
    from jaxgpt.model.transformer import ModelConfig  # pylint: disable=import-outside-toplevel
    return ModelConfig.from_config(mcfg)
  if mcfg.family not in HF_MODEL_TYPE:
    raise ConversionError(f"family '{mcfg.family}' must be one of {tuple(HF_MODEL_TYPE)}.")
  return mcfg


def hf_class_name(mcfg, head: str = 'lm') -> str:
  if mcfg.family == 'gpt2':
    return 'GPT2LMHeadModel' if head == 'lm' else 'GPT2ForSequenceClassification'
  lm_stem, score_stem = _CLASS_STEMS[mcfg.family]
  return lm_stem + 'ForCausalLM' if head == 'lm' else score_stem + 'ForSequenceClassification'


def _check_expressible(c, model_type: str) -> None:
  """Every switch of `c` has a place in a `model_type` config.json, or one line says which
  does not (e.g. family 'llama' with qk_norm=True: no LLaMA config has q/k norms)."""
  preset = families.preset(c.family)
  for name in families.BASE:
    value = getattr(c, name)
    if name in ('mlp_activation', 'window_pattern') or value == preset[name]:
      continue
    raise ConversionError(
        f"config.model.{name}={value!r} has no place in a Hugging Face '{model_type}' model "
        f"(family '{c.family}' has {preset[name]!r}); train with the family's value, or pick "
        'the family that has it.')
  windows = _declared_windows(c)
  if windows and model_type == 'llama':
    raise ConversionError(f"config.model.sliding_window={c.sliding_window}: a Hugging Face "
                          "'llama' model has no sliding window; use family 'mistral'.")
  if windows and model_type == 'mistral' and 0 in windows:
    raise ConversionError(f'config.model.window_pattern={c.window_pattern!r}: a Hugging Face '
                          "'mistral' model slides its window on every layer ('S').")
  if model_type != 'gemma3_text':
    if windows and c.local_rope_theta and c.local_rope_theta != c.rope_theta:
      raise ConversionError(f'config.model.local_rope_theta={c.local_rope_theta}: only a '
                            "Hugging Face 'gemma3_text' model has a RoPE base per layer kind.")
    if c.attn_scale_dim and c.attn_scale_dim != c.head_dim:
      raise ConversionError(f'config.model.attn_scale_dim={c.attn_scale_dim}: only a Hugging '
                            "Face 'gemma3_text' model scales attention other than by head_dim.")


def _declared_windows(c) -> tuple[int, ...] | None:
  """Each layer's window as the config declares it (also one at least as long as the
  context, which changes nothing the model computes but is part of its config.json)."""
  return families.layer_windows(c.n_layers, c.sliding_window, c.window_pattern, float('inf'))


def _rope_parameters(c) -> dict[str, Any]:
  out = {'rope_type': c.rope_scaling or 'default', 'rope_theta': c.rope_theta}
  if c.rope_scaling:
    out['factor'] = c.rope_factor
  if c.rope_scaling == 'llama3':
    out.update(low_freq_factor=c.rope_low_freq_factor, high_freq_factor=c.rope_high_freq_factor,
               original_max_position_embeddings=c.rope_original_max_len)
  return out


def hf_config_from_model(mcfg, *, head: str = 'lm', special_ids: Mapping[str, Any] = (),
                         dtype: str = 'float32') -> dict[str, Any]:
  """config.json of the exported model: `head='lm'` a `*ForCausalLM`, 'score' a
  `*ForSequenceClassification` with one label (the reward model). `special_ids` holds
  bos/eos/pad token ids (Hugging Face names, e.g. 'eos_token_id')."""
  c = model_config(mcfg)
  model_type = HF_MODEL_TYPE[c.family]
  out: dict[str, Any] = {'model_type': model_type, 'architectures': [hf_class_name(c, head)],
                         'vocab_size': c.vocab_size, 'dtype': dtype}
  if c.family == 'gpt2':
    out.update(
        n_embd=c.d_model, n_layer=c.n_layers, n_head=c.n_heads, n_inner=c.d_ff,
        n_positions=c.max_seq_len, layer_norm_epsilon=c.norm_eps,
        activation_function='gelu_new', tie_word_embeddings=True)
  else:
    _check_expressible(c, model_type)
    out.update(_decoder_json(c, model_type))
  if head == 'score':
    out.update(num_labels=1, id2label={'0': 'LABEL_0'}, label2id={'LABEL_0': 0})
  out.update({k: v for k, v in dict(special_ids).items() if v is not None})
  return out


def _int_if_whole(x):
  """transformers' strict configs type query_pre_attn_scalar as int."""
  return int(x) if float(x).is_integer() else x


def _decoder_json(c, model_type: str) -> dict[str, Any]:
  act = 'silu' if c.mlp_activation == 'silu' else 'gelu_pytorch_tanh'
  windows = _declared_windows(c)
  out = dict(
      hidden_size=c.d_model, intermediate_size=c.d_ff, num_hidden_layers=c.n_layers,
      num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, head_dim=c.head_dim,
      max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps,
      tie_word_embeddings=bool(c.tie_embeddings), rope_theta=c.rope_theta)
  layer_types = [_SLIDING if w else _FULL for w in windows or (0,) * c.n_layers]
  if c.rope_scaling:  # transformers 4.x reads rope_scaling, 5.x rope_parameters
    out['rope_scaling'] = {k: v for k, v in _rope_parameters(c).items() if k != 'rope_theta'}
  if model_type == 'gemma3_text':
    if windows and c.window_pattern == 'S' * (len(c.window_pattern) - 1) + 'G':
      out['sliding_window_pattern'] = len(c.window_pattern)  # what 4.x reads
    local = c.local_rope_theta or c.rope_theta
    out.update(
        hidden_activation=act, query_pre_attn_scalar=_int_if_whole(c.attn_scale_dim or c.head_dim),
        sliding_window=c.sliding_window or c.max_seq_len, layer_types=layer_types,
        rope_local_base_freq=local, final_logit_softcapping=None,
        attn_logit_softcapping=None, attention_bias=False,
        rope_parameters={_FULL: _rope_parameters(c),
                         _SLIDING: {'rope_type': 'default', 'rope_theta': local}})
    return out
  out.update(hidden_act=act, rope_parameters=_rope_parameters(c))
  if model_type == 'llama':
    out.update(attention_bias=False, mlp_bias=False)
  elif model_type == 'mistral':
    out['sliding_window'] = c.sliding_window if windows else None
  else:  # qwen2, qwen3
    # transformers 4.x reads max_window_layers: the sliding layers are the ones from there on
    first = next((i for i, t in enumerate(layer_types) if t == _SLIDING), c.n_layers)
    out.update(use_sliding_window=bool(windows), layer_types=layer_types,
               sliding_window=c.sliding_window if windows else None, max_window_layers=first)
    if model_type == 'qwen3':
      out['attention_bias'] = False
  return out
