"""JSONL rows from users' files: one reader, one bad-row policy, one message check.

Every user-supplied JSONL source (SFT conversations, reward comparisons, PPO prompts)
reads its files through `read_rows`: blank lines are ignored; a row that is not JSON, or
that the source's `parse` rejects with `BadRow`, either raises `BadRowError` whose message
starts with `path:line:` (on_bad_row='error') or is skipped and counted by kind ('skip').
`expand_paths` turns the config's comma-separated paths, globs or directories into files.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any, Callable, Sequence

from jaxgpt.config import ConfigError
from jaxgpt.data.tokenizer import ROLES

BAD_ROW_POLICIES = ('error', 'skip')


class BadRowError(ValueError):
  """A malformed row; the message starts with `path:line:`."""

  def __init__(self, path: str, line: int, kind: str, reason: str):
    super().__init__(f'{path}:{line}: {reason}')
    self.path, self.line, self.kind, self.reason = path, line, kind, reason


class BadRow(Exception):
  """Raised by a source's row parser: what kind of problem, and the reason to print."""

  def __init__(self, kind: str, reason: str):
    super().__init__(reason)
    self.kind, self.reason = kind, reason


def read_rows(paths: Sequence[str], parse: Callable[[Any, str], Any],
              on_bad_row: str = 'error') -> tuple[list, dict]:
  """[parse(obj, 'path:line') for every valid row] and counts {rows_read, bad_rows,
  bad_rows_by_kind}."""
  if on_bad_row not in BAD_ROW_POLICIES:
    raise ValueError(f'on_bad_row={on_bad_row!r} must be one of {BAD_ROW_POLICIES}.')
  rows, counts = [], {'rows_read': 0, 'bad_rows': 0, 'bad_rows_by_kind': {}}
  for path in paths:
    with open(path, 'rb') as f:
      for lineno, raw in enumerate(f, start=1):
        if not raw.strip():
          continue
        counts['rows_read'] += 1
        try:
          try:
            obj = json.loads(raw.decode('utf-8'))
          except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BadRow('bad_json', f'bad JSON: {e}') from None
          rows.append(parse(obj, f'{path}:{lineno}'))
        except BadRow as bad:
          if on_bad_row == 'error':
            raise BadRowError(str(path), lineno, bad.kind, bad.reason) from None
          counts['bad_rows'] += 1
          by_kind = counts['bad_rows_by_kind']
          by_kind[bad.kind] = by_kind.get(bad.kind, 0) + 1
  return rows, counts


def parse_messages(raw) -> list[dict]:
  """A `messages` value as [{'role', 'content'}] with stripped contents; raises BadRow."""
  if not isinstance(raw, list) or not raw:
    raise BadRow('bad_type', "'messages' must be a non-empty list")
  messages = []
  for i, m in enumerate(raw):
    where = f'messages[{i}]'
    if not isinstance(m, dict):
      raise BadRow('bad_type', f'{where}: expected an object with "role" and "content"')
    for field in ('role', 'content'):
      if field not in m:
        raise BadRow('missing_field', f"{where}: missing field '{field}'")
    if m['role'] not in ROLES:
      raise BadRow('unknown_role',
                   f"{where}: unknown role {m['role']!r} (roles: {', '.join(ROLES)})")
    if not isinstance(m['content'], str):
      raise BadRow('bad_type', f"{where}: content must be a string, got "
                   f"{type(m['content']).__name__}")
    messages.append({'role': m['role'], 'content': m['content'].strip()})
  return messages


def parse_prompt(obj: dict) -> tuple[dict, ...]:
  """The messages a reply answers: `"prompt": "text"` (one user turn) or `"messages"`
  ending with a non-empty user turn; raises BadRow."""
  if 'prompt' in obj and 'messages' in obj:
    raise BadRow('bad_type', "give either 'prompt' or 'messages', not both")
  if 'prompt' in obj:
    if not isinstance(obj['prompt'], str):
      raise BadRow('bad_type', f"'prompt' must be a string, got {type(obj['prompt']).__name__}")
    messages = [{'role': 'user', 'content': obj['prompt'].strip()}]
  elif 'messages' in obj:
    messages = parse_messages(obj['messages'])
    if messages[-1]['role'] != 'user':
      raise BadRow('prompt_end', "the prompt 'messages' must end with a user turn (the one "
                   f"the reply answers), got a final {messages[-1]['role']!r} turn")
  else:
    raise BadRow('missing_field', "missing field: need 'prompt' (text) or 'messages'")
  if not messages[-1]['content']:
    raise BadRow('empty_prompt', 'the last user turn of the prompt is empty')
  return tuple(messages)


def expand_paths(spec: str, field: str) -> list[str]:
  """Comma-separated files, globs or directories (their *.jsonl) -> sorted file list;
  errors name `field`, the config field the spec came from."""
  out: list[str] = []
  for part in (p.strip() for p in spec.split(',')):
    if not part:
      continue
    if os.path.isdir(part):
      found = sorted(glob.glob(os.path.join(part, '*.jsonl')))
    else:
      found = sorted(glob.glob(os.path.expanduser(part)))
    if not found:
      raise ConfigError(f'{field}: {part!r} matches no file; give JSONL paths, globs or '
                        "directories, or 'embedded'.")
    out += [f for f in found if f not in out]
  if not out:
    raise ConfigError(f"{field} is empty; give JSONL paths, globs or directories, or 'embedded'.")
  return out
