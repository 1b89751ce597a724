"""One reward layout everywhere: `... <|assistant|> reply [<|end|> if finished] <|reward|>`.

The reward stage trains on it, PPO's rollouts are scored in it, and every scoring path
(evaluation, best-of-N, the CLI) scores in it; the finished flags survive the comparison
files; score_stats are over distinct held-out samples.
"""

import json
import random
import types

import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from jaxgpt import config as config_lib
from jaxgpt import model as model_lib
from jaxgpt import sharding
from jaxgpt.data import reward, tasks
from jaxgpt.data import comparisons as comp
from jaxgpt.data.jsonl import BadRowError
from jaxgpt.data.tokenizer import train_tokenizer
from jaxgpt.evals import best_of_n
from jaxgpt.inference import scoring
from jaxgpt.rl import rollout
from jaxgpt.stages import preference_data
from jaxgpt.stages import reward as reward_stage

_TEXT = ['Hello there! How are you doing today? I think it is fine, thank you.',
         *[f'{ex.prompt} {ex.answer}' for ex in tasks.sample_examples('train', 300, seed=0)]]


@pytest.fixture(scope='module')
def tok(tmp_path_factory):
  return train_tokenizer(_TEXT * 3, str(tmp_path_factory.mktemp('tok') / 'tok.model'), 400)


@pytest.fixture(scope='module')
def rm():
  """A random tiny reward model on one device: (graphdef, params, mcfg)."""
  cfg = helpers.tiny_config(vocab=512)
  mcfg = model_lib.ModelConfig.for_stage(cfg, 'reward')
  mesh = sharding.make_mesh(cfg, helpers.devices_for((1, 1, 1)))
  params = helpers.place(helpers.random_params(mcfg, seed=3), mcfg, mesh)
  return model_lib.abstract_model(mcfg)[0], params, mcfg


def _cfg(seq_len=40):
  cfg = config_lib.base_config()
  cfg.reward.batch_size, cfg.reward.seq_len = 8, seq_len
  return cfg


def _user(text):
  return ({'role': 'user', 'content': text},)


def _write(path, rows):
  with open(path, 'w') as f:
    for r in rows:
      f.write((r if isinstance(r, str) else json.dumps(r)) + '\n')
  return str(path)


def _body(text, tok):
  return tok.encode(text, allow_special=False, after_special=True)


def _ppo_ids(prompt_ids, response_ids, budget, tok):
  """What PPO's reward model reads for one rollout: `rollout.assemble`, up to `<|reward|>`."""
  pad = 3  # prompts are right-padded in a batch
  prompt_bp = np.full((1, len(prompt_ids) + pad), tok.pad_id, np.int32)
  prompt_bp[0, :len(prompt_ids)] = prompt_ids
  response_bn = np.full((1, budget), tok.pad_id, np.int32)
  response_bn[0, :len(response_ids)] = response_ids
  tokens_bw, _, readout_b = rollout.assemble(
      jnp.asarray(prompt_bp), jnp.asarray([len(prompt_ids)]), jnp.asarray(response_bn),
      jnp.asarray([len(response_ids)]), tok.reward_id, tok.pad_id)
  return np.asarray(tokens_bw)[0, :int(readout_b[0]) + 1].tolist()


# ----------------------------------------------------------------------------- layout

def test_reward_training_ids_equal_ppo_rollout_ids(tmp_path, tok):
  prompt, answer = tasks.TASKS['add'].make(random.Random(0), 'train')
  cut_ids = _body('I think it is', tok)  # a sampled reply that ran out of its budget
  budget = len(cut_ids)
  done_ids = _body(answer, tok) + [tok.end_of_turn_id]
  assert len(done_ids) <= budget
  sampled = [done_ids, cut_ids]
  # The sampler's (text, finished) of each: what sampling.generate hands the labeler.
  replies = [tok.chat.reply(ids) for ids in sampled]
  assert replies == [(answer, True), ('I think it is', False)]
  pairs = comp.comparisons_from_samples(prompt, 'add', replies, random.Random(0), 0.0, 'g')
  assert [(c.chosen, c.chosen_finished, c.rejected, c.rejected_finished) for c in pairs] == [
      (answer, True, 'I think it is', False)]
  path = str(tmp_path / 'comparisons.jsonl')
  comp.write_comparisons(path, pairs)              # the stage reuses what it wrote
  pairs = comp.read_comparisons([path])[0]
  batch = reward.make_reward_data(_cfg(), tok, pairs, pairs).val_batches(1)[0]
  prompt_ids = tok.chat.prompt(list(_user(prompt)))
  for side, ids in enumerate(sampled):
    n = int(batch['segment_ids'][0, side].sum())
    trained = batch['tokens'][0, side, :n].tolist()
    assert trained == _ppo_ids(prompt_ids, ids, budget, tok)
    assert batch['readout'][0, side] == n - 1 and trained[-1] == tok.reward_id
  done, cut = (batch['tokens'][0, s, :int(batch['segment_ids'][0, s].sum())].tolist()
               for s in (0, 1))
  assert done[-2:] == [tok.end_of_turn_id, tok.reward_id]
  assert cut[-2] != tok.end_of_turn_id and cut.count(tok.end_of_turn_id) == 1  # the prompt's
  # encode_reply is the one encoder (the scoring paths use it too).
  assert reward.encode_reply(_user(prompt), 'I think it is', tok, 40, 'truncate', False) == (
      cut, False)


def test_encode_reply_cut_reply_truncates_the_prompt_only(tok):
  prompt = _user('Hello there! How are you doing today? ' * 3)
  reply_part = [tok.role_id('assistant'), *_body('I think it is', tok), tok.reward_id]
  ids, cut = reward.encode_reply(prompt, 'I think it is', tok, len(reply_part) + 2, 'truncate',
                                 finished=False)
  assert cut and ids[-len(reply_part):] == reply_part and len(ids) == len(reply_part) + 2
  assert reward.encode_reply(prompt, 'I think it is', tok, len(reply_part), 'truncate',
                             False)[0] == reply_part
  assert reward.encode_reply(prompt, 'I think it is', tok, len(reply_part) - 1, 'truncate',
                             False) == (None, False)


def test_score_replies_omits_end_for_cut_replies(tok, rm):
  graphdef, params, mcfg = rm
  prompt = _user('Hi')
  base = tok.chat.prompt(list(prompt)) + _body('Hello there', tok)
  want = scoring.score_ids(graphdef, params, mcfg,
                           [base + [tok.end_of_turn_id, tok.reward_id], base + [tok.reward_id]],
                           pad_id=tok.pad_id)
  got = scoring.score_replies(graphdef, params, mcfg, tok,
                              [(prompt, 'Hello there'), (prompt, 'Hello there', False),
                               (prompt, 'Hello there', True)], seq_len=32)
  np.testing.assert_allclose(got, [want[0], want[1], want[0]], rtol=1e-5, atol=1e-6)
  assert abs(want[0] - want[1]) > 1e-6  # the two layouts are different sequences


def test_best_of_n_scores_samples_with_their_finished_flag(tok, monkeypatch):
  eval_set = tasks.heldout_eval_set(1, seed=0)[:1]
  cut_ids = _body('I think it is', tok)
  monkeypatch.setattr(best_of_n.samples_lib, 'draw', lambda *a, **k: [
      (_body('7', tok) + [tok.end_of_turn_id], None), (cut_ids, None)])
  seen = []

  def fake_score(graphdef, params, mcfg, tokenizer, items, **kw):
    seen.extend(items)
    return np.zeros(len(items), np.float32)

  monkeypatch.setattr(best_of_n.scoring, 'score_replies', fake_score)
  rm = types.SimpleNamespace(graphdef=None, params=None, mcfg=None)
  got = best_of_n.sample_scored(None, rm, tok, eval_set, 2, n_new=len(cut_ids), seed=0,
                                rm_len=40)
  question = [{'role': 'user', 'content': eval_set[0].prompt}]
  assert seen == [(question, '7', True), (question, 'I think it is', False)]
  assert got.finished == [True, False]


# ----------------------------------------------------------------------------- files

def test_finished_fields_parse_and_round_trip(tmp_path):
  rows = [
      {'prompt': 'p', 'chosen': 'a', 'rejected': 'b', 'rejected_finished': False},
      {'prompt': 'p', 'chosen': 'a', 'rejected': 'a', 'chosen_finished': True,
       'rejected_finished': False},                       # same text, cut: another reply
      {'chosen': '\n\nHuman: hi\n\nAssistant: yo', 'rejected': '\n\nHuman: hi\n\nAssistant: y',
       'chosen_finished': False},
      {'prompt': 'q', 'responses': ['x', 'y', 'x'], 'ranking': [1, 2, 3],
       'responses_finished': [True, True, False]},
      {'prompt': 'r', 'responses': ['x', 'y'], 'ranking': [2, 1]},
  ]
  path = _write(tmp_path / 'f.jsonl', rows)
  out, counts = comp.read_comparisons([path])
  assert counts['bad_rows'] == 0
  got = [(c.chosen, c.chosen_finished, c.rejected, c.rejected_finished) for c in out]
  assert got == [('a', True, 'b', False), ('a', True, 'a', False), ('yo', False, 'y', True),
                 ('x', True, 'y', True), ('x', True, 'x', False), ('y', True, 'x', False),
                 ('y', True, 'x', True)]
  again = str(tmp_path / 'again.jsonl')
  comp.write_comparisons(again, out)
  assert comp.read_comparisons([again])[0] == out
  with open(again) as f:
    written = [json.loads(line) for line in f]
  # Only a cut side is written (finished rows look as before).
  assert [{k for k in r if k.endswith('_finished')} for r in written] == [
      {'rejected_finished'}, {'rejected_finished'}, {'chosen_finished'}, set(),
      {'rejected_finished'}, {'rejected_finished'}, set()]
  assert all(r[k] is False for r in written for k in r if k.endswith('_finished'))


_BAD_FINISHED = [
    ('bad_finished', {'prompt': 'p', 'chosen': 'a', 'rejected': 'b', 'chosen_finished': 'no'}),
    ('bad_finished', {'prompt': 'p', 'chosen': 'a', 'rejected': 'b', 'rejected_finished': 0}),
    ('bad_finished', {'chosen': '\n\nHuman: hi\n\nAssistant: a',
                      'rejected': '\n\nHuman: hi\n\nAssistant: b', 'rejected_finished': None}),
    ('bad_finished', {'prompt': 'p', 'responses': ['a', 'b'], 'ranking': [1, 2],
                      'responses_finished': True}),
    ('bad_finished', {'prompt': 'p', 'responses': ['a', 'b'], 'ranking': [1, 2],
                      'responses_finished': [True, 1]}),
    ('finished_length', {'prompt': 'p', 'responses': ['a', 'b'], 'ranking': [1, 2],
                         'responses_finished': [True]}),
    ('identical', {'prompt': 'p', 'chosen': 'a', 'rejected': 'a', 'chosen_finished': False,
                   'rejected_finished': False}),
    ('identical', {'prompt': 'p', 'responses': ['a', 'a'], 'ranking': [1, 2],
                   'responses_finished': [False, False]}),
]


@pytest.mark.parametrize('kind,row', _BAD_FINISHED,
                         ids=[f'{k}{i}' for i, (k, _) in enumerate(_BAD_FINISHED)])
def test_bad_finished_fields_name_file_and_line(tmp_path, kind, row):
  good = {'prompt': 'p', 'chosen': 'a', 'rejected': 'b'}
  path = _write(tmp_path / 'bad.jsonl', [good, row])
  with pytest.raises(BadRowError, match=f'^{path}:2: ') as e:
    comp.read_comparisons([path])
  assert e.value.kind == kind
  out, counts = comp.read_comparisons([path], on_bad_row='skip')
  assert len(out) == 1 and counts['bad_rows_by_kind'] == {kind: 1}


# ----------------------------------------------------------------------------- score stats

def test_score_stats_over_distinct_samples(tmp_path, tok, rm):
  graphdef, params, mcfg = rm
  p, q = _user('Hi'), _user('What is 2 + 3?')
  drawn = [(p, 'Hello there', True), (p, 'Hello there', True), (p, 'Hello there', False),
           (q, 'Hello there', True), (p, 'I think it is', True), (q, '5', True), (q, '5', True)]
  samples = preference_data.distinct_samples(drawn)
  assert samples == [(p, 'Hello there', True), (p, 'Hello there', False),
                     (q, 'Hello there', True), (p, 'I think it is', True), (q, '5', True)]
  stats = reward_stage.score_stats(graphdef, params, mcfg, tok, samples, 32)
  want = scoring.score_replies(graphdef, params, mcfg, tok, samples, seq_len=32)
  assert stats['n'] == 5
  assert stats['mean'] == pytest.approx(float(want.mean()), rel=1e-5, abs=1e-6)
  assert stats['std'] == pytest.approx(float(want.std()), rel=1e-5, abs=1e-6)
  assert reward_stage.score_stats(graphdef, params, mcfg, tok, samples[:1], 32) == {}
  # The user's pairs: each distinct side once, however many pairs it is in.
  pairs = [comp.Comparison(q, '5', '6'), comp.Comparison(q, '5', '7'),
           comp.Comparison(q, '6', '7', rejected_finished=False)]
  assert preference_data.pair_sides(pairs) == [(q, '5', True), (q, '6', True), (q, '7', True),
                                            (q, '7', False)]
  # The embedded stage keeps its held-out samples in a file it reads back on a re-run.
  path = str(tmp_path / preference_data.SAMPLES_FILE)
  multi = ({'role': 'system', 'content': 'Be brief.'}, *p)
  preference_data.write_samples(path, samples + [(multi, 'Yo', False)])
  assert preference_data.read_samples(path) == samples + [(multi, 'Yo', False)]
  _write(path, [{'prompt': 'p', 'response': 'a', 'finished': True},
                {'prompt': 'p', 'response': 'a', 'finished': 'yes'}])
  with pytest.raises(BadRowError, match=f'^{path}:2: '):
    preference_data.read_samples(path)
