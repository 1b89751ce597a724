"""Loss functions: pure functions of arrays, shared by every stage.

Each returns a *sum* over tokens (or rows) plus what to normalise by, so a step
that accumulates micro-batches can divide once by the count of the whole step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_log_probs(logits_btv, targets_bt):
  """log p(target) per position, float32."""
  logits_btv = logits_btv.astype(jnp.float32)
  logz_bt = jax.nn.logsumexp(logits_btv, axis=-1)
  target_logit_bt = jnp.take_along_axis(logits_btv, targets_bt[..., None], axis=-1)[..., 0]
  return target_logit_bt - logz_bt


def masked_lm_loss_sum(logits_btv, targets_bt, weights_bt, z_loss: float = 0.0):
  """Sum over weighted positions of next-token cross-entropy (+ z-loss).

  Returns (loss_sum, nll_sum): loss_sum includes the z-loss term
  z_loss * logsumexp(logits)^2 that keeps the softmax normaliser near 1; nll_sum
  is the plain cross-entropy, the number to report.
  """
  logits_btv = logits_btv.astype(jnp.float32)
  weights_bt = weights_bt.astype(jnp.float32)
  logz_bt = jax.nn.logsumexp(logits_btv, axis=-1)
  target_logit_bt = jnp.take_along_axis(logits_btv, targets_bt[..., None], axis=-1)[..., 0]
  nll_sum = jnp.sum((logz_bt - target_logit_bt) * weights_bt)
  loss_sum = nll_sum
  if z_loss:
    loss_sum = loss_sum + z_loss * jnp.sum(jnp.square(logz_bt) * weights_bt)
  return loss_sum, nll_sum
