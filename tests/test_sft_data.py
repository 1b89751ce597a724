"""SFT data: strict JSONL parsing, long-row policy, packing/padding, weights, sharding."""

import json

import numpy as np
import pytest

from jaxgpt import config as config_lib
from jaxgpt.data import conversations, sft, tasks
from jaxgpt.data.tokenizer import train_tokenizer

_TEXT = ['Hello there! How are you doing today? I am doing well, thank you.',
         *[f'{ex.prompt} {ex.answer}' for ex in tasks.sample_examples('train', 300, seed=0)]]


@pytest.fixture(scope='module')
def tok(tmp_path_factory):
  return train_tokenizer(_TEXT * 3, str(tmp_path_factory.mktemp('tok') / 'tok.model'), 400)


def _cfg(tmp_path, *, seq_len=48, batch_size=4, **sft_fields):
  cfg = config_lib.base_config()
  cfg.data.seq_len = seq_len
  cfg.data.tfds_dir = str(tmp_path / 'tfds')
  cfg.train.batch_size = batch_size
  for k, v in sft_fields.items():
    cfg.sft[k] = v
  return cfg


def _write(path, rows):
  with open(path, 'w') as f:
    for r in rows:
      f.write((r if isinstance(r, str) else json.dumps(r)) + '\n')
  return str(path)


def _good_rows(n, seed=0):
  rows = [{'prompt': ex.prompt, 'response': ex.answer}
          for ex in tasks.sample_examples('train', n, seed)]
  rows[::5] = [{'messages': [
      {'role': 'system', 'content': 'Be brief.'},
      {'role': 'user', 'content': f'Hello number {i}'},
      {'role': 'assistant', 'content': 'Hi there!'},
      {'role': 'user', 'content': 'How are you?'},
      {'role': 'assistant', 'content': f'Doing well, {i}.'}]} for i in range(len(rows[::5]))]
  return rows


def _mask_of(full, tok):
  """Independent reading of a token sequence: 1 inside assistant turns (content + end)."""
  out, inside = [], False
  for t in full:
    if t == tok.role_id('assistant'):
      out.append(0)
      inside = True
      continue
    if t in (tok.role_id('user'), tok.role_id('system')):
      inside = False
    out.append(int(inside))
    if inside and t == tok.end_of_turn_id:
      inside = False
  return out


def _segments(batch):
  """Yield (row, segment id, inputs, targets, weights, positions) per packed segment."""
  for r in range(batch['inputs'].shape[0]):
    seg = batch['segment_ids'][r]
    for s in sorted(set(seg[seg > 0].tolist())):
      idx = np.nonzero(seg == s)[0]
      yield (r, s, batch['inputs'][r, idx], batch['targets'][r, idx],
             batch['weights'][r, idx], batch['positions'][r, idx], idx)


def _check_batch(batch, tok, cfg, local_batch):
  T = cfg.data.seq_len
  assert set(batch) == {'inputs', 'targets', 'weights', 'segment_ids', 'positions'}
  for k, dt in (('inputs', np.int32), ('targets', np.int32), ('weights', np.float32),
                ('segment_ids', np.int32), ('positions', np.int32)):
    assert batch[k].shape == (local_batch, T) and batch[k].dtype == dt, k
  pad = batch['segment_ids'] == 0
  assert not batch['weights'][pad].any()
  n = 0
  for _, _, inp, tgt, w, pos, idx in _segments(batch):
    n += 1
    assert (np.diff(idx) == 1).all()                     # a segment is contiguous
    np.testing.assert_array_equal(pos, np.arange(len(idx)))  # positions restart at 0
    np.testing.assert_array_equal(inp[1:], tgt[:-1])     # targets stay inside the segment
    assert inp[0] in (tok.role_id('system'), tok.role_id('user'))  # a conversation starts
    full = [int(inp[0]), *tgt.tolist()]
    np.testing.assert_array_equal(w, _mask_of(full, tok)[1:])
    assert w.any()
  return n


def test_bad_rows_error_names_file_and_line(tmp_path, tok):
  cases = {
      'bad_json': '{"prompt": "hi", "response": ',
      'missing_field': {'prompt': 'hi'},
      'unknown_role': {'messages': [{'role': 'bot', 'content': 'x'},
                                    {'role': 'assistant', 'content': 'y'}]},
      'empty_assistant': {'messages': [{'role': 'user', 'content': 'x'},
                                       {'role': 'assistant', 'content': '  '}]},
  }
  extra = {
      'missing_field': [{'messages': [{'role': 'user'}]}, {'text': 'x'}],
      'bad_type': ['[1, 2]', {'prompt': 'a', 'response': 5}],
      'no_assistant': [{'messages': [{'role': 'user', 'content': 'x'}]}],
  }
  messages = {'bad_json': 'bad JSON', 'missing_field': 'missing field',
              'unknown_role': "unknown role 'bot'", 'empty_assistant': 'empty assistant turn',
              'bad_type': 'expected a JSON object|must be a string',
              'no_assistant': 'no assistant turn'}
  all_cases = [(k, v) for k, v in cases.items()] + [(k, v) for k, vs in extra.items() for v in vs]
  for i, (kind, bad) in enumerate(all_cases):
    path = _write(tmp_path / f'bad{i}.jsonl', [*_good_rows(3), '', bad, *_good_rows(2)])
    with pytest.raises(sft.BadRowError, match=messages[kind]) as e:
      sft.read_jsonl([path], 'error')
    assert str(e.value).startswith(f'{path}:5: '), str(e.value)   # the blank line counts
    assert e.value.kind == kind and e.value.line == 5
  # The same through the whole pipeline, as a plain ValueError.
  path = _write(tmp_path / 'bad.jsonl', [*_good_rows(4), cases['unknown_role']])
  with pytest.raises(ValueError, match=f'{path}:5: '):
    sft.make_sft_data(_cfg(tmp_path, data=path), tok)


def test_bad_rows_skipped_and_counted(tmp_path, tok):
  good = _good_rows(30)
  rows = [*good[:10], '{oops', {'prompt': 'p'}, *good[10:20],
          {'messages': [{'role': 'robot', 'content': 'x'}, {'role': 'assistant', 'content': 'y'}]},
          {'prompt': 'p', 'response': ''}, {'messages': [{'role': 'user', 'content': 'a'},
                                                         {'role': 'assistant', 'content': ''}]},
          *good[20:]]
  path = _write(tmp_path / 'mixed.jsonl', rows)
  data = sft.make_sft_data(_cfg(tmp_path, data=path, on_bad_row='skip', val_fraction=0.0), tok)
  s = data.stats
  assert s['rows_read'] == 35 and s['bad_rows'] == 5 and s['rows'] == 30
  assert s['bad_rows_by_kind'] == {'bad_json': 1, 'missing_field': 1, 'unknown_role': 1,
                                   'empty_assistant': 2}
  assert s['train_rows'] == 30 and s['val_rows'] == 0
  _check_batch(next(data.train_iter), tok, _cfg(tmp_path), 4)


@pytest.mark.parametrize('policy', ['truncate', 'drop'])
def test_long_rows_truncated_or_dropped_and_counted(tmp_path, tok, policy):
  long_reply = ' '.join(['hello there'] * 40)
  rows = _good_rows(20) + [{'prompt': 'Say hello many times.', 'response': long_reply}] * 3
  # A row whose user turn alone fills the context: truncation would leave no target.
  rows += [{'prompt': long_reply, 'response': 'ok'}]
  path = _write(tmp_path / 'long.jsonl', rows)
  cfg = _cfg(tmp_path, seq_len=64, data=path, on_long_row=policy, val_fraction=0.0,
             packing=False)
  lengths = [len(tok.chat.render(sft.normalize_row(r))[0]) for r in rows]
  assert max(lengths[:20]) <= 65 < min(lengths[20:])
  data = sft.make_sft_data(cfg, tok)
  s = data.stats
  assert s['too_long'] == 4
  if policy == 'truncate':
    assert (s['truncated'], s['dropped'], s['train_rows']) == (3, 1, 23)
  else:
    assert (s['truncated'], s['dropped'], s['train_rows']) == (0, 4, 20)
  full_rows = 0
  for _ in range(8):
    b = next(data.train_iter)
    _check_batch(b, tok, cfg, 4)
    full_rows += int((b['segment_ids'] == 1).all(axis=1).sum())
  assert (full_rows > 0) == (policy == 'truncate')


def test_packing_keeps_conversations_apart(tmp_path, tok):
  path = _write(tmp_path / 'a.jsonl', _good_rows(60))
  cfg = _cfg(tmp_path, seq_len=64, data=path, packing=True, val_fraction=0.1)
  data = sft.make_sft_data(cfg, tok)
  segments = 0
  for _ in range(6):
    segments += _check_batch(next(data.train_iter), tok, cfg, 4)
  assert segments > 6 * 4  # several conversations a row
  vb = data.val_batches(100)
  assert 0 < len(vb) < 100 and vb is data.val_batches(100)
  assert sum(_check_batch(b, tok, cfg, 4) for b in vb) == data.stats['val_rows']
  assert sum(float(b['weights'].sum()) for b in vb) == data.stats['val_target_tokens']


def test_padding_one_conversation_a_row(tmp_path, tok):
  path = _write(tmp_path / 'a.jsonl', _good_rows(30))
  cfg = _cfg(tmp_path, data=path, packing=False)
  data = sft.make_sft_data(cfg, tok)
  for _ in range(4):
    b = next(data.train_iter)
    _check_batch(b, tok, cfg, 4)
    assert set(np.unique(b['segment_ids']).tolist()) <= {0, 1}
    assert (b['segment_ids'][:, 0] == 1).all()
    assert (b['inputs'][b['segment_ids'] == 0] == tok.pad_id).all()


def test_deterministic_and_resumable(tmp_path, tok):
  path = _write(tmp_path / 'a.jsonl', _good_rows(40))
  cfg = _cfg(tmp_path, data=path)
  a = sft.make_sft_data(cfg, tok)
  first = [next(a.train_iter) for _ in range(5)]
  state = a.train_iter.get_state()
  later = [next(a.train_iter) for _ in range(5)]
  b = sft.make_sft_data(cfg, tok)
  for x, y in zip(first, [next(b.train_iter) for _ in range(5)]):
    np.testing.assert_array_equal(x['inputs'], y['inputs'])
  c = sft.make_sft_data(cfg, tok)
  c.train_iter.set_state(json.loads(json.dumps(state)))   # the state survives JSON
  for x, y in zip(later, [next(c.train_iter) for _ in range(5)]):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_processes_split_each_epoch(tmp_path, tok):
  rows = [{'prompt': f'Hello number {i}', 'response': f'Hi {i}'} for i in range(40)]
  path = _write(tmp_path / 'a.jsonl', rows)
  cfg = _cfg(tmp_path, data=path, packing=False, val_fraction=0.0, batch_size=4)
  seen = []
  for p in range(2):
    data = sft.make_sft_data(cfg, tok, process_index=p, process_count=2)
    assert data.local_batch == 2
    convs = []
    for _ in range(10):   # 10 batches x 2 rows = half an epoch on each process
      b = next(data.train_iter)
      for r in range(2):
        convs.append(tok.decode(b['inputs'][r][b['segment_ids'][r] == 1]))
    seen.append(convs)
  assert len(set(seen[0])) == 20 and len(set(seen[1])) == 20
  assert not set(seen[0]) & set(seen[1])


def test_val_batches_same_count_on_every_process(tmp_path, tok):
  path = _write(tmp_path / 'a.jsonl', _good_rows(80))
  cfg = _cfg(tmp_path, data=path, val_fraction=0.3, batch_size=4)
  counts, weights = [], 0.0
  for p in range(2):
    data = sft.make_sft_data(cfg, tok, process_index=p, process_count=2)
    vb = data.val_batches(50)
    counts.append(len(vb))
    weights += sum(float(b['weights'].sum()) for b in vb)
    for b in vb:
      _check_batch(b, tok, cfg, 2)
    assert len(data.val_batches(1)) == 1
  assert counts[0] == counts[1] > 0
  assert weights == data.stats['val_target_tokens']


def test_embedded_source_offline(tmp_path, tok, monkeypatch):
  convs = [{'messages': [{'role': 'user', 'content': f'Hello {i}'},
                         {'role': 'assistant', 'content': f'Hi {i}!'}]} for i in range(20)]
  monkeypatch.setattr(conversations, 'chatterbot_conversations', lambda: convs)
  cfg = _cfg(tmp_path, data='embedded', task_examples=100)
  data = sft.make_sft_data(cfg, tok)
  assert data.stats['rows'] == 120
  assert data.stats['train_rows'] + data.stats['val_rows'] == 120
  _check_batch(next(data.train_iter), tok, cfg, 4)
  rows = conversations.demo_sft_rows(100, seed=0)
  assert rows == conversations.demo_sft_rows(100, seed=0)
  heldout = {ex.prompt for ex in tasks.heldout_eval_set(50)}
  assert not heldout & {r['messages'][0]['content'] for r in rows}


def test_bad_config_values(tmp_path, tok):
  with pytest.raises(ValueError, match='on_bad_row'):
    sft.make_sft_data(_cfg(tmp_path, on_bad_row='ignore'), tok)
  with pytest.raises(ValueError, match='matches no file'):
    sft.make_sft_data(_cfg(tmp_path, data=str(tmp_path / 'nothing*.jsonl')), tok)


@pytest.mark.slow
def test_chatterbot_corpus_real():
  convs = conversations.chatterbot_conversations()
  assert len(convs) > 1900
  for c in convs:
    roles = [m['role'] for m in c['messages']]
    assert roles == ['user', 'assistant'] * (len(roles) // 2) and roles
    assert all(m['content'] and m['content'] == m['content'].strip() for m in c['messages'])
  assert any(len(c['messages']) > 2 for c in convs)
  assert conversations.chatterbot_skipped() >= 1   # the entry that is a bare string
  rows = conversations.demo_sft_rows(500, seed=0)
  assert len(rows) == len(convs) + 500
  for r in rows:
    sft.normalize_row(r)
