"""Real conversations for SFT: the ChatterBot corpus, fetched from PyPI on first use.

The corpus (BSD-3) ships as the wheel `chatterbot-corpus==1.3.3`. It is downloaded with
pip itself (`pip download --no-deps`) into the jaxgpt cache (`$JAXGPT_CACHE`, else
`~/.cache/jaxgpt`) and read straight from the zip; nothing of it is stored in the repo.
Each `conversations:` entry of `chatterbot_corpus/data/<language>/*.yml` is a list of
turns spoken alternately by the user and the assistant; a trailing user turn without a
reply is dropped, and an entry that is not a list of non-empty strings is skipped.
"""

from __future__ import annotations

import functools
import random
import zipfile
from pathlib import Path

import yaml

from jaxgpt.data import tasks
from jaxgpt.data.corpus import fetch_pip_package

CHATTERBOT = 'chatterbot-corpus==1.3.3'
_WHEEL_GLOB = 'chatterbot_corpus-1.3.3-*.whl'
_YAML_LOADER = getattr(yaml, 'CSafeLoader', yaml.SafeLoader)  # libyaml when present: 10x faster


def chatterbot_wheel() -> Path:
  return fetch_pip_package(CHATTERBOT, _WHEEL_GLOB, hint='Put the wheel there by hand, or train on '
                           'your own JSONL conversations (config.sft.data).')


def turns_to_messages(turns) -> list[dict] | None:
  """Alternating user/assistant messages from a list of turns, or None if unusable."""
  if not isinstance(turns, list) or not all(isinstance(t, str) and t.strip() for t in turns):
    return None
  turns = [t.strip() for t in turns]
  turns = turns[:len(turns) - len(turns) % 2]
  if not turns:
    return None
  return [{'role': 'user' if i % 2 == 0 else 'assistant', 'content': t}
          for i, t in enumerate(turns)]


@functools.cache
def _chatterbot(language: str) -> tuple[tuple[dict, ...], int]:
  prefix = f'chatterbot_corpus/data/{language}/'
  rows, skipped = [], 0
  with zipfile.ZipFile(chatterbot_wheel()) as z:
    names = sorted(n for n in z.namelist() if n.startswith(prefix) and n.endswith('.yml'))
    if not names:
      raise ValueError(f'chatterbot corpus has no language {language!r}.')
    for name in names:
      doc = yaml.load(z.read(name), Loader=_YAML_LOADER) or {}
      for turns in doc.get('conversations') or ():
        messages = turns_to_messages(turns)
        if messages is None:
          skipped += 1
        else:
          rows.append({'messages': messages})
  return tuple(rows), skipped


def chatterbot_conversations(language: str = 'english') -> list[dict]:
  """All usable conversations as `{"messages": [{"role", "content"}, ...]}` rows."""
  rows, _ = _chatterbot(language)
  return [{'messages': [dict(m) for m in r['messages']]} for r in rows]


def chatterbot_skipped(language: str = 'english') -> int:
  """How many corpus entries were not usable conversations (e.g. a bare string)."""
  return _chatterbot(language)[1]


def demo_sft_rows(n_task_examples: int = 20_000, seed: int = 0,
                  conversations: list[dict] | None = None) -> list[dict]:
  """The embedded SFT data: ChatterBot conversations plus train-split task examples.

  Task examples become single-turn user/assistant conversations; only the `train` split
  of `jaxgpt.data.tasks` is used, so the held-out evaluation set stays unseen. The rows are
  shuffled deterministically in `seed`. `conversations` replaces the ChatterBot rows
  (tests pass a few to stay offline).
  """
  rows = chatterbot_conversations() if conversations is None else list(conversations)
  rows += [{'messages': ex.messages()}
           for ex in tasks.sample_examples('train', n_task_examples, seed)]
  random.Random(f'demo_sft_rows|{seed}').shuffle(rows)
  return rows
