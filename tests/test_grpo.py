"""GRPO / Dr. GRPO / RLOO on the online-RL loop: the group layout, one sharded update equal
to one device, a toy reward it raises, and resume on the real pipeline."""

import json
import os
import shutil
import textwrap
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from jaxgpt import model as model_lib
from jaxgpt import run as run_lib
from jaxgpt import sharding
from jaxgpt.data import prompts as prompts_lib
from jaxgpt.data.tokenizer import Tokenizer
from jaxgpt.inference import sampling
from jaxgpt.rl import grpo as grpo_algo
from jaxgpt.rl import group
from jaxgpt.rl import loop as rl_loop
from jaxgpt.rl import rollout
from jaxgpt.rl import roles as roles_lib
from jaxgpt.train import checkpoint as ckpt_lib
from jaxgpt.train import trainer

TOK = types.SimpleNamespace(pad_id=0, end_of_turn_id=1, eot_id=2, reward_id=3,
                            chat=types.SimpleNamespace(stop_ids=(1, 2)))
P, N, K = 8, 8, 4


def grpo_config(mesh_shape=(1, 1, 1), **fields):
  cfg = helpers.tiny_config('llama', mesh=mesh_shape)
  cfg.model.max_seq_len = 32
  g = cfg.grpo
  g.rollout_batch, g.batch_size, g.epochs, g.response_tokens, g.group_size = 16, 8, 2, N, K
  g.temperature, g.warmup_steps, g.steps, g.missing_eot_penalty = 0.7, 0, 20, 0.0
  for k, v in fields.items():
    g[k] = v
  return cfg


class Setup:
  """A random policy and reference, and GRPO's jitted pieces."""

  def __init__(self, cfg, devices, seed=0):
    self.cfg = cfg
    self.mesh = sharding.make_mesh(cfg, devices)
    self.algo = grpo_algo.build(cfg, TOK, self.mesh, None)
    roles = self.algo.roles
    policy = helpers.random_params(roles.policy, seed=seed)
    # With LoRA the reference is the policy's base (roles.reference_params), no copy.
    self.frozen = ({} if roles.policy.lora_rank else
                   {'reference': helpers.place(policy, roles.reference, self.mesh)})
    self.state = roles_lib.make_state({'policy': helpers.place(policy, roles.policy, self.mesh)},
                                      cfg.grpo, cfg.seed, self.algo.optimizers,
                                      self.algo.shardings, self.mesh)


def test_prompts_come_in_groups_of_k():
  local = {'prompt': np.arange(6).reshape(3, 2), 'length': np.array([1, 2, 2]),
           'row': np.array([7, 8, 9])}
  got = rl_loop.group_rows(local, 3)
  np.testing.assert_array_equal(got['row'], [7, 7, 7, 8, 8, 8, 9, 9, 9])
  np.testing.assert_array_equal(got['prompt'][3:6], [[2, 3]] * 3)


def test_prompt_data_gives_rollout_batch_over_k_prompts(smoke_run):
  cfg = helpers.smoke_config(**{'grpo.rollout_batch': 12, 'grpo.group_size': 4})
  tok = Tokenizer.load(os.path.join(smoke_run[0], 'tokenizer.model'))
  data = prompts_lib.make_prompt_data(cfg, 'grpo', tok)
  batch = next(data.train_iter)
  assert batch['prompt'].shape[0] == 3 and batch['row'].shape == (3,)
  row = data.rows[int(batch['row'][0])]
  assert set(row.fields) == {'task', 'answer'} and row.text == row.messages[-1]['content']


def test_advantages_are_group_relative_per_reply():
  """The batch's advantages are the group formula of each reply's reward, with no std
  blow-up for a group whose rewards are all equal."""
  s = Setup(grpo_config(), jax.devices()[:1])
  rng = np.random.default_rng(0)
  b = s.cfg.grpo.rollout_batch
  prompt = np.repeat(rng.integers(4, 256, (b // K, P)), K, axis=0).astype(np.int32)
  length = np.repeat(rng.integers(2, P + 1, (b // K,)), K).astype(np.int32)
  host = rng.integers(0, 2, (b,)).astype(np.float32)
  host[:K] = 1.0  # one group all right: no signal
  with jax.set_mesh(s.mesh):
    out = sampling.sample(s.algo.graphdefs['policy'], s.state['policy']['params'],
                          s.algo.roles.policy, prompt, length, jax.random.PRNGKey(1),
                          rl_loop.Iteration(s.algo, rl_loop.Inputs(None, TOK, s.frozen, None,
                                                                   s.mesh, 0, None, {})).settings)
    params = {'policy': s.state['policy']['params']}
    batch, metrics = s.algo.prepare(params, s.frozen, jnp.float32(0.04), rl_loop.Rollout(
        prompt, length, out, host, host))
  want = group.group_advantages(jnp.asarray(host), K, 'grpo')
  np.testing.assert_allclose(batch['advantages'], want, rtol=1e-6)
  np.testing.assert_array_equal(batch['advantages'][:K], 0.0)
  assert abs(metrics['equal_reward_groups'] - np.mean(
      [len(set(host[i:i + K])) == 1 for i in range(0, b, K)])) < 1e-6
  assert abs(metrics['gold'] - host.mean()) < 1e-6 and abs(metrics['kl']) < 1e-5


def sampled_and_prepared(old_logp):
  """A rollout of a random policy at T = 0.7 and the batch `prepare` makes of it."""
  s = Setup(grpo_config(old_logp=old_logp), jax.devices()[:1])
  rng = np.random.default_rng(1)
  b = s.cfg.grpo.rollout_batch
  prompt = np.repeat(rng.integers(4, 256, (b // K, P)), K, axis=0).astype(np.int32)
  length = np.repeat(rng.integers(2, P + 1, (b // K,)), K).astype(np.int32)
  host = rng.integers(0, 2, (b,)).astype(np.float32)
  iteration = rl_loop.Iteration(s.algo, rl_loop.Inputs(None, TOK, s.frozen, None, s.mesh, 0,
                                                       None, {}))
  with jax.set_mesh(s.mesh):
    out = sampling.sample(s.algo.graphdefs['policy'], s.state['policy']['params'],
                          s.algo.roles.policy, prompt, length, jax.random.PRNGKey(2),
                          iteration.settings)
    params = {'policy': s.state['policy']['params']}
    batch, metrics = s.algo.prepare(params, s.frozen, jnp.float32(0.04), rl_loop.Rollout(
        prompt, length, out, host, host))
  return jax.device_get((out, batch, metrics))


def test_old_log_probs_from_the_sampler_equal_the_recomputed_ones():
  """config.grpo.old_logp='sampler' takes the update's old log-probs (at the rollout's
  temperature, 0.7 here) and the entropy metric from the sampler instead of a forward of
  the policy: the same rollout, the same batch up to float rounding."""
  out_r, batch_r, metrics_r = sampled_and_prepared('recompute')
  out_s, batch_s, metrics_s = sampled_and_prepared('sampler')
  np.testing.assert_array_equal(out_s.tokens, out_r.tokens)
  assert out_r.entropy is None and out_s.entropy.shape == out_s.tokens.shape
  assert (batch_r['mask'].sum(axis=1) > 0).all()
  np.testing.assert_array_equal(batch_s['mask'], batch_r['mask'])
  np.testing.assert_allclose(batch_s['old_logp'], batch_r['old_logp'], rtol=1e-4, atol=1e-5)
  assert np.abs(batch_r['old_logp']).sum() > 1.0  # not all zero: real log-probs compared
  for k in ('entropy', 'kl', 'rewards'):
    np.testing.assert_allclose(metrics_s[k], metrics_r[k], rtol=1e-4, atol=1e-5, err_msg=k)


def one_update(mesh_shape, micro_batches, advantage, entropy_coef=0.0):
  cfg = grpo_config(mesh_shape, micro_batches=micro_batches, advantage=advantage,
                    entropy_coef=entropy_coef)
  cfg.train.eps = 1e-6  # see test_ppo.one_update: float-noise gradients under Adam's eps
  s = Setup(cfg, helpers.devices_for(mesh_shape))
  rng = np.random.default_rng(3)
  b, w = cfg.grpo.batch_size, P + N + 1
  mask = (rng.random((b, w - 1)) > 0.4).astype(np.float32)
  mask[1] = 0.0  # a row with no response token
  batch = {'tokens': rng.integers(4, 256, (b, w)).astype(np.int32), 'mask': mask,
           'old_logp': (-5.5 + 0.1 * rng.standard_normal((b, w - 1))).astype(np.float32) * mask,
           'ref_logp': (-5.5 + 0.1 * rng.standard_normal((b, w - 1))).astype(np.float32) * mask,
           'advantages': rng.standard_normal((b,)).astype(np.float32)}
  with jax.set_mesh(s.mesh):
    state, metrics = s.algo.update(s.state, batch)
  return jax.device_get((metrics, state['policy']['params']))


@pytest.mark.parametrize('mesh,advantage,entropy_coef',
                         [((2, 2, 2), 'grpo', 0.0), ((1, 2, 4), 'dr_grpo', 0.01)],
                         ids=lambda x: 'x'.join(map(str, x)) if isinstance(x, tuple) else str(x))
def test_sharded_grpo_update_equals_one_device(mesh, advantage, entropy_coef):
  """With an entropy bonus too (at entropy_coef 0 the update does not compute the entropy)."""
  ref_metrics, ref_policy = one_update((1, 1, 1), 1, advantage, entropy_coef)
  metrics, policy = one_update(mesh, 2, advantage, entropy_coef)
  assert ('update_entropy' in metrics) == bool(entropy_coef)
  for k in ('policy_loss', 'kl_loss', 'clipfrac', 'ratio') + (
      ('update_entropy',) if entropy_coef else ()):
    np.testing.assert_allclose(metrics[k], ref_metrics[k], rtol=1e-4, atol=1e-6, err_msg=k)
  for a, b in zip(jax.tree.leaves(policy), jax.tree.leaves(ref_policy)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


TOY_REWARD = '''
CALLS = []

def vowels(prompts, completions, **fields):
  """The share of a reply's letters that are vowels: a per-token preference a policy of
  near-uniform tokens learns within a few updates."""
  CALLS.append((list(prompts), list(completions), sorted(fields)))
  assert len(prompts) == len(completions) == len(fields['task']) == len(fields['answer'])
  letters = [[ch for ch in c.lower() if ch.isalpha()] for c in completions]
  return [sum(ch in 'aeiou' for ch in l) / max(len(l), 1) for l in letters]
'''


def copy_sft(workdir, wd):
  os.makedirs(wd)
  shutil.copytree(os.path.join(workdir, 'sft'), os.path.join(wd, 'sft'))
  return wd


def read_jsonl(path):
  with open(path, encoding='utf-8') as f:
    return [json.loads(line) for line in f if line.strip()]


def test_grpo_raises_a_toy_reward_of_a_user_function(smoke_run, tmp_path, monkeypatch):
  """A user's `module:function` reward (TRL's signature) rises within a few iterations,
  and is called with the prompts, the decoded replies and the rows' fields."""
  (tmp_path / 'toy_rewards.py').write_text(textwrap.dedent(TOY_REWARD), encoding='utf-8')
  monkeypatch.syspath_prepend(str(tmp_path))
  workdir = smoke_run[0]
  wd = copy_sft(workdir, str(tmp_path / 'toy'))
  cfg = helpers.smoke_config(**{
      'stage': 'grpo', 'grpo.reward': 'toy_rewards:vowels', 'grpo.steps': 10, 'grpo.lr': 3e-3,
      'grpo.warmup_steps': 0, 'grpo.rollout_batch': 32, 'grpo.batch_size': 16,
      'grpo.group_size': 8, 'grpo.epochs': 2, 'grpo.kl_coef': 0.0, 'train.min_lr_ratio': 1.0,
      'tokenizer.path': os.path.join(workdir, 'tokenizer.model')})
  run_lib.run(cfg, wd)
  import toy_rewards  # pylint: disable=import-outside-toplevel
  prompts, completions, fields = toy_rewards.CALLS[0]
  assert len(prompts) == 32 and prompts[0] == prompts[7] and fields == ['answer', 'task']
  rewards = [r['host_rewards'] for r in read_jsonl(os.path.join(wd, 'grpo', 'metrics.jsonl'))]
  assert np.mean(rewards[-3:]) > np.mean(rewards[:3]) + 0.1, rewards


def test_lora_grpo_resume_equals_uninterrupted_run(smoke_run, tmp_path):
  """With LoRA adapters (PPO's resume test covers full fine-tuning): 2 iterations, stop,
  re-run to 4 == 4 straight (policy, optimizer, rng, data position); the checkpoint holds
  the adapters, not the base; resuming onto another base is one line naming both."""
  workdir = smoke_run[0]
  runs = {name: copy_sft(workdir, str(tmp_path / name)) for name in ('split', 'straight')}
  common = {'stage': 'grpo', 'train.min_lr_ratio': 1.0, 'checkpoint.every_steps': 100,
            'grpo.rollout_batch': 16, 'grpo.batch_size': 8, 'grpo.group_size': 4,
            'grpo.epochs': 1, 'grpo.eval_per_task': 1, 'lora.rank': 4,
            'tokenizer.path': os.path.join(workdir, 'tokenizer.model')}
  run_lib.run(helpers.smoke_config(**common, **{'grpo.steps': 2}), runs['split'])
  saved = ckpt_lib.Checkpointer(os.path.join(runs['split'], 'grpo', 'checkpoints'))
  meta = saved.read_meta(2)
  saved.close()
  assert meta['lora']['policy/params']['base'].endswith(os.path.join('sft', 'checkpoints'))
  resumed = run_lib.run(helpers.smoke_config(**common, **{'grpo.steps': 4}),
                        runs['split'])['grpo']
  straight = run_lib.run(helpers.smoke_config(**common, **{'grpo.steps': 4}),
                         runs['straight'])['grpo']
  assert resumed.steps_run == 2 and straight.steps_run == 4
  for a, b in zip(jax.tree.leaves(jax.device_get(resumed.state)),
                  jax.tree.leaves(jax.device_get(straight.state))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert os.path.exists(os.path.join(runs['straight'], 'grpo', 'eval.json'))
  # The same adapters offered the pretrained model as their base: refused, both named.
  other = os.path.join(workdir, 'pretrain', 'checkpoints')
  with pytest.raises(ckpt_lib.CheckpointError) as e:
    run_lib.run(helpers.smoke_config(**common, **{'grpo.steps': 6, 'checkpoint.init_from':
                                                  other}), runs['split'])
  line = str(e.value)
  assert '\n' not in line and os.path.join('sft', 'checkpoints') in line and other in line


def test_grpo_base_runs_with_the_fields_its_section_sets(smoke_run, tmp_path):
  """grpo_base starts from the pretrained model and runs config.grpo, but for the fields
  config.grpo_base sets: here its own iterations and reward."""
  workdir = smoke_run[0]
  wd = str(tmp_path / 'from_base')
  shutil.copytree(os.path.join(workdir, 'pretrain'), os.path.join(wd, 'pretrain'))
  cfg = helpers.smoke_config(**{
      'stage': 'grpo_base', 'grpo.steps': 3, 'grpo_base.steps': 1,
      'grpo_base.reward': 'partial', 'grpo.rollout_batch': 16, 'grpo.batch_size': 8,
      'grpo.group_size': 4, 'grpo.eval_per_task': 1,
      'tokenizer.path': os.path.join(workdir, 'tokenizer.model')})
  assert run_lib.run(cfg, wd)['grpo_base'].steps_run == 1
  assert len(read_jsonl(os.path.join(wd, 'grpo_base', 'metrics.jsonl'))) == 1
  with open(os.path.join(wd, 'grpo_base', 'eval.json'), encoding='utf-8') as f:
    assert json.load(f)['reward'] == 'partial'


def test_informative_first_keeps_whole_groups_with_a_signal_first():
  rewards = np.array([0, 0, 1, 0,  1, 1, 1, 1,  0, 0, 0, 0,  0, 1, 1, 1,  2, 2, 2, 2], float)
  keep = rl_loop.informative_first(rewards, 4, 3)  # groups 0 and 3 differ; then group 1
  np.testing.assert_array_equal(keep, [0, 1, 2, 3, 4, 5, 6, 7, 12, 13, 14, 15])
  np.testing.assert_array_equal(rl_loop.informative_first(rewards, 4, 1), [0, 1, 2, 3])
  assert len(rl_loop.informative_first(np.zeros(8), 4, 2)) == 8  # none differ: the first two


def test_dynamic_sampling_draws_more_and_keeps_one_batch(smoke_run, tmp_path, monkeypatch):
  """oversample=3: three batches of prompts sampled, one batch of groups updated on, the
  drawn rows' gold and equal-group share logged beside the kept ones'."""
  (tmp_path / 'toy_rewards.py').write_text(textwrap.dedent(TOY_REWARD), encoding='utf-8')
  monkeypatch.syspath_prepend(str(tmp_path))
  workdir = smoke_run[0]
  wd = copy_sft(workdir, str(tmp_path / 'dyn'))
  cfg = helpers.smoke_config(**{
      'stage': 'grpo', 'grpo.reward': 'toy_rewards:vowels', 'grpo.steps': 2,
      'grpo.oversample': 3, 'grpo.rollout_batch': 16, 'grpo.batch_size': 8,
      'grpo.group_size': 4, 'grpo.eval_per_task': 1,
      'tokenizer.path': os.path.join(workdir, 'tokenizer.model')})
  run_lib.run(cfg, wd)
  import toy_rewards  # pylint: disable=import-outside-toplevel
  assert [len(c[0]) for c in toy_rewards.CALLS[-2:]] == [48, 48]  # 3 x 4 prompts x K
  rows = read_jsonl(os.path.join(wd, 'grpo', 'metrics.jsonl'))
  for r in rows:
    assert r['equal_reward_groups'] <= r['drawn_equal_reward_groups'] and 'drawn_gold' in r


def test_a_weighted_sum_with_the_reward_model():
  """'checker + 0.5*model': the host term plus half the reward model's raw score (no
  score_stats), then the group formula."""
  cfg = grpo_config(reward='checker + 0.5*model', kl_coef=0.0)
  mesh = sharding.make_mesh(cfg, jax.devices()[:1])
  algo = grpo_algo.build(cfg, TOK, mesh, None)
  assert algo.roles.reward is not None and algo.roles.reference is None
  roles = algo.roles
  policy = helpers.place(helpers.random_params(roles.policy, 0), roles.policy, mesh)
  frozen = {'reward': helpers.place(helpers.random_params(roles.reward, 2), roles.reward, mesh)}
  rng = np.random.default_rng(1)
  b = cfg.grpo.rollout_batch
  prompt = np.repeat(rng.integers(4, 256, (b // K, P)), K, axis=0).astype(np.int32)
  length = np.repeat(rng.integers(2, P + 1, (b // K,)), K).astype(np.int32)
  host = rng.integers(0, 2, (b,)).astype(np.float32)
  settings = sampling.SamplingConfig(max_new_tokens=N, temperature=0.7, stop_ids=(1, 2))
  with jax.set_mesh(mesh):
    out = sampling.sample(algo.graphdefs['policy'], policy, roles.policy, prompt, length,
                          jax.random.PRNGKey(0), settings)
    batch, metrics = algo.prepare({'policy': policy}, frozen, jnp.float32(0.0), rl_loop.Rollout(
        prompt, length, out, host, host))
    tokens_bw, _, readout_b = rollout.assemble(prompt, length, out.tokens, out.lengths, 3, 0)
    raw = rollout.scores(model_lib.merge(model_lib.abstract_model(roles.reward)[0],
                                         frozen['reward']), tokens_bw, readout_b)
  want = group.group_advantages(jnp.asarray(host) + 0.5 * raw, K, 'grpo')
  np.testing.assert_allclose(batch['advantages'], want, rtol=1e-5, atol=1e-6)
  assert abs(metrics['scores'] - float(jnp.mean(raw))) < 1e-5 and 'ref_logp' not in batch


def test_on_policy_grpo_gradient_is_the_advantage_weighted_sft_gradient():
  """Before any update (ratio 1, no KL term), GRPO's per-reply-mean loss has the gradient
  of SFT's cross-entropy with each reply token weighted A_i / len_i. The SFT side lays the
  rows out itself (prompt + reply, shifted targets, positions 0..): a reply window or a
  mask one position off in the RL layout would fail this."""
  import test_rl_update_program  # pylint: disable=import-outside-toplevel  (it imports this file)
  cfg = grpo_config(temperature=1.0)  # T scales the RL gradient by 1 / T; no 'ref_logp': no KL
  s = Setup(cfg, jax.devices()[:1])
  r, _, longest_reply = test_rl_update_program.short_rollout(cfg.grpo.rollout_batch, seed=3,
                                                             group_size=K)
  prompt_bp, length_b = np.asarray(r.prompt_bp), np.asarray(r.length_b)
  reply_bn, n_b = np.asarray(r.out.tokens), np.asarray(r.out.lengths)
  adv_b = np.linspace(-1.5, 2.0, len(n_b)).astype(np.float32)
  graphdef, params = s.algo.graphdefs['policy'], s.state['policy']['params']
  tokens_bw, mask_bt, _ = rollout.assemble(r.prompt_bp, r.length_b, r.out.tokens, r.out.lengths,
                                           TOK.reward_id, TOK.pad_id)
  window_bn = rollout.reply_window(mask_bt, longest_reply)
  old_logp_bt = rollout.log_probs(model_lib.merge(graphdef, params), tokens_bw, 1.0,
                                  window_bn)[0] * mask_bt
  rl_batch = {'tokens': tokens_bw, 'mask': mask_bt, 'window': window_bn,
              'old_logp': old_logp_bt, 'advantages': jnp.asarray(adv_b)}

  rows = [np.concatenate([prompt_bp[i, :length_b[i]], reply_bn[i, :n_b[i]]])
          for i in range(len(n_b))]
  w = max(len(x) for x in rows)
  inputs_bt = np.zeros((len(rows), w - 1), np.int32)
  targets_bt, weights_bt = np.zeros_like(inputs_bt), np.zeros((len(rows), w - 1), np.float32)
  for i, x in enumerate(rows):
    inputs_bt[i, :len(x) - 1], targets_bt[i, :len(x) - 1] = x[:-1], x[1:]
    weights_bt[i, length_b[i] - 1:len(x) - 1] = adv_b[i] / max(n_b[i], 1)
  sft_batch = {'inputs': inputs_bt, 'targets': targets_bt, 'weights': weights_bt,
               'positions': np.broadcast_to(np.arange(w - 1, dtype=np.int32), inputs_bt.shape)}

  def grad(loss_fn, batch):
    return jax.grad(lambda p: loss_fn(model_lib.merge(graphdef, p), batch)[0])(params)

  assert 0 in n_b and len(set(n_b)) > 2  # empty and uneven replies
  rl_grads = grad(grpo_algo.make_loss_fn(cfg.grpo), rl_batch)
  sft_grads = grad(trainer.lm_loss_fn(), sft_batch)
  scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(sft_grads))
  for a, b in zip(jax.tree.leaves(rl_grads), jax.tree.leaves(sft_grads)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6 * scale)
