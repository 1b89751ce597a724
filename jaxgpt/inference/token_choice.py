"""How the sampler picks a token from one step's logits, and the log-prob it records.

Token choice (`SamplingConfig`), applied in this order:

* temperature == 0: greedy, `argmax` of the raw logits; ties go to the lowest id.
  top_k / top_p are ignored.
* otherwise logits / temperature, then top-k, then top-p, then one categorical draw:
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
    tokens_b = jax.random.categorical(key, scaled_bv, axis=-1)
  tokens_b = tokens_b.astype(jnp.int32)
  if settings.logprob_temperature != 1.0:
    logits_bv = logits_bv / settings.logprob_temperature
  logp_bv = jax.nn.log_softmax(logits_bv, axis=-1)
  logprobs_b = jnp.take_along_axis(logp_bv, tokens_b[:, None], axis=-1)[:, 0]
  entropy_b = -jnp.sum(jnp.exp(logp_bv) * logp_bv, axis=-1) if settings.entropy else None
  return tokens_b, logprobs_b, entropy_b


def is_stop(tokens_b, stop_ids):
  """(B,) bool: the row's token is one of `stop_ids`."""
  if not stop_ids:
    return jnp.zeros(tokens_b.shape, bool)
  return jnp.any(tokens_b[:, None] == jnp.asarray(stop_ids, jnp.int32)[None, :], axis=-1)
