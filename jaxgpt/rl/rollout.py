"""From sampled responses to a PPO training batch: pure functions, jitted by the stage.

Sequence layout (one row per rollout, W tokens: at most P + N + 1, P the prompt width, N
the response budget, and at least the batch's longest prompt + reply + readout): the
prompt (its true length L), right after it the response (n tokens, its stop token
included when it has one), then the `<|reward|>` readout token at L + n, then padding.
Logits position t predicts token t + 1, so per-token arrays have W - 1 entries and
`mask[t] = 1` exactly where token t + 1 is a response token (L - 1 <= t <= L + n - 2).
The reward model reads its score at L + n; values V_t are read at position t, the state
before the action token t + 1.

Log-probs are those of the distribution the tokens were drawn from: log softmax(logits /
temperature), for the policy and the reference alike, so before any update the PPO ratio
is exactly 1 and the KL of the policy to itself 0 (to float rounding where the policy's
are the sampler's, config.<section>.old_logp='sampler').
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxgpt import losses
from jaxgpt import model as model_lib
from jaxgpt.rl import algo


def assemble(prompt_bp, length_b, response_bn, response_len_b, readout_id: int, pad_id: int,
             width: int | None = None):
  """(tokens_bw, mask_bt, readout_b): prompt + response + readout, right-padded to `width`
  (None: P + N + 1). A narrower width drops only padding: the caller makes it at least
  max(length + response_len) + 1."""
  b, p = prompt_bp.shape
  n = response_bn.shape[1]
  w = width or p + n + 1
  pos_w = jnp.arange(w)[None, :]
  length_b1, resp_len_b1 = length_b[:, None], response_len_b[:, None]
  from_prompt = jnp.take_along_axis(prompt_bp, jnp.clip(pos_w, 0, p - 1), axis=1)
  from_response = jnp.take_along_axis(response_bn, jnp.clip(pos_w - length_b1, 0, n - 1), axis=1)
  readout_b1 = length_b1 + resp_len_b1
  tokens_bw = jnp.where(pos_w < length_b1, from_prompt,
                        jnp.where(pos_w < readout_b1, from_response,
                                  jnp.where(pos_w == readout_b1, readout_id, pad_id)))
  pos_t = jnp.arange(w - 1)[None, :]
  mask_bt = ((pos_t >= length_b1 - 1) & (pos_t <= readout_b1 - 2)).astype(jnp.float32)
  return tokens_bw.astype(jnp.int32), mask_bt, readout_b1[:, 0].astype(jnp.int32)


def reply_window(mask_bt, n: int):
  """(b, n) int32 logits positions start_b .. start_b + n - 1, start_b the first position of
  row b's mask (its first reply token's predecessor): every reply of at most n tokens lies
  inside. Positions past W - 2 (the last logits position) are outside every reply."""
  start_b = jnp.argmax(mask_bt > 0, axis=1).astype(jnp.int32)
  return start_b[:, None] + jnp.arange(n, dtype=jnp.int32)[None, :]


def in_window(x_bt, window_bn):
  """x at the window's positions (b, n, ...); 0 at positions past the row. No window: x."""
  if window_bn is None:
    return x_bt
  last = x_bt.shape[1] - 1
  got = jnp.take_along_axis(x_bt, jnp.minimum(window_bn, last).reshape(
      window_bn.shape + (1,) * (x_bt.ndim - 2)), axis=1)
  valid = (window_bn <= last).reshape(window_bn.shape + (1,) * (x_bt.ndim - 2))
  return jnp.where(valid, got, jnp.zeros((), got.dtype))


def group_prefix(tokens_bw, group_size: int, prefix_width: int):
  """(g, prefix_width): the first `prefix_width` tokens of each group's first row, the
  prompt the group's K consecutive rows share (past a row's prompt, its own tokens; the
  shared pass never attends to them, see `Transformer.hidden_after_prefix`)."""
  return tokens_bw[::group_size, :prefix_width]


def log_probs(model, tokens_bw, temperature: float, window_bn=None, prefix_gp=None):
  """(logp_bt, logits_bnv): log softmax(logits / T) of each next token, (b, W-1), and the
  logits / T at the reply window (`reply_window`). The LM head and the softmax run only at
  the window's positions, the rest of logp_bt is 0: the prompt's and the padding's
  positions, which no loss reads, cost the trunk alone. No window: every position (n = W-1).
  `prefix_gp` (`group_prefix`, with a window): each group's prompt runs once and only the
  window's tokens run per row (the same values; the prompt of a group of K, once not K
  times)."""
  if window_bn is None:
    logits_btv = model(tokens_bw[:, :-1]) / temperature
    return losses.token_log_probs(logits_btv, tokens_bw[:, 1:]), logits_btv
  if prefix_gp is None:
    h_bnd = in_window(model.hidden(tokens_bw[:, :-1]), window_bn)
  else:
    # Window positions past the row hold token 0 and are dropped below; clipped, they
    # stay valid positions (a learned position table has no row past the last).
    positions_bn = jnp.minimum(window_bn, tokens_bw.shape[1] - 2)
    h_bnd = model.hidden_after_prefix(prefix_gp, in_window(tokens_bw[:, :-1], window_bn),
                                      positions_bn)
  logits_bnv = model.logits(h_bnd) / temperature
  logp_bn = losses.token_log_probs(logits_bnv, in_window(tokens_bw[:, 1:], window_bn))
  return from_window(logp_bn, window_bn, tokens_bw.shape[1] - 1), logits_bnv


def from_window(x_bn, window_bn, t: int):
  """(b, t) float32: x at the window's positions (`reply_window`), 0 elsewhere; positions
  past the row (>= t) are dropped."""
  scatter = jax.vmap(lambda z_t, i_n, v_n: z_t.at[i_n].add(v_n, mode='drop'))
  return scatter(jnp.zeros((x_bn.shape[0], t), jnp.float32), window_bn, x_bn)


def sampled_log_probs(out, window_bn, t: int):
  """The sampler's log-probs of its tokens (`SampleOutput.logprobs`, recorded at the
  rollout's temperature) laid out as `log_probs`' logp_bt: reply token i of a row is
  logits position start + i, the window's i-th position."""
  n = window_bn.shape[1]
  lp_bn = out.logprobs[:, :n]
  lp_bn = jnp.pad(lp_bn, ((0, 0), (0, n - lp_bn.shape[1])))
  return from_window(lp_bn, window_bn, t)


def values(model, tokens_bw):
  """Value of each state t (b, W-1) from the scalar head of a value (or policy) model."""
  return model.scalars(model.hidden(tokens_bw[:, :-1]))


def scores(model, tokens_bw, readout_b):
  return model.score(tokens_bw, None, None, readout_b)


def reward_model_score_fn(graphdef):
  """The frozen reward model as `score_fn(frozen, tokens_bw, mask_bt, readout_b) -> (b,)`."""
  def score_fn(frozen, tokens_bw, mask_bt, readout_b):
    del mask_bt
    return scores(model_lib.merge(graphdef, frozen['reward']), tokens_bw, readout_b)
  return score_fn


def sequence_rewards(host_b, raw_b, finished_b, *, model_weight: float, stats, normalize: bool,
                     missing_eot_penalty: float):
  """The reward of each response: the host terms (checker, user functions), plus
  `model_weight` times the RM score standardised with the reward stage's mean / std on
  SFT samples (raw_b None: no reward model), plus a penalty for a response cut before its
  end token."""
  r = host_b.astype(jnp.float32)
  if raw_b is not None:
    s = raw_b
    if normalize and stats:
      s = (s - stats['mean']) / max(stats['std'], 1e-6)
    r = r + model_weight * s
  return r + jnp.where(finished_b, 0.0, missing_eot_penalty)


class Scored(NamedTuple):
  """A rollout laid out for the update, with what every algorithm computes of it."""
  tokens_bw: jnp.ndarray
  mask_bt: jnp.ndarray
  window_bn: jnp.ndarray        # the reply window (`reply_window`) the update reads too
  logp_bt: jnp.ndarray          # the policy's log-probs at logits / T (the update's "old")
  logits_bnv: jnp.ndarray | None  # the policy's logits / T at the window (None: the log-probs
                                # came from the sampler, section.old_logp='sampler')
  ref_logp_bt: jnp.ndarray | None
  raw_b: jnp.ndarray | None     # the reward model's score (None: no model term)
  rewards_b: jnp.ndarray        # the sequence reward (`sequence_rewards`)


def score(r, policy, reference, score_fn, tok, section, *, model_weight: float,
          stats, width: int | None = None, reply_width: int | None = None,
          group: tuple[int, int] | None = None) -> Scored:
  """Assemble rollout `r` (a `rl.loop.Rollout`) at `width`, the policy's and (unless None) the
  reference's log-probs over a reply window `reply_width` long (None: the response budget;
  at least the longest reply), the reward model's score (`score_fn(tokens_bw, mask_bt,
  readout_b)`, unless None) and the sequence reward. `group = (K, prefix_width)`: rows come
  in groups of K sharing their prompt, at most `prefix_width` long, which the log-probs run
  once a group (`group_prefix`). With section.old_logp='sampler' the policy's log-probs are
  the sampler's (`sampled_log_probs`) and its forward is skipped."""
  out = r.out
  tokens_bw, mask_bt, readout_b = assemble(r.prompt_bp, r.length_b, out.tokens, out.lengths,
                                           tok.reward_id, tok.pad_id, width)
  window_bn = reply_window(mask_bt, reply_width or out.tokens.shape[1])
  prefix_gp = None if group is None else group_prefix(tokens_bw, *group)
  if section.old_logp == 'sampler':
    logp_bt, logits_bnv = sampled_log_probs(out, window_bn, mask_bt.shape[1]), None
  else:
    logp_bt, logits_bnv = log_probs(policy, tokens_bw, section.temperature, window_bn,
                                    prefix_gp)
  ref_logp_bt = (None if reference is None else
                 log_probs(reference, tokens_bw, section.temperature, window_bn, prefix_gp)[0])
  raw_b = None if score_fn is None else score_fn(tokens_bw, mask_bt, readout_b)
  rewards_b = sequence_rewards(r.host_reward_b, raw_b, out.finished, model_weight=model_weight,
                               stats=stats, normalize=section.normalize_scores,
                               missing_eot_penalty=section.missing_eot_penalty)
  return Scored(tokens_bw, mask_bt, window_bn, logp_bt, logits_bnv, ref_logp_bt, raw_b,
                rewards_b)


def rollout_metrics(rollout, s: Scored, rewards_b) -> dict:
  """What every online-RL iteration logs of its samples (`s`, from `score`, with the
  algorithm's `rewards_b`): reward-model score (`scores`), reward, gold accuracy (the
  checker on what was sampled), KL to the reference, entropy, reply length, the share that
  ended their turn."""
  out, mask_bt = rollout.out, s.mask_bt
  n_tokens = jnp.maximum(mask_bt.sum(), 1.0)
  if s.logits_bnv is None:  # recorded by the sampler at the same temperature
    entropy = jnp.sum(out.entropy * out.response_mask)
  else:
    entropy = algo.entropy_sum(s.logits_bnv, in_window(mask_bt, s.window_bn))
  metrics = {'rewards': rewards_b.mean(), 'host_rewards': rollout.host_reward_b.mean(),
             'gold': rollout.correct_b.mean(), 'entropy': entropy / n_tokens,
             'response_length': out.lengths.mean(), 'eot_rate': out.finished.mean(),
             'response_tokens': mask_bt.sum()}
  if s.raw_b is not None:
    metrics['scores'] = s.raw_b.mean()
  if s.ref_logp_bt is not None:
    metrics['kl'] = kl_estimate(s.logp_bt, s.ref_logp_bt, mask_bt)
  return metrics


def advantages(old_logp_bt, ref_logp_bt, values_bt, rewards_b, mask_bt, beta, *,
               kl_estimator: str, kl_clamp: float, gamma: float, lam: float):
  """Per-token KL, rewards, GAE advantages (whitened over the whole batch) and returns."""
  kl_bt = algo.kl_per_token(old_logp_bt, ref_logp_bt, kl_estimator, kl_clamp) * mask_bt
  token_rewards_bt = algo.per_token_rewards(kl_bt, rewards_b, mask_bt, beta)
  adv_bt, returns_bt = algo.gae(token_rewards_bt, values_bt, mask_bt, gamma, lam)
  return {'advantages': algo.masked_whiten(adv_bt, mask_bt), 'returns': returns_bt,
          'kl_bt': kl_bt, 'token_rewards': token_rewards_bt}


def kl_estimate(logp_bt, ref_logp_bt, mask_bt):
  """Sequence KL (sum over the response of log pi - log pi_ref), mean over rows: the
  number the adaptive controller steers and the report quotes."""
  return jnp.mean(jnp.sum((logp_bt - ref_logp_bt) * mask_bt, axis=1))
