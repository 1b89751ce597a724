"""DPO: the reply mask, the stored reference log-probs, the step on sharded meshes, step 0,
resume, and a bad comparison row."""

import json
import math
import os
import shutil

import jax
import numpy as np
import pytest

import helpers
from jaxgpt import sharding
from jaxgpt import model as model_lib
from jaxgpt import run as run_lib

from jaxgpt.data import reward as reward_data
from jaxgpt.data.comparisons import Comparison
from jaxgpt.data.tokenizer import train_tokenizer
from jaxgpt.evals import samples as samples_lib
from jaxgpt.stages import dpo
from jaxgpt.train import checkpoint as ckpt_lib
from jaxgpt.train import loop, trainer

_TEXT = ('What is 2 + 3? It is five. Which number is greater, 17 or 71? Spell cat backwards. '
         'Hello there, how are you today? I am fine, thank you. ') * 40
T = 96


@pytest.fixture(scope='module')
def tok(tmp_path_factory):
  return train_tokenizer(_TEXT, str(tmp_path_factory.mktemp('tok') / 'tok.model'), 300)


def _pairs():
  q = ({'role': 'user', 'content': 'What is 2 + 3?'},)
  multi = ({'role': 'user', 'content': 'Hello'}, {'role': 'assistant', 'content': 'Hi there'},
           {'role': 'user', 'content': 'Which number is greater, 17 or 71?'})
  return [Comparison(q, 'It is five.', 'It is six, thank you.', group='a', task='add'),
          Comparison(q, '5', 'I am fine', group='a', task='add', rejected_finished=False),
          Comparison(multi, '71', 'seventeen or so', group='b', task='larger')]


def _cfg(batch_size=4, loss='dpo'):
  cfg = helpers.tiny_config(vocab=512, batch_size=batch_size)
  cfg.dpo.seq_len, cfg.dpo.loss, cfg.model.max_seq_len = T, loss, 128
  return cfg


def test_reply_mask_marks_the_generated_reply_tokens_only(tok):
  """1 on the reply's content and its <|end|> (none for a reply cut at the limit); 0 on
  the prompt, the earlier turns, <|assistant|>, <|reward|> and padding."""
  pairs = _pairs()
  batch = reward_data.make_reward_data(_cfg(), tok, pairs, pairs, section='dpo',
                                       policy=True).val_batches(1)[0]
  for r, c in enumerate(pairs):
    for side, (reply, finished) in enumerate(((c.chosen, c.chosen_finished),
                                              (c.rejected, c.rejected_finished))):
      mask = batch['reply_mask'][r, side].astype(bool)
      ids = batch['tokens'][r, side][mask].tolist()
      want = tok.chat.render([{'role': 'assistant', 'content': reply}])[0][1:]
      assert ids == (want if finished else want[:-1])
      assert (ids[-1] == tok.end_of_turn_id) == finished
      n = int(batch['segment_ids'][r, side].sum())
      assert not mask[n - 1:].any()  # the <|reward|> and the padding after it
      assert batch['tokens'][r, side][n - 1] == tok.reward_id
  assert not batch['reply_mask'][len(pairs):].any()  # padding pairs


@pytest.fixture(scope='module')
def policy():
  """A random tiny LM on one device: (cfg, mcfg, mesh, graphdef, params)."""
  cfg = _cfg()
  mcfg = model_lib.ModelConfig.from_config(cfg)
  mesh = sharding.make_mesh(cfg, helpers.devices_for((1, 1, 1)))
  params = helpers.place(helpers.random_params(mcfg, seed=3), mcfg, mesh)
  return cfg, mcfg, mesh, model_lib.abstract_model(mcfg)[0], params


def _with_reference(tok, policy):
  """The test pairs' DPO data, the random policy as their reference."""
  cfg, _, mesh, graphdef, params = policy
  pairs = _pairs()
  return pairs, reward_data.make_reward_data(
      cfg, tok, pairs, pairs, section='dpo',
      reference_fn=dpo.reference_fn(graphdef, params, mesh, cfg.mesh.rules))


def _left_padded(batch):
  """The same pairs with the padding moved in front of each sequence."""
  out = dict(batch)
  for k in ('tokens', 'positions', 'segment_ids', 'reply_mask'):
    out[k] = np.zeros_like(batch[k])
  b, _, width = batch['tokens'].shape
  for r in range(b):
    for side in (0, 1):
      n = int(batch['segment_ids'][r, side].sum())
      for k in ('tokens', 'positions', 'segment_ids', 'reply_mask'):
        out[k][r, side, width - n:] = batch[k][r, side, :n]
  return out


def test_reply_log_probs_ignore_padding_on_either_side(tok, policy):
  cfg, _, mesh, graphdef, params = policy
  pairs = _pairs()
  batch = reward_data.make_reward_data(cfg, tok, pairs, pairs, section='dpo',
                                       policy=True).val_batches(1)[0]
  fn = dpo.reference_fn(graphdef, params, mesh, cfg.mesh.rules)
  right, left = fn(batch), fn(_left_padded(batch))
  np.testing.assert_allclose(left, right, rtol=1e-5, atol=1e-5)
  assert np.all(right[:len(pairs)] < 0) and np.all(right[len(pairs):] == 0)


def test_stored_reference_log_probs_equal_a_fresh_forward(tok, policy):
  """The log-probs kept with the data equal the sum of an independent full forward's
  (`evals.samples.response_logprobs`, prompt + response) over each reply's tokens."""
  _, mcfg, _, graphdef, params = policy
  pairs, data = _with_reference(tok, policy)
  batch = data.val_batches(1)[0]
  model = samples_lib.StageModel(graphdef, params, mcfg, {}, 0)
  prompts, replies = [], []
  for c in pairs:
    prompt = tok.chat.render(list(c.prompt), add_generation_prompt=True)[0]
    for reply, finished in ((c.chosen, c.chosen_finished), (c.rejected, c.rejected_finished)):
      ids = tok.chat.render([{'role': 'assistant', 'content': reply}])[0][1:]
      prompts.append(prompt)
      replies.append(ids if finished else ids[:-1])
  fresh = [float(lp.sum()) for lp, _ in samples_lib.response_logprobs(model, prompts, replies)]
  np.testing.assert_allclose(batch['ref_logp'][:len(pairs)].ravel(), fresh, rtol=1e-5,
                             atol=1e-4)
  # the prompts come in runs of two (chosen, rejected): each run's prompt run once, the same
  # log-probs and entropies per token
  whole = samples_lib.response_logprobs(model, prompts, replies)
  shared = samples_lib.response_logprobs(model, prompts, replies, group=2)
  for (lp, ent), (lp2, ent2), r in zip(whole, shared, replies):
    assert lp.shape == lp2.shape == (len(r),)
    np.testing.assert_allclose(lp2, lp, rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(ent2, ent, rtol=1e-5, atol=2e-5)
  train_batch = next(data.train_iter)
  assert 'ref_logp' in train_batch and 'reply_mask' in train_batch


def test_at_step_0_the_margin_is_0_and_the_loss_ln2(tok, policy):
  """The policy is its reference before the first update: every implicit reward is 0."""
  cfg, _, mesh, graphdef, params = policy
  _, data = _with_reference(tok, policy)
  batch = data.val_batches(1)[0]
  loss_fn = trainer.preference_loss_fn('dpo', beta=0.1)
  param_sh = jax.tree.map(lambda x: x.sharding, params)
  eval_step = trainer.make_eval_step(graphdef, loss_fn, param_sh, mesh, cfg.mesh.rules,
                                     list(batch))
  with jax.set_mesh(mesh):
    sums = jax.device_get(eval_step(params, loop.global_batch(batch, mesh, cfg.mesh.rules)))
  weight = float(sums['weight'])
  assert float(sums['rewards/margins']) == 0.0
  assert float(sums['rewards/chosen']) == 0.0 and float(sums['rewards/rejected']) == 0.0
  np.testing.assert_allclose(float(sums['loss']) / weight, math.log(2), rtol=1e-6)


def _dpo_batch(cfg, seed=0):
  rng = np.random.default_rng(seed)
  b = cfg.train.batch_size
  lengths = rng.integers(8, 25, size=(b, 2))
  starts = rng.integers(3, 7, size=(b, 2))
  at = np.arange(24)[None, None]
  seg = (at < lengths[..., None]).astype(np.int32)
  return {'tokens': np.where(seg > 0, rng.integers(3, cfg.model.vocab_size, (b, 2, 24)),
                             0).astype(np.int32),
          'positions': np.where(seg > 0, at, 0).astype(np.int32), 'segment_ids': seg,
          'reply_mask': ((at >= starts[..., None]) & (at < lengths[..., None] - 1)
                         ).astype(np.int32),
          'ref_logp': rng.normal(-40.0, 5.0, (b, 2)).astype(np.float32),
          'readout': (lengths - 1).astype(np.int32), 'margin': np.zeros(b, np.float32),
          'weight': np.where(np.arange(b) < b - 2, 0.5, 0.0).astype(np.float32)}


def _dpo_step(family, mesh_shape, micro_batches=1):
  cfg = helpers.tiny_config(family, mesh=mesh_shape, seq_len=24, micro_batches=micro_batches)
  cfg.model.max_seq_len = 32
  loss_fn = trainer.preference_loss_fn('dpo', beta=0.5, label_smoothing=0.1)
  return helpers.one_train_step(cfg, model_lib.ModelConfig.from_config(cfg), loss_fn,
                                _dpo_batch(cfg))


@pytest.mark.parametrize('family,mesh', [('llama', (2, 2, 2)), ('gpt2', (1, 2, 4))],
                         ids=lambda x: x if isinstance(x, str) else 'x'.join(map(str, x)))
def test_sharded_dpo_step_matches_one_device(family, mesh):
  helpers.assert_same_step(_dpo_step(family, mesh, micro_batches=2),
                           _dpo_step(family, (1, 1, 1)))


# -- the stage on the smoke run ----------------------------------------------------------------


def _workdir_from(smoke_run, tmp_path, name):
  """A workdir holding the smoke run's tokenizer and the reward stage's comparison files;
  the SFT model comes through config.checkpoint.init_from."""
  workdir, _ = smoke_run
  new = tmp_path / name
  os.makedirs(new / 'reward')
  for f in ('comparisons.jsonl', 'comparisons_heldout.jsonl', 'samples_heldout.jsonl'):
    shutil.copy(os.path.join(workdir, 'reward', f), new / 'reward' / f)
  shutil.copy(os.path.join(workdir, 'tokenizer.model'), new / 'tokenizer.model')
  return str(new)


def _dpo_cfg(smoke_run, steps, **dotted):
  workdir, _ = smoke_run
  return helpers.smoke_config(**{'stage': 'dpo', 'dpo.steps': steps,
                                 'checkpoint.init_from': ckpt_lib.checkpoints_dir(workdir, 'sft'),
                                 **dotted})


def _params(workdir):
  got = samples_lib.load_stage(workdir, 'dpo', model_lib.ModelConfig.from_config(
      helpers.smoke_config()), sharding.make_mesh(helpers.smoke_config()))
  return got.step, jax.device_get(got.params)


@pytest.mark.slow
def test_smoke_run_trains_dpo_on_the_reward_stages_pairs(smoke_run):
  workdir, results = smoke_run
  assert results['dpo'].steps_run == helpers.smoke_config().dpo.steps
  with open(os.path.join(workdir, 'dpo', 'eval.json'), encoding='utf-8') as f:
    report = json.load(f)
  assert report['heldout_pairs']['pairs'] > 0
  assert {'val_rewards/accuracies', 'val_rewards/margins', 'val_logps/chosen'} <= set(
      report['heldout_metrics'])
  rows = [json.loads(l) for l in open(os.path.join(workdir, 'dpo', 'metrics.jsonl'))]
  logged = set().union(*rows)
  assert {'rewards/chosen', 'rewards/rejected', 'rewards/accuracies', 'rewards/margins',
          'logps/chosen', 'logps/rejected'} <= logged
  # The embedded pairs are the reward stage's, read from WORKDIR/reward, not sampled again.
  assert not os.path.exists(os.path.join(workdir, 'dpo', 'comparisons.jsonl'))


@pytest.mark.slow
def test_resumed_dpo_equals_an_uninterrupted_run(smoke_run, tmp_path):
  straight = _workdir_from(smoke_run, tmp_path, 'straight')
  run_lib.run(_dpo_cfg(smoke_run, 4), straight)
  resumed = _workdir_from(smoke_run, tmp_path, 'resumed')
  run_lib.run(_dpo_cfg(smoke_run, 2), resumed)
  run_lib.run(_dpo_cfg(smoke_run, 4), resumed)
  (step_a, a), (step_b, b) = _params(straight), _params(resumed)
  assert step_a == step_b == 4
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def test_a_bad_comparison_row_names_its_file_and_line(tmp_path):
  path = tmp_path / 'prefs.jsonl'
  path.write_text('{"prompt": "2 + 3?", "chosen": "5", "rejected": "6"}\n'
                  '{"prompt": "2 + 2?", "chosen": "4"}\n', encoding='utf-8')
  cfg = helpers.smoke_config(**{'dpo.data': str(path)})
  with pytest.raises(Exception, match=rf'{path}:2:'):
    reward_data.load_comparison_files(cfg, 'dpo')
  cfg.dpo.on_bad_row = 'skip'
  train, heldout, counts = reward_data.load_comparison_files(cfg, 'dpo')
  assert len(train) + len(heldout) == 1
  assert counts['rows_read'] == 2 and counts['bad_rows'] == 1
