"""Stage-1 data: documents -> tokens -> packed (batch, seq_len) rows, with grain.

Train pipeline, per process:

    source (train split) -> shard [process_index::process_count] -> shuffle(seed)
    -> repeat (reshuffled each epoch) -> tokenize: [<|endoftext|>] + ids
    -> ConcatThenSplit into rows of seq_len + 1 tokens -> inputs/targets -> batch

Each document is preceded by `<|endoftext|>`, so there is exactly one between every
pair of documents and it doubles as a beginning-of-document token (as in GPT-2;
samplers may prefix prompts with it). Documents are tokenized with
`allow_special=False`: text that literally contains '<|endoftext|>' stays text.
Concat-then-split never drops or repeats a token: a document that does not fit the
rest of a row continues at the start of the next one, so documents longer than a
row are simply split (`stats['split_long_docs']` counts them). Each row of
seq_len + 1 tokens gives seq_len (input, target) pairs; the next row starts after it.

Batch fields, each (local_batch, seq_len) with local_batch = batch_size // process_count:
  inputs, targets   int32
  weights           float32, 1 where the target is a real token, 0 on padding
  segment_ids       int32; with config.data.segment_ids: 1, 2, ... per document piece
                    in the row (0 = padding), else all 1
  positions         int32; with config.data.segment_ids: restart at 0 for each
                    document piece in the row, else 0..seq_len-1

Padding appears only in validation batches (the split is not repeated).
Validation is not sharded by document: every process packs the whole validation
split the same way and takes its own rows of each global batch, so all processes
see the same number of batches (needed for multi-process evaluation).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

from absl import flags
import grain
import numpy as np

from jaxgpt.data import text_dataset
from jaxgpt.data import tokenizer as tokenizer_lib
from jaxgpt.data.tokenizer import Tokenizer, check_vocab, train_tokenizer

Batch = dict[str, np.ndarray]
# Token statistics read at most this many characters of the local shard; beyond
# that they are extrapolated (stats['token_stats_sampled'] = 1).
_STATS_MAX_CHARS = 16_000_000


# -- element transforms --------------------------------------------------------

def _as_text(value) -> str:
  if isinstance(value, bytes):
    return value.decode('utf-8', 'replace')
  if isinstance(value, np.ndarray) and value.dtype.kind in 'SO':  # 0-d bytes array
    return _as_text(value.item())
  return str(value)


def tokenize_fn(tokenizer: Tokenizer, text_field: str) -> Callable[[dict], dict | None]:
  """Example -> {'tokens': [eot] + ids}; None for a blank document (dropped)."""
  eot = tokenizer.eot_id

  def tokenize(example):
    text = _as_text(example[text_field])
    if not text.strip():
      return None
    ids = tokenizer.encode(text, allow_special=False)
    return {'tokens': np.asarray([eot] + ids, dtype=np.int32)}
  return tokenize


class _JsonSafeStateIterator(grain.DatasetIterator):
  """Restores the tuples that a JSON checkpoint turns into lists.

  ConcatThenSplit compares its state's slices with the tuple (-1, -1); after a JSON
  round trip (grain's and orbax's checkpoint format) they are lists, the check
  fails and the next document is silently dropped on restore.
  """

  def __init__(self, parent: grain.DatasetIterator):
    super().__init__(parent)

  def __next__(self):
    return next(self._parent)

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    state = dict(state)
    state['remainder_slices'] = {
        k: tuple(v) for k, v in state['remainder_slices'].items()}
    self._parent.set_state(state)


class _Pack(grain.IterDataset):
  """Concat-then-split into rows of seq_len + 1 tokens (+ segment ids, positions)."""

  def __init__(self, parent: grain.IterDataset, seq_len: int):
    super().__init__(parent)
    self._packed = grain.experimental.ConcatThenSplitIterDataset(
        parent, length_struct={'tokens': seq_len + 1})

  def __iter__(self):
    return _JsonSafeStateIterator(self._packed.__iter__())


def pack(ds: grain.IterDataset, seq_len: int) -> grain.IterDataset:
  """Token streams -> rows of seq_len + 1 tokens (with segment ids and positions)."""
  return _Pack(ds, seq_len)


def to_example(row: dict[str, np.ndarray], segment_ids: bool) -> Batch:
  """A packed row of seq_len + 1 -> shifted inputs/targets and masks."""
  tokens, seg, pos = row['tokens'], row['tokens_segment_ids'], row['tokens_positions']
  seq_len = len(tokens) - 1
  if segment_ids:
    segs, positions = seg[:-1], pos[:-1]
  else:
    segs = np.ones(seq_len, np.int32)
    positions = np.arange(seq_len, dtype=np.int32)
  return {
      'inputs': tokens[:-1].astype(np.int32),
      'targets': tokens[1:].astype(np.int32),
      'weights': (seg[1:] != 0).astype(np.float32),
      'segment_ids': segs.astype(np.int32),
      'positions': positions.astype(np.int32),
  }


def _read_options(docs_per_batch: float) -> grain.ReadOptions:
  """Enough read-ahead for a couple of batches, without tokenizing far ahead."""
  threads = max(1, min(4, os.cpu_count() or 1))
  buffer = int(min(4096, max(4 * threads, 2 * docs_per_batch)))
  return grain.ReadOptions(num_threads=threads, prefetch_buffer_size=buffer)


# -- pipelines -----------------------------------------------------------------

def build_train_dataset(source: Sequence[Any], tokenizer: Tokenizer, *, text_field: str,
                        seq_len: int, local_batch: int, seed: int, segment_ids: bool,
                        process_index: int = 0, process_count: int = 1,
                        num_epochs: int | None = None,
                        read_options: grain.ReadOptions | None = None) -> grain.IterDataset:
  """The training pipeline of one process (infinite unless num_epochs is set)."""
  ds = grain.MapDataset.source(source)
  ds = ds.slice(slice(process_index, None, process_count))
  ds = ds.shuffle(seed=seed).repeat(num_epochs)
  ds = ds.map(tokenize_fn(tokenizer, text_field))
  ds = pack(ds.to_iter_dataset(read_options), seq_len)
  ds = ds.map(lambda row: to_example(row, segment_ids))
  return ds.batch(local_batch, drop_remainder=num_epochs is None)


def val_rows(source: Sequence[Any], tokenizer: Tokenizer, *, text_field: str,
             seq_len: int, segment_ids: bool) -> grain.IterDataset:
  """Validation rows in source order, one pass, identical on every process."""
  ds = grain.MapDataset.source(source).map(tokenize_fn(tokenizer, text_field))
  ds = pack(ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=16)),
            seq_len)
  return ds.map(lambda row: to_example(row, segment_ids))


def _empty_rows(n: int, seq_len: int) -> Batch:
  z = np.zeros((n, seq_len), np.int32)
  return {'inputs': z, 'targets': z, 'weights': z.astype(np.float32),
          'segment_ids': z, 'positions': z}


def _stack(rows: list[Batch], n: int, seq_len: int) -> Batch:
  """Stacks rows, padding with all-zero (weight 0) rows up to n."""
  if not rows:
    return _empty_rows(n, seq_len)
  out = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
  if len(rows) < n:
    pad = _empty_rows(n - len(rows), seq_len)
    out = {k: np.concatenate([v, pad[k]]) for k, v in out.items()}
  return out


def global_val_batches(rows: grain.IterDataset, *, max_batches: int, global_batch: int,
                       local_batch: int, process_index: int, seq_len: int) -> list[Batch]:
  """Cuts the validation rows into global batches and keeps this process's rows."""
  batches, it = [], iter(rows)
  lo, hi = process_index * local_batch, (process_index + 1) * local_batch
  for _ in range(max_batches):
    chunk = [row for _, row in zip(range(global_batch), it)]
    if not chunk:
      break
    batches.append(_stack(chunk[lo:hi], local_batch, seq_len))
    if len(chunk) < global_batch:
      break
  return batches


# -- statistics ----------------------------------------------------------------

def token_stats(source: Sequence[Any], tokenizer: Tokenizer, *, text_field: str,
                seq_len: int, max_chars: int = _STATS_MAX_CHARS) -> dict[str, int]:
  """Tokens (separators included), long documents and blanks of a split."""
  tokenize = tokenize_fn(tokenizer, text_field)
  tokens = long_docs = blank = seen = chars = 0
  for seen, example in enumerate(source, 1):
    out = tokenize(example)
    if out is None:
      blank += 1
      continue
    n = len(out['tokens'])
    tokens += n
    long_docs += n > seq_len + 1
    chars += len(_as_text(example[text_field]))
    if chars >= max_chars:
      break
  scale = len(source) / seen if seen else 1.0
  stats = {'tokens': round(tokens * scale), 'split_long_docs': round(long_docs * scale),
           'blank_docs': round(blank * scale)}
  if seen < len(source):
    stats['token_stats_sampled'] = 1
  return stats


# -- public entry point --------------------------------------------------------

@dataclasses.dataclass
class PretrainData:
  """The pretraining data of one process: a resumable train iterator and val batches.

  stats (ints, for logging):
    files, documents, chars, skipped_empty, utf8_replaced, qa_pages, qa_chars: the
        whole corpus, as read when it was prepared (embedded / files sources only;
        documents and chars include the Q/A pages of config.data.qa_share);
    train_documents, val_documents: the split sizes;
    local_documents, tokens, split_long_docs, blank_docs, rows_per_epoch,
        steps_per_epoch: this process's training shard (tokens include one
        <|endoftext|> per document; extrapolated when token_stats_sampled is set);
    val_tokens: the whole validation split.
  """
  train_iter: grain.DatasetIterator
  stats: dict[str, int]
  _val_fn: Callable[[int], list[Batch]]
  _val_cache: dict[int, list[Batch]] = dataclasses.field(default_factory=dict)

  def val_batches(self, max_batches: int) -> list[Batch]:
    """The first max_batches validation batches (fewer if the split is small)."""
    if max_batches not in self._val_cache:
      self._val_cache[max_batches] = self._val_fn(max_batches)
    return self._val_cache[max_batches]


def local_batch_size(config, process_count: int) -> int:
  batch = config.train.batch_size
  if batch % process_count:
    raise ValueError(f'config.train.batch_size={batch} is not divisible by the '
                     f'{process_count} processes.')
  return batch // process_count


def _collect_stats(splits, tokenizer, config, local_batch, process_index,
                   process_count) -> dict[str, int]:
  seq_len, field = config.data.seq_len, splits.text_field
  shard = grain.MapDataset.source(splits.train).slice(
      slice(process_index, None, process_count))
  stats = dict(splits.stats)
  stats['local_documents'] = len(shard)
  stats.update(token_stats(shard, tokenizer, text_field=field, seq_len=seq_len))
  val = token_stats(splits.validation, tokenizer, text_field=field, seq_len=seq_len)
  stats['val_tokens'] = val['tokens']
  stats['rows_per_epoch'] = math.ceil(stats['tokens'] / (seq_len + 1))
  stats['steps_per_epoch'] = stats['rows_per_epoch'] // local_batch
  return stats


def make_pretrain_data(config, tokenizer: Tokenizer, *, process_index: int = 0,
                       process_count: int = 1) -> 'PretrainData':
  """Builds the train iterator and validation batches for this process."""
  check_vocab(tokenizer, config.model.vocab_size)
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} not in [0, {process_count}).')
  local_batch = local_batch_size(config, process_count)
  d = config.data
  splits = text_dataset.load_splits(config)
  if len(splits.train) < process_count:
    raise ValueError(f'{splits.name}: {len(splits.train)} training documents for '
                     f'{process_count} processes; every process needs one.')
  stats = _collect_stats(splits, tokenizer, config, local_batch, process_index, process_count)
  if stats['tokens'] == 0:
    raise ValueError(f'{splits.name}: the training split has no tokens.')

  docs_per_row = (d.seq_len + 1) * max(1, stats['local_documents']) / max(1, stats['tokens'])
  train = build_train_dataset(
      splits.train, tokenizer, text_field=splits.text_field, seq_len=d.seq_len,
      local_batch=local_batch, seed=d.shuffle_seed, segment_ids=d.segment_ids,
      process_index=process_index, process_count=process_count,
      read_options=_read_options(docs_per_row * local_batch))
  if d.worker_count > 0:
    if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags
      flags.FLAGS.mark_as_parsed()
    train = train.mp_prefetch(grain.MultiprocessingOptions(num_workers=d.worker_count))

  def val_fn(max_batches: int) -> list[Batch]:
    rows = val_rows(splits.validation, tokenizer, text_field=splits.text_field,
                    seq_len=d.seq_len, segment_ids=d.segment_ids)
    return global_val_batches(rows, max_batches=max_batches,
                              global_batch=config.train.batch_size, local_batch=local_batch,
                              process_index=process_index, seq_len=d.seq_len)

  return PretrainData(train_iter=iter(train), stats=stats, _val_fn=val_fn)


def corpus_sample(config, max_chars: int, seed: int = 0):
  """Training-split documents in a random order, up to max_chars characters."""
  splits = text_dataset.load_splits(config)
  order = np.random.default_rng(seed).permutation(len(splits.train))
  total = 0
  for i in order:
    text = _as_text(splits.train[int(i)][splits.text_field])
    yield text
    total += len(text)
    if total >= max_chars:
      return


def load_or_train_tokenizer(config, workdir: str) -> Tokenizer:
  """config.tokenizer.path, or WORKDIR/tokenizer.model trained from the corpus once."""
  if config.tokenizer.path:  # a .model file or a model's tokenizer (directory, .json)
    return tokenizer_lib.load(config.tokenizer.path,
                              chat_template=config.tokenizer.chat_template)
  path = os.path.join(workdir, 'tokenizer.model')
  if os.path.exists(path):
    return Tokenizer.load(path)
  texts = corpus_sample(config, config.tokenizer.train_chars, seed=config.seed)
  return train_tokenizer(texts, path, config.tokenizer.vocab_size,
                         max_chars=config.tokenizer.train_chars)

