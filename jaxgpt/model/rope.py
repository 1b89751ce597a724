"""Rotary position embedding: the frequencies of a layer, and their rotation of q and k.

Rotate-half layout (the Hugging Face LLaMA convention, so published q/k weights map
without a permutation). The frequencies are 1 / theta^(2i/h), then scaled as the config
says: 'linear' divides them all by the factor (Gemma 3's global layers), 'llama3' divides
the low ones by it and blends the band between (Llama 3.1-3.3). A sliding-window layer
with its own base (config.model.local_rope_theta, Gemma 3) gets plain, unscaled RoPE.

Frequencies are computed from Python constants inside the traced function (XLA folds
them), once per kind of layer; a scanned stack picks its layer's with a `where`.
"""

from __future__ import annotations

import math

import jax.numpy as jnp


def frequencies(cfg, local: bool = False):
  """inv_freq_h2 (float32) of the global layers, or of the sliding-window layers (`local`)."""
  h = cfg.head_dim
  own_base = local and cfg.local_rope_theta
  theta = cfg.local_rope_theta if own_base else cfg.rope_theta
  inv_freq_h2 = 1.0 / theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h)
  if own_base or not cfg.rope_scaling:
    return inv_freq_h2
  if cfg.rope_scaling == 'linear':
    return inv_freq_h2 / cfg.rope_factor
  return _llama3(inv_freq_h2, cfg)


def _llama3(inv_freq_h2, cfg):
  """Llama 3.1's scaling: wavelengths longer than original_len / low_freq_factor are
  stretched by the factor, shorter than original_len / high_freq_factor kept, and the
  band between interpolated."""
  factor, low, high = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
  original = cfg.rope_original_max_len
  wavelen_h2 = 2 * math.pi / inv_freq_h2
  scaled_h2 = jnp.where(wavelen_h2 > original / low, inv_freq_h2 / factor, inv_freq_h2)
  smooth_h2 = (original / wavelen_h2 - low) / (high - low)
  blended_h2 = (1 - smooth_h2) * scaled_h2 / factor + smooth_h2 * scaled_h2
  medium_h2 = (wavelen_h2 >= original / high) & (wavelen_h2 <= original / low)
  return jnp.where(medium_h2, blended_h2, scaled_h2)


def layer_frequencies(cfg, window):
  """This layer's inv_freq_h2: the global layers', or where `window` (the layer's, 0:
  global; may be traced) is a sliding window with its own base, the local layers'."""
  if window is None or not cfg.local_rope_theta:
    return frequencies(cfg)
  return jnp.where(window > 0, frequencies(cfg, local=True), frequencies(cfg))


def rotate(x_btnh, positions_bt, inv_freq_h2):
  """x rotated by the angles positions * inv_freq, computed in float32."""
  h = x_btnh.shape[-1]
  angle_bth2 = positions_bt[..., None].astype(jnp.float32) * inv_freq_h2
  cos, sin = jnp.cos(angle_bth2)[:, :, None, :], jnp.sin(angle_bth2)[:, :, None, :]
  x = x_btnh.astype(jnp.float32)
  x1, x2 = x[..., : h // 2], x[..., h // 2:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_btnh.dtype)
