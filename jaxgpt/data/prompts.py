"""Online-RL prompts: the task suite's train split or the user's JSONL, as resumable batches.

A row is `{"prompt": "text"}` (one user turn) or `{"messages": [...]}` ending with a user
turn; its other fields (e.g. `"answer"`) travel with it to the reward functions (TRL's
dataset columns); embedded task prompts carry `task` and `answer`. Bad rows follow
`config.<stage>.on_bad_row` (error with `file:line: reason`, or skip and count). Each
prompt is rendered with the chat template up to the bare `<|assistant|>` a sampler
continues; a prompt longer than the room left for the response (max_seq_len -
response_tokens - 1, the 1 for the reward readout) loses tokens from the left, counted.

Batches, per process: `prompt` (b, P) int32 right-padded with pad_id, `length` (b,) int32
and `row` (b,) int32, the index into `PromptData.rows` (the text and fields, on the host);
P is the longest prompt rounded up to 16 tokens (one shape, compiled once); b is the
stage's rollout_batch / group_size / processes, each prompt sampled group_size times. The
iterator is grain's, so its position is checkpointed with the stage's state.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import grain
import numpy as np

from jaxgpt.data import tasks
from jaxgpt.data.jsonl import BadRow, expand_paths, parse_prompt, read_rows

EMBEDDED_PROMPTS = 20_000


@dataclasses.dataclass(frozen=True)
class PromptRow:
  """One prompt: the chat messages a reply answers and the row's other fields."""
  messages: tuple[dict, ...]
  fields: dict

  @property
  def text(self) -> str:
    """The last user turn: the `prompts` entry reward functions get."""
    return self.messages[-1]['content']


def _prompt_row(obj, where: str) -> PromptRow:
  del where
  if not isinstance(obj, dict):
    raise BadRow('bad_type', f'expected a JSON object, got {type(obj).__name__}')
  return PromptRow(tuple(parse_prompt(obj)),
                   {k: v for k, v in obj.items() if k not in ('prompt', 'messages')})


def read_prompt_files(paths, on_bad_row: str = 'error') -> tuple[list[PromptRow], dict]:
  """Every valid row, and counts {rows_read, bad_rows, bad_rows_by_kind}."""
  return read_rows(paths, _prompt_row, on_bad_row)


def embedded_prompts(seed: int) -> list[PromptRow]:
  """Distinct train-split task prompts as single user turns, with their task and answer."""
  seen = {e.prompt: e for e in tasks.sample_examples('train', EMBEDDED_PROMPTS, seed)}
  return [PromptRow(({'role': 'user', 'content': e.prompt},), {'task': e.task, 'answer': e.answer})
          for e in seen.values()]


@dataclasses.dataclass
class PromptData:
  train_iter: Any        # grain iterator: next() -> {'prompt': (b, P), 'length', 'row': (b,)}
  stats: dict
  width: int             # P
  rows: list             # PromptRow per `row` index
  ptx_iter: Any = None   # pretraining batches for PPO-ptx (set by the stage)


def make_prompt_data(config, stage: str, tokenizer, *, process_index: int = 0,
                     process_count: int = 1) -> PromptData:
  """The prompts of online-RL stage `stage` (its config section: prompts, response_tokens,
  rollout_batch, on_bad_row and, for GRPO, group_size)."""
  p = config[stage]
  if p.prompts == 'embedded':
    rows = embedded_prompts(int(config.seed))
    stats = {'rows_read': len(rows), 'bad_rows': 0}
  else:
    rows, stats = read_prompt_files(expand_paths(p.prompts, f'config.{stage}.prompts'),
                                    p.on_bad_row)
  if not rows:
    raise ValueError(f'config.{stage}.prompts={p.prompts!r}: no valid prompt (counts: {stats}).')
  room = int(config.model.max_seq_len) - int(p.response_tokens) - 1
  if room < 2:
    raise ValueError(f'config.{stage}.response_tokens={p.response_tokens} leaves no room for a '
                     f'prompt in config.model.max_seq_len={config.model.max_seq_len}.')
  ids = [tokenizer.chat.prompt(list(r.messages)) for r in rows]
  truncated = sum(len(x) > room for x in ids)
  ids = [x[-room:] for x in ids]
  width = min(-(-max(len(x) for x in ids) // 16) * 16, room)
  prompt = np.full((len(ids), width), tokenizer.pad_id, np.int32)
  length = np.zeros((len(ids),), np.int32)
  for i, x in enumerate(ids):
    prompt[i, :len(x)] = x
    length[i] = len(x)
  stats.update(prompts=len(ids), truncated=truncated, prompt_width=width)
  prompts_per_batch = p.rollout_batch // int(p.get('group_size', 1))
  if prompts_per_batch % process_count:
    raise ValueError(f'config.{stage}.rollout_batch={p.rollout_batch} gives {prompts_per_batch} '
                     f'prompts an iteration, not divisible by the {process_count} processes.')
  local = prompts_per_batch // process_count
  ds = grain.MapDataset.source([{'prompt': prompt[i], 'length': length[i],
                                 'row': np.int32(i)} for i in range(len(ids))])
  ds = ds.shuffle(seed=int(config.data.shuffle_seed)).repeat(None)[process_index::process_count]
  train = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
  return PromptData(train_iter=iter(train.batch(local, drop_remainder=True)), stats=stats,
                    width=width, rows=rows)
