"""The simulated labeler's verdict between two models' replies, and which preference decided it.

InstructGPT's headline measure is how often labelers prefer a model's reply to the
baseline's. Here the labeler is `comparisons.labeler_key` (right, then finished, then free
of repetition, then shorter), so each verdict also says which of those keys decided it:
a model that wins only on "shorter" has learned brevity, not correctness.
"""

from __future__ import annotations

import collections
from typing import Sequence

from jaxgpt.data import comparisons

DECIDING_KEYS = ('correct', 'finished', 'repetition', 'shorter')


def verdict(prompt: str, reply: tuple[str, bool], baseline: tuple[str, bool]) -> tuple[int, str]:
  """(+1 reply preferred, -1 baseline preferred, 0 tie; the key that decided, '' for a tie)
  for two (text, finished) replies to `prompt`."""
  a = comparisons.labeler_key(prompt, *reply)
  b = comparisons.labeler_key(prompt, *baseline)
  for key, x, y in zip(DECIDING_KEYS, a, b):
    if x != y:
      return (1 if x > y else -1), key
  return 0, ''


def win_rate(prompts: Sequence[str], replies, baselines) -> dict:
  """{'win_rate' (ties count half), 'wins', 'losses', 'ties', 'wins_by' {key: n},
  'losses_by' {key: n}, 'n'} of `replies` against `baselines`, one (text, finished) each
  per prompt."""
  wins_by, losses_by = collections.Counter(), collections.Counter()
  ties = 0
  for prompt, reply, base in zip(prompts, replies, baselines, strict=True):
    sign, key = verdict(prompt, reply, base)
    if sign > 0:
      wins_by[key] += 1
    elif sign < 0:
      losses_by[key] += 1
    else:
      ties += 1
  n = len(prompts)
  wins, losses = sum(wins_by.values()), sum(losses_by.values())
  return {'win_rate': (wins + 0.5 * ties) / max(n, 1), 'wins': wins, 'losses': losses,
          'ties': ties, 'wins_by': {k: wins_by[k] for k in DECIDING_KEYS},
          'losses_by': {k: losses_by[k] for k in DECIDING_KEYS}, 'n': n}
