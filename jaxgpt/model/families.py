"""Model families as data: a family is a preset of the decoder's architecture switches.

One decoder (`jaxgpt.model.layers`) runs GPT-2, LLaMA 1-3, Mistral, Qwen 2 / 2.5, Qwen 3
and Gemma 3. What tells them apart is a handful of `config.model` fields, the switches:

  norm            rmsnorm | layernorm (with a bias: GPT-2)
  norm_plus_one   RMSNorm scales by (1 + w) rather than w (Gemma; w starts at 0)
  post_norms      a norm after attention and after the MLP as well as before (Gemma 3)
  qk_norm         an RMSNorm over each head's q and k, before RoPE (Qwen 3, Gemma 3)
  positions       rope | learned (a position-embedding table: GPT-2)
  bias            none | qkv (biases on q, k, v: Qwen 2) | all (every projection: GPT-2)
  mlp             gated (act(x W_gate) * x W_up) | plain (act(x W_up): GPT-2)
  mlp_activation  silu | gelu_tanh
  embed_scale     token embeddings times sqrt(d_model), in the compute dtype (Gemma)
  window_pattern  one letter per layer, repeated over the stack: S a sliding-window
                  layer (config.model.sliding_window > 0), G a global one (Gemma 3: SSSSSG)

`config.model.family` names a preset (FAMILIES). A switch the config leaves unset ('' or
None, the schema's defaults) takes the family's value; a value the config sets wins, so
family='llama' with qk_norm=True is a LLaMA with query-key norms. Sizes that differ within
a family (sliding_window, local_rope_theta, rope_scaling and its factors, attn_scale_dim)
are plain fields with neutral defaults. `resolve` turns a config.model into the values the
model is built with; GPT-2 also fixes two fields its configs always ignored (FIXED).
"""

from __future__ import annotations

from typing import Any

# LLaMA's switches: what every family starts from, and the values the decoder had before
# there were switches.
BASE = dict(norm='rmsnorm', norm_plus_one=False, post_norms=False, qk_norm=False,
            positions='rope', bias='none', mlp='gated', mlp_activation='silu',
            embed_scale=False, window_pattern='S')

# family -> the switches it changes from BASE.
FAMILIES: dict[str, dict[str, Any]] = {
    'llama': {},
    'mistral': {},
    'qwen2': dict(bias='qkv'),
    'qwen3': dict(qk_norm=True),
    'gemma3': dict(norm_plus_one=True, post_norms=True, qk_norm=True, embed_scale=True,
                   mlp_activation='gelu_tanh', window_pattern='SSSSSG'),
    'gpt2': dict(norm='layernorm', positions='learned', bias='all', mlp='plain',
                 mlp_activation='gelu_tanh'),
}

# Fields a family decides whatever config.model says: GPT-2 always ties its head to the
# embedding and has one key/value head per query head.
FIXED = {'gpt2': dict(tie_embeddings=True, kv_heads_are_heads=True)}

# The string switches' allowed values ('' = the family's); the others are booleans and
# window_pattern, a string of S and G.
CHOICES = dict(norm=('rmsnorm', 'layernorm'), positions=('rope', 'learned'),
               bias=('none', 'qkv', 'all'), mlp=('gated', 'plain'),
               mlp_activation=('silu', 'gelu_tanh'))
ROPE_SCALINGS = ('', 'linear', 'llama3')


def _error(message: str):
  from jaxgpt import config as config_lib  # pylint: disable=import-outside-toplevel
  return config_lib.ConfigError(message)


def preset(family: str) -> dict[str, Any]:
  """Every switch of a family (BASE with the family's changes)."""
  if family not in FAMILIES:
    raise _error(f"config.model.family={family!r} must be one of {tuple(FAMILIES)}.")
  return dict(BASE, **FAMILIES[family])


def resolve(m) -> dict[str, Any]:
  """The switches of config.model `m` (the family's where `m` leaves them unset), plus the
  resolved n_kv_heads and tie_embeddings. Fails naming the field on a value it does not know."""
  out = preset(m.family)
  for name in BASE:
    value = m.get(name)
    if value is None or value == '':
      continue
    if name in CHOICES and value not in CHOICES[name]:
      raise _error(f'config.model.{name}={value!r} must be one of {CHOICES[name]} '
                   "('' for the family's).")
    if name == 'window_pattern' and not set(value) <= set('SG'):
      raise _error(f'config.model.window_pattern={value!r}: one letter per layer, S (sliding '
                   "window) or G (global), repeated over the layers; '' for the family's.")
    out[name] = value
  fixed = FIXED.get(m.family, {})
  out['tie_embeddings'] = bool(fixed.get('tie_embeddings', m.tie_embeddings))
  out['n_kv_heads'] = int(m.n_heads if fixed.get('kv_heads_are_heads') else m.n_kv_heads)
  return out


def validate(m) -> dict[str, Any]:
  """`resolve`, and the switches' sizes checked against each other; returns the switches."""
  sw = resolve(m)
  if m.rope_scaling not in ROPE_SCALINGS:
    raise _error(f'config.model.rope_scaling={m.rope_scaling!r} must be one of {ROPE_SCALINGS}.')
  if m.rope_scaling and not m.rope_factor > 0:
    raise _error(f'config.model.rope_factor={m.rope_factor} must be > 0.')
  if m.rope_scaling == 'llama3' and not 0 < m.rope_low_freq_factor < m.rope_high_freq_factor:
    raise _error(f'config.model.rope_low_freq_factor={m.rope_low_freq_factor} and '
                 f'rope_high_freq_factor={m.rope_high_freq_factor} must satisfy 0 < low < high.')
  if m.sliding_window < 0 or m.attn_scale_dim < 0 or m.local_rope_theta < 0:
    raise _error('config.model.sliding_window, attn_scale_dim and local_rope_theta must be '
                 '>= 0 (0: off / the default).')
  if m.sliding_window == 0 and 'S' in sw['window_pattern'] and 'G' in sw['window_pattern']:
    raise _error(f"config.model.window_pattern={sw['window_pattern']!r} (family "
                 f"'{m.family}') mixes sliding-window and global layers but "
                 'config.model.sliding_window=0; set the window (Gemma 3: 512 or 1024 tokens).')
  return sw


def layer_windows(n_layers: int, sliding_window: int, pattern: str,
                  max_seq_len: int) -> tuple[int, ...] | None:
  """Each layer's attention window (0: global), or None when every layer is global (a
  window as long as the context is no window)."""
  if not 0 < sliding_window < max_seq_len or 'S' not in pattern:
    return None
  return tuple(sliding_window if pattern[i % len(pattern)] == 'S' else 0
               for i in range(n_layers))
