"""Best-of-N with the reward model: of N samples of a policy per prompt, the one the reward
model scores highest.

`sample_scored` draws N samples per prompt at T=1 once and scores and checks each;
`expected_best_of` then gives, for any n <= N, the expected value (gold accuracy, RM
score) of the best-of-n pick averaged over every n-subset of the N samples: an unbiased
estimate that uses all N samples instead of one arbitrary subset (Gao et al. 2022). The KL
of a best-of-n policy to the one it samples is at most `kl_bound(n)` = log n - (n-1)/n.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from jaxgpt.data import tasks
from jaxgpt.evals import samples as samples_lib
from jaxgpt.inference import scoring


@dataclasses.dataclass
class Scored:
  """N samples per prompt, prompt-major: row p * N + j is sample j of prompt p."""
  prompts: list           # the rendered prompt ids, one per sample
  ids: list               # sampled ids (stop token included), one per sample
  texts: list[str]        # decoded replies
  finished: list[bool]    # the reply ended with a stop token (else cut at n_new tokens)
  scores_pn: np.ndarray   # (P, N) reward-model scores
  gold_pn: np.ndarray     # (P, N) bool: the task checker accepts the reply


def sample_scored(policy, rm, tok, eval_set, n: int, *, n_new: int, seed: int,
                  rm_len: int) -> Scored:
  """N samples at T=1 of `policy` (a samples.StageModel) for each held-out example, scored
  by `rm` and checked by the task suite. A sample cut at n_new tokens is scored without
  `<|end|>`, as PPO would score it."""
  questions = [[{'role': 'user', 'content': e.prompt}] for e in eval_set]
  prompts = [tok.chat.prompt(q) for q in questions for _ in range(n)]
  drawn = samples_lib.draw(policy, tok, prompts, n_new=n_new, seed=seed, group=n)
  ids = [x for x, _ in drawn]
  replies = [tok.chat.reply(x) for x in ids]
  texts, finished = [t for t, _ in replies], [f for _, f in replies]
  scores = scoring.score_replies(rm.graphdef, rm.params, rm.mcfg, tok,
                                 [(questions[i // n], t, f)
                                  for i, (t, f) in enumerate(zip(texts, finished))],
                                 seq_len=rm_len)
  gold = np.array([tasks.check(eval_set[i // n], None, t) for i, t in enumerate(texts)])
  p = len(eval_set)
  return Scored(prompts, ids, texts, finished, scores.reshape(p, n), gold.reshape(p, n))


def subset_max_weights(big_n: int, n: int) -> np.ndarray:
  """(N,) weights w_i: the probability that the i-th lowest of N scores is the highest of a
  uniformly drawn n-subset, C(i, n-1) / C(N, n). They sum to 1."""
  if not 1 <= n <= big_n:
    raise ValueError(f'best-of-{n} needs 1 <= n <= N = {big_n} samples per prompt.')
  return np.array([math.comb(i, n - 1) for i in range(big_n)]) / math.comb(big_n, n)


def expected_best_of(values_pn, scores_pn, n: int) -> np.ndarray:
  """(P,) expected `values` of the best-of-n pick by `scores`, over all n-subsets of each
  prompt's N samples. Tied scores are ordered by a stable sort (first sample lowest)."""
  values_pn, scores_pn = np.asarray(values_pn, np.float64), np.asarray(scores_pn)
  order_pn = np.argsort(scores_pn, axis=1, kind='stable')
  sorted_pn = np.take_along_axis(values_pn, order_pn, axis=1)
  return sorted_pn @ subset_max_weights(scores_pn.shape[1], n)


def pick_best(scores_pn, n: int) -> np.ndarray:
  """(P, N // n) flat sample indices: the best-scored of each consecutive group of n."""
  p, big_n = scores_pn.shape
  groups = np.asarray(scores_pn)[:, :big_n // n * n].reshape(p, big_n // n, n)
  return (np.arange(p)[:, None] * big_n + np.arange(big_n // n)[None, :] * n +
          groups.argmax(-1))


def kl_bound(n: int) -> float:
  """Upper bound on KL(best-of-n || the sampled policy), log n - (n-1)/n nats."""
  return math.log(n) - (n - 1) / n
