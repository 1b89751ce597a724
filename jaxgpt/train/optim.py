"""The optax chain: global-norm clipping, AdamW with a decay mask, warm-up + cosine."""

from __future__ import annotations

import jax
import optax

# Leaves named like this are matrices (decay under 'matrices'); biases, norm scales
# and the scalar head bias are not.
_MATRIX_LEAVES = ('kernel', 'embed', 'pos_embed')


def schedule(t) -> optax.Schedule:
  """Linear warm-up from 0 to t.lr, then cosine decay to t.lr * t.min_lr_ratio."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=t.lr, warmup_steps=t.warmup_steps,
      decay_steps=max(t.steps, t.warmup_steps + 1), end_value=t.lr * t.min_lr_ratio)


def decay_mask(params, which: str):
  """Tree of bools: which parameters get weight decay ('matrices' | 'all' | 'none')."""
  def one(path, _):
    if which == 'all':
      return True
    if which == 'none':
      return False
    return getattr(path[-1], 'key', None) in _MATRIX_LEAVES
  return jax.tree_util.tree_map_with_path(one, params)


def make_optimizer(t) -> optax.GradientTransformation:
  """AdamW from config.train, with the learning rate schedule inside."""
  return optax.chain(
      optax.clip_by_global_norm(t.clip_norm) if t.clip_norm > 0 else optax.identity(),
      optax.adamw(schedule(t), b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay,
                  mask=lambda p: decay_mask(p, t.decay)),
  )
