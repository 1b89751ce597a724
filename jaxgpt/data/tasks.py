"""A suite of small verifiable tasks, shared by the SFT, reward and PPO stages.

Each task turns an *instance* (a word, a pair of numbers, a letter and a word) into a
short templated prompt and its one right answer, and can check any response to any of
its prompts by parsing the instance back out of the prompt. The tasks are sized for a
model of a few million parameters: one short answer each, no reasoning chains.

Train / held-out split. Every instance has a canonical key (``'lemon'``, ``'23+45'`` with
the pair sorted, ``'a|banana'``); a SHA-256 of ``task|key`` puts it in ``'heldout'`` for
``HELDOUT_PERMILLE``/1000 of keys and in ``'train'`` otherwise. Since a prompt spells out
its whole instance, a held-out prompt can never be produced by the train split, whatever
the template or the seed; and since the key of an unordered task (``a + b``, ``larger of
a and b``) is the sorted pair, ``45 + 23`` is held out exactly when ``23 + 45`` is.

Words are pseudo-words generated here from consonant-vowel syllables (no word list is
shipped or read), so the suite is the same on every machine and needs no download.

Checking is lenient about form and strict about content: surrounding whitespace, quotes
and end punctuation are ignored; yes/no answers are read from the first word (and fail if
the other label appears too); word answers ignore case except for the upper-case task;
number answers accept digits or, for small counts, a number word ("three").

Graded credit (`score`, the RL reward source 'partial'): 1.0 for a right answer, and for a
wrong one up to `PARTIAL_MAX` by closeness: a word answer by its character-level similarity
to the right one, a number answer by its distance; the two-way choices (palindrome, larger)
get none, since half credit for the wrong one of two answers would reward guessing.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import random
import re
from typing import Callable, Iterable

HELDOUT_PERMILLE = 100          # 10% of instances are held out from training
SPLITS = ('train', 'heldout')

_CONSONANTS = 'bcdfghklmnprstvz'
_VOWELS = 'aeiou'
_NUMBER_WORDS = ('zero one two three four five six seven eight nine ten eleven twelve '
                 'thirteen fourteen fifteen sixteen seventeen eighteen nineteen twenty').split()
_STRIP = ' \t\r\n\'"`.,!?;:'
PARTIAL_MAX = 0.5              # the most a wrong answer can earn in `Task.score`


@dataclasses.dataclass(frozen=True)
class Example:
  task: str
  prompt: str
  answer: str

  def messages(self) -> list[dict]:
    """The example as a single-turn chat conversation."""
    return [{'role': 'user', 'content': self.prompt},
            {'role': 'assistant', 'content': self.answer}]


# ----------------------------------------------------------------------------- words

def _syllable(rng: random.Random) -> str:
  return rng.choice(_CONSONANTS) + rng.choice(_VOWELS)


@functools.cache
def vocabulary() -> tuple[str, ...]:
  """About 4,000 distinct pronounceable pseudo-words of 3-7 letters, none a palindrome."""
  rng = random.Random(20240601)
  words: set[str] = set()
  while len(words) < 4000:
    w = ''.join(_syllable(rng) for _ in range(rng.choice((1, 2, 2, 3))))
    if rng.random() < 0.5:
      w += rng.choice(_CONSONANTS)
    if 3 <= len(w) <= 7 and w != w[::-1]:
      words.add(w)
  return tuple(sorted(words))


def _palindrome(rng: random.Random) -> str:
  half = ''.join(_syllable(rng) for _ in range(rng.choice((1, 2))))
  if rng.random() < 0.5:
    half += rng.choice(_CONSONANTS)
  return half + half[-2::-1] if rng.random() < 0.5 else half + half[::-1]


def _near_palindrome(rng: random.Random) -> str:
  """A palindrome with one letter changed: the cases where only checking tells."""
  while True:
    w = list(_palindrome(rng))
    i = rng.randrange(len(w))
    w[i] = rng.choice([c for c in _CONSONANTS + _VOWELS if c != w[i]])
    w = ''.join(w)
    if w != w[::-1]:
      return w


# ----------------------------------------------------------------------------- matching

def _clean(response: str) -> str:
  return response.strip().strip(_STRIP).strip()


def _match_yes_no(response: str, answer: str) -> bool:
  words = re.findall(r'[a-z]+', response.lower())
  if not words or words[0] != answer.lower():
    return False
  other = 'no' if answer.lower() == 'yes' else 'yes'
  return other not in words


def _match_word_nocase(response: str, answer: str) -> bool:
  return _clean(response).lower() == answer.lower()


def _match_exact(response: str, answer: str) -> bool:
  return _clean(response) == answer


def _parse_number(response: str) -> int | None:
  r = _clean(response).lower()
  if r in _NUMBER_WORDS:
    return _NUMBER_WORDS.index(r)
  return int(r) if re.fullmatch(r'[+-]?\d+', r) else None


def _match_number(response: str, answer: str) -> bool:
  r = _parse_number(response)
  return r is not None and r == int(answer)


# Closeness in [0, 1] of a wrong answer to the right one, for graded credit.

def _close_text(response: str, answer: str) -> float:
  return difflib.SequenceMatcher(None, _clean(response), answer).ratio()


def _close_text_nocase(response: str, answer: str) -> float:
  return _close_text(response.lower(), answer.lower())


def _close_number(response: str, answer: str) -> float:
  """1 at the answer, falling linearly to 0 at twice its distance from zero (off by one of
  a count of 6: 0.83; 85 for 95: 0.89)."""
  r = _parse_number(response)
  if r is None:
    return 0.0
  a = int(answer)
  return max(0.0, 1.0 - abs(r - a) / max(abs(a), 1))


# ----------------------------------------------------------------------------- tasks

_FIELD_PATTERNS = {'w': '[a-z]+', 'c': '[a-z]', 'a': r'\d+', 'b': r'\d+'}


def _template_regex(template: str) -> re.Pattern:
  parts = re.split(r'\{(\w)\}', template)
  out = []
  for i, part in enumerate(parts):
    out.append(f'(?P<{part}>{_FIELD_PATTERNS[part]})' if i % 2 else re.escape(part))
  return re.compile(''.join(out))


@dataclasses.dataclass(frozen=True)
class Task:
  """One verifiable task: templates over an instance, its answer and its checker."""
  name: str
  templates: tuple[str, ...]
  draw: Callable[[random.Random], dict]       # rng -> instance fields (all str)
  key: Callable[[dict], str]                  # canonical instance key (decides the split)
  solve: Callable[[dict], str]                # instance -> the one right answer
  match: Callable[[str, str], bool]           # (response, answer) -> correct?
  close: Callable[[str, str], float] | None = None  # a wrong answer's closeness in [0, 1]

  @functools.cached_property
  def _regexes(self) -> tuple[re.Pattern, ...]:
    return tuple(_template_regex(t) for t in self.templates)

  def split_of(self, fields: dict) -> str:
    digest = hashlib.sha256(f'{self.name}|{self.key(fields)}'.encode()).digest()
    return 'heldout' if int.from_bytes(digest[:8], 'big') % 1000 < HELDOUT_PERMILLE else 'train'

  def make(self, rng: random.Random, split: str | None = None) -> tuple[str, str]:
    """A (prompt, answer) pair; with `split`, only instances of that split."""
    if split is not None and split not in SPLITS:
      raise ValueError(f'split={split!r} must be one of {SPLITS}.')
    while True:
      fields = self.draw(rng)
      if split is None or self.split_of(fields) == split:
        break
    template = rng.choice(self.templates)
    return template.format(**fields), self.solve(fields)

  def parse(self, prompt: str) -> dict | None:
    """The instance fields a prompt of this task spells out, or None if it is not one."""
    prompt = prompt.strip()
    for rx in self._regexes:
      m = rx.fullmatch(prompt)
      if m:
        return m.groupdict()
    return None

  def answer(self, prompt: str) -> str:
    fields = self.parse(prompt)
    if fields is None:
      raise ValueError(f'not a {self.name!r} prompt: {prompt!r}')
    return self.solve(fields)

  def check(self, prompt: str, response: str) -> bool:
    return self.match(response, self.answer(prompt))

  def score(self, prompt: str, response: str) -> float:
    """Graded credit: 1.0 right; a wrong answer PARTIAL_MAX times its closeness (0.0 for a
    task without one)."""
    answer = self.answer(prompt)
    if self.match(response, answer):
      return 1.0
    return PARTIAL_MAX * self.close(response, answer) if self.close else 0.0


def _draw_word(rng):
  return {'w': rng.choice(vocabulary())}


def _draw_palindrome(rng):
  r = rng.random()
  if r < 0.5:
    return {'w': _palindrome(rng)}
  return {'w': _near_palindrome(rng) if r < 0.75 else rng.choice(vocabulary())}


def _draw_count(rng):
  w = rng.choice(vocabulary())
  if rng.random() < 0.75:
    c = rng.choice(w)
  else:
    c = rng.choice([x for x in 'abcdefghijklmnopqrstuvwxyz' if x not in w])
  return {'c': c, 'w': w}


def _draw_pair(rng):
  return {'a': str(rng.randint(10, 99)), 'b': str(rng.randint(10, 99))}


def _draw_distinct_pair(rng):
  a, b = rng.sample(range(10, 100), 2)
  return {'a': str(a), 'b': str(b)}


def _pair_key(f):
  a, b = sorted((int(f['a']), int(f['b'])))
  return f'{a},{b}'


def _word_key(f):
  return f['w']


_TASK_LIST = (
    Task('palindrome',
         ("Is '{w}' a palindrome?",
          "Is the word '{w}' a palindrome?",
          "Does '{w}' read the same forwards and backwards?",
          "Is '{w}' the same when reversed?"),
         _draw_palindrome, _word_key,
         lambda f: 'Yes' if f['w'] == f['w'][::-1] else 'No', _match_yes_no),
    Task('reverse',
         ("Reverse the word '{w}'.",
          "Spell '{w}' backwards.",
          "What is '{w}' written in reverse?"),
         _draw_word, _word_key, lambda f: f['w'][::-1], _match_word_nocase, _close_text_nocase),
    Task('sort_letters',
         ("Sort the letters of '{w}' alphabetically.",
          "Put the letters of '{w}' in alphabetical order.",
          "Arrange the letters in '{w}' from a to z."),
         _draw_word, _word_key, lambda f: ''.join(sorted(f['w'])), _match_word_nocase,
         _close_text_nocase),
    Task('add',
         ('What is {a} + {b}?',
          'What is the sum of {a} and {b}?',
          'Add {a} and {b}.',
          'Compute {a} plus {b}.'),
         _draw_pair, _pair_key, lambda f: str(int(f['a']) + int(f['b'])), _match_number,
         _close_number),
    Task('count_letter',
         ("How many times does the letter '{c}' appear in '{w}'?",
          "Count the letter '{c}' in '{w}'.",
          "How many '{c}'s are in the word '{w}'?"),
         _draw_count, lambda f: f"{f['c']}|{f['w']}",
         lambda f: str(f['w'].count(f['c'])), _match_number, _close_number),
    Task('uppercase',
         ("Write '{w}' in capital letters.",
          "Convert '{w}' to uppercase.",
          "Spell '{w}' in upper case."),
         _draw_word, _word_key, lambda f: f['w'].upper(), _match_exact, _close_text),
    Task('length',
         ("How many letters are in '{w}'?",
          "How long is the word '{w}'?",
          "Count the letters in '{w}'."),
         _draw_word, _word_key, lambda f: str(len(f['w'])), _match_number, _close_number),
    Task('larger',
         ('Which is larger, {a} or {b}?',
          'Which number is greater, {a} or {b}?',
          'What is the bigger number: {a} or {b}?'),
         _draw_distinct_pair, _pair_key,
         lambda f: str(max(int(f['a']), int(f['b']))), _match_number),
)

TASKS: dict[str, Task] = {t.name: t for t in _TASK_LIST}


def task_of(prompt: str) -> str | None:
  """The name of the task whose templates produce `prompt`, or None."""
  for name, task in TASKS.items():
    if task.parse(prompt) is not None:
      return name
  return None


def _resolve(example_or_task) -> Task | None:
  if isinstance(example_or_task, Example):
    return TASKS[example_or_task.task]
  if isinstance(example_or_task, Task):
    return example_or_task
  if isinstance(example_or_task, str):
    if example_or_task not in TASKS:
      raise KeyError(f'unknown task {example_or_task!r}; tasks: {sorted(TASKS)}')
    return TASKS[example_or_task]
  if example_or_task is None:
    return None
  raise TypeError(f'expected an Example, a Task, a task name or None, got {example_or_task!r}')


def check(example_or_task, prompt: str | None, response: str) -> bool:
  """Is `response` a right answer to `prompt`?

  `example_or_task` is an Example (then `prompt` may be None: the example's own is
  used), a Task, a task name, or None (the task is recognised from the prompt; a prompt
  no task recognises is never answered right).
  """
  task = _resolve(example_or_task)
  if prompt is None:
    if not isinstance(example_or_task, Example):
      raise ValueError('check: prompt=None needs an Example.')
    prompt = example_or_task.prompt
  if task is None:
    name = task_of(prompt)
    if name is None:
      return False
    task = TASKS[name]
  return task.check(prompt, response)


def sample_examples(split: str, n: int, seed: int,
                    tasks: Iterable[str] | None = None) -> list[Example]:
  """`n` examples of `split`, tasks drawn uniformly, deterministic in `seed`."""
  names = sorted(TASKS) if tasks is None else list(tasks)
  for name in names:
    _resolve(name)
  rng = random.Random(f'{split}|{seed}')
  out = []
  for _ in range(n):
    name = rng.choice(names)
    prompt, answer = TASKS[name].make(rng, split)
    out.append(Example(name, prompt, answer))
  return out


def heldout_eval_set(n_per_task: int, seed: int = 0) -> list[Example]:
  """`n_per_task` distinct held-out examples of every task, in task order."""
  out = []
  for name in sorted(TASKS):
    rng = random.Random(f'eval|{name}|{seed}')
    seen: set[str] = set()
    tries = 0
    while len(seen) < n_per_task:
      tries += 1
      if tries > 100 * n_per_task + 1000:
        raise ValueError(f'task {name!r} has fewer than {n_per_task} held-out prompts to draw.')
      prompt, answer = TASKS[name].make(rng, 'heldout')
      if prompt not in seen:
        seen.add(prompt)
        out.append(Example(name, prompt, answer))
  return out
