"""How the sampler picks a token from one step's logits, and the log-prob it records.

Token choice (`SamplingConfig`), applied in this order:

* temperature == 0: greedy, `argmax` of the raw logits; ties go to the lowest id.
  top_k / top_p are ignored.
* otherwise logits / temperature, then top-k, then top-p, then one categorical draw
  (`draw`: the inverse CDF at one uniform per row):
  - top-k keeps exactly `min(top_k, V)` tokens: the largest logits, ties broken towards
    the lower token id (`jax.lax.top_k`'s documented order);
  - top-p (nucleus) keeps the shortest prefix of the tokens sorted by (logit descending,
    id ascending) whose probability mass — of the tempered distribution, renormalised
    over the top-k survivors — reaches `top_p`; the most likely token is always kept.
    Inside a group of tied logits the cut keeps the lower ids, so the support is
    deterministic. (Token r of the sorted list is kept iff the mass of tokens 0..r-1 is
    < top_p.)

`filter_logits` is that filtering on its own (tests check the support on crafted
logits).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def filter_logits(logits_bv, top_k: int = 0, top_p: float = 1.0):
  """`logits_bv` with -inf outside the top-k / top-p support (see the module docstring).

  Apply temperature before calling: the top-p cut depends on it, the top-k one does not.
  """
  v = logits_bv.shape[-1]
  k = min(int(top_k), v) if top_k else v
  if k == v and top_p >= 1.0:
    return logits_bv
  # Sorted by value descending, ties by lower index first (documented for lax.top_k).
  vals_bk, idx_bk = jax.lax.top_k(logits_bv, k)
  keep_bk = jnp.ones(vals_bk.shape, bool)
  if top_p < 1.0:
    probs_bk = jax.nn.softmax(vals_bk.astype(jnp.float32), axis=-1)
    mass_before_bk = jnp.cumsum(probs_bk, axis=-1) - probs_bk
    keep_bk = (mass_before_bk < top_p) | (jnp.arange(k) == 0)
  rows_b1 = jnp.arange(logits_bv.shape[0])[:, None]
  keep_bv = jnp.zeros(logits_bv.shape, bool).at[rows_b1, idx_bk].set(keep_bk)
  return jnp.where(keep_bv, logits_bv, -jnp.inf)


BLOCK = 256  # vocabulary block of the inverse-CDF draw


def draw(key, logits_bv):
  """One token per row from softmax(logits_bv) (-inf: probability 0), by inversion of the
  CDF with one uniform per row, in two levels: the block of `BLOCK` ids the uniform falls
  in (the blocks' masses), then the id inside it. The same distribution as
  `jax.random.categorical`, whose Gumbel noise costs a random number per vocabulary entry
  (~60 ms a step at 64 x 49,152 on a 2-core CPU, against ~2 ms here). A row always gets an
  id of positive probability inside the vocabulary: the first whose running mass exceeds
  the uniform's share, with the share kept below the total however the sums round."""
  b, v = logits_bv.shape
  n_blocks = -(-v // BLOCK)
  m_b1 = jnp.max(logits_bv, axis=-1, keepdims=True)
  p_bv = jnp.exp(logits_bv - m_b1)
  p_bkc = jnp.pad(p_bv, ((0, 0), (0, n_blocks * BLOCK - v))).reshape(b, n_blocks, BLOCK)
  mass_bk = jnp.sum(p_bkc, axis=-1)
  cum_bk = jnp.cumsum(mass_bk, axis=-1)
  below_one = 1.0 - 2.0 ** -24
  u_b = jax.random.uniform(key, (b,), jnp.float32, 0.0, below_one)
  target_b = u_b * cum_bk[:, -1]
  last_b = n_blocks - 1 - jnp.argmax(mass_bk[:, ::-1] > 0, axis=-1)  # last block with mass
  k_b = jnp.minimum(jnp.sum(cum_bk <= target_b[:, None], axis=-1), last_b)
  mass_b = jnp.take_along_axis(mass_bk, k_b[:, None], axis=-1)[:, 0]
  before_b = jnp.take_along_axis(cum_bk, k_b[:, None], axis=-1)[:, 0] - mass_b
  share_b = jnp.clip((target_b - before_b) / mass_b, 0.0, below_one)
  p_bc = jnp.take_along_axis(p_bkc, k_b[:, None, None], axis=1)[:, 0]
  cum_bc = jnp.cumsum(p_bc, axis=-1)
  c_b = jnp.sum(cum_bc <= (share_b * cum_bc[:, -1])[:, None], axis=-1)
  return (k_b * BLOCK + c_b).astype(jnp.int32)


def next_token(logits_bv, key, settings):
  """(tokens_b int32, logprobs_b float32, entropy_b float32 or None) from one step's raw
  float32 logits, chosen as `settings` (a `sampling.SamplingConfig`) says.

  The log-prob is that of the chosen token under softmax(raw logits /
  settings.logprob_temperature), unfiltered; with settings.entropy, entropy_b is that
  distribution's entropy (else None).
  """
  logits_bv = logits_bv.astype(jnp.float32)
  if settings.temperature == 0.0:
    tokens_b = jnp.argmax(logits_bv, axis=-1)
  else:
    scaled_bv = filter_logits(logits_bv / settings.temperature, settings.top_k, settings.top_p)
    tokens_b = draw(key, scaled_bv)
  tokens_b = tokens_b.astype(jnp.int32)
  if settings.logprob_temperature != 1.0:
    logits_bv = logits_bv / settings.logprob_temperature
  # log_softmax's own steps, written out so that the entropy reuses its exponentials: one
  # pass over the vocabulary less a step (2 of ~6 ms at 64 x 49,152 on a 2-core CPU).
  z_bv = logits_bv - jnp.max(logits_bv, axis=-1, keepdims=True)
  e_bv = jnp.exp(z_bv)
  sum_b = jnp.sum(e_bv, axis=-1)
  lse_b = jnp.log(sum_b)
  logprobs_b = jnp.take_along_axis(z_bv, tokens_b[:, None], axis=-1)[:, 0] - lse_b
  entropy_b = lse_b - jnp.sum(e_bv * z_bv, axis=-1) / sum_b if settings.entropy else None
  return tokens_b, logprobs_b, entropy_b


def is_stop(tokens_b, stop_ids):
  """(B,) bool: the row's token is one of `stop_ids`."""
  if not stop_ids:
    return jnp.zeros(tokens_b.shape, bool)
  return jnp.any(tokens_b[:, None] == jnp.asarray(stop_ids, jnp.int32)[None, :], axis=-1)
