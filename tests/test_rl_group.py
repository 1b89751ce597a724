"""The critic-free math of jaxgpt.rl.group against plain Python loops and hand values."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxgpt.rl import group

_AGGREGATIONS = group.LOSS_AGGREGATIONS


def _masks(rng, b, t, empty_rows=(1, 6)):
  """Prompt zeros, response ones, padding zeros; uneven lengths, and some empty rows."""
  mask = np.zeros((b, t), np.float32)
  for i in range(b):
    start = rng.integers(0, t // 2)
    mask[i, start:start + rng.integers(1, t - start + 1)] = 1.0
  mask[list(empty_rows)] = 0.0
  return mask


def _advantages_reference(rewards, k, estimator, eps=1e-6):
  out = []
  for g in range(len(rewards) // k):
    rs = [float(r) for r in rewards[g * k:(g + 1) * k]]
    mean = sum(rs) / k
    std = math.sqrt(sum((r - mean) ** 2 for r in rs) / k)  # population std
    for r in rs:
      if estimator == 'grpo':
        out.append((r - mean) / (std + eps))
      elif estimator == 'dr_grpo':
        out.append(r - mean)
      else:
        out.append(r - (sum(rs) - r) / (k - 1))
  return np.array(out)


def _aggregate_reference(loss, mask, aggregation, max_tokens):
  """The aggregation's mean of loss over the mask, row by row; empty rows do not count."""
  rows = [(sum(loss[i, j] for j in range(mask.shape[1]) if mask[i, j]),
           int(mask[i].sum())) for i in range(mask.shape[0])]
  rows = [(s, n) for s, n in rows if n > 0]
  if aggregation == 'seq_mean':
    return sum(s / n for s, n in rows) / len(rows)
  if aggregation == 'token_sum':
    return sum(s for s, _ in rows) / (len(rows) * max_tokens)
  return sum(s for s, _ in rows) / sum(n for _, n in rows)


@pytest.mark.parametrize('k', [3, 4])
def test_each_estimator_equals_the_python_loop(k):
  rng = np.random.default_rng(k)
  rewards = rng.normal(size=12).astype(np.float32)
  fn = jax.jit(group.group_advantages, static_argnums=(1, 2))
  for estimator in group.ADVANTAGE_ESTIMATORS:
    adv = fn(rewards, k, estimator)
    assert adv.shape == (12,) and adv.dtype == jnp.float32
    np.testing.assert_allclose(adv, _advantages_reference(rewards, k, estimator),
                               rtol=1e-5, atol=1e-6)
  # RLOO = K / (K - 1) * (r - mean); Dr. GRPO = r - mean; GRPO its std-scaled version.
  centred = rewards.reshape(-1, k) - rewards.reshape(-1, k).mean(1, keepdims=True)
  np.testing.assert_allclose(fn(rewards, k, 'rloo'), (k / (k - 1) * centred).ravel(),
                             rtol=1e-5, atol=1e-6)


def test_rloo_baseline_is_the_explicit_leave_one_out_mean():
  rewards = np.array([1.0, 0.0, 0.0, 3.0, 2.0, 5.0, -1.0, 4.0], np.float32)
  adv = np.asarray(jax.jit(group.group_advantages, static_argnums=(1, 2))(rewards, 4, 'rloo'))
  for i in range(8):
    g = i // 4
    others = [rewards[j] for j in range(g * 4, g * 4 + 4) if j != i]
    np.testing.assert_allclose(adv[i], rewards[i] - sum(others) / 3, rtol=1e-6)
  # Group 0 by hand: the others of 1 sum to 3, of each 0 to 4, of 3 to 1.
  np.testing.assert_allclose(adv[:4], [0.0, -4 / 3, -4 / 3, 8 / 3], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize('k', [3, 5, 7])
def test_all_equal_groups_give_exactly_zero_not_nan(k):
  # 0.1 is not exact in float32, so the group mean can round away from r: still 0.
  rewards = np.concatenate([np.full(k, 0.1), np.full(k, -7.3), np.arange(k)]).astype(np.float32)
  fn = jax.jit(group.group_advantages, static_argnums=(1, 2))
  for estimator in group.ADVANTAGE_ESTIMATORS:
    adv = np.asarray(fn(rewards, k, estimator))
    assert np.all(np.isfinite(adv))
    assert np.all(adv[:2 * k] == 0.0), (estimator, adv[:2 * k])
    assert np.any(adv[2 * k:] != 0.0)
  # GRPO at K = 1 is legal and carries no signal.
  np.testing.assert_array_equal(fn(rewards[:3], 1, 'grpo'), 0.0)


def test_each_aggregation_divided_by_its_weight_equals_the_hand_loop():
  rng = np.random.default_rng(10)
  mask = _masks(rng, 8, 11)
  loss = rng.normal(size=(8, 11)).astype(np.float32)
  fn = jax.jit(group.token_loss_weights, static_argnums=(1, 2))
  for aggregation in _AGGREGATIONS:
    weights, weight = fn(mask, aggregation, 9)
    got = float(jnp.sum(loss * weights) / weight)
    np.testing.assert_allclose(got, _aggregate_reference(loss, mask, aggregation, 9),
                               rtol=1e-5)
    assert np.all(np.asarray(weights)[mask == 0] == 0.0)
  _, rows = fn(mask, 'seq_mean', None)
  assert float(rows) == 6.0  # the two empty rows do not count
  _, budget = fn(mask, 'token_sum', 9)
  assert float(budget) == 6.0 * 9
  _, tokens = fn(mask, 'token_mean', None)
  assert float(tokens) == mask.sum()


def _batch(rng, b=8, t=10, k=4):
  mask = _masks(rng, b, t)
  old = rng.normal(-2.0, 0.5, size=(b, t)).astype(np.float32)
  logp = (old + rng.normal(0.0, 0.1, size=(b, t))).astype(np.float32)
  ref = (old + rng.normal(0.0, 0.3, size=(b, t))).astype(np.float32)
  adv = _advantages_reference(rng.normal(size=b), k, 'grpo').astype(np.float32)
  return logp, old, ref, adv, mask


@pytest.mark.parametrize('aggregation', _AGGREGATIONS)
def test_ratio_one_loss_is_minus_the_mean_advantage_and_its_gradient(aggregation):
  rng = np.random.default_rng(20)
  _, old, _, adv, mask = _batch(rng)

  def mean_loss(logp):
    loss, stats = group.group_policy_loss_sum(logp, old, adv, mask, 0.2, aggregation, 12)
    return loss / stats['weight'], stats

  (loss, stats), grad = jax.jit(jax.value_and_grad(mean_loss, has_aux=True))(old)
  adv_bt = np.broadcast_to(adv[:, None], mask.shape)
  np.testing.assert_allclose(loss, _aggregate_reference(-adv_bt, mask, aggregation, 12),
                             rtol=1e-5, atol=1e-6)
  # d(-A * ratio) / d logp = -A * ratio = -A at ratio 1, times the token weight.
  weights, weight = jax.jit(group.token_loss_weights, static_argnums=(1, 2))(mask, aggregation, 12)
  np.testing.assert_allclose(grad, -adv_bt * np.asarray(weights) / float(weight),
                             rtol=1e-5, atol=1e-7)
  assert float(stats['clipfrac']) == 0.0 and float(stats['kl_loss']) == 0.0
  np.testing.assert_allclose(stats['ratio'] / stats['weight'],
                             _aggregate_reference(np.ones_like(mask), mask, aggregation, 12),
                             rtol=1e-6)
  np.testing.assert_allclose(stats['pg_loss'], loss * stats['weight'], rtol=1e-6)


def test_gradient_with_clipping_and_kl_equals_hand_values_and_finite_differences():
  clip, kl_coef = 0.2, 0.1
  mask = np.array([[1, 1, 1, 0], [0, 1, 1, 1]], np.float32)
  adv = np.array([1.5, -0.5], np.float32)
  old = np.full((2, 4), -1.0, np.float32)
  ratio = np.array([[1.1, 1.5, 0.5, 1.0], [1.0, 0.9, 0.5, 1.3]], np.float32)
  logp = old + np.log(ratio)
  ref = np.array([[-1.2, -0.6, -1.0, -1.0], [-1.0, -0.8, -1.5, -0.9]], np.float32)

  def total(lp):
    loss, stats = group.group_policy_loss_sum(lp, old, adv, mask, clip, 'seq_mean', None,
                                              ref, kl_coef)
    return loss / stats['weight']

  total = jax.jit(total)
  grad = np.asarray(jax.jit(jax.grad(total))(logp))
  # Surrogate: -A * ratio where the unclipped branch is active, 0 where clipped.
  #  row 0, A > 0: ratio 1.1 inside; 1.5 above 1 + clip (clipped, no gradient); 0.5 inside
  #    the unclipped branch (a loss is never clipped away).
  #  row 1, A < 0: 0.9 inside; 0.5 below 1 - clip (clipped); 1.3 unclipped (larger loss).
  active = np.array([[1, 0, 1, 0], [0, 1, 0, 1]], np.float32)
  d_pg = -adv[:, None] * ratio * active
  d_kl = kl_coef * (1.0 - np.exp(ref - logp))  # d k3 / d logp, k3 = e^-x - 1 + x
  w = mask / mask.sum(1, keepdims=True) / 2.0  # seq_mean over 2 replies of 3 tokens
  np.testing.assert_allclose(grad, (d_pg + d_kl) * w, rtol=1e-5, atol=1e-7)
  # Central finite differences along a random direction agree.
  v = np.random.default_rng(30).normal(size=logp.shape).astype(np.float32) * mask
  h = 1e-3
  fd = (float(total(logp + h * v)) - float(total(logp - h * v))) / (2 * h)
  np.testing.assert_allclose(fd, float(np.sum(grad * v)), rtol=2e-2)


def test_kl_term_equals_a_hand_k3_and_kl_coef_may_be_traced():
  rng = np.random.default_rng(40)
  logp, old, ref, adv, mask = _batch(rng)
  x = logp.astype(np.float64) - ref
  k3 = np.exp(-x) - 1.0 + x
  fn = jax.jit(group.group_policy_loss_sum, static_argnums=(4, 5, 6))
  for aggregation in _AGGREGATIONS:
    loss, stats = fn(logp, old, adv, mask, 0.2, aggregation, 10, ref, 0.05)
    want = 0.05 * _aggregate_reference(k3, mask, aggregation, 10)
    np.testing.assert_allclose(stats['kl_loss'] / stats['weight'], want, rtol=1e-4)
    np.testing.assert_allclose(loss, stats['pg_loss'] + stats['kl_loss'], rtol=1e-6)
  # A literal 0 skips the term; a traced coefficient is used as given.
  _, zero = fn(logp, old, adv, mask, 0.2, 'token_mean', None, ref, 0)
  assert float(zero['kl_loss']) == 0.0
  _, traced = fn(logp, old, adv, mask, 0.2, 'token_mean', None, ref, jnp.float32(0.05))
  np.testing.assert_allclose(traced['kl_loss'] / traced['weight'],
                             0.05 * _aggregate_reference(k3, mask, 'token_mean', None),
                             rtol=1e-4)


@pytest.mark.parametrize('aggregation', _AGGREGATIONS)
def test_micro_batches_add_up_to_the_whole_batch(aggregation):
  rng = np.random.default_rng(50)
  logp, old, ref, adv, mask = _batch(rng)
  args = (0.2, aggregation, 10, None, 0.05)

  fn = jax.jit(group.group_policy_loss_sum, static_argnums=(4, 5, 6))

  def run(rows):
    return fn(logp[rows], old[rows], adv[rows], mask[rows], *args[:3],
                                       ref[rows], args[4])

  loss, stats = run(slice(0, 8))
  parts = [run(slice(0, 4)), run(slice(4, 8))]
  np.testing.assert_allclose(sum(float(p[0]) for p in parts), loss, rtol=1e-5)
  for key in stats:
    np.testing.assert_allclose(sum(float(p[1][key]) for p in parts), stats[key], rtol=1e-5,
                               atol=1e-7)


def test_group_stats_on_a_crafted_batch():
  rewards = np.array([1., 1., 1.,  0., 1., 2.,  3., 3., 3.,  0., 0., 4.], np.float32)
  correct = np.array([0, 0, 0,  0, 1, 1,  1, 1, 1,  0, 0, 0], bool)
  stats = jax.jit(group.group_stats, static_argnums=2)(rewards, correct, 3)
  np.testing.assert_allclose(stats['equal_reward_groups'], 0.5)  # groups 0 and 2
  np.testing.assert_allclose(stats['pass_at_k'], 0.5)  # groups 1 and 2
  std = [0.0, math.sqrt(2 / 3), 0.0, math.sqrt(32 / 9)]
  np.testing.assert_allclose(stats['reward_std_in_group'], sum(std) / 4, rtol=1e-6)
  # 0/1 floats work as correct_b too.
  floats = jax.jit(group.group_stats, static_argnums=2)(rewards, correct.astype(np.float32), 3)
  np.testing.assert_allclose(floats['pass_at_k'], 0.5)


def test_groups_straddling_shards_use_the_whole_group():
  mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  rng = np.random.default_rng(60)
  rewards = rng.normal(size=16).astype(np.float32)  # 2 rows a device, groups of 4
  correct = rewards > 0.5
  sharding = NamedSharding(mesh, P('data'))
  rs, cs = jax.device_put(rewards, sharding), jax.device_put(correct, sharding)
  assert rs.addressable_shards[0].data.shape == (2,)
  adv = jax.jit(group.group_advantages, static_argnums=(1, 2))(rs, 4, 'grpo')
  np.testing.assert_allclose(adv, _advantages_reference(rewards, 4, 'grpo'), rtol=1e-5,
                             atol=1e-6)
  stats = jax.jit(group.group_stats, static_argnums=2)(rs, cs, 4)
  want = group.group_stats(rewards, correct, 4)
  for key, value in want.items():
    np.testing.assert_allclose(stats[key], value, rtol=1e-6)


def test_bad_names_and_group_sizes_raise_value_errors_naming_the_field():
  rewards = np.zeros(6, np.float32)
  with pytest.raises(ValueError, match=r'config\.grpo\.advantage.*grpo.*dr_grpo.*rloo'):
    group.group_advantages(rewards, 3, 'ppo')
  with pytest.raises(ValueError, match=r'config\.grpo\.group_size >= 2'):
    group.group_advantages(rewards, 1, 'rloo')
  with pytest.raises(ValueError, match=r'config\.grpo\.group_size = 4'):
    group.group_advantages(rewards, 4, 'grpo')
  with pytest.raises(ValueError, match=r'config\.grpo\.group_size'):
    group.group_stats(rewards, rewards, 0)
  mask = np.ones((2, 3), np.float32)
  with pytest.raises(ValueError, match=r'config\.grpo\.loss_aggregation.*seq_mean'):
    group.token_loss_weights(mask, 'sum', 3)
  with pytest.raises(ValueError, match='max_tokens'):
    group.token_loss_weights(mask, 'token_sum', None)
