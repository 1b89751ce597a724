"""Stage 3 data: comparison rows (prompt, chosen, rejected), their JSONL formats, and the
simulated labeler that ranks sampled responses the way human contractors would.

Row formats, one JSON object a line (blank lines ignored, unknown extra fields ignored)::

    {"prompt": "text" | "messages": [...], "chosen": "...", "rejected": "...",
     "margin"?: number, "group"?: str|int, "task"?: str,
     "chosen_finished"?: bool, "rejected_finished"?: bool}                     (1: a pair)
    {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": "...",
     "chosen_finished"?: bool, "rejected_finished"?: bool}                     (2: Anthropic HH)
    {"prompt"|"messages", "responses": [str, ...], "ranking": [int, ...],
     "responses_finished"?: [bool, ...]}                                       (3: K-way ranking)

A prompt given as text is one user turn; given as messages it must end with a user turn
(earlier assistant turns are allowed). HH transcripts are split on the `\\n\\nHuman:` /
`\\n\\nAssistant:` markers; both must end with an assistant turn and share every turn
before it, and the two last assistant turns are the pair. In a ranking, `ranking[i]` is
the rank of `responses[i]` (1 = best; equal ranks are ties and give no pair); it expands
into every pair of different ranks, chosen = the better, in response order. A ranking's
"margin", if any, applies to each of its pairs. Contents are stripped of surrounding
whitespace.

Finished. A reply is finished (the default) when it ended its turn; `false` marks one cut
at a length limit, as a sampled reply that ran out of tokens. The reward model reads a
finished reply as `<|assistant|>{reply}<|end|><|reward|>` and a cut one without the
`<|end|>`, as PPO scores its own samples (`jaxgpt.data.reward`). A response is its text
and this flag: the same text finished and cut are two different responses.

Groups. A comparison set (the pairs of one ranking, or rows sharing a "group") weighs 1
in the loss in total (InstructGPT), and is never split across train and held-out. A row
without "group" is its own set, named `path:line`. `task` is the given "task", else the
task-suite task that produces the last user message (`tasks.task_of`), else ''.

Bad rows. With `on_bad_row='error'` a bad row raises `jsonl.BadRowError` whose message
starts with `path:line:` (1-based, blank lines counted); with `'skip'` it is left out and
counted by kind: bad_json, bad_type (wrong JSON type, or both "prompt" and "messages"),
missing_field, unknown_role, empty_prompt, prompt_end (messages do not end with a user
turn), empty_response, identical (chosen == rejected in text and finished flag, or one
response ranked twice differently), ranking_length, bad_ranking (a rank that is not an
integer >= 1), bad_margin (not a finite number), bad_finished (a finished flag that is
not true or false, or "responses_finished" not a list), finished_length
("responses_finished" not one flag per response), hh_format (an HH transcript that is
not alternating marked turns ending with the assistant), hh_prefix (the two HH
transcripts differ before their last turn). A well-formed ranking whose responses are all
tied gives no pair: it is counted in `no_pair_rows`, not as bad.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
from typing import Iterable, Sequence

from jaxgpt.data import tasks
from jaxgpt.data.jsonl import BadRow, BadRowError, parse_prompt, read_rows

__all__ = ['Comparison', 'read_comparisons', 'write_comparisons', 'has_repetition',
           'labeler_key', 'label_samples', 'comparisons_from_samples', 'BadRowError']


@dataclasses.dataclass(frozen=True)
class Comparison:
  """One preference: after `prompt`, reply `chosen` is better than `rejected`."""
  prompt: tuple[dict, ...]   # chat messages before the reply; ends with a user turn
  chosen: str
  rejected: str
  margin: float = 0.0
  group: str = ''            # comparison set id (pairs of one ranking share it)
  task: str = ''             # task-suite task name when known
  chosen_finished: bool = True    # False: the reply was cut before its <|end|>
  rejected_finished: bool = True


# ----------------------------------------------------------------------------- parsing

def _text(obj: dict, field: str) -> str:
  if field not in obj:
    raise BadRow('missing_field', f"missing field '{field}'")
  value = obj[field]
  if not isinstance(value, str):
    raise BadRow('bad_type', f"'{field}' must be a string, got {type(value).__name__}")
  return value.strip()


def _margin(obj: dict) -> float:
  value = obj.get('margin', 0.0)
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
    raise BadRow('bad_margin', f"'margin' must be a finite number, got {value!r}")
  return float(value)


def _group(obj: dict, default: str) -> str:
  value = obj.get('group', '')
  if isinstance(value, bool) or not isinstance(value, (str, int)):
    raise BadRow('bad_type', f"'group' must be a string or an integer, got {value!r}")
  return str(value) if value != '' else default


def _task(obj: dict, prompt: tuple[dict, ...]) -> str:
  if 'task' in obj:
    if not isinstance(obj['task'], str):
      raise BadRow('bad_type', f"'task' must be a string, got {obj['task']!r}")
    return obj['task']
  return tasks.task_of(prompt[-1]['content']) or ''


def _finished(obj: dict, field: str) -> bool:
  value = obj.get(field, True)
  if not isinstance(value, bool):
    raise BadRow('bad_finished', f"'{field}' must be true or false, got {value!r}")
  return value


def _response(text: str, where: str) -> str:
  if not text:
    raise BadRow('empty_response', f'{where} is empty')
  return text


_HH_MARKERS = {'\n\nHuman:': 'user', '\n\nAssistant:': 'assistant'}
_HH_SPLIT = re.compile('(' + '|'.join(re.escape(m) for m in _HH_MARKERS) + ')')


def _hh_turns(transcript: str, field: str) -> list[dict]:
  """An HH transcript as chat messages; it must start with a marker and end with Assistant."""
  parts = _HH_SPLIT.split(transcript)
  if parts[0].strip() or len(parts) < 3:
    raise BadRow('hh_format', f"'{field}' must start with '\\n\\nHuman:' (Anthropic HH format)")
  turns = [{'role': _HH_MARKERS[parts[i]], 'content': parts[i + 1].strip()}
           for i in range(1, len(parts), 2)]
  if turns[-1]['role'] != 'assistant':
    raise BadRow('hh_format', f"'{field}' must end with an '\\n\\nAssistant:' turn")
  return turns


def _hh_pair(obj: dict) -> tuple[tuple[dict, ...], str, str]:
  chosen, rejected = _hh_turns(_raw_text(obj, 'chosen'), 'chosen'), _hh_turns(
      _raw_text(obj, 'rejected'), 'rejected')
  if chosen[:-1] != rejected[:-1]:
    raise BadRow('hh_prefix', "'chosen' and 'rejected' differ before their last assistant turn")
  prompt = tuple(chosen[:-1])
  if not prompt or prompt[-1]['role'] != 'user':
    raise BadRow('hh_format', 'the last assistant turn must follow a Human turn')
  if not prompt[-1]['content']:
    raise BadRow('empty_prompt', 'the last Human turn is empty')
  return prompt, chosen[-1]['content'], rejected[-1]['content']


def _raw_text(obj: dict, field: str) -> str:
  if field not in obj:
    raise BadRow('missing_field', f"missing field '{field}'")
  if not isinstance(obj[field], str):
    raise BadRow('bad_type', f"'{field}' must be a string, got {type(obj[field]).__name__}")
  return obj[field]


def _responses_finished(obj: dict, n: int) -> list[bool]:
  if 'responses_finished' not in obj:
    return [True] * n
  flags = obj['responses_finished']
  if not isinstance(flags, list) or not all(isinstance(f, bool) for f in flags):
    raise BadRow('bad_finished', "'responses_finished' must be a list of true/false, got "
                 f'{flags!r}')
  if len(flags) != n:
    raise BadRow('finished_length', f"'responses_finished' has {len(flags)} entries for "
                 f'{n} responses')
  return flags


def _ranking_pairs(obj: dict) -> list[tuple[tuple[str, bool], tuple[str, bool]]]:
  """(chosen, rejected) (text, finished) responses of a K-way ranking: every pair of
  different ranks."""
  for field in ('responses', 'ranking'):
    if field not in obj:
      raise BadRow('missing_field', f"missing field '{field}'")
  responses, ranking = obj['responses'], obj['ranking']
  if not isinstance(responses, list) or not all(isinstance(r, str) for r in responses):
    raise BadRow('bad_type', "'responses' must be a list of strings")
  if not isinstance(ranking, list):
    raise BadRow('bad_type', "'ranking' must be a list of integers")
  if len(ranking) != len(responses):
    raise BadRow('ranking_length', f"'ranking' has {len(ranking)} entries for "
               f'{len(responses)} responses')
  for r in ranking:
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
      raise BadRow('bad_ranking', f"'ranking' entries must be integers >= 1 (1 = best), got {r!r}")
  finished = _responses_finished(obj, len(responses))
  replies = [(_response(r.strip(), f'responses[{i}]'), f)
             for i, (r, f) in enumerate(zip(responses, finished))]
  rank_of: dict[tuple[str, bool], int] = {}
  for i, (reply, r) in enumerate(zip(replies, ranking)):
    if rank_of.setdefault(reply, r) != r:
      raise BadRow('identical', f'responses[{i}] repeats an earlier response with another rank')
  pairs = []
  for i in range(len(replies)):
    for j in range(i + 1, len(replies)):
      if ranking[i] != ranking[j] and replies[i] != replies[j]:
        better, worse = (i, j) if ranking[i] < ranking[j] else (j, i)
        pairs.append((replies[better], replies[worse]))
  return pairs


def parse_row(obj, default_group: str) -> list[Comparison]:
  """The comparisons of one decoded row (any format); raises BadRow. [] = all tied."""
  if not isinstance(obj, dict):
    raise BadRow('bad_type', f'expected a JSON object, got {type(obj).__name__}')
  if 'responses' in obj or 'ranking' in obj:
    if 'prompt' not in obj and 'messages' not in obj:
      raise BadRow('missing_field', "a ranking needs 'prompt' or 'messages'")
    prompt = parse_prompt(obj)
    pairs = _ranking_pairs(obj)
  elif 'prompt' in obj or 'messages' in obj:
    prompt = parse_prompt(obj)
    chosen = _response(_text(obj, 'chosen'), "'chosen'")
    rejected = _response(_text(obj, 'rejected'), "'rejected'")
    pairs = [((chosen, _finished(obj, 'chosen_finished')),
              (rejected, _finished(obj, 'rejected_finished')))]
  elif 'chosen' in obj or 'rejected' in obj:
    prompt, chosen, rejected = _hh_pair(obj)
    pairs = [((_response(chosen, "the last assistant turn of 'chosen'"),
               _finished(obj, 'chosen_finished')),
              (_response(rejected, "the last assistant turn of 'rejected'"),
               _finished(obj, 'rejected_finished')))]
  else:
    raise BadRow('missing_field', "need 'prompt' or 'messages' with 'chosen'/'rejected' or "
               "'responses'/'ranking', or HH 'chosen'/'rejected' transcripts")
  for chosen, rejected in pairs:
    if chosen == rejected:
      raise BadRow('identical', 'chosen and rejected are the same text, equally finished')
  margin, group, task = _margin(obj), _group(obj, default_group), _task(obj, prompt)
  return [Comparison(prompt, c, r, margin, group, task, cf, rf) for (c, cf), (r, rf) in pairs]


def read_comparisons(paths: Sequence[str],
                     on_bad_row: str = 'error') -> tuple[list[Comparison], dict]:
  """Comparisons of JSONL files in any of the three formats, and the counts.

  counts: rows_read, bad_rows, bad_rows_by_kind (a dict), pairs, groups, no_pair_rows.
  """
  rows, counts = read_rows(paths, parse_row, on_bad_row)
  counts['no_pair_rows'] = sum(not r for r in rows)
  out = [c for r in rows for c in r]
  counts['pairs'] = len(out)
  counts['groups'] = len({c.group for c in out})
  return out, counts


def _row(c: Comparison) -> dict:
  single = len(c.prompt) == 1 and c.prompt[0]['role'] == 'user'
  row = ({'prompt': c.prompt[0]['content']} if single else
         {'messages': [{'role': m['role'], 'content': m['content']} for m in c.prompt]})
  row.update(chosen=c.chosen, rejected=c.rejected, group=c.group, task=c.task)
  if c.margin:
    row['margin'] = c.margin
  for field in ('chosen_finished', 'rejected_finished'):  # written only when cut
    if not getattr(c, field):
      row[field] = False
  return row


def write_comparisons(path: str, comparisons: Iterable[Comparison]) -> None:
  """Writes format 1 rows atomically (temp file + rename): never a half file to reuse.

  Reading the file back gives the same comparisons (contents are stored stripped, as
  reading strips them; a comparison with group '' comes back as its own `path:line`). The
  finished flags are written only when False: rows of finished replies look as before.
  """
  path = os.fspath(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f'{path}.tmp{os.getpid()}'
  try:
    with open(tmp, 'w', encoding='utf-8') as f:
      for c in comparisons:
        f.write(json.dumps(_row(c), ensure_ascii=False) + '\n')
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


# ----------------------------------------------------------------------------- labeler

_WORD = re.compile(r'\w+')
_MAX_NGRAM = 4
# A unit of 1-4 non-space characters repeated back to back, 3+ copies and 6+ characters
# in all: 'abcabcabc', 'hahaha', 'xxxxxx'. Shorter runs ('111', 'aaab', 'lll') occur in
# right answers of the task suite (sums, sorted letters) and are not flagged.
_CHAR_RUNS = tuple(re.compile(rf'(\S{{{u}}})\1{{{max(2, -(-6 // u) - 1)},}}')
                   for u in range(1, 5))


def has_repetition(text: str) -> bool:
  """Does the response repeat itself? The degenerate loops of a small sampler.

  Rule: (a) a word or word n-gram (n <= 4; words are runs of letters/digits, compared
  case-insensitively, punctuation ignored) immediately repeated ('71 71', 'no no no',
  'the cat the cat'), or (b) a unit of 1-4 non-space characters repeated 3+ times back
  to back over 6+ characters ('abcabcabc', 'hahaha'). '71', 'Yes', '111' are not.
  """
  words = _WORD.findall(text.lower())
  for n in range(1, _MAX_NGRAM + 1):
    for i in range(len(words) - 2 * n + 1):
      if words[i:i + n] == words[i + n:i + 2 * n]:
        return True
  return any(rx.search(text) for rx in _CHAR_RUNS)


def labeler_key(prompt: str, response: str, finished: bool) -> tuple:
  """How the simulated labeler rates a response; larger is better (lexicographic).

  Right first (the task checker), then finished (it ended its turn), then free of
  repetition, then shorter.
  """
  return (tasks.check(None, prompt, response), bool(finished), not has_repetition(response),
          -len(response))


TIE_BREAKS = ('none', 'coin')


def label_samples(prompt: str, responses: Sequence[tuple[str, bool]], rng: random.Random,
                  flip_fraction: float, tie_break: str = 'none') -> list[tuple[int, int]]:
  """(chosen_index, rejected_index) pairs over K sampled (text, finished) responses.

  Identical texts are ties: only the first index of each distinct text takes part.
  Every two distinct texts are compared by `labeler_key`. Equal keys (say two wrong
  answers of one length) are equally ranked and give no pair with tie_break='none'; with
  'coin' a coin orders them, as a labeler forced into a total order would (such pairs
  teach the model nothing it can learn). Each pair is then flipped with probability
  flip_fraction (labeler noise). Pairs come in index order (i < j); every draw comes
  from `rng`, so a seeded rng gives the same labels.
  """
  if tie_break not in TIE_BREAKS:
    raise ValueError(f'tie_break={tie_break!r} must be one of {TIE_BREAKS} '
                     '(config.reward.tie_break).')
  if not 0.0 <= flip_fraction <= 1.0:
    raise ValueError(f'flip_fraction={flip_fraction} must be in [0, 1] '
                     '(config.reward.flip_fraction).')
  first: dict[str, int] = {}
  for i, (text, _) in enumerate(responses):
    first.setdefault(text, i)
  kept = sorted(first.values())
  keys = {i: labeler_key(prompt, responses[i][0], responses[i][1]) for i in kept}
  pairs = []
  for a, i in enumerate(kept):
    for j in kept[a + 1:]:
      if keys[i] != keys[j]:
        pair = (i, j) if keys[i] > keys[j] else (j, i)
      elif tie_break == 'coin':
        pair = (i, j) if rng.random() < 0.5 else (j, i)
      else:
        continue
      if rng.random() < flip_fraction:
        pair = pair[::-1]
      pairs.append(pair)
  return pairs


def comparisons_from_samples(prompt: str, task: str, responses: Sequence[tuple[str, bool]],
                             rng: random.Random, flip_fraction: float, group: str,
                             tie_break: str = 'none') -> list[Comparison]:
  """The labelled pairs of one prompt's samples, as Comparisons of one group.

  Texts are stripped first and empty ones left out, so that what is written is what
  `read_comparisons` reads back (texts equal after stripping are ties). Each side keeps
  its sample's finished flag: the reward model sees a cut reply without `<|end|>`.
  """
  kept = [(text.strip(), bool(finished)) for text, finished in responses if text.strip()]
  messages = ({'role': 'user', 'content': prompt.strip()},)
  return [Comparison(messages, kept[c][0], kept[r][0], 0.0, group, task, kept[c][1], kept[r][1])
          for c, r in label_samples(prompt, kept, rng, flip_fraction, tie_break)]
