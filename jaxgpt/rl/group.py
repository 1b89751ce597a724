"""Critic-free policy-gradient math (GRPO, Dr. GRPO, RLOO): pure, jittable functions.

Without a value model the baseline of a reply comes from the other replies to the same
prompt. Layout: a rollout batch of B rows holds B / K groups of K consecutive rows (rows
g*K .. g*K + K - 1 answer prompt g), K the group size. Every reply gets one scalar
advantage, broadcast over its tokens.

As in jaxgpt.rl.algo, the loss is a *sum* plus stats that are sums, with a 'weight' to
divide by once for the whole step; micro-batches and shards add up exactly. A row
"counts" when it has at least one response token: an empty row (batch padding) gets no
loss, no stats and no weight under every aggregation. All float math is float32.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxgpt.rl import algo

ADVANTAGE_ESTIMATORS = ('grpo', 'dr_grpo', 'rloo')
LOSS_AGGREGATIONS = ('seq_mean', 'token_sum', 'token_mean')


def _f32(x):
  return jnp.asarray(x, jnp.float32)


def _groups(x_b, group_size: int):
  """(B,) -> (B / K, K); a batch that is not whole groups is an error, not a silent mix."""
  b = x_b.shape[0]
  if group_size < 1 or b % group_size:
    raise ValueError(f'config.grpo.group_size = {group_size} must be >= 1 and divide the '
                     f'rollout batch of {b} rows')
  return x_b.reshape(b // group_size, group_size)


def group_advantages(rewards_b, group_size: int, estimator: str, eps: float = 1e-6):
  """One advantage per reply, from its reward and its group's: (B,) float32.

  'grpo': (r - mean) / (std + eps), std the population one (divides by K, not K - 1).
  'dr_grpo': r - mean; no std division, which would up-weight groups that barely differ.
  'rloo': r - mean of the other K - 1 rewards = K / (K - 1) * (r - mean); needs K >= 2.
  A group whose K rewards are all equal gets exactly 0 under each (no signal, and no
  float32 round-off of mean != r amplified by 1 / eps).
  """
  if estimator not in ADVANTAGE_ESTIMATORS:
    raise ValueError(f'unknown advantage estimator {estimator!r}: config.grpo.advantage '
                     f'must be one of {ADVANTAGE_ESTIMATORS}')
  if estimator == 'rloo' and group_size < 2:
    raise ValueError(f'config.grpo.advantage = rloo needs config.grpo.group_size >= 2 '
                     f'(got {group_size}): the leave-one-out baseline of a lone reply '
                     f'is undefined')
  r_gk = _groups(_f32(rewards_b), group_size)
  equal_g1 = jnp.max(r_gk, axis=1, keepdims=True) == jnp.min(r_gk, axis=1, keepdims=True)
  centred_gk = jnp.where(equal_g1, 0.0, r_gk - jnp.mean(r_gk, axis=1, keepdims=True))
  if estimator == 'grpo':
    adv_gk = centred_gk / (jnp.std(r_gk, axis=1, keepdims=True) + eps)
  elif estimator == 'dr_grpo':
    adv_gk = centred_gk
  else:
    adv_gk = centred_gk * (group_size / (group_size - 1))
  return adv_gk.reshape(-1)


def token_loss_weights(mask_bt, aggregation: str, max_tokens: int | None):
  """(weights_bt, weight): sum(loss_bt * weights_bt) / weight is the aggregation's mean.

  The weight is a sum over rows, so summing both over micro-batches (or shards) and
  dividing once gives the mean of the whole step. Empty rows add 0 to both.
  'seq_mean' (GRPO): weights mask / len_i, weight = rows with len_i > 0; each reply's
    token mean, then the mean over replies, so a long reply's tokens count less each.
  'token_sum' (Dr. GRPO): weights = mask, weight = (non-empty rows) * max_tokens: a
    token budget that does not depend on the replies' lengths (with no empty rows it is
    the constant rows * max_tokens of each micro-batch), so no length bias.
  'token_mean' (DAPO): weights = mask, weight = total response tokens.
  """
  if aggregation not in LOSS_AGGREGATIONS:
    raise ValueError(f'unknown loss aggregation {aggregation!r}: '
                     f'config.grpo.loss_aggregation must be one of {LOSS_AGGREGATIONS}')
  mask_bt = _f32(mask_bt)
  len_b = jnp.sum(mask_bt, axis=-1)
  rows = jnp.sum(len_b > 0).astype(jnp.float32)
  if aggregation == 'seq_mean':
    return mask_bt / jnp.where(len_b > 0, len_b, 1.0)[:, None], rows
  if aggregation == 'token_sum':
    if not max_tokens or max_tokens < 1:
      raise ValueError(f'loss aggregation token_sum needs max_tokens >= 1 (the response '
                       f'budget), got {max_tokens}')
    return mask_bt, rows * max_tokens
  return mask_bt, jnp.sum(len_b)


def group_policy_loss_sum(logp_bt, old_logp_bt, adv_b, mask_bt, clip: float,
                          aggregation: str, max_tokens: int | None, ref_logp_bt=None,
                          kl_coef=0.0, kl_clamp: float = 10.0):
  """GRPO-family loss, summed with token_loss_weights: (loss_sum, stats of sums).

  The PPO clipped surrogate of algo.policy_loss_sum with adv_b broadcast over each reply's
  tokens, plus, when ref_logp_bt is given and kl_coef is not a literal 0, GRPO's KL
  penalty in the loss (not the reward): kl_coef * k3(logp, ref_logp) per token (clamped
  to kl_clamp as in algo.kl_per_token). kl_coef may be traced.
  Every stat uses the same weights, so stat / weight is its mean under the aggregation.
  stats: the surrogate's clipfrac / approxkl / ratio / ratio_sq, 'pg_loss' (the surrogate
  alone), 'kl_loss' (kl_coef * weighted k3), 'tokens' (response tokens: tokens / weight
  turns token_sum's stats back into token means) and 'weight', the divisor, summed over
  micro-batches like the rest (so token_sum's is rows * max_tokens of each micro-batch).
  """
  weights_bt, weight = token_loss_weights(mask_bt, aggregation, max_tokens)
  adv_bt = jnp.broadcast_to(_f32(adv_b)[:, None], weights_bt.shape)
  pg_sum, stats = algo.policy_loss_sum(logp_bt, old_logp_bt, adv_bt, weights_bt, clip)
  kl_loss = jnp.float32(0.0)
  static_zero = isinstance(kl_coef, (int, float)) and kl_coef == 0
  if ref_logp_bt is not None and not static_zero:
    kl_bt = algo.kl_per_token(logp_bt, ref_logp_bt, 'k3', kl_clamp)
    kl_loss = _f32(kl_coef) * algo.masked_sum(kl_bt, weights_bt)
  stats = dict(stats, pg_loss=pg_sum, kl_loss=kl_loss, tokens=jnp.sum(_f32(mask_bt)),
               weight=weight)
  return pg_sum + kl_loss, stats


def group_stats(rewards_b, correct_b, group_size: int):
  """Per-step diagnostics of the groups, as float32 jnp scalars (jittable; under jit with
  sharded inputs they are global over all devices).

  'equal_reward_groups': share of groups whose K rewards are all equal; these carry no
    learning signal (every estimator gives them advantage 0).
  'pass_at_k': share of groups with at least one correct reply (correct_b bool or 0/1):
    the empirical rate for k = K, not the unbiased pass@k estimator for k < K.
  'reward_std_in_group': mean over groups of the population std of the K rewards
    (exactly 0 for an all-equal group).
  """
  r_gk = _groups(_f32(rewards_b), group_size)
  correct_gk = _groups(jnp.asarray(correct_b) != 0, group_size)
  equal_g = jnp.max(r_gk, axis=1) == jnp.min(r_gk, axis=1)
  return {'equal_reward_groups': jnp.mean(equal_g.astype(jnp.float32)),
          'pass_at_k': jnp.mean(jnp.any(correct_gk, axis=1).astype(jnp.float32)),
          'reward_std_in_group': jnp.mean(jnp.where(equal_g, 0.0, jnp.std(r_gk, axis=1)))}
