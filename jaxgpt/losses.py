"""Loss functions: pure functions of arrays, shared by every stage.

Each returns a *sum* over tokens (or rows) plus what to normalise by, so a step
that accumulates micro-batches can divide once by the count of the whole step.
"""

from __future__ import annotations

import functools

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


def chunked_lm_loss_sum(h_btd, logits_fn, targets_bt, weights_bt, chunk: int,
                        z_loss: float = 0.0):
  """`masked_lm_loss_sum(logits_fn(h_btd), ...)` taken `chunk` positions at a time.

  At most one (b, chunk, v) float32 slice of logits exists at once, in the forward and
  the backward pass: the scan body is rematerialised, so the backward recomputes a
  chunk's logits from its hidden states instead of keeping every chunk's. Same value
  and gradient as the unchunked loss (up to float summation order). `logits_fn` maps
  (b, c, d) hidden states to (b, c, v) logits; a length that `chunk` does not divide is
  padded with weight-0 positions.
  """
  b, t, _ = h_btd.shape
  n = -(-t // chunk)
  if n == 1:
    return masked_lm_loss_sum(logits_fn(h_btd), targets_bt, weights_bt, z_loss)
  pad = n * chunk - t
  if pad:
    h_btd = jnp.pad(h_btd, ((0, 0), (0, pad), (0, 0)))
    targets_bt = jnp.pad(targets_bt, ((0, 0), (0, pad)))
    weights_bt = jnp.pad(weights_bt, ((0, 0), (0, pad)))

  def chunks(x_bt):  # (b, n * c, ...) -> (n, b, c, ...): the scan runs over chunks
    return jnp.swapaxes(x_bt.reshape(b, n, chunk, *x_bt.shape[2:]), 0, 1)

  @functools.partial(jax.checkpoint, prevent_cse=False)  # inside a scan CSE cannot merge it
  def one_chunk(h_bcd, targets_bc, weights_bc):
    return masked_lm_loss_sum(logits_fn(h_bcd), targets_bc, weights_bc, z_loss)

  def body(sums, xs):
    loss, nll = one_chunk(*xs)
    return (sums[0] + loss, sums[1] + nll), None

  zero = jnp.zeros((), jnp.float32)
  (loss_sum, nll_sum), _ = jax.lax.scan(
      body, (zero, zero), (chunks(h_btd), chunks(targets_bt), chunks(weights_bt)))
  return loss_sum, nll_sum


def pairwise_reward_loss_sum(r_chosen_b, r_rejected_b, weight_b, margin_b=None,
                             center: float = 0.0):
  """Bradley-Terry loss of a reward model on comparison pairs, summed with weights.

  Per pair: -log sigmoid(r_chosen - r_rejected - margin), plus `center` *
  (r_chosen + r_rejected)^2, which pins the scores' mean near 0 (the loss alone
  only sees differences). `weight_b` is 1/(pairs of the pair's comparison set), so a
  K-way ranking counts as one comparison and padding pairs (weight 0) count nothing.
  Returns (loss_sum, sums) with the sums of 'loss' (the Bradley-Terry part),
  'accuracy', 'chosen', 'rejected', 'margin' and 'weight', to divide once per step.
  """
  r_c = r_chosen_b.astype(jnp.float32)
  r_r = r_rejected_b.astype(jnp.float32)
  w = weight_b.astype(jnp.float32)
  diff_b = r_c - r_r
  shifted_b = diff_b if margin_b is None else diff_b - margin_b.astype(jnp.float32)
  nll_sum = jnp.sum(w * jax.nn.softplus(-shifted_b))  # = -log sigmoid(shifted)
  loss_sum = nll_sum
  if center:
    loss_sum = loss_sum + center * jnp.sum(w * jnp.square(r_c + r_r))
  sums = {'loss': nll_sum, 'accuracy': jnp.sum(w * (diff_b > 0)), 'chosen': jnp.sum(w * r_c),
          'rejected': jnp.sum(w * r_r), 'margin': jnp.sum(w * diff_b), 'weight': jnp.sum(w)}
  return loss_sum, sums


PREFERENCE_LOSSES = ('dpo', 'ipo', 'simpo')


def preference_loss_sum(logp_chosen_b, logp_rejected_b, weight_b, *, loss: str = 'dpo',
                        beta: float = 0.1, ref_chosen_b=None, ref_rejected_b=None,
                        label_smoothing: float = 0.0, len_chosen_b=None, len_rejected_b=None,
                        gamma: float = 0.0, nll_coef: float = 0.0):
  """Direct preference optimisation on comparison pairs, summed with weights (as
  `pairwise_reward_loss_sum`, so the shared LM loop divides once per step).

  logp_*_b are the policy's summed log-probs of each reply (its end-of-turn token
  included, the prompt excluded); ref_*_b the reference model's, for 'dpo' and 'ipo'.
  With h = (logp_c - ref_c) - (logp_r - ref_r):
    'dpo':   -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)   (eps: label
             smoothing, conservative DPO; 0 is Rafailov et al.'s loss)
    'ipo':   (h - 1 / (2 beta))^2                                         (Azar et al.)
    'simpo': -log sigmoid(beta (logp_c / len_c - logp_r / len_r) - gamma), no reference,
             per-token averages (Meng et al.)
  plus, with nll_coef, nll_coef * (-logp_c / len_c): the chosen reply's per-token NLL (RPO,
  Pang et al. 2024; TRL's rpo_alpha), which keeps DPO from lowering the chosen replies'
  likelihood along with the rejected ones'.
  Returns (loss_sum, sums): 'loss' and TRL's metrics as sums — 'rewards/chosen' and
  'rewards/rejected' (the implicit rewards beta (logp - ref); SimPO: beta times the
  length-normalised log-prob), 'rewards/accuracies', 'rewards/margins', 'logps/chosen',
  'logps/rejected' — and 'weight'.
  """
  if loss not in PREFERENCE_LOSSES:
    raise ValueError(f'unknown preference loss {loss!r}: config.dpo.loss must be one of '
                     f'{PREFERENCE_LOSSES}')
  w = weight_b.astype(jnp.float32)
  lc, lr = logp_chosen_b.astype(jnp.float32), logp_rejected_b.astype(jnp.float32)
  if loss == 'simpo':
    reward_c = beta * lc / len_chosen_b.astype(jnp.float32)
    reward_r = beta * lr / len_rejected_b.astype(jnp.float32)
    per_pair = jax.nn.softplus(-(reward_c - reward_r - gamma))
  else:
    reward_c = beta * (lc - ref_chosen_b.astype(jnp.float32))
    reward_r = beta * (lr - ref_rejected_b.astype(jnp.float32))
    h = (reward_c - reward_r) / beta
    if loss == 'ipo':
      per_pair = jnp.square(h - 1.0 / (2.0 * beta))
    else:
      per_pair = ((1.0 - label_smoothing) * jax.nn.softplus(-beta * h)
                  + label_smoothing * jax.nn.softplus(beta * h))
  if nll_coef:
    per_pair = per_pair + nll_coef * (-lc / len_chosen_b.astype(jnp.float32))
  margin = reward_c - reward_r
  loss_sum = jnp.sum(w * per_pair)
  sums = {'loss': loss_sum, 'rewards/chosen': jnp.sum(w * reward_c),
          'rewards/rejected': jnp.sum(w * reward_r),
          'rewards/accuracies': jnp.sum(w * (margin > 0)), 'rewards/margins': jnp.sum(w * margin),
          'logps/chosen': jnp.sum(w * lc), 'logps/rejected': jnp.sum(w * lr), 'weight': jnp.sum(w)}
  return loss_sum, sums
