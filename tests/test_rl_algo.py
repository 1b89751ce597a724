"""The PPO math of jaxgpt.rl.algo against plain Python loops and hand-worked values."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxgpt.rl import algo


def _response_masks(rng, b, t):
  """Rows of prompt zeros, then response ones, then padding zeros; lengths vary per row."""
  mask = np.zeros((b, t), np.float32)
  for i in range(b):
    start = rng.integers(0, t // 2)
    length = rng.integers(1, t - start + 1)
    mask[i, start:start + length] = 1.0
  return mask


def _gae_reference(rewards, values, mask, gamma, lam):
  """GAE row by row, walking backwards; 'next' is the next position whose mask is 1."""
  b, t = rewards.shape
  adv = np.zeros((b, t))
  ret = np.zeros((b, t))
  for i in range(b):
    next_value, next_adv = 0.0, 0.0
    for j in reversed(range(t)):
      if mask[i, j] == 0:
        continue
      delta = rewards[i, j] + gamma * next_value - values[i, j]
      adv[i, j] = delta + gamma * lam * next_adv
      ret[i, j] = adv[i, j] + values[i, j]
      next_value, next_adv = values[i, j], adv[i, j]
  return adv, ret


def test_gae_equals_python_loop_on_response_masks():
  rng = np.random.default_rng(0)
  rewards = rng.normal(size=(6, 12)).astype(np.float32)
  values = rng.normal(size=(6, 12)).astype(np.float32)
  mask = _response_masks(rng, 6, 12)
  mask[0] = 0.0  # a row with no response at all
  mask[1] = 0.0
  mask[1, -1] = 1.0  # response ending at the very last position
  adv, ret = jax.jit(algo.gae, static_argnums=(3, 4))(rewards, values, mask, 0.9, 0.8)
  adv_ref, ret_ref = _gae_reference(rewards, values, mask, 0.9, 0.8)
  np.testing.assert_allclose(adv, adv_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ret, ret_ref, rtol=1e-5, atol=1e-5)
  assert np.all(np.asarray(adv)[mask == 0] == 0) and np.all(np.asarray(ret)[mask == 0] == 0)


def test_gae_skips_gaps_in_non_contiguous_masks_and_ignores_masked_inputs():
  rng = np.random.default_rng(1)
  rewards = rng.normal(size=(4, 10)).astype(np.float32)
  values = rng.normal(size=(4, 10)).astype(np.float32)
  mask = (rng.random((4, 10)) < 0.6).astype(np.float32)
  adv, ret = algo.gae(rewards, values, mask, 0.95, 0.7)
  adv_ref, ret_ref = _gae_reference(rewards, values, mask, 0.95, 0.7)
  np.testing.assert_allclose(adv, adv_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ret, ret_ref, rtol=1e-5, atol=1e-5)
  # A gap behaves as if absent: equal to GAE on the row with the gap squeezed out.
  row = np.array([1, 1, 0, 0, 1, 0], np.float32)
  r = np.array([1., 2., 9., 9., 3., 9.], np.float32)
  v = np.array([.5, .1, 9., 9., .2, 9.], np.float32)
  a_gap, _ = algo.gae(r[None], v[None], row[None], 0.9, 0.8)
  a_dense, _ = algo.gae(r[row == 1][None], v[row == 1][None], np.ones((1, 3)), 0.9, 0.8)
  np.testing.assert_allclose(np.asarray(a_gap)[0, row == 1], a_dense[0], rtol=1e-6)
  # Garbage (even inf) at masked positions changes nothing.
  r_bad = np.where(mask == 0, np.inf, rewards).astype(np.float32)
  v_bad = np.where(mask == 0, -1e30, values).astype(np.float32)
  adv_bad, ret_bad = algo.gae(r_bad, v_bad, mask, 0.95, 0.7)
  np.testing.assert_array_equal(adv_bad, adv)
  np.testing.assert_array_equal(ret_bad, ret)


def test_gae_hand_computed():
  # Two response tokens, gamma = 0.5, lam = 0.5: terminal value is 0.
  adv, ret = algo.gae(np.array([[0., 1., 2., 0.]]), np.array([[7., 1., 3., 7.]]),
                      np.array([[0, 1, 1, 0]]), 0.5, 0.5)
  a2 = 2.0 + 0.5 * 0.0 - 3.0  # -1
  a1 = (1.0 + 0.5 * 3.0 - 1.0) + 0.25 * a2  # 1.5 - 0.25
  np.testing.assert_allclose(adv, [[0., a1, a2, 0.]], rtol=1e-6)
  np.testing.assert_allclose(ret, [[0., a1 + 1.0, a2 + 3.0, 0.]], rtol=1e-6)


def test_kl_estimators_match_definitions_with_clamping():
  logp = np.array([[-1.0, -2.0, -0.5, 0.0, -30.0]], np.float32)
  ref = np.array([[-1.5, -1.0, -0.5, -20.0, 0.0]], np.float32)
  x = np.clip(logp - ref, -10.0, 10.0)  # last two are clamped: 20 -> 10, -30 -> -10
  assert x[0, 3] == 10.0 and x[0, 4] == -10.0
  expected = {'k1': x, 'k2': 0.5 * x ** 2, 'k3': np.exp(-x) - 1.0 + x}
  for name, want in expected.items():
    got = jax.jit(algo.kl_per_token, static_argnums=(2, 3))(logp, ref, name, 10.0)
    np.testing.assert_allclose(got, want, rtol=1e-6)
  np.testing.assert_allclose(algo.kl_per_token(logp, ref, 'k1', clamp=1.0), np.clip(x, -1, 1))
  with pytest.raises(ValueError, match='config.ppo.kl_estimator'):
    algo.kl_per_token(logp, ref, 'k4')


def test_last_token_index_and_per_token_rewards():
  mask = np.array([[0, 1, 1, 1, 0], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0], [0, 0, 1, 1, 1]])
  np.testing.assert_array_equal(algo.last_token_index(mask), [3, 1, 0, 4])
  kl = np.arange(20, dtype=np.float32).reshape(4, 5) / 10
  scores = np.array([10., 20., 30., 40.], np.float32)
  beta = jnp.float32(0.5)
  rewards = jax.jit(algo.per_token_rewards)(kl, scores, mask, beta)
  want = np.where(mask == 1, -0.5 * kl, 0.0)
  want[0, 3] += 10.0
  want[1, 1] += 20.0  # row 2 has no response: its score goes nowhere
  want[3, 4] += 40.0
  np.testing.assert_allclose(rewards, want, rtol=1e-6)


def test_masked_sum_and_mean():
  x = np.array([[1., 2., np.inf], [4., np.nan, 6.]], np.float32)
  m = np.array([[1, 1, 0], [0, 0, 1]], np.float32)
  assert float(algo.masked_sum(x, m)) == 9.0
  assert float(algo.masked_mean(x, m)) == 3.0
  np.testing.assert_allclose(algo.masked_mean(x, m, axis=1), [1.5, 6.0])
  assert float(algo.masked_mean(x, np.zeros_like(m))) == 0.0


def test_masked_whiten():
  rng = np.random.default_rng(2)
  x = rng.normal(3.0, 2.0, size=(4, 9)).astype(np.float32)
  mask = _response_masks(rng, 4, 9)
  w = np.asarray(jax.jit(algo.masked_whiten)(x, mask))
  assert np.all(w[mask == 0] == 0.0)
  on = w[mask == 1]
  np.testing.assert_allclose(on.mean(), 0.0, atol=1e-5)
  np.testing.assert_allclose(on.var(), 1.0, rtol=1e-5)  # biased variance
  x2 = np.where(mask == 0, 1e6, x).astype(np.float32)
  np.testing.assert_array_equal(algo.masked_whiten(x2, mask), w)
  mean = x[mask == 1].mean()
  kept = np.asarray(algo.masked_whiten(x, mask, shift_mean=False))
  np.testing.assert_allclose(kept[mask == 1], on + mean, rtol=1e-5)
  assert np.all(kept[mask == 0] == 0.0)


def test_masked_whiten_on_a_sharded_array_uses_global_statistics():
  mesh = jax.make_mesh((2, 2, 2), ('data', 'fsdp', 'tensor'),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  rng = np.random.default_rng(3)
  # Rows differ a lot in scale, so per-shard statistics would give a different answer.
  x = (rng.normal(size=(8, 6)) * np.arange(1, 9)[:, None] + np.arange(8)[:, None])
  x = x.astype(np.float32)
  mask = _response_masks(rng, 8, 6)
  single = algo.masked_whiten(x, mask)
  sharding = NamedSharding(mesh, P(('data', 'fsdp')))
  xs, ms = jax.device_put(x, sharding), jax.device_put(mask, sharding)
  assert len(xs.addressable_shards) == 8 and xs.addressable_shards[0].data.shape == (2, 6)
  sharded = jax.jit(algo.masked_whiten)(xs, ms)
  np.testing.assert_allclose(sharded, single, rtol=1e-5, atol=1e-6)


def test_policy_loss_clipping_branches_and_stats():
  clip = 0.2
  ratio = np.array([[1.1, 1.5, 0.5, 1.5, 0.5, 2.0]], np.float32)
  adv = np.array([[2.0, 1.0, 1.0, -1.0, -1.0, 3.0]], np.float32)
  mask = np.array([[1, 1, 1, 1, 1, 0]], np.float32)
  old = np.full((1, 6), -1.0, np.float32)
  logp = old + np.log(ratio)
  loss, stats = jax.jit(algo.policy_loss_sum, static_argnums=4)(logp, old, adv, mask, clip)
  # Per token: max(-A r, -A clip(r, 0.8, 1.2)).
  #  r=1.1, A=2 : inside the range       -> -2.2
  #  r=1.5, A=1 : max(-1.5, -1.2) = -1.2  (clipped branch active)
  #  r=0.5, A=1 : max(-0.5, -0.8) = -0.5  (unclipped: no gain from clipping a loss)
  #  r=1.5, A=-1: max(1.5, 1.2) = 1.5     (unclipped)
  #  r=0.5, A=-1: max(0.5, 0.8) = 0.8     (clipped branch active)
  #  masked token ignored.
  np.testing.assert_allclose(loss, -2.2 - 1.2 - 0.5 + 1.5 + 0.8, rtol=1e-5)
  assert float(stats['clipfrac']) == 2.0
  on = ratio[0, :5]
  np.testing.assert_allclose(stats['ratio'], on.sum(), rtol=1e-5)
  np.testing.assert_allclose(stats['ratio_sq'], (on ** 2).sum(), rtol=1e-5)
  np.testing.assert_allclose(stats['approxkl'], (0.5 * np.log(on) ** 2).sum(), rtol=1e-5)


def test_value_loss_clipping_and_clipfrac():
  clip = 0.5
  v = np.array([[1.0, 2.0, 0.0, 3.0]], np.float32)
  v_old = np.array([[1.2, 0.0, 1.0, 0.0]], np.float32)
  r = np.array([[0.0, 0.0, 0.0, 0.0]], np.float32)
  mask = np.array([[1, 1, 1, 0]], np.float32)
  loss, stats = jax.jit(algo.value_loss_sum, static_argnums=4)(v, v_old, r, mask, clip)
  #  V=1, V_old=1.2: clipped V stays 1 -> 0.5 * 1 (equal, not counted)
  #  V=2, V_old=0  : clipped 0.5 -> max(4, 0.25) = 4 (unclipped larger)
  #  V=0, V_old=1  : clipped 0.5 -> max(0, 0.25) = 0.25 (clipped larger: counted)
  np.testing.assert_allclose(loss, 0.5 * (1.0 + 4.0 + 0.25), rtol=1e-6)
  assert float(stats['val_clipfrac']) == 1.0


def test_entropy_of_uniform_and_masked_logits():
  v = 7
  logits = jnp.zeros((2, 3, v), jnp.bfloat16)
  mask = np.array([[1, 1, 0], [1, 0, 0]], np.float32)
  ent = jax.jit(algo.entropy_sum)(logits, mask)
  assert ent.dtype == jnp.float32
  np.testing.assert_allclose(ent, 3 * math.log(v), rtol=1e-6)
  # -inf logits (banned tokens) give no NaN: uniform over the remaining 2.
  two = jnp.array([[[0.0, 0.0, -jnp.inf]]])
  np.testing.assert_allclose(algo.entropy_sum(two, np.ones((1, 1))), math.log(2), rtol=1e-6)


def test_explained_variance():
  r = np.array([[1.0, 2.0, 3.0, 4.0, 100.0]], np.float32)
  mask = np.array([[1, 1, 1, 1, 0]], np.float32)
  ev = jax.jit(algo.explained_variance)
  np.testing.assert_allclose(ev(r, r, mask), 1.0)
  np.testing.assert_allclose(ev(np.zeros_like(r), r, mask), 0.0, atol=1e-6)
  # V = R + [1, -1, 1, -1]: Var[R - V] = 1, Var[R] = 1.25 -> 1 - 0.8.
  v = r + np.array([[1., -1., 1., -1., 0.]], np.float32)
  np.testing.assert_allclose(ev(v, r, mask), 0.2, rtol=1e-5)


def test_adaptive_kl_coef():
  ctl = jax.jit(algo.adaptive_kl_coef, static_argnums=(3, 4))
  # Inside the clip range: error = 5.5/5 - 1 = 0.1.
  np.testing.assert_allclose(ctl(0.1, 5.5, 256, 5.0, 1000.0), 0.1 * (1 + 0.1 * 0.256),
                             rtol=1e-6)
  # KL far above target: error clipped to +0.2; far below: -0.2.
  np.testing.assert_allclose(ctl(0.1, 50.0, 100, 5.0, 1000.0), 0.1 * (1 + 0.02), rtol=1e-6)
  np.testing.assert_allclose(ctl(0.1, 0.0, 100, 5.0, 1000.0), 0.1 * (1 - 0.02), rtol=1e-6)
  # Fixed coefficient when target <= 0.
  assert algo.adaptive_kl_coef(0.3, 50.0, 100, 0.0, 1000.0) == 0.3
  assert algo.adaptive_kl_coef(0.3, 50.0, 100, -1.0, 1000.0) == 0.3
