"""Reward data: comparison formats, bad rows, the simulated labeler, pair batches."""

import collections
import json
import os
import random

import numpy as np
import pytest

from jaxgpt import config as config_lib
from jaxgpt.data import reward, tasks
from jaxgpt.data import comparisons as comp
from jaxgpt.data.jsonl import BadRowError
from jaxgpt.data.tokenizer import train_tokenizer

_TEXT = ['Hello there! How are you doing today? I am doing well, thank you.',
         *[f'{ex.prompt} {ex.answer}' for ex in tasks.sample_examples('train', 300, seed=0)]]


@pytest.fixture(scope='module')
def tok(tmp_path_factory):
  return train_tokenizer(_TEXT * 3, str(tmp_path_factory.mktemp('tok') / 'tok.model'), 400)


def _write(path, rows):
  with open(path, 'w') as f:
    for r in rows:
      f.write((r if isinstance(r, str) else json.dumps(r)) + '\n')
  return str(path)


def _cfg(*, batch_size=8, seq_len=40, seed=0):
  cfg = config_lib.base_config()
  cfg.train.batch_size = 32        # overridden by config.reward.batch_size
  cfg.reward.batch_size = batch_size
  cfg.reward.seq_len = seq_len
  cfg.data.shuffle_seed = seed
  return cfg


def _user(text):
  return ({'role': 'user', 'content': text},)


def _groups(sizes, seed=0):
  """Comparisons in groups of the given sizes; margin = group number (to find them again)."""
  rng = random.Random(seed)
  out = []
  for g, n in enumerate(sizes):
    prompt, answer = tasks.TASKS['add'].make(rng, 'train')
    for i in range(n):
      out.append(comp.Comparison(_user(prompt), answer, str(10 + i), float(g), f'g{g}', 'add'))
  return out


# ----------------------------------------------------------------------------- formats

def test_row_formats_parse(tmp_path):
  add_prompt, add_answer = tasks.TASKS['add'].make(random.Random(0), 'train')
  rows = [
      {'prompt': f'  {add_prompt} ', 'chosen': f' {add_answer}', 'rejected': '3',
       'margin': 2, 'extra': [1, 2]},
      '',
      {'messages': [{'role': 'system', 'content': 'Be brief.'},
                    {'role': 'user', 'content': 'Hi'},
                    {'role': 'assistant', 'content': 'Hello!'},
                    {'role': 'user', 'content': 'Name a colour.'}],
       'chosen': 'Blue.', 'rejected': 'I will not.', 'group': 7, 'task': 'chitchat'},
      {'chosen': '\n\nHuman: Hi there\n\nAssistant: Hello.\n\nHuman: Tell me a joke.'
                 '\n\nAssistant:  A pun walks into a bar. ',
       'rejected': '\n\nHuman: Hi there\n\nAssistant: Hello.\n\nHuman: Tell me a joke.'
                   '\n\nAssistant: No.'},
  ]
  path = _write(tmp_path / 'a.jsonl', rows)
  out, counts = comp.read_comparisons([path])
  assert counts == {'rows_read': 3, 'bad_rows': 0, 'bad_rows_by_kind': {}, 'no_pair_rows': 0,
                    'pairs': 3, 'groups': 3}
  a, b, c = out
  assert a == comp.Comparison(_user(add_prompt), add_answer, '3', 2.0, f'{path}:1', 'add')
  assert b.prompt == ({'role': 'system', 'content': 'Be brief.'},
                      {'role': 'user', 'content': 'Hi'},
                      {'role': 'assistant', 'content': 'Hello!'},
                      {'role': 'user', 'content': 'Name a colour.'})
  assert (b.chosen, b.rejected, b.margin, b.group, b.task) == (
      'Blue.', 'I will not.', 0.0, '7', 'chitchat')
  assert c.prompt == ({'role': 'user', 'content': 'Hi there'},
                      {'role': 'assistant', 'content': 'Hello.'},
                      {'role': 'user', 'content': 'Tell me a joke.'})
  assert (c.chosen, c.rejected, c.group, c.task) == (
      'A pun walks into a bar.', 'No.', f'{path}:4', '')


def test_ranking_expands_to_pairs_with_ties(tmp_path, tok):
  rows = [{'prompt': 'Pick one.', 'responses': ['b', 'a', 'c', 'a2'], 'ranking': [2, 1, 3, 1]},
          {'prompt': 'Three.', 'responses': ['x', 'y', 'z'], 'ranking': [3, 1, 2],
           'group': 'three'},
          {'prompt': 'Tied.', 'responses': ['p', 'q'], 'ranking': [1, 1]}]
  path = _write(tmp_path / 'rank.jsonl', rows)
  out, counts = comp.read_comparisons([path])
  assert counts['no_pair_rows'] == 1 and counts['pairs'] == 8 and counts['groups'] == 2
  first = [(c.chosen, c.rejected) for c in out if c.group == f'{path}:1']
  # Ranks: a = a2 = 1 (tied: no pair between them), b = 2, c = 3.
  assert sorted(first) == sorted([('a', 'b'), ('b', 'c'), ('a2', 'b'), ('a', 'c'),
                                  ('a2', 'c')])
  three = [(c.chosen, c.rejected) for c in out if c.group == 'three']
  assert sorted(three) == sorted([('y', 'x'), ('z', 'x'), ('y', 'z')])
  data = reward.make_reward_data(_cfg(batch_size=8), tok, out, out)
  b = data.val_batches(1)[0]
  np.testing.assert_allclose(b['weight'], [1 / 5] * 5 + [1 / 3] * 3)
  assert data.stats['val_groups'] == 2
  assert b['weight'].sum() == pytest.approx(2.0)


_BAD = [
    ('bad_json', '{"prompt": "x", "chosen": '),
    ('bad_type', '["a list"]'),
    ('bad_type', {'prompt': 5, 'chosen': 'a', 'rejected': 'b'}),
    ('bad_type', {'prompt': 'p', 'messages': [], 'chosen': 'a', 'rejected': 'b'}),
    ('missing_field', {'prompt': 'p', 'chosen': 'a'}),
    ('missing_field', {'text': 'hello'}),
    ('missing_field', {'messages': [{'role': 'user'}], 'chosen': 'a', 'rejected': 'b'}),
    ('unknown_role', {'messages': [{'role': 'bot', 'content': 'hi'}], 'chosen': 'a',
                      'rejected': 'b'}),
    ('prompt_end', {'messages': [{'role': 'user', 'content': 'hi'},
                                 {'role': 'assistant', 'content': 'yo'}],
                    'chosen': 'a', 'rejected': 'b'}),
    ('empty_prompt', {'prompt': '  ', 'chosen': 'a', 'rejected': 'b'}),
    ('empty_response', {'prompt': 'p', 'chosen': ' ', 'rejected': 'b'}),
    ('empty_response', {'prompt': 'p', 'responses': ['a', ''], 'ranking': [1, 2]}),
    ('identical', {'prompt': 'p', 'chosen': 'same ', 'rejected': ' same'}),
    ('identical', {'prompt': 'p', 'responses': ['a', 'a'], 'ranking': [1, 2]}),
    ('ranking_length', {'prompt': 'p', 'responses': ['a', 'b'], 'ranking': [1, 2, 3]}),
    ('bad_ranking', {'prompt': 'p', 'responses': ['a', 'b'], 'ranking': [0, 1]}),
    ('bad_margin', {'prompt': 'p', 'chosen': 'a', 'rejected': 'b', 'margin': 'big'}),
    ('bad_margin', {'prompt': 'p', 'chosen': 'a', 'rejected': 'b', 'margin': True}),
    ('bad_margin', '{"prompt": "p", "chosen": "a", "rejected": "b", "margin": NaN}'),
    ('hh_format', {'chosen': 'Human: hi Assistant: yo', 'rejected': 'x'}),
    ('hh_format', {'chosen': '\n\nHuman: hi', 'rejected': '\n\nHuman: hi'}),
    ('hh_prefix', {'chosen': '\n\nHuman: hi\n\nAssistant: a',
                   'rejected': '\n\nHuman: hello\n\nAssistant: b'}),
]


@pytest.mark.parametrize('kind,row', _BAD, ids=[f'{k}{i}' for i, (k, _) in enumerate(_BAD)])
def test_bad_row_errors_with_file_and_line(tmp_path, kind, row):
  good = {'prompt': 'p', 'chosen': 'a', 'rejected': 'b'}
  path = _write(tmp_path / 'bad.jsonl', [good, '', row, good])
  with pytest.raises(BadRowError, match=f'^{path}:3: ') as e:
    comp.read_comparisons([path])
  assert e.value.kind == kind and e.value.line == 3


def test_bad_rows_skipped_and_counted(tmp_path):
  good = {'prompt': 'p', 'chosen': 'a', 'rejected': 'b'}
  path = _write(tmp_path / 'bad.jsonl', [good] + [row for _, row in _BAD] + [good])
  out, counts = comp.read_comparisons([path], on_bad_row='skip')
  assert len(out) == 2 and counts['rows_read'] == len(_BAD) + 2
  assert counts['bad_rows'] == len(_BAD)
  assert counts['bad_rows_by_kind'] == dict(collections.Counter(k for k, _ in _BAD))
  with pytest.raises(ValueError, match='on_bad_row'):
    comp.read_comparisons([path], on_bad_row='ignore')


def test_write_read_round_trip(tmp_path):
  rng = random.Random(1)
  prompt, answer = tasks.TASKS['reverse'].make(rng, 'train')
  original = [
      comp.Comparison(_user(prompt), answer, 'no idea', 0.0, 'g1', 'reverse'),
      comp.Comparison(_user('Hi'), 'Hello!', 'Go away.', -1.25, 'g1', ''),
      comp.Comparison(({'role': 'system', 'content': 'Be kind. "Quotes" \u00e9'},
                       {'role': 'user', 'content': 'Hi'},
                       {'role': 'assistant', 'content': 'Hey.'},
                       {'role': 'user', 'content': 'Bye\nnow'}), 'Bye!', '...', 0.5, 'g2',
                      'chitchat'),
  ]
  original += comp.comparisons_from_samples(
      prompt, 'reverse', [(answer, True), (' wrong ', False), ('x x', True)], rng, 0.0, 'g3')
  path = str(tmp_path / 'out' / 'pairs.jsonl')
  comp.write_comparisons(path, original)
  comp.write_comparisons(path, original)  # replaces the file, leaves no temp file behind
  assert os.listdir(tmp_path / 'out') == ['pairs.jsonl']
  back, counts = comp.read_comparisons([path])
  assert back == original and counts['bad_rows'] == 0
  with open(path) as f:
    assert json.loads(f.readline())['prompt'] == prompt


# ----------------------------------------------------------------------------- labeler

@pytest.mark.parametrize('text,want', [
    ('71', False), ('Yes', False), ('No.', False), ('111', False), ('aaabbb', False),
    ('hello', False), ('The answer is 42.', False),
    ('71 71', True), ('no no no', True), ('Yes, yes.', True), ('abcabcabc', True),
    ('hahaha', True), ('7777777', True), ('the cat the cat', True)])
def test_has_repetition(text, want):
  assert comp.has_repetition(text) is want


def _winner(prompt, a, b, rng=None):
  """Labeler's pick between two (text, finished) responses, no flips."""
  pairs = comp.label_samples(prompt, [a, b], rng or random.Random(0), 0.0)
  assert len(pairs) == 1
  return [a, b][pairs[0][0]]


def test_labeler_ranks_as_specified():
  prompt, answer = tasks.TASKS['add'].make(random.Random(0), 'train')
  wrong = str(int(answer) + 1)
  assert tasks.check(None, prompt, answer) and not tasks.check(None, prompt, wrong)
  # correct beats wrong, even when the right one is unfinished, repetitive and longer
  assert _winner(prompt, (wrong, True), (answer, True)) == (answer, True)
  assert _winner(prompt, (wrong, True), (f'{answer}.  ', False))[0] == f'{answer}.  '
  # finished beats unfinished
  assert _winner(prompt, (wrong, False), (str(int(answer) + 2), True))[1] is True
  # not repetitive beats repetitive (both wrong, both finished; the repetitive one shorter)
  assert _winner(prompt, ('5 5', True), ('I think it is 1000.', True))[0] == (
      'I think it is 1000.')
  # shorter beats longer
  word_prompt, word = tasks.TASKS['reverse'].make(random.Random(3), 'train')
  assert _winner(word_prompt, ('dunno at all', True), ('dunno', True))[0] == 'dunno'
  assert _winner(prompt, (f'{answer}!', True), (answer, True))[0] == answer
  # identical texts are ties: one pair among three samples with two distinct texts
  assert comp.label_samples(prompt, [(answer, True)] * 3, random.Random(0), 0.5) == []
  pairs = comp.label_samples(prompt, [(wrong, True), (answer, True), (wrong, False)],
                             random.Random(0), 0.0)
  assert pairs == [(1, 0)]
  keys = [comp.labeler_key(prompt, t, f) for t, f in ((answer, True), (wrong, True))]
  assert keys[0] > keys[1] and keys[0] == (True, True, True, -len(answer))


def test_labeler_ties_coin_and_flip_fraction():
  prompts = [tasks.TASKS['add'].make(random.Random(i), 'train') for i in range(40)]
  samples = [(p, [(a, True), (str(int(a) + 1), True)]) for p, a in prompts]

  def run(seed, n=4000, flip=0.05):
    rng = random.Random(seed)
    return [comp.label_samples(p, s, rng, flip)[0] for p, s in
            (samples[i % len(samples)] for i in range(n))]

  labels = run(7)
  flipped = sum(pair == (1, 0) for pair in labels) / len(labels)
  assert abs(flipped - 0.05) < 0.015
  assert run(7) == labels and run(8) != labels
  # equal keys (two wrong answers of one length) are a tie, or with 'coin' a fair coin
  rng = random.Random(0)
  p, a = prompts[0]
  assert comp.label_samples(p, [('1', True), ('2', True)], rng, 0.0) == []
  ties = [comp.label_samples(p, [('1', True), ('2', True)], rng, 0.0, 'coin')
          for _ in range(2000)]
  assert abs(sum(t == [(0, 1)] for t in ties) / 2000 - 0.5) < 0.05
  with pytest.raises(ValueError, match='tie_break'):
    comp.label_samples(p, samples[0][1], rng, 0.0, 'dice')
  with pytest.raises(ValueError, match='flip_fraction'):
    comp.label_samples(p, samples[0][1], rng, 1.5)


def test_comparisons_from_samples():
  prompt, answer = tasks.TASKS['uppercase'].make(random.Random(2), 'train')
  out = comp.comparisons_from_samples(
      prompt, 'uppercase', [(f' {answer}', True), ('  ', True), (answer, False),
                            ('nope', True)], random.Random(0), 0.0, 'p0')
  # ' X' and 'X' are one text after stripping (a tie); the blank one is left out
  assert [(c.chosen, c.rejected) for c in out] == [(answer, 'nope')]
  assert out[0].prompt == _user(prompt) and out[0].group == 'p0' and out[0].task == 'uppercase'


# ----------------------------------------------------------------------------- tokens

def test_encode_reply_reward_token_and_left_truncation(tok):
  prompt = ({'role': 'system', 'content': 'Be brief and kind to everyone.'},
            {'role': 'user', 'content': 'What is 23 + 45? Please answer with a number.'})
  reply = '68'
  full = tok.chat.render(list(prompt) + [{'role': 'assistant', 'content': reply}])[0]
  ids, cut = reward.encode_reply(prompt, reply, tok, 200, 'truncate')
  assert ids == full + [tok.reward_id] and not cut
  assert ids[-2:] == [tok.end_of_turn_id, tok.reward_id]
  reply_part = [tok.role_id('assistant'), *tok.encode(reply, allow_special=False),
                tok.end_of_turn_id, tok.reward_id]
  n = len(reply_part) + 3
  ids, cut = reward.encode_reply(prompt, reply, tok, n, 'truncate')
  assert cut and ids == (full + [tok.reward_id])[-n:] and ids[-len(reply_part):] == reply_part
  assert reward.encode_reply(prompt, reply, tok, n, 'drop') == (None, False)
  assert reward.encode_reply(prompt, reply, tok, len(reply_part) - 1, 'truncate') == (None, False)
  assert reward.encode_reply(prompt, reply, tok, len(reply_part), 'truncate')[0] == reply_part


def test_long_pairs_truncated_or_dropped_and_counted(tok):
  long_prompt = _user('Hello there! How are you doing today? ' * 6)
  data = [comp.Comparison(long_prompt, 'Fine.', 'Bad.', group='a'),
          comp.Comparison(long_prompt, 'Fine.', 'word ' * 60, group='b'),
          comp.Comparison(_user('Hi'), 'Yo.', 'Hey.', group='c')]
  d = reward.make_reward_data(_cfg(seq_len=24), tok, data, [])
  assert {k: d.stats[k] for k in ('too_long', 'truncated', 'dropped', 'train_pairs')} == {
      'too_long': 2, 'truncated': 1, 'dropped': 1, 'train_pairs': 2}
  cfg = _cfg(seq_len=24)
  cfg.reward.on_long_row = 'drop'
  d = reward.make_reward_data(cfg, tok, data, [])
  assert (d.stats['dropped'], d.stats['train_pairs']) == (2, 1)
  with pytest.raises(ValueError, match='no training pair'):
    reward.make_reward_data(cfg, tok, data[:2], [])


# ----------------------------------------------------------------------------- batches

_SIZES = [1, 3, 6, 6, 2, 10, 1, 4, 6, 5, 3, 1]   # 10 > B = 8: split into 8 + 2


def _check_batch(b, tok, B, T):
  assert {k: (v.shape, v.dtype) for k, v in b.items()} == {
      'tokens': ((B, 2, T), np.int32), 'positions': ((B, 2, T), np.int32),
      'segment_ids': ((B, 2, T), np.int32), 'readout': ((B, 2), np.int32),
      'margin': ((B,), np.float32), 'weight': ((B,), np.float32)}
  for r in range(B):
    for s in (0, 1):
      n = int(b['segment_ids'][r, s].sum())
      np.testing.assert_array_equal(b['segment_ids'][r, s], np.arange(T) < n)
      np.testing.assert_array_equal(b['positions'][r, s], np.where(np.arange(T) < n,
                                                                   np.arange(T), 0))
      assert (b['tokens'][r, s, n:] == tok.pad_id).all()
      assert b['readout'][r, s] == n - 1
      if b['weight'][r] > 0:
        assert b['tokens'][r, s, n - 1] == tok.reward_id
        assert b['tokens'][r, s, n - 2] == tok.end_of_turn_id
      else:  # padding pair: one pad token, read at 0
        assert n == 1 and b['tokens'][r, s, 0] == tok.pad_id and b['margin'][r] == 0


def test_batches_keep_groups_together_and_weigh_groups(tok):
  data = reward.make_reward_data(_cfg(), tok, _groups(_SIZES), [])
  stats = data.stats
  assert (stats['train_pairs'], stats['train_groups'], stats['split_groups']) == (
      sum(_SIZES), len(_SIZES), 1)
  epochs = []
  for epoch in range(2):
    batches = [next(data.train_iter)]
    while data.train_iter.get_state()['epoch'] == epoch:
      batches.append(next(data.train_iter))
    if epoch == 0:
      assert len(batches) == stats['train_batches']
    where = collections.defaultdict(collections.Counter)  # group -> batch -> pairs
    total = 0.0
    for k, b in enumerate(batches):
      _check_batch(b, tok, 8, 40)
      for r in np.nonzero(b['weight'])[0]:
        g = int(b['margin'][r])
        where[g][k] += 1
        assert b['weight'][r] == pytest.approx(1 / _SIZES[g])
      total += b['weight'].sum()
    assert total == pytest.approx(len(_SIZES))   # every group weighs 1 per epoch
    for g, n in enumerate(_SIZES):
      assert sorted(where[g].values()) == ([2, 8] if n > 8 else [n])
    epochs.append([b['margin'].tolist() for b in batches])
  assert epochs[0] != epochs[1]                  # a new order every epoch


def test_pack_groups_first_fit():
  groups = [np.arange(a, b) for a, b in ((0, 5), (5, 9), (9, 12), (12, 13), (13, 23))]
  plan = reward.pack_groups(groups, [0, 1, 2, 3, 4], 8)
  # 5 -> batch 0; 4 -> batch 1 (3 left in 0); 3 -> batch 0; 1 -> batch 1; 10 -> 8 + 2 (batch 1)
  assert [p.tolist() for p in plan] == [
      [0, 1, 2, 3, 4, 9, 10, 11], [5, 6, 7, 8, 12, 21, 22, -1],
      [13, 14, 15, 16, 17, 18, 19, 20]]


def test_deterministic_and_resumable(tok):
  cfg = _cfg()
  data = reward.make_reward_data(cfg, tok, _groups(_SIZES), [])
  n = data.stats['train_batches']
  for take in (3, n - 1):   # mid-epoch, and a state whose next batches cross into epoch 1
    it = reward.make_reward_data(cfg, tok, _groups(_SIZES), []).train_iter
    for _ in range(take):
      next(it)
    state = json.loads(json.dumps(it.get_state()))
    want = [next(it) for _ in range(3)]
    fresh = reward.make_reward_data(cfg, tok, _groups(_SIZES), []).train_iter
    fresh.set_state(state)
    for a, b in zip(want, [next(fresh) for _ in range(3)]):
      for k in a:
        np.testing.assert_array_equal(a[k], b[k])
  other = reward.make_reward_data(cfg, tok, _groups(_SIZES[:-1]), []).train_iter
  with pytest.raises(ValueError, match='same comparison data'):
    other.set_state(state)
  reseeded = reward.make_reward_data(_cfg(seed=1), tok, _groups(_SIZES), []).train_iter
  assert ([next(reseeded)['margin'].tolist() for _ in range(n)] !=
          [next(data.train_iter)['margin'].tolist() for _ in range(n)])


def test_two_processes_split_each_global_batch(tok):
  cfg, train, val = _cfg(), _groups(_SIZES), _groups([3, 4, 6, 2], seed=1)
  one = reward.make_reward_data(cfg, tok, train, val)
  two = [reward.make_reward_data(cfg, tok, train, val, process_index=p, process_count=2)
         for p in (0, 1)]
  assert two[0].local_batch == 4 and one.local_batch == 8
  for _ in range(one.stats['train_batches'] + 2):
    whole, halves = next(one.train_iter), [next(d.train_iter) for d in two]
    for k in whole:
      np.testing.assert_array_equal(whole[k], np.concatenate([h[k] for h in halves]))
  vals = [d.val_batches(10) for d in two]
  assert len(vals[0]) == len(vals[1]) == len(one.val_batches(10)) == 2
  for whole, h0, h1 in zip(one.val_batches(10), *vals):
    for k in whole:
      np.testing.assert_array_equal(whole[k], np.concatenate([h0[k], h1[k]]))


def test_val_batches_fixed_order_and_padded(tok):
  val = _groups([3, 4, 6, 2], seed=1)         # 15 pairs: 8 + 7 and one padding pair
  data = reward.make_reward_data(_cfg(), tok, _groups([2]), val)
  batches = data.val_batches(10)
  assert len(batches) == 2 and len(data.val_batches(1)) == 1
  np.testing.assert_array_equal(data.val_batches(1)[0]['tokens'], batches[0]['tokens'])
  assert data.heldout == val and data.stats['val_groups'] == 4
  margins = np.concatenate([b['margin'] for b in batches])
  weights = np.concatenate([b['weight'] for b in batches])
  np.testing.assert_array_equal(margins[:15], [c.margin for c in data.heldout])
  assert weights[15] == 0 and weights.sum() == pytest.approx(4.0)
  for b in batches:
    _check_batch(b, tok, 8, 40)


# ----------------------------------------------------------------------------- files

def test_split_by_group_hash():
  data = _groups([2, 3, 1] * 100)
  train, heldout = reward.split_comparisons(data, 0.2)
  assert len(train) + len(heldout) == len(data)
  assert not {c.group for c in train} & {c.group for c in heldout}
  assert 30 < len({c.group for c in heldout}) < 90
  shuffled = list(data)
  random.Random(0).shuffle(shuffled)
  train2, heldout2 = reward.split_comparisons(shuffled, 0.2)
  assert {c.group for c in heldout2} == {c.group for c in heldout}
  assert reward.split_comparisons(data, 0.0) == (data, [])
  with pytest.raises(ValueError, match='val_fraction'):
    reward.split_comparisons(data, 1.0)


def test_load_comparison_files(tmp_path):
  os.makedirs(tmp_path / 'd')
  comp.write_comparisons(str(tmp_path / 'd' / 'a.jsonl'), _groups([2, 3] * 20))
  _write(tmp_path / 'd' / 'b.jsonl', [{'prompt': 'p', 'chosen': 'a', 'rejected': 'b'}, '{'])
  cfg = _cfg()
  cfg.reward.data = f"{tmp_path / 'd'}"
  cfg.reward.val_fraction = 0.3
  with pytest.raises(BadRowError, match='b.jsonl:2: '):
    reward.load_comparison_files(cfg)
  cfg.reward.on_bad_row = 'skip'
  train, heldout, counts = reward.load_comparison_files(cfg)
  assert counts['bad_rows'] == 1 and counts['pairs'] == 101 == len(train) + len(heldout)
  assert heldout and not {c.group for c in train} & {c.group for c in heldout}
  cfg.reward.data = f"{tmp_path / 'd' / 'a.jsonl'}, {tmp_path / 'nothing*.jsonl'}"
  with pytest.raises(ValueError, match=r'config\.reward\.data: .*nothing'):
    reward.load_comparison_files(cfg)


def test_iterator_saved_and_restored_by_the_checkpointer(tmp_path, tok):
  """The stage saves the iterator with grain.checkpoint.CheckpointSave (jaxgpt.train.checkpoint)."""
  from jaxgpt.train import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  cfg, train = _cfg(), _groups(_SIZES)
  it = reward.make_reward_data(cfg, tok, train, []).train_iter
  for _ in range(5):
    next(it)
  state = {'step': np.zeros((), np.int32)}
  ckpt = ckpt_lib.Checkpointer(str(tmp_path / 'ckpt'), async_save=False)
  ckpt.save(5, state, it, {'stage': 'reward'})
  want = next(it)
  fresh = reward.make_reward_data(cfg, tok, train, []).train_iter
  ckpt.restore(5, state, fresh)
  ckpt.close()
  got = next(fresh)
  for k in want:
    np.testing.assert_array_equal(want[k], got[k])
