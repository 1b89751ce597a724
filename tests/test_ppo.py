"""The PPO stage's pieces on tiny random models: rollout layout, first ratio, sharded update,
frozen roles, a toy reward that PPO raises, prompt files; and resume on the real pipeline."""

import os
import shutil
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from jaxgpt import sharding
from jaxgpt import run as run_lib
from jaxgpt.data import prompts as prompts_lib
from jaxgpt.data.jsonl import BadRowError
from jaxgpt.rl import rollout
from jaxgpt.rl import loop as rl_loop
from jaxgpt.rl import ppo as ppo_algo
from jaxgpt.rl import roles as roles_lib

# Ids of a stand-in tokenizer: the stage reads only these from the real one.
TOK = types.SimpleNamespace(pad_id=0, end_of_turn_id=1, eot_id=2, reward_id=3,
                            chat=types.SimpleNamespace(stop_ids=(1, 2)))
P, N = 8, 8


def ppo_config(mesh_shape=(1, 1, 1), **ppo_fields):
  cfg = helpers.tiny_config('llama', mesh=mesh_shape)
  cfg.model.max_seq_len = 32
  p = cfg.ppo
  p.rollout_batch, p.batch_size, p.epochs, p.response_tokens = 16, 8, 2, N
  p.temperature, p.kl_target, p.warmup_steps, p.steps = 0.7, 0.0, 0, 20
  for k, v in ppo_fields.items():
    p[k] = v
  return cfg


class Setup:
  """Random policy / value / reference / reward models and the stage's jitted pieces."""

  def __init__(self, cfg, devices, score_fn=None, seed=0):
    self.cfg = cfg
    self.mesh = sharding.make_mesh(cfg, devices)
    self.algo = ppo_algo.build(cfg, TOK, self.mesh, None, score_fn)
    self.roles, self.graphdefs = self.algo.roles, self.algo.graphdefs
    policy = helpers.random_params(self.roles.policy, seed=seed)
    params = {'policy': helpers.place(policy, self.roles.policy, self.mesh)}
    if self.roles.value is not None:
      params['value'] = helpers.place(helpers.random_params(self.roles.value, seed + 1),
                                      self.roles.value, self.mesh)
    frozen_dtype = self.roles.reference.param_dtype
    reference = {k: v for k, v in policy.items() if k != 'scalar_head'}
    self.frozen = {
        'reference': helpers.place(jax.tree.map(lambda x: x.astype(frozen_dtype), reference),
                                   self.roles.reference, self.mesh),
        'reward': helpers.place(jax.tree.map(lambda x: x.astype(frozen_dtype),
                                             helpers.random_params(self.roles.reward, seed + 2)),
                                self.roles.reward, self.mesh)}
    self.state = roles_lib.make_state(params, cfg.ppo, cfg.seed, self.algo.optimizers,
                                      self.algo.shardings, self.mesh)
    self.update = self.algo.update

  def iterate(self, n, seed=0):
    rng = np.random.default_rng(seed)
    r = self.cfg.ppo.rollout_batch
    batches = [{'prompt': rng.integers(4, 256, (r, P)).astype(np.int32),
                'length': rng.integers(2, P + 1, (r,)).astype(np.int32)} for _ in range(n)]
    data = types.SimpleNamespace(train_iter=iter(batches), ptx_iter=None)
    iteration = rl_loop.Iteration(self.algo, rl_loop.Inputs(
        data, TOK, self.frozen, None, self.mesh, self.cfg.seed, None, {}))
    out = []
    with jax.set_mesh(self.mesh):
      for step in range(n):
        self.state, m = iteration(self.state, step)
        out.append(m)
    return out


def test_assemble_places_prompt_response_and_readout():
  prompt = jnp.array([[5, 6, 7, 0], [8, 0, 0, 0]])
  resp = jnp.array([[9, 1, 0], [10, 11, 12]])
  tokens, mask, readout = rollout.assemble(prompt, jnp.array([3, 1]), resp, jnp.array([2, 3]),
                                           readout_id=3, pad_id=0)
  np.testing.assert_array_equal(tokens, [[5, 6, 7, 9, 1, 3, 0, 0], [8, 10, 11, 12, 3, 0, 0, 0]])
  np.testing.assert_array_equal(readout, [5, 4])
  # logits position t predicts token t+1: the response tokens are targets at t = L-1 ...
  np.testing.assert_array_equal(mask, [[0, 0, 1, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0]])


def test_first_ratio_is_one_at_temperature_not_one():
  s = Setup(ppo_config(temperature=0.7), jax.devices()[:1])
  m = s.iterate(1)[0]
  assert abs(m['ratio_first'] - 1.0) < 1e-6
  assert m['approxkl_first'] < 1e-10
  assert abs(m['kl']) < 1e-5  # policy == reference before any update


def test_value_head_on_the_policy_and_bfloat16_frozen_roles():
  s = Setup(ppo_config(value_from='policy', frozen_dtype='bfloat16'), jax.devices()[:1])
  assert 'value' not in s.state and 'scalar_head' in s.state['policy']['params']
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(s.frozen))
  before = jax.device_get(s.state['policy']['params']['scalar_head'])
  m = s.iterate(2)
  assert abs(m[0]['ratio_first'] - 1.0) < 1e-6 and np.isfinite(m[-1]['value_loss'])
  after = jax.device_get(s.state['policy']['params']['scalar_head'])
  assert np.abs(after['kernel'] - before['kernel']).max() > 0  # the value head trains


def test_frozen_roles_never_change_and_stay_readable():
  s = Setup(ppo_config(), jax.devices()[:1])
  before = jax.device_get(s.frozen)
  policy_before = jax.device_get(s.state['policy']['params'])
  s.iterate(2)
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(jax.device_get(s.frozen))):
    np.testing.assert_array_equal(a, b)
  moved = [np.abs(a - b).max() for a, b in zip(
      jax.tree.leaves(policy_before), jax.tree.leaves(jax.device_get(s.state['policy']['params'])))]
  assert max(moved) > 0  # ... while the policy trains


def one_update(mesh_shape, micro_batches):
  cfg = ppo_config(mesh_shape, micro_batches=micro_batches)
  # Adam's first step is lr * g / (|g| + eps): with eps 1e-8 a gradient entry at float-noise
  # level becomes a full +-lr step whose size rounding decides, on one mesh or another.
  cfg.train.eps = 1e-6
  s = Setup(cfg, helpers.devices_for(mesh_shape))
  rng = np.random.default_rng(3)
  b, w = cfg.ppo.batch_size, P + N + 1
  mask = (rng.random((b, w - 1)) > 0.4).astype(np.float32)
  batch = {'tokens': rng.integers(4, 256, (b, w)).astype(np.int32), 'mask': mask,
           'old_logp': (-5.5 + 0.1 * rng.standard_normal((b, w - 1))).astype(np.float32) * mask,
           'old_values': rng.standard_normal((b, w - 1)).astype(np.float32) * mask,
           'advantages': rng.standard_normal((b, w - 1)).astype(np.float32) * mask,
           'returns': rng.standard_normal((b, w - 1)).astype(np.float32) * mask}
  with jax.set_mesh(s.mesh):
    state, metrics = s.update(s.state, batch)
  return jax.device_get((metrics, state['policy']['params'], state['value']['params']))


@pytest.mark.parametrize('mesh', [(2, 2, 2), (1, 2, 4)], ids=lambda m: 'x'.join(map(str, m)))
def test_sharded_ppo_update_equals_one_device(mesh):
  ref_metrics, ref_policy, ref_value = one_update((1, 1, 1), 1)
  metrics, policy, value = one_update(mesh, 2)
  for k in ('policy_loss', 'value_loss', 'clipfrac', 'ratio'):
    np.testing.assert_allclose(metrics[k], ref_metrics[k], rtol=1e-4, atol=1e-6, err_msg=k)
  for a, b in zip(jax.tree.leaves((policy, value)), jax.tree.leaves((ref_policy, ref_value))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_ppo_raises_a_toy_reward():
  """Reward = share of response tokens from the lower half of the vocabulary."""
  def toy_score(frozen, tokens_bw, mask_bt, readout_b):
    del frozen, readout_b
    low = (tokens_bw[:, 1:] < 128) & (tokens_bw[:, 1:] > 3)
    return (low * mask_bt).sum(1) / jnp.maximum(mask_bt.sum(1), 1.0)

  cfg = ppo_config(temperature=1.0, lr=1e-2, value_lr=1e-2, kl_coef=0.01, epochs=4,
                   normalize_scores=False, missing_eot_penalty=0.0)
  s = Setup(cfg, jax.devices()[:1], score_fn=toy_score)
  scores = [m['scores'] for m in s.iterate(12)]
  assert np.mean(scores[-3:]) > np.mean(scores[:3]) + 0.15, scores


def test_prompt_files_bad_rows_name_file_and_line(tmp_path):
  path = tmp_path / 'p.jsonl'
  path.write_text('{"prompt": "What is 2 + 3?"}\n'
                  '{"messages": [{"role": "user", "content": "hi"}]}\n'
                  '{"messages": [{"role": "assistant", "content": "hi"}]}\n'
                  'not json\n', encoding='utf-8')
  with pytest.raises(BadRowError, match=r'p.jsonl:3: the prompt .messages. must end with a user turn'):
    prompts_lib.read_prompt_files([str(path)], 'error')
  rows, counts = prompts_lib.read_prompt_files([str(path)], 'skip')
  assert len(rows) == 2 and counts['rows_read'] == 4 and counts['bad_rows'] == 2


def copy_up_to_reward(workdir, wd):
  os.makedirs(wd)
  for stage in ('sft', 'reward'):
    shutil.copytree(os.path.join(workdir, stage), os.path.join(wd, stage))
  return wd


def test_ppo_resume_equals_uninterrupted_run(smoke_run, tmp_path):
  """2 iterations, stop, re-run to 4 == 4 straight (policy, value, beta, data position)."""
  workdir = smoke_run[0]
  runs = {name: copy_up_to_reward(workdir, str(tmp_path / name)) for name in ('split', 'straight')}
  common = {'stage': 'ppo', 'train.min_lr_ratio': 1.0, 'checkpoint.every_steps': 100,
            'tokenizer.path': os.path.join(workdir, 'tokenizer.model')}
  run_lib.run(helpers.smoke_config(**common, **{'ppo.steps': 2}), runs['split'])
  resumed = run_lib.run(helpers.smoke_config(**common, **{'ppo.steps': 4}), runs['split'])['ppo']
  straight = run_lib.run(helpers.smoke_config(**common, **{'ppo.steps': 4}),
                         runs['straight'])['ppo']
  assert resumed.steps_run == 2 and straight.steps_run == 4
  for a, b in zip(jax.tree.leaves(jax.device_get(resumed.state)),
                  jax.tree.leaves(jax.device_get(straight.state))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_ppo_ptx_mixes_pretraining_loss_and_keeps_its_position(smoke_run, tmp_path):
  workdir = smoke_run[0]
  wd = copy_up_to_reward(workdir, str(tmp_path / 'ptx'))
  cfg = helpers.smoke_config(**{'stage': 'ppo', 'ppo.steps': 1, 'ppo.ptx_coef': 0.5,
                                'tokenizer.path': os.path.join(workdir, 'tokenizer.model')})
  result = run_lib.run(cfg, wd)['ppo']
  assert np.isfinite(result.final_metrics['ptx_loss']) and result.final_metrics['ptx_loss'] > 0
  from jaxgpt.train import checkpoint as ckpt_lib
  reader = ckpt_lib.Checkpointer(ckpt_lib.checkpoints_dir(wd, 'ppo'), async_save=False)
  try:
    assert reader.read_meta(1)['ptx_data']
  finally:
    reader.close()
