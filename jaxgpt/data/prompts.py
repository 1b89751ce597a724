"""PPO prompts: the task suite's train split or the user's JSONL, as resumable token batches.

A row is `{"prompt": "text"}` (one user turn) or `{"messages": [...]}` ending with a user
turn; bad rows follow config.ppo.on_bad_row (error with `file:line: reason`, or skip and
count). Each prompt is rendered with the chat template up to the bare `<|assistant|>` a
sampler continues; a prompt longer than the room left for the response
(max_seq_len - response_tokens - 1, the 1 for the reward readout) loses tokens from the
left, counted. Batches, per process: `prompt` (b, P) int32 right-padded with pad_id and
`length` (b,) int32, P the longest prompt rounded up to 16 tokens (one shape, compiled
once). The iterator is grain's, so its position is checkpointed with the PPO state.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import grain
import numpy as np

from jaxgpt.data import chat, tasks
from jaxgpt.data.jsonl import BadRow, expand_paths, parse_prompt, read_rows

EMBEDDED_PROMPTS = 20_000


def _prompt_row(obj, where: str) -> list[dict]:
  del where
  if not isinstance(obj, dict):
    raise BadRow('bad_type', f'expected a JSON object, got {type(obj).__name__}')
  return list(parse_prompt(obj))


def read_prompt_files(paths, on_bad_row: str = 'error') -> tuple[list[list[dict]], dict]:
  """Message lists of every valid row, and counts {rows_read, bad_rows, bad_rows_by_kind}."""
  return read_rows(paths, _prompt_row, on_bad_row)


def embedded_prompts(seed: int) -> list[list[dict]]:
  """Distinct train-split task prompts as single user turns."""
  seen = dict.fromkeys(e.prompt for e in tasks.sample_examples('train', EMBEDDED_PROMPTS, seed))
  return [[{'role': 'user', 'content': p}] for p in seen]


@dataclasses.dataclass
class PromptData:
  train_iter: Any        # grain iterator: next() -> {'prompt': (b, P), 'length': (b,)}
  stats: dict
  width: int             # P
  ptx_iter: Any = None   # pretraining batches for PPO-ptx (set by the stage)


def make_prompt_data(config, tokenizer, *, process_index: int = 0,
                     process_count: int = 1) -> PromptData:
  p = config.ppo
  if p.prompts == 'embedded':
    rows = embedded_prompts(int(config.seed))
    stats = {'rows_read': len(rows), 'bad_rows': 0}
  else:
    rows, stats = read_prompt_files(expand_paths(p.prompts, 'config.ppo.prompts'), p.on_bad_row)
  if not rows:
    raise ValueError(f'config.ppo.prompts={p.prompts!r}: no valid prompt (counts: {stats}).')
  room = int(config.model.max_seq_len) - int(p.response_tokens) - 1
  if room < 2:
    raise ValueError(f'config.ppo.response_tokens={p.response_tokens} leaves no room for a '
                     f'prompt in config.model.max_seq_len={config.model.max_seq_len}.')
  ids = [chat.render_prompt(m, tokenizer) for m in rows]
  truncated = sum(len(x) > room for x in ids)
  ids = [x[-room:] for x in ids]
  width = min(-(-max(len(x) for x in ids) // 16) * 16, room)
  prompt = np.full((len(ids), width), tokenizer.pad_id, np.int32)
  length = np.zeros((len(ids),), np.int32)
  for i, x in enumerate(ids):
    prompt[i, :len(x)] = x
    length[i] = len(x)
  stats.update(prompts=len(ids), truncated=truncated, prompt_width=width)
  if p.rollout_batch % process_count:
    raise ValueError(f'config.ppo.rollout_batch={p.rollout_batch} is not divisible by the '
                     f'{process_count} processes.')
  local = p.rollout_batch // process_count
  ds = grain.MapDataset.source([{'prompt': prompt[i], 'length': length[i]}
                                for i in range(len(ids))])
  ds = ds.shuffle(seed=int(config.data.shuffle_seed)).repeat(None)[process_index::process_count]
  train = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
  return PromptData(train_iter=iter(train.batch(local, drop_remainder=True)), stats=stats,
                    width=width)
