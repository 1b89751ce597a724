"""Web-like question-and-answer pages for the pretraining corpus (`config.data.qa_share`).

A real base model has read the internet, and the internet has pages of solved questions:
quizzes, FAQs, forum threads, homework help. Shakespeare alone has none, so a base model
trained on it never sees a question answered and cannot be coaxed into answering one.
With `config.data.qa_share = s > 0` the pretraining corpus also holds such pages,
written in plain text from the task suite (`jaxgpt.data.tasks`).

Pages
* Each page holds 3-8 distinct question/answer pairs, each pair of a task drawn
  uniformly (so pages mix tasks), instances from the **train** split only
  (`Task.make(rng, 'train')`): a held-out prompt can never appear, whatever the seed.
* Each page has one of `FORMATS`, drawn per page:
    qa          'Q: ...' / 'A: ...' lines under a title
    labelled    'Question: ... Answer: ...' on one line or two
    faq         a markdown FAQ: '**question**', a blank line, the answer
    quiz        a numbered quiz, then its answer key
    forum       a thread: '<user> asked: ...' / 'reply from <user>: ...'
    flashcards  a study set: the question on one line, the answer on the next
  Answers are always the bare answer (no chatter), as the task checkers expect. Pages
  are plain text: no special tokens, no chat template.
* Page `i` is drawn from its own RNG seeded by (`SEED`, `i`), so pages are the same on
  every machine and every run, and the first pages do not depend on how many follow.

Share of characters. The pages come after the corpus's own documents, in the reading
order. With B characters of documents, pages are added one by one while doing so brings
the page total P closer to s / (1 - s) * B, so P / (B + P) ~= s (within half a page:
a few hundred characters in millions). Pages are documents like any other: they take
the same hash-based train / validation split (by their index in the reading order),
and `CorpusStats.qa_pages` / `qa_chars` count them (they are in `documents` / `chars`
too).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import random
from collections.abc import Callable, Iterable, Iterator

from jaxgpt.config import ConfigError
from jaxgpt.data import tasks

SEED = 0
# Bump when what pages look like changes (formats, counts, the tasks they draw): it is
# part of the dataset name, so a prepared dataset with older pages is never reused.
VERSION = 1
MIN_PAIRS, MAX_PAIRS = 3, 8
MAX_SHARE = 0.5

Pair = tuple[str, str]


@dataclasses.dataclass(frozen=True)
class QAPage:
  text: str
  format: str
  examples: tuple[tasks.Example, ...]   # the pairs on the page, in page order


# ---------------------------------------------------------------------------- formats

def _user(rng: random.Random) -> str:
  name = rng.choice(tasks.vocabulary())
  return name + (str(rng.randint(1, 99)) if rng.random() < 0.5 else '')


def _qa(pairs: list[Pair], rng: random.Random) -> str:
  title = rng.choice(('Practice questions', 'Questions and answers', 'Warm-up exercises',
                      'Homework help', 'Study notes', 'Q&A'))
  gap = rng.choice(('\n\n', '\n'))
  return f'{title}\n\n' + gap.join(f'Q: {q}\nA: {a}' for q, a in pairs) + '\n'


def _labelled(pairs: list[Pair], rng: random.Random) -> str:
  title = rng.choice(('Exercises with answers', 'Solved problems', 'Answers to common questions',
                      'Daily practice'))
  sep = rng.choice((' ', '\n'))
  return f'{title}\n\n' + '\n\n'.join(f'Question: {q}{sep}Answer: {a}' for q, a in pairs) + '\n'


def _faq(pairs: list[Pair], rng: random.Random) -> str:
  title = rng.choice(('# Frequently asked questions', '## FAQ', '# FAQ', '## Common questions'))
  return f'{title}\n\n' + '\n\n'.join(f'**{q}**\n\n{a}' for q, a in pairs) + '\n'


def _quiz(pairs: list[Pair], rng: random.Random) -> str:
  title = rng.choice(('Quiz', 'Pop quiz', 'Test yourself', 'Brain teasers', 'Puzzle corner'))
  questions = '\n'.join(f'{i}. {q}' for i, (q, _) in enumerate(pairs, 1))
  if rng.random() < 0.5:
    key = 'Answer key: ' + ', '.join(f'{i}. {a}' for i, (_, a) in enumerate(pairs, 1))
  else:
    key = 'Answers\n' + '\n'.join(f'{i}) {a}' for i, (_, a) in enumerate(pairs, 1))
  return f'{title}\n\n{questions}\n\n{key}\n'


def _forum(pairs: list[Pair], rng: random.Random) -> str:
  title = rng.choice(('Re: quick question', 'Thread: stuck on these', 'Re: homework help',
                      'Topic: can someone check my answers?'))
  posts = [f'{_user(rng)} asked: {q}\nreply from {_user(rng)}: {a}' for q, a in pairs]
  return f'{title}\n\n' + '\n\n'.join(posts) + '\n'


def _flashcards(pairs: list[Pair], rng: random.Random) -> str:
  title = rng.choice(('Flashcards', 'Study set', 'Review cards'))
  return f'{title}\n\n' + '\n\n'.join(f'{q}\n{a}' for q, a in pairs) + '\n'


_RENDER: dict[str, Callable[[list[Pair], random.Random], str]] = {
    'qa': _qa, 'labelled': _labelled, 'faq': _faq, 'quiz': _quiz, 'forum': _forum,
    'flashcards': _flashcards,
}
FORMATS = tuple(_RENDER)


# ---------------------------------------------------------------------------- pages

def page(index: int, seed: int = SEED) -> QAPage:
  """Page `index` of the sequence `seed` (train-split task instances only)."""
  rng = random.Random(f'jaxgpt-qa-page|v{VERSION}|{seed}|{index}')
  fmt = rng.choice(FORMATS)
  names = sorted(tasks.TASKS)
  examples, seen = [], set()
  for _ in range(rng.randint(MIN_PAIRS, MAX_PAIRS)):
    while True:
      name = rng.choice(names)
      prompt, answer = tasks.TASKS[name].make(rng, 'train')
      if prompt not in seen:
        break
    seen.add(prompt)
    examples.append(tasks.Example(name, prompt, answer))
  text = _RENDER[fmt]([(e.prompt, e.answer) for e in examples], rng)
  return QAPage(text=text, format=fmt, examples=tuple(examples))


def target_chars(base_chars: int, share: float) -> float:
  """Page characters P with P / (base_chars + P) = share."""
  return share / (1.0 - share) * base_chars


def pages_for(base_chars: int, share: float, seed: int = SEED) -> Iterator[QAPage]:
  """Pages 0, 1, ... while each brings their total closer to `target_chars`."""
  target, total, index = target_chars(base_chars, share), 0, 0
  while True:
    p = page(index, seed)
    if total + len(p.text) / 2 > target:  # adding it would overshoot more than stop short
      return
    yield p
    total += len(p.text)
    index += 1


def with_pages(documents: Iterable[str], share: float, stats=None,
               seed: int = SEED) -> Iterator[str]:
  """The documents, then pages making up about `share` of all their characters.

  `stats` (a `corpus.CorpusStats`, optional) counts the pages in documents, chars,
  qa_pages and qa_chars; the documents count themselves as they are read.
  """
  check_share(share)
  base = 0
  for doc in documents:
    base += len(doc)
    yield doc
  for p in pages_for(base, share, seed):
    if stats is not None:
      stats.documents += 1
      stats.chars += len(p.text)
      stats.qa_pages += 1
      stats.qa_chars += len(p.text)
    yield p.text


def check_share(share) -> float:
  """`config.data.qa_share` as a float in [0, MAX_SHARE], else ConfigError naming it."""
  if isinstance(share, bool) or not isinstance(share, (int, float)) or not (
      0.0 <= share <= MAX_SHARE):
    raise ConfigError(f'config.data.qa_share={share!r} must be a number in [0, {MAX_SHARE}] '
                     '(the share of the pretraining characters that are Q/A pages).')
  return float(share)


@functools.cache
def fingerprint(seed: int = SEED) -> str:
  """A short hash of the page generator (its version and first pages): part of the
  dataset name, so a change of what pages look like never reuses a prepared dataset."""
  h = hashlib.sha1(f'v{VERSION}|{seed}'.encode())
  for i in range(16):
    h.update(page(i, seed).text.encode())
  return h.hexdigest()[:8]
