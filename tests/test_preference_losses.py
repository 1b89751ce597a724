"""DPO, IPO and SimPO losses (`losses.preference_loss_sum`) against hand-computed values and
their gradients."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt import losses

LC, LR = np.array([-3.0, -5.0, -2.0], np.float32), np.array([-4.0, -4.5, -6.0], np.float32)
RC, RR = np.array([-3.5, -5.0, -2.5], np.float32), np.array([-3.5, -4.0, -5.0], np.float32)
W = np.array([1.0, 0.5, 0.0], np.float32)  # the third pair is padding


def sigmoid(x):
  return 1.0 / (1.0 + math.exp(-x))


def hand_dpo(beta, eps):
  out = []
  for lc, lr, rc, rr in zip(LC, LR, RC, RR):
    h = (lc - rc) - (lr - rr)
    out.append(-(1 - eps) * math.log(sigmoid(beta * h)) - eps * math.log(sigmoid(-beta * h)))
  return float(np.dot(W, out))


@pytest.mark.parametrize('beta,eps', [(0.1, 0.0), (0.5, 0.2), (1e-4, 0.0)])
def test_dpo_and_its_gradient_equal_hand_values(beta, eps):
  def f(lc, lr):
    return losses.preference_loss_sum(lc, lr, jnp.asarray(W), loss='dpo', beta=beta,
                                      ref_chosen_b=jnp.asarray(RC), ref_rejected_b=jnp.asarray(RR),
                                      label_smoothing=eps)[0]
  np.testing.assert_allclose(float(f(LC, LR)), hand_dpo(beta, eps), rtol=1e-5)
  g_c, g_r = jax.grad(f, argnums=(0, 1))(jnp.asarray(LC), jnp.asarray(LR))
  for i in range(3):  # d/dlogp_c of -(1-e) log s(b h) - e log s(-b h) = -b [(1-e)(1-s) - e s]
    h = (LC[i] - RC[i]) - (LR[i] - RR[i])
    s = sigmoid(beta * h)
    want = -beta * ((1 - eps) * (1 - s) - eps * s) * W[i]
    np.testing.assert_allclose(float(g_c[i]), want, rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(float(g_r[i]), -want, rtol=1e-4, atol=1e-9)
  if beta < 1e-3:  # beta -> 0: the loss tends to ln 2 per pair, the gradient to -beta/2
    np.testing.assert_allclose(float(f(LC, LR)) / W.sum(), math.log(2), rtol=1e-4)


def test_policy_equal_to_reference_gives_ln2_and_zero_margin():
  loss_sum, sums = losses.preference_loss_sum(
      jnp.asarray(LC), jnp.asarray(LR), jnp.asarray(W), loss='dpo', beta=0.1,
      ref_chosen_b=jnp.asarray(LC), ref_rejected_b=jnp.asarray(LR))
  assert float(loss_sum / sums['weight']) == pytest.approx(math.log(2))
  assert float(sums['rewards/margins']) == 0.0 and float(sums['rewards/accuracies']) == 0.0
  assert float(sums['logps/chosen']) == pytest.approx(float(np.dot(W, LC)))


def test_ipo_is_the_squared_distance_to_half_over_beta():
  beta = 0.25
  f = lambda lc: losses.preference_loss_sum(  # noqa: E731
      lc, jnp.asarray(LR), jnp.asarray(W), loss='ipo', beta=beta,
      ref_chosen_b=jnp.asarray(RC), ref_rejected_b=jnp.asarray(RR))[0]
  h = (LC - RC) - (LR - RR)
  np.testing.assert_allclose(float(f(jnp.asarray(LC))), float(np.dot(W, (h - 2.0) ** 2)),
                             rtol=1e-5)
  np.testing.assert_allclose(jax.grad(f)(jnp.asarray(LC)), W * 2 * (h - 2.0), rtol=1e-5)


def test_simpo_is_reference_free_and_length_normalised():
  beta, gamma = 2.0, 0.5
  len_c, len_r = np.array([3.0, 5.0, 2.0], np.float32), np.array([4.0, 3.0, 6.0], np.float32)
  f = lambda lc: losses.preference_loss_sum(  # noqa: E731
      lc, jnp.asarray(LR), jnp.asarray(W), loss='simpo', beta=beta,
      len_chosen_b=jnp.asarray(len_c), len_rejected_b=jnp.asarray(len_r), gamma=gamma)
  loss_sum, sums = f(jnp.asarray(LC))
  z = beta * LC / len_c - beta * LR / len_r - gamma
  want = sum(w * -math.log(sigmoid(x)) for w, x in zip(W, z))
  np.testing.assert_allclose(float(loss_sum), want, rtol=1e-5)
  g = jax.grad(lambda lc: f(lc)[0])(jnp.asarray(LC))
  np.testing.assert_allclose(g, [-w * (1 - sigmoid(x)) * beta / n
                                 for w, x, n in zip(W, z, len_c)], rtol=1e-4)
  np.testing.assert_allclose(float(sums['rewards/chosen']), float(np.dot(W, beta * LC / len_c)),
                             rtol=1e-6)


def test_unknown_loss_names_the_field():
  with pytest.raises(ValueError, match='config.dpo.loss'):
    losses.preference_loss_sum(jnp.zeros(1), jnp.zeros(1), jnp.ones(1), loss='kto')


def test_chosen_nll_term_adds_the_per_token_nll_of_the_chosen_reply():
  """RPO: + nll_coef * (-log p_c / len_c) per pair; its gradient on log p_c is -coef / len_c."""
  coef, len_c = 0.5, np.array([3.0, 5.0, 2.0], np.float32)

  def f(lc, nll_coef):
    return losses.preference_loss_sum(lc, jnp.asarray(LR), jnp.asarray(W), loss='dpo', beta=0.1,
                                      ref_chosen_b=jnp.asarray(RC), ref_rejected_b=jnp.asarray(RR),
                                      len_chosen_b=jnp.asarray(len_c), nll_coef=nll_coef)[0]
  np.testing.assert_allclose(float(f(jnp.asarray(LC), coef)) - float(f(jnp.asarray(LC), 0.0)),
                             float(np.dot(W, coef * -LC / len_c)), rtol=1e-5)
  extra = jax.grad(f)(jnp.asarray(LC), coef) - jax.grad(f)(jnp.asarray(LC), 0.0)
  np.testing.assert_allclose(extra, -coef * W / len_c, rtol=1e-5)
