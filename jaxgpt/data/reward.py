"""Stage 3 data: comparison pairs -> tokenized (chosen, rejected) batches for the reward model
(and, with reply masks and reference log-probs, for DPO).

Sequence. Each reply is rendered as the conversation prompt + assistant reply with the
chat template, then one `<|reward|>` token: ``... <|assistant|>{reply}<|end|><|reward|>``
for a finished reply, ``... <|assistant|>{reply}<|reward|>`` for one cut at a length
limit (`Comparison.chosen_finished` / `rejected_finished` False). That is the layout PPO
scores its rollouts in (`jaxgpt.rl.rollout.assemble`: the sampled tokens, their `<|end|>`
only when the sampler emitted it, then `<|reward|>`), so the model learns on the
sequences it is later asked about. It reads its scalar at the last token, which has seen
the whole reply and whether an `<|end|>` closed it. A sequence longer than seq_len loses
prompt tokens from the left (`on_long_row='truncate'`; the `<|assistant|>`, reply, its
`<|end|>` and `<|reward|>` are always kept) or is dropped (`'drop'`); a pair is dropped
when either side is dropped. Counted per pair: too_long (either side over seq_len),
truncated (kept after cutting), dropped.

Batch (one global step of B pairs; this process holds rows [p*b, (p+1)*b), b = B // P),
numpy arrays:

    tokens, positions, segment_ids   (b, 2, T) int32   [:, 0] chosen, [:, 1] rejected;
                                     right-padded: pad_id, position 0, segment 0
    readout                          (b, 2) int32      index of each `<|reward|>` token
    margin, weight                   (b,) float32
    reply_mask (policy=True, DPO)    (b, 2, T) int32   1 on the reply tokens a policy generates
    ref_logp (with reference_fn)     (b, 2) float32    the reference's summed reply log-probs

weight = 1 / (pairs kept in the pair's group), so every comparison set weighs 1 however
many pairs it has (InstructGPT: the K(K-1)/2 pairs of one ranking are one example). A
padding pair weighs 0 and holds a single pad token (segment 1, readout 0), so it is a
valid sequence for the model and drops out of the loss.

Train order. Every epoch the groups are shuffled (numpy, seeded by
config.data.shuffle_seed and the epoch) and packed first-fit into batches of B pair slots
(each group goes to the earliest batch with room), so the pairs of a group always share
a global batch and few slots are left empty. A group of more than B pairs is cut into
chunks of B (whole batches of its own) plus a remainder placed first-fit; its weights stay
1 / (its pairs), so it still weighs 1 per epoch. Batches come in the order they were
opened; empty slots are padding. The iterator is a grain IterDataset: a batch-plan source
whose state is (epoch, batch), then a grain map that assembles the arrays, so
`get_state()` / `set_state()` resume exactly and cost one epoch's plan.

Validation: the held-out pairs in their order (no shuffle, no group packing), B a batch,
the last batch padded with weight-0 pairs. `RewardData.heldout` lists them in that order:
global row k*B + i of val batch k is heldout[k*B + i].
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
from typing import Any, Sequence

import grain
import numpy as np

from jaxgpt.data.comparisons import Comparison, read_comparisons
from jaxgpt.data.jsonl import BAD_ROW_POLICIES, expand_paths
from jaxgpt.data.sft import LONG_ROW_POLICIES

__all__ = ['encode_reply', 'split_comparisons', 'load_comparison_files', 'make_reward_data',
           'RewardData', 'pack_groups']


# ----------------------------------------------------------------------------- tokens

def encode_reply(prompt_messages: Sequence[dict], reply: str, tokenizer, seq_len: int,
                 on_long_row: str, finished: bool = True) -> tuple[list[int] | None, bool]:
  """(ids, truncated) of `encode_reply_parts`."""
  ids, truncated, _ = encode_reply_parts(prompt_messages, reply, tokenizer, seq_len,
                                         on_long_row, finished)
  return ids, truncated


def encode_reply_parts(prompt_messages: Sequence[dict], reply: str, tokenizer, seq_len: int,
                       on_long_row: str, finished: bool = True
                       ) -> tuple[list[int] | None, bool, int]:
  """(ids, truncated, reply tokens): prompt + assistant reply in the tokenizer's chat format
  + `<|reward|>`, at most seq_len tokens. The reply's own tokens (what a policy samples
  after the generation prompt and is scored on: its content and, if finished, its
  end-of-turn token) are the `reply tokens` before the `<|reward|>`.

  A cut reply (finished False) has no end-of-turn token, as in a PPO rollout of a response
  that ran out of tokens. Too long: 'truncate' drops prompt tokens from the left (the
  assistant turn's header, the reply and `<|reward|>` are always whole); when they alone do
  not fit, or with 'drop', the ids are None (truncated False).
  """
  if on_long_row not in LONG_ROW_POLICIES:
    raise ValueError(f'on_long_row={on_long_row!r} must be one of {LONG_ROW_POLICIES}.')
  context, header, reply_ids = tokenizer.chat.split_reply(prompt_messages, reply, finished)
  ids = context + header + reply_ids + [tokenizer.reward_id]
  if len(ids) <= seq_len:
    return ids, False, len(reply_ids)
  if on_long_row == 'drop' or len(header) + len(reply_ids) + 1 > seq_len:
    return None, False, len(reply_ids)
  return ids[len(ids) - seq_len:], True, len(reply_ids)


@dataclasses.dataclass
class _Pairs:
  """Tokenized pairs, flat in memory: sequence 2i is pair i's chosen, 2i + 1 its rejected."""
  tokens: np.ndarray     # int32, all sequences back to back
  offsets: np.ndarray    # int64, (2P + 1,)
  margin: np.ndarray     # float32, (P,)
  weight: np.ndarray     # float32, (P,)
  groups: list           # per group: int64 array of its pair indices, in order
  reply_lens: np.ndarray  # int32, (2P,): each sequence's reply tokens (`encode_reply_parts`)
  ref_logps: np.ndarray | None = None  # float32, (P, 2): a reference model's reply log-probs

  def __len__(self) -> int:
    return len(self.margin)

  def seq(self, s: int) -> np.ndarray:
    return self.tokens[self.offsets[s]:self.offsets[s + 1]]


def _tokenize(comparisons: Sequence[Comparison], tokenizer, seq_len: int,
              on_long_row: str) -> tuple[_Pairs, list[Comparison], dict]:
  """Encode every pair, apply the long-row policy, weigh by group; (pairs, kept, counts)."""
  counts = {'too_long': 0, 'truncated': 0, 'dropped': 0}
  seqs, kept, group_of, reply_lens = [], [], [], []
  group_index: dict[str, int] = {}
  for c in comparisons:
    sides = [encode_reply_parts(c.prompt, reply, tokenizer, seq_len, on_long_row, finished)
             for reply, finished in ((c.chosen, c.chosen_finished),
                                     (c.rejected, c.rejected_finished))]
    long = any(ids is None or cut for ids, cut, _ in sides)
    counts['too_long'] += long
    if any(ids is None for ids, _, _ in sides):
      counts['dropped'] += 1
      continue
    counts['truncated'] += long
    seqs += [np.asarray(ids, np.int32) for ids, _, _ in sides]
    reply_lens += [n for _, _, n in sides]
    kept.append(c)
    group_of.append(group_index.setdefault(c.group, len(group_index)))
  group_of = np.asarray(group_of, np.int64)
  sizes = np.bincount(group_of, minlength=len(group_index))
  lengths = [len(s) for s in seqs]
  pairs = _Pairs(
      tokens=np.concatenate(seqs) if seqs else np.zeros(0, np.int32),
      offsets=np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64),
      margin=np.asarray([c.margin for c in kept], np.float32),
      weight=(1.0 / sizes[group_of]).astype(np.float32) if len(kept) else np.zeros(0, np.float32),
      groups=np.split(np.argsort(group_of, kind='stable'), np.cumsum(sizes)[:-1])
      if len(kept) else [], reply_lens=np.asarray(reply_lens, np.int32))
  return pairs, kept, counts


# ----------------------------------------------------------------------------- batches

def pack_groups(groups: Sequence[np.ndarray], order: Sequence[int],
                batch_size: int) -> list[np.ndarray]:
  """First-fit: each group (in `order`) into the earliest batch with room for it.

  Returns (batch_size,) int64 arrays of pair indices, -1 on empty slots. A group larger
  than a batch fills whole batches with chunks of batch_size and places its remainder.
  """
  B = batch_size
  batches: list[list[int]] = []
  by_free: list[list[int]] = [[] for _ in range(B + 1)]  # heaps: open batches by free slots

  def place(chunk):
    n, best = len(chunk), None
    for free in range(n, B):
      if by_free[free] and (best is None or by_free[free][0] < by_free[best][0]):
        best = free
    if best is None:
      k, free = len(batches), B
      batches.append([])
    else:
      k, free = heapq.heappop(by_free[best]), best
    batches[k] += [int(i) for i in chunk]
    if free - n:
      heapq.heappush(by_free[free - n], k)

  for g in order:
    pairs = groups[g]
    for start in range(0, len(pairs), B):
      place(pairs[start:start + B])
  out = []
  for b in batches:
    row = np.full(B, -1, np.int64)
    row[:len(b)] = b
    out.append(row)
  return out


def _epoch_plan(pairs: _Pairs, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
  order = np.random.default_rng([seed, epoch]).permutation(len(pairs.groups))
  return pack_groups(pairs.groups, order, batch_size)


def _assemble(pairs: _Pairs, slots: np.ndarray, seq_len: int, pad_id: int,
              policy: bool = False) -> dict:
  """The batch arrays of pair slots (-1: a weight-0 padding pair); `policy` adds each
  sequence's reply mask (and the reference log-probs, once the pairs have them)."""
  b, T = len(slots), seq_len
  tokens = np.full((b, 2, T), pad_id, np.int32)
  positions = np.zeros((b, 2, T), np.int32)
  segment_ids = np.zeros((b, 2, T), np.int32)
  reply_mask = np.zeros((b, 2, T), np.int32)
  readout = np.zeros((b, 2), np.int32)
  ref_logp = np.zeros((b, 2), np.float32)
  margin = np.zeros(b, np.float32)
  weight = np.zeros(b, np.float32)
  for r, p in enumerate(int(s) for s in slots):
    if p < 0:
      segment_ids[r, :, 0] = 1  # one pad token: a valid sequence, read at 0, weight 0
      continue
    for side in (0, 1):
      ids = pairs.seq(2 * p + side)
      n = len(ids)
      tokens[r, side, :n] = ids
      positions[r, side, :n] = np.arange(n)
      segment_ids[r, side, :n] = 1
      readout[r, side] = n - 1
      reply_mask[r, side, n - 1 - pairs.reply_lens[2 * p + side]:n - 1] = 1
    margin[r], weight[r] = pairs.margin[p], pairs.weight[p]
    if pairs.ref_logps is not None:
      ref_logp[r] = pairs.ref_logps[p]
  out = {'tokens': tokens, 'positions': positions, 'segment_ids': segment_ids,
         'readout': readout, 'margin': margin, 'weight': weight}
  if policy:
    out['reply_mask'] = reply_mask
    if pairs.ref_logps is not None:
      out['ref_logp'] = ref_logp
  return out


class _Assemble(grain.transforms.Map):

  def __init__(self, pairs: _Pairs, seq_len: int, pad_id: int, policy: bool):
    self._pairs, self._seq_len, self._pad_id, self._policy = pairs, seq_len, pad_id, policy

  def map(self, slots):
    return _assemble(self._pairs, slots, self._seq_len, self._pad_id, self._policy)


class _PlanIterator(grain.DatasetIterator):
  """Endless local batch plans; state = the next (epoch, batch) of the global order."""

  def __init__(self, ds: '_PlanDataset'):
    super().__init__()
    self._ds = ds
    self._epoch, self._batch = 0, 0
    self._plan_epoch, self._plan = None, None

  def _plan_of(self, epoch: int) -> list[np.ndarray]:
    if self._plan_epoch != epoch:
      self._plan = _epoch_plan(self._ds.pairs, self._ds.batch_size, self._ds.seed, epoch)
      self._plan_epoch = epoch
    return self._plan

  def __next__(self) -> np.ndarray:
    plan = self._plan_of(self._epoch)
    slots = plan[self._batch]
    self._batch += 1
    if self._batch == len(plan):  # the state after an epoch's last batch is (epoch + 1, 0)
      self._epoch, self._batch = self._epoch + 1, 0
    lo = self._ds.process_index * self._ds.local_batch
    return slots[lo:lo + self._ds.local_batch]

  def _fingerprint(self) -> dict:
    return {'pairs': len(self._ds.pairs), 'groups': len(self._ds.pairs.groups),
            'batch_size': self._ds.batch_size, 'seed': self._ds.seed}

  def get_state(self) -> dict:
    return {'epoch': self._epoch, 'batch': self._batch, **self._fingerprint()}

  def set_state(self, state: dict) -> None:
    want = self._fingerprint()
    got = {k: state.get(k) for k in want}
    if got != want:
      raise ValueError(
          f'reward data iterator: the checkpoint was saved for {got} but the data is '
          f'{want}; resume with the same comparison data, config.reward.batch_size and '
          'config.data.shuffle_seed, or start the reward stage in a new workdir.')
    self._epoch, self._batch = int(state['epoch']), int(state['batch'])


class _PlanDataset(grain.IterDataset):
  """Source of the train pipeline: this process's pair slots of each global batch."""

  def __init__(self, pairs: _Pairs, batch_size: int, local_batch: int, process_index: int,
               seed: int):
    super().__init__()
    self.pairs, self.batch_size, self.local_batch = pairs, batch_size, local_batch
    self.process_index, self.seed = process_index, seed

  def __iter__(self) -> _PlanIterator:
    return _PlanIterator(self)

  def __str__(self) -> str:
    return f'RewardBatchPlan(pairs={len(self.pairs)}, batch_size={self.batch_size})'


# ----------------------------------------------------------------------------- data

@dataclasses.dataclass
class RewardData:
  """The reward data of one process: a resumable train iterator, val batches, counts.

  stats (ints): train_pairs, val_pairs, train_groups, val_groups (kept after the long-row
  policy), too_long, truncated, dropped (pairs, both splits), train_batches (global
  batches in the first epoch), split_groups (train groups larger than a batch).
  """
  train_iter: Any                   # grain DatasetIterator: next() -> batch; get/set_state
  stats: dict
  seq_len: int
  local_batch: int
  heldout: list                     # the kept held-out Comparisons, in val order
  _val_fn: Any
  _val_cache: dict = dataclasses.field(default_factory=dict)

  def val_batches(self, max_batches: int) -> list[dict[str, np.ndarray]]:
    """The first max_batches validation batches (fewer if the held-out set is small)."""
    if max_batches not in self._val_cache:
      self._val_cache[max_batches] = self._val_fn(max_batches)
    return self._val_cache[max_batches]


def _first_set(config, fields: Sequence[str]) -> tuple[int, str]:
  """(value, field) of the first of `fields` ('section.name') that is set (non-zero)."""
  for field in fields:
    section, name = field.split('.')
    if config[section][name] or field == fields[-1]:
      return int(config[section][name]), field
  raise AssertionError(fields)


def reward_shape(config, process_count: int = 1,
                 section: str = 'reward') -> tuple[int, int, int]:
  """(B global pairs a step, b local pairs, T tokens a sequence) from config.<section>
  (0 fields fall back: batch_size to config.train's, seq_len to config.reward's, then to
  config.data's)."""
  B, field = _first_set(config, (f'{section}.batch_size', 'train.batch_size'))
  if B < 1 or B % process_count:
    raise ValueError(f'config.{field}={B} pairs a step must be positive and divisible by the '
                     f'{process_count} processes.')
  T, field = _first_set(config, tuple(dict.fromkeys(
      (f'{section}.seq_len', 'reward.seq_len', 'data.seq_len'))))
  if T < 4 or T > config.model.max_seq_len:
    raise ValueError(f'config.{field}={T} tokens a sequence must be in [4, '
                     f'config.model.max_seq_len={config.model.max_seq_len}].')
  return B, B // process_count, T


def _reference_logps(pairs: _Pairs, reference_fn, B: int, b: int, process_index: int,
                     seq_len: int, pad_id: int) -> np.ndarray:
  """(P, 2) reference log-probs of every pair: `reference_fn(local batch) -> (B, 2)` (the
  global batch's, on every process) over the pairs B at a time, in the training layout."""
  out = np.zeros((len(pairs), 2), np.float32)
  for start in range(0, len(pairs), B):
    slots = np.full(B, -1, np.int64)
    chunk = np.arange(start, min(start + B, len(pairs)))
    slots[:len(chunk)] = chunk
    local = _assemble(pairs, slots[process_index * b:(process_index + 1) * b], seq_len, pad_id,
                      policy=True)
    out[chunk] = np.asarray(reference_fn(local))[:len(chunk)]
  return out


def make_reward_data(config, tokenizer, train: Sequence[Comparison],
                     heldout: Sequence[Comparison], *, process_index: int = 0,
                     process_count: int = 1, section: str = 'reward', policy: bool = False,
                     reference_fn=None) -> RewardData:
  """The train iterator, validation batches and counts of comparison pairs for this
  process, shaped by config.<section> ('reward', or 'dpo' for the policy's pairs).

  `policy` adds `reply_mask` (b, 2, T) to the batches: 1 on the tokens of each reply that
  a policy generates (content and `<|end|>`), 0 on the prompt, the `<|assistant|>`, the
  `<|reward|>` and padding. `reference_fn` (local batch -> (B, 2) summed reply log-probs of
  the global batch) is called once per pair before training, and every batch then carries
  `ref_logp` (b, 2): the reference model need not be held while the policy trains.
  """
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} not in [0, {process_count}).')
  on_long_row = config[section].on_long_row
  if on_long_row not in LONG_ROW_POLICIES:
    raise ValueError(f'config.{section}.on_long_row={on_long_row!r} must be one of '
                     f'{LONG_ROW_POLICIES}.')
  B, b, T = reward_shape(config, process_count, section)
  seed = int(config.data.shuffle_seed)
  policy = policy or reference_fn is not None

  train_pairs, _, c_train = _tokenize(train, tokenizer, T, on_long_row)
  val_pairs, val_kept, c_val = _tokenize(heldout, tokenizer, T, on_long_row)
  stats = {'train_pairs': len(train_pairs), 'val_pairs': len(val_pairs),
           'train_groups': len(train_pairs.groups), 'val_groups': len(val_pairs.groups)}
  for k in c_train:
    stats[k] = c_train[k] + c_val[k]
  if not len(train_pairs):
    raise ValueError(
        f'{section} data: no training pair left of {len(train)} (stats: {stats}); give more '
        f'comparisons, raise config.{section}.seq_len, or set '
        f'config.{section}.on_long_row=truncate.')
  stats['train_batches'] = len(_epoch_plan(train_pairs, B, seed, 0))
  stats['split_groups'] = sum(len(g) > B for g in train_pairs.groups)
  if reference_fn is not None:
    for pairs in (train_pairs, val_pairs):
      pairs.ref_logps = _reference_logps(pairs, reference_fn, B, b, process_index, T,
                                         tokenizer.pad_id)

  plans = _PlanDataset(train_pairs, B, b, process_index, seed)
  train_iter = iter(plans.map(_Assemble(train_pairs, T, tokenizer.pad_id, policy)))

  def val_fn(max_batches: int) -> list[dict[str, np.ndarray]]:
    out = []
    for start in range(0, min(len(val_pairs), max_batches * B), B):
      slots = np.full(B, -1, np.int64)
      chunk = np.arange(start, min(start + B, len(val_pairs)))
      slots[:len(chunk)] = chunk
      out.append(_assemble(val_pairs, slots[process_index * b:(process_index + 1) * b], T,
                           tokenizer.pad_id, policy))
    return out

  return RewardData(train_iter=train_iter, stats=stats, seq_len=T, local_batch=b,
                    heldout=val_kept, _val_fn=val_fn)


# ----------------------------------------------------------------------------- files

def split_comparisons(comparisons: Sequence[Comparison],
                      val_fraction: float) -> tuple[list[Comparison], list[Comparison]]:
  """(train, heldout) by a SHA-256 of the group id: a group is never split, and the
  split does not depend on row order or on the other rows."""
  if not 0.0 <= val_fraction < 1.0:
    raise ValueError(f'val_fraction={val_fraction} must be in [0, 1) '
                     '(config.reward.val_fraction).')
  train, heldout = [], []
  for c in comparisons:
    digest = hashlib.sha256(c.group.encode('utf-8')).digest()
    (heldout if int.from_bytes(digest[:8], 'big') < val_fraction * 2**64 else train).append(c)
  return train, heldout


def load_comparison_files(config, section: str = 'reward'
                          ) -> tuple[list[Comparison], list[Comparison], dict]:
  """(train, heldout, counts) of the JSONL files named by config.<section>.data."""
  r = config[section]
  if r.data == 'embedded':
    raise ValueError(f"config.{section}.data='embedded' is sampled by the stage, not read "
                     'from files.')
  if r.on_bad_row not in BAD_ROW_POLICIES:
    raise ValueError(f'config.{section}.on_bad_row={r.on_bad_row!r} must be one of '
                     f'{BAD_ROW_POLICIES}.')
  comparisons, counts = read_comparisons(expand_paths(r.data, f'config.{section}.data'),
                                         r.on_bad_row)
  train, heldout = split_comparisons(comparisons, float(r.val_fraction))
  counts['train_pairs'], counts['heldout_pairs'] = len(train), len(heldout)
  return train, heldout, counts
