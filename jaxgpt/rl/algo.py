"""PPO math for RLHF: pure, jittable functions of arrays.

Losses return *sums* over the response mask (plus stats that are sums too), as in
jaxgpt/losses.py: the caller divides once by the mask weight of the whole step, so
micro-batches and shards add up exactly. Statistics over the mask (whitening,
explained variance) reduce over the whole array, so under jit with a sharded input
they are global over all devices. All float math is float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

KL_ESTIMATORS = ('k1', 'k2', 'k3')


def _f32(x):
  return jnp.asarray(x, jnp.float32)


def kl_per_token(logp_bt, ref_logp_bt, estimator: str = 'k1', clamp: float = 10.0):
  """Per-token estimate of KL(pi || ref) from tokens sampled from pi (Schulman's k1/k2/k3).

  x = logp - ref_logp is clamped to [-clamp, clamp] first, so one token the reference
  finds near-impossible cannot blow the reward (k3's exp(-x)) up.
  """
  if estimator not in KL_ESTIMATORS:
    raise ValueError(f'unknown KL estimator {estimator!r}: config.ppo.kl_estimator must be '
                     f'one of {KL_ESTIMATORS}')
  x_bt = jnp.clip(_f32(logp_bt) - _f32(ref_logp_bt), -clamp, clamp)
  if estimator == 'k1':
    return x_bt  # unbiased, high variance, can be negative
  if estimator == 'k2':
    return 0.5 * jnp.square(x_bt)  # biased, low variance, >= 0
  return jnp.expm1(-x_bt) + x_bt  # k3: unbiased, >= 0


def last_token_index(mask_bt):
  """Index of the last nonzero mask position in each row (0 for an empty row)."""
  t = mask_bt.shape[-1]
  return jnp.max(jnp.where(mask_bt != 0, jnp.arange(t), 0), axis=-1)


def per_token_rewards(kl_bt, scores_b, mask_bt, beta):
  """-beta * KL on every response token, plus the reward model's score on the last one.

  The score is a sequence-level reward, so it lands where the sequence ends; a row with
  no response token gets nothing. beta may be traced (adaptive controller).
  """
  mask_bt = _f32(mask_bt)
  rewards_bt = jnp.where(mask_bt != 0, -_f32(beta) * _f32(kl_bt), 0.0)
  last_bt = jax.nn.one_hot(last_token_index(mask_bt), mask_bt.shape[-1], dtype=jnp.float32)
  return rewards_bt + last_bt * (mask_bt != 0) * _f32(scores_b)[:, None]


def gae(rewards_bt, values_bt, mask_bt, gamma: float, lam: float):
  """Generalized advantage estimation over response tokens: (advantages_bt, returns_bt).

  A reverse scan over time. "Next" means the next position with mask 1: masked positions
  (prompt, padding, and any gap inside a non-contiguous mask) are skipped, carrying the
  next response token's value and advantage across them unchanged, so a gap acts as if
  absent. After the last response token the value is 0 (terminal). Masked positions get
  advantage and return 0; their rewards and values are never read. returns = advantages +
  values, before any whitening of the advantages.
  """
  on_tb = jnp.swapaxes(mask_bt != 0, 0, 1)
  r_tb = jnp.swapaxes(_f32(rewards_bt), 0, 1)
  v_tb = jnp.swapaxes(_f32(values_bt), 0, 1)

  def step(carry, xs):
    next_v_b, next_adv_b = carry
    on_b, r_b, v_b = xs
    delta_b = r_b + gamma * next_v_b - v_b
    adv_b = delta_b + gamma * lam * next_adv_b
    carry = (jnp.where(on_b, v_b, next_v_b), jnp.where(on_b, adv_b, next_adv_b))
    return carry, jnp.where(on_b, adv_b, 0.0)

  zeros_b = jnp.zeros(r_tb.shape[1], jnp.float32)
  _, adv_tb = jax.lax.scan(step, (zeros_b, zeros_b), (on_tb, r_tb, v_tb), reverse=True)
  advantages_bt = jnp.swapaxes(adv_tb, 0, 1)
  returns_bt = jnp.where(mask_bt != 0, advantages_bt + _f32(values_bt), 0.0)
  return advantages_bt, returns_bt


def masked_sum(x, mask, axis=None):
  """sum(x * mask); positions with mask 0 are never read (inf/nan there stay out)."""
  mask = _f32(mask)
  return jnp.sum(jnp.where(mask != 0, _f32(x) * mask, 0.0), axis=axis)


def masked_mean(x, mask, axis=None):
  """Weighted mean over the mask; 0 where the mask is empty."""
  total = jnp.sum(_f32(mask), axis=axis)
  return masked_sum(x, mask, axis) / jnp.where(total != 0, total, 1.0)


def masked_whiten(x_bt, mask_bt, shift_mean: bool = True, eps: float = 1e-8):
  """(x - mean) / sqrt(var + eps) over mask positions of the whole array; 0 off the mask.

  The variance is the biased one (divides by the count, not count - 1): token counts are
  large, and it keeps whitened values at exactly variance 1 over the mask (up to eps).
  shift_mean=False adds the mean back, keeping the sign information of rewards (TRL).
  """
  mean = masked_mean(x_bt, mask_bt)
  centred_bt = _f32(x_bt) - mean
  var = masked_mean(jnp.square(centred_bt), mask_bt)
  out_bt = centred_bt * jax.lax.rsqrt(var + eps)
  if not shift_mean:
    out_bt = out_bt + mean
  return jnp.where(mask_bt != 0, out_bt, 0.0)


def policy_loss_sum(logp_bt, old_logp_bt, advantages_bt, mask_bt, clip: float):
  """PPO clipped surrogate, summed over the mask: (loss_sum, stats of sums).

  Per token max(-A * ratio, -A * clip(ratio, 1 - clip, 1 + clip)): the pessimistic bound,
  so moving the ratio beyond the clip range in the advantage's direction earns nothing.
  stats: clipfrac (tokens where the clipped term is the larger), approxkl
  (0.5 * log-ratio^2), ratio and ratio_sq (for the mean and variance of the ratio).
  """
  log_ratio_bt = _f32(logp_bt) - _f32(old_logp_bt)
  ratio_bt = jnp.exp(log_ratio_bt)
  adv_bt = _f32(advantages_bt)
  unclipped_bt = -adv_bt * ratio_bt
  clipped_bt = -adv_bt * jnp.clip(ratio_bt, 1.0 - clip, 1.0 + clip)
  stats = {
      'clipfrac': masked_sum(clipped_bt > unclipped_bt, mask_bt),
      'approxkl': masked_sum(0.5 * jnp.square(log_ratio_bt), mask_bt),
      'ratio': masked_sum(ratio_bt, mask_bt),
      'ratio_sq': masked_sum(jnp.square(ratio_bt), mask_bt),
  }
  return masked_sum(jnp.maximum(unclipped_bt, clipped_bt), mask_bt), stats


def value_loss_sum(values_bt, old_values_bt, returns_bt, mask_bt, clip: float):
  """Clipped value loss 0.5 * max((V - R)^2, (V_clipped - R)^2), summed over the mask.

  V_clipped keeps V within clip of the rollout's V_old, so one minibatch cannot move the
  value far. stats: val_clipfrac, the count of tokens where the clipped term is larger.
  """
  v_bt, old_v_bt, r_bt = _f32(values_bt), _f32(old_values_bt), _f32(returns_bt)
  v_clipped_bt = jnp.clip(v_bt, old_v_bt - clip, old_v_bt + clip)
  unclipped_bt = jnp.square(v_bt - r_bt)
  clipped_bt = jnp.square(v_clipped_bt - r_bt)
  loss_sum = masked_sum(0.5 * jnp.maximum(unclipped_bt, clipped_bt), mask_bt)
  return loss_sum, {'val_clipfrac': masked_sum(clipped_bt > unclipped_bt, mask_bt)}


def entropy_sum(logits_btv, mask_bt):
  """Sum over the mask of the entropy of softmax(logits), in float32 (-inf logits are fine)."""
  logp_btv = jax.nn.log_softmax(_f32(logits_btv), axis=-1)
  p_btv = jnp.exp(logp_btv)
  ent_bt = -jnp.sum(jnp.where(p_btv > 0, p_btv * logp_btv, 0.0), axis=-1)
  return masked_sum(ent_bt, mask_bt)


def grad_unless_zero(coef, x):
  """x, its gradient cut when the static `coef` is 0: a term that is only logged (the
  entropy at entropy_coef 0) then costs no backward pass."""
  return x if coef else jax.lax.stop_gradient(x)


def explained_variance(values_bt, returns_bt, mask_bt):
  """1 - Var[R - V] / Var[R] over the mask: 1 is a perfect value function, <= 0 useless.

  NaN when the returns have no variance (undefined).
  """
  r_bt = _f32(returns_bt)
  diff_bt = r_bt - _f32(values_bt)
  var_diff = masked_mean(jnp.square(diff_bt - masked_mean(diff_bt, mask_bt)), mask_bt)
  var_r = masked_mean(jnp.square(r_bt - masked_mean(r_bt, mask_bt)), mask_bt)
  return jnp.where(var_r > 0, 1.0 - var_diff / jnp.where(var_r > 0, var_r, 1.0), jnp.nan)


def adaptive_kl_coef(beta, kl, n_steps, target: float, horizon: float):
  """Ziegler et al. (2019) proportional controller for the KL coefficient.

  beta * (1 + clip(kl / target - 1, -0.2, 0.2) * n_steps / horizon): beta grows when the
  KL runs above target and shrinks below it. target <= 0 keeps beta fixed.
  """
  if target <= 0:
    return beta
  error = jnp.clip(_f32(kl) / target - 1.0, -0.2, 0.2)
  return _f32(beta) * (1.0 + error * _f32(n_steps) / horizon)
