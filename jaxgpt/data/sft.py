"""Stage 2 data: chat transcripts -> (inputs, targets, weights) rows for supervised finetuning.

Source (`config.sft.data`): `'embedded'` (ChatterBot conversations plus train-split task
examples, `conversations.demo_sft_rows`), `'tasks'` (the task examples alone: a model that
already converses learns the task suite's answer format) or comma-separated paths/globs
of JSONL files,
one conversation a line, in either shape::

    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
    {"prompt": "...", "response": "..."}            (optional "system": "...")

Parsing is strict. A line that is not JSON (`bad_json`), not an object or with a
non-string content (`bad_type`), that misses a field (`missing_field`), names an unknown
role (`unknown_role`), has an empty assistant turn (`empty_assistant`) or no assistant
turn at all (`no_assistant`) is a bad row: with `on_bad_row='error'` it raises
`BadRowError` (a ValueError) whose message starts with `path:line:` (1-based, blank lines
counted); with `'skip'` it is left out and counted in `stats['bad_rows']` and, by kind,
`stats['bad_rows_by_kind']`. Blank lines are ignored. Contents are stripped of
surrounding whitespace.

Storage. The validated conversations are written once as a TFDS dataset in array_record
format with the pretraining corpus builder (`text_dataset.JaxgptText`, under
`config.data.tfds_dir`): one document per conversation, its text the canonical JSON
`{"messages": [...]}`. It is tokenizer-independent: the same prepared data serves any
tokenizer and any seq_len. It is named `sft-<hash of the rows>-val<fraction>`, so a
changed file gets a new dataset and an unchanged one is reused. The split is the corpus
builder's: a conversation goes to `validation` by a hash of its index.

Reading (grain). At start-up every conversation is read back from the TFDS dataset once,
rendered with the tokenizer's chat format (`tokenizer.chat.render`, `jaxgpt.data.chat`) into ids and a loss mask, and kept in memory (`Tokenized`,
five bytes a token). A conversation longer than seq_len + 1 tokens is cut to seq_len + 1
(`on_long_row='truncate'`; one whose cut leaves no assistant target is dropped) or
dropped (`'drop'`); both are counted (`too_long`, `truncated`, `dropped`). Each kept one
gives inputs = ids[:-1], targets = ids[1:], weights = mask[1:]: 1 exactly where the
target is assistant content or the `<|end|>` closing it. Train: shuffle (new order every
epoch) -> repeat -> every `process_count`-th element from `process_index` -> pack
(`packing=True`: first-fit into seq_len rows; segment_ids 1, 2, ... per conversation,
positions restarting at 0; padding has segment 0 and weight 0) or pad (one conversation
a row, segment 1) -> batch, in `config.data.worker_count` grain processes when > 0 (the
order then depends on the worker count). Shifting before packing means no target ever
crosses into the next conversation.

Batch: dict of numpy arrays, each (local_batch, seq_len), local_batch =
config.train.batch_size // process_count: inputs, targets, segment_ids, positions int32;
weights float32.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Sequence

import grain
from absl import flags
import numpy as np

from jaxgpt.data import conversations
from jaxgpt.data import jsonl
from jaxgpt.data.jsonl import BAD_ROW_POLICIES, BadRow, BadRowError, expand_paths  # noqa: F401
from jaxgpt.data import pretrain
from jaxgpt.data import text_dataset

FORMAT_VERSION = '1.0.0'
LONG_ROW_POLICIES = ('truncate', 'drop')
# config.sft.data values that name data of our own: ChatterBot conversations plus task
# examples, or the task examples alone.
EMBEDDED_SOURCES = ('embedded', 'tasks')

# The `config.sft` fields this module reads (defaults and meanings: jaxgpt/config.py).
_FIELDS = ('data', 'task_examples', 'on_bad_row', 'on_long_row', 'packing', 'val_fraction')


def sft_options(config) -> dict[str, Any]:
  """The `config.sft` fields this module reads, validated."""
  opts = {k: config.sft[k] for k in _FIELDS}
  for field, allowed in (('on_bad_row', BAD_ROW_POLICIES), ('on_long_row', LONG_ROW_POLICIES)):
    if opts[field] not in allowed:
      raise ValueError(f'config.sft.{field}={opts[field]!r} must be one of {allowed}.')
  if not 0.0 <= float(opts['val_fraction']) < 1.0:
    raise ValueError(f"config.sft.val_fraction={opts['val_fraction']} must be in [0, 1).")
  return opts


# ----------------------------------------------------------------------------- parsing

def _content(value, where: str) -> str:
  if not isinstance(value, str):
    raise BadRow('bad_type', f'{where}: content must be a string, got {type(value).__name__}')
  return value.strip()


def normalize_row(obj, where: str = '') -> list[dict]:
  """The canonical message list of one row in either shape; raises BadRow."""
  del where
  if not isinstance(obj, dict):
    raise BadRow('bad_type', f'expected a JSON object, got {type(obj).__name__}')
  if 'messages' in obj:
    messages = jsonl.parse_messages(obj['messages'])
  elif 'prompt' in obj or 'response' in obj:
    for field in ('prompt', 'response'):
      if field not in obj:
        raise BadRow('missing_field', f"missing field '{field}'")
    messages = []
    if 'system' in obj:
      messages.append({'role': 'system', 'content': _content(obj['system'], 'system')})
    messages.append({'role': 'user', 'content': _content(obj['prompt'], 'prompt')})
    messages.append({'role': 'assistant', 'content': _content(obj['response'], 'response')})
  else:
    raise BadRow('missing_field', "missing field: need 'messages', or 'prompt' and 'response'")
  assistant = [i for i, m in enumerate(messages) if m['role'] == 'assistant']
  if not assistant:
    raise BadRow('no_assistant', 'no assistant turn: nothing to learn from')
  for i in assistant:
    if not messages[i]['content']:
      raise BadRow('empty_assistant', f'empty assistant turn (message {i})')
  return messages


def read_jsonl(paths: Sequence[str], on_bad_row: str = 'error') -> tuple[list[list[dict]], dict]:
  """Parse JSONL files into message lists; bad rows raise or are counted (`on_bad_row`)."""
  return jsonl.read_rows(paths, normalize_row, on_bad_row)


def load_rows(opts: dict, seed: int = 0) -> tuple[list[list[dict]], dict]:
  """All valid conversations of the configured source, and the parsing counts."""
  if opts['data'] in EMBEDDED_SOURCES:
    # Embedded rows come from our own code: any bad one is a bug, never skipped.
    rows = [normalize_row(r) for r in conversations.demo_sft_rows(
        int(opts['task_examples']), seed, [] if opts['data'] == 'tasks' else None)]
    return rows, {'rows_read': len(rows), 'bad_rows': 0, 'bad_rows_by_kind': {}}
  return read_jsonl(expand_paths(opts['data'], 'config.sft.data'), opts['on_bad_row'])


# ----------------------------------------------------------------------------- TFDS

def _canonical(messages: list[dict]) -> str:
  return json.dumps({'messages': messages}, ensure_ascii=False, sort_keys=True,
                    separators=(',', ':'))


def prepare(rows: list[list[dict]], config, val_fraction: float):
  """The prepared TFDS builder holding `rows` (reused when it already exists).

  Reuses the pretraining corpus builder (`text_dataset.JaxgptText`): each conversation
  is one document whose text is its canonical JSON. The dataset is named by a hash of
  that text, so a changed source gets a new dataset and an unchanged one is reused.
  """
  texts = [_canonical(m) for m in rows]
  h = hashlib.sha256(FORMAT_VERSION.encode())
  for t in texts:
    h.update(t.encode())
    h.update(b'\n')
  cfg = text_dataset.TextCorpusConfig(
      name=f'sft-{h.hexdigest()[:16]}-val{val_fraction:g}',
      documents=lambda stats: iter(texts), val_fraction=val_fraction)
  builder = text_dataset.JaxgptText(config=cfg, data_dir=text_dataset.tfds_dir(config))
  if not builder.data_path.exists():
    with text_dataset._quiet_tfds():  # pylint: disable=protected-access
      builder.download_and_prepare(file_format='array_record')
  return builder


# ----------------------------------------------------------------------------- grain

# Reading an in-memory array is cheaper than handing it to a thread pool.
_READ = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


def _decode(record) -> list[dict]:
  text = record[text_dataset.TEXT_FIELD]
  if isinstance(text, bytes):
    text = text.decode('utf-8')
  return json.loads(text)['messages']


@dataclasses.dataclass
class Tokenized:
  """The rendered conversations of one split, flat in memory (a grain data source).

  Conversation i is tokens[offsets[i]:offsets[i + 1]] with its loss mask alongside,
  already cut to at most seq_len + 1 tokens. Five bytes a token: SFT sets are small.
  """
  tokens: np.ndarray    # int32
  mask: np.ndarray      # int8
  offsets: np.ndarray   # int64, len = conversations + 1

  def __len__(self) -> int:
    return len(self.offsets) - 1

  def __getitem__(self, i) -> dict[str, np.ndarray]:
    a, b = int(self.offsets[i]), int(self.offsets[i + 1])
    ids, mask = self.tokens[a:b], self.mask[a:b]
    return {'inputs': ids[:-1], 'targets': ids[1:], 'weights': mask[1:].astype(np.float32)}


def tokenize_split(source, tokenizer, seq_len: int, on_long_row: str,
                   chunk: int = 1024) -> tuple[Tokenized, dict]:
  """Render every conversation of a TFDS split once; apply and count the long-row policy."""
  c = {'too_long': 0, 'truncated': 0, 'dropped': 0, 'tokens': 0, 'target_tokens': 0}
  tokens, masks, offsets = [], [], [0]
  for start in range(0, len(source), chunk):
    keys = list(range(start, min(start + chunk, len(source))))
    for record in source.__getitems__(keys):
      ids, mask = tokenizer.chat.render(_decode(record))
      if len(ids) > seq_len + 1:
        c['too_long'] += 1
        if on_long_row == 'drop' or not any(mask[1:seq_len + 1]):
          c['dropped'] += 1
          continue
        c['truncated'] += 1
        ids, mask = ids[:seq_len + 1], mask[:seq_len + 1]
      tokens.append(np.asarray(ids, np.int32))
      masks.append(np.asarray(mask, np.int8))
      offsets.append(offsets[-1] + len(ids))
      c['tokens'] += len(ids) - 1
      c['target_tokens'] += sum(mask[1:])
  cat = lambda xs, dt: np.concatenate(xs) if xs else np.zeros(0, dt)
  return Tokenized(cat(tokens, np.int32), cat(masks, np.int8), np.asarray(offsets, np.int64)), c


class _Pad(grain.transforms.Map):
  """One conversation a row: pad to seq_len, segment 1 on tokens, 0 on padding."""

  def __init__(self, seq_len: int):
    self._seq_len = seq_len

  def map(self, ex):
    n, T = len(ex['inputs']), self._seq_len
    out = {}
    for k in ('inputs', 'targets', 'weights'):
      out[k] = np.zeros(T, ex[k].dtype)
      out[k][:n] = ex[k]
    out['segment_ids'] = (np.arange(T) < n).astype(np.int32)
    out['positions'] = np.where(np.arange(T) < n, np.arange(T), 0).astype(np.int32)
    return out


class _RenamePacked(grain.transforms.Map):

  def map(self, ex):
    return {'inputs': ex['inputs'], 'targets': ex['targets'],
            'weights': ex['weights'].astype(np.float32),
            'segment_ids': ex['inputs_segment_ids'].astype(np.int32),
            'positions': ex['inputs_positions'].astype(np.int32)}


def _rows(ds: grain.IterDataset, seq_len: int, packing: bool, num_bins: int,
          seed: int, shuffle_bins: bool) -> grain.IterDataset:
  if not packing:
    return ds.map(_Pad(seq_len))
  lengths = {'inputs': seq_len, 'targets': seq_len, 'weights': seq_len}
  ds = grain.experimental.FirstFitPackIterDataset(
      ds, length_struct=lengths, num_packing_bins=num_bins, seed=seed,
      shuffle_bins=shuffle_bins)
  return ds.map(_RenamePacked())


@dataclasses.dataclass
class SFTData:
  """The SFT data of one process: a resumable train iterator, val batches, counts.

  stats (ints): rows_read, bad_rows, bad_rows_by_kind (a dict), rows (valid
  conversations); train_rows / val_rows (kept after the long-row policy), their
  tokens and target_tokens (tokens with weight 1); too_long, truncated, dropped (both
  splits).
  """
  train_iter: Any                   # grain DatasetIterator: next() -> batch; get/set_state
  stats: dict
  seq_len: int
  local_batch: int
  builder: Any                      # the TFDS builder holding the conversations
  _val_fn: Any
  _val_cache: dict = dataclasses.field(default_factory=dict)

  def val_batches(self, max_batches: int) -> list[dict[str, np.ndarray]]:
    """The first max_batches validation batches (fewer if the split is small).

    As in pretraining, every process packs the whole validation split the same way
    and keeps its rows of each global batch, so all processes get the same number.
    """
    if max_batches not in self._val_cache:
      self._val_cache[max_batches] = self._val_fn(max_batches)
    return self._val_cache[max_batches]


def make_sft_data(config, tokenizer, *, process_index: int = 0,
                  process_count: int = 1) -> SFTData:
  """The SFT train iterator, validation batches and counts for this process."""
  opts = sft_options(config)
  seq_len = int(config.data.seq_len)
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} not in [0, {process_count}).')
  local_batch = pretrain.local_batch_size(config, process_count)
  seed = int(config.data.shuffle_seed)

  rows, counts = load_rows(opts, seed=int(config.seed))
  if not rows:
    raise ValueError(f"SFT data {opts['data']!r}: no valid conversation (counts: {counts}).")
  builder = prepare(rows, config, float(opts['val_fraction']))
  splits = set(builder.info.splits.keys())
  stats = {'rows_read': counts['rows_read'], 'bad_rows': counts['bad_rows'],
           'bad_rows_by_kind': dict(counts['bad_rows_by_kind']), 'rows': len(rows)}
  data = {}
  for split, name in (('train', 'train'), ('validation', 'val')):
    source = builder.as_data_source(split) if split in splits else []
    data[split], c = tokenize_split(source, tokenizer, seq_len, opts['on_long_row'])
    stats[f'{name}_rows'] = len(data[split])
    stats[f'{name}_tokens'] = c.pop('tokens')
    stats[f'{name}_target_tokens'] = c.pop('target_tokens')
    for k, v in c.items():
      stats[k] = stats.get(k, 0) + v
  if not len(data['train']):
    raise ValueError(f"SFT data {opts['data']!r}: no training conversation left "
                     f'(stats: {stats}).')

  packing = bool(opts['packing'])
  ds = grain.MapDataset.source(data['train'])
  ds = ds.shuffle(seed=seed).repeat(None)[process_index::process_count]
  ds = _rows(ds.to_iter_dataset(_READ), seq_len, packing, local_batch, seed=seed,
             shuffle_bins=True)
  train = ds.batch(local_batch, drop_remainder=True)
  workers = int(config.data.worker_count)
  if workers > 0:
    if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags
      flags.FLAGS.mark_as_parsed()
    train = train.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))

  def val_fn(max_batches: int) -> list[dict[str, np.ndarray]]:
    rows = _rows(grain.MapDataset.source(data['validation']).to_iter_dataset(_READ),
                 seq_len, packing, local_batch, seed=0, shuffle_bins=False)
    return pretrain.global_val_batches(
        rows, max_batches=max_batches, global_batch=config.train.batch_size,
        local_batch=local_batch, process_index=process_index, seq_len=seq_len)

  return SFTData(train_iter=iter(train), stats=stats, seq_len=seq_len,
                 local_batch=local_batch, builder=builder, _val_fn=val_fn)
