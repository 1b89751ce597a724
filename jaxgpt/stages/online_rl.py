"""What the online-RL stages (ppo, grpo) share around `rl.loop`: reading the SFT and reward
checkpoints they start from, the prompts, the reward sources, and their eval.json.

A stage supplies its algorithm (`build(cfg, tok, mesh, score_stats)`) and the trained
roles' starting parameters; this module does the rest. The reward model is read only when
the reward spec has a `model` term; a reward-model checkpoint without `score_stats` is
used unnormalised, and the run says so.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt import model as model_lib
from jaxgpt import sharding
from jaxgpt.data import tasks
from jaxgpt.data.pretrain import make_pretrain_data
from jaxgpt.data.prompts import make_prompt_data
from jaxgpt.evals import accuracy as evaluation
from jaxgpt.inference import sampling, scoring
from jaxgpt.model import lora
from jaxgpt.rl import loop as rl_loop
from jaxgpt.rl import rewards as rewards_lib
from jaxgpt.rl import roles as roles_lib
from jaxgpt.stages import common
from jaxgpt.train import checkpoint as ckpt_lib
from jaxgpt.train import loop

POLICY_FROM, REWARD_FROM = 'sft', 'reward'


@dataclasses.dataclass
class Started:
  """A finished (or resumed-and-finished) online-RL run and what evaluating it needs."""
  result: loop.Result
  algo: rl_loop.Algorithm
  inputs: rl_loop.Inputs
  policy_dir: str
  reward_dir: str
  policy_from: str = POLICY_FROM


def run(cfg, workdir: str, name: str, build: Callable, initial_params: Callable,
        section_name: str = '', policy_from: str = POLICY_FROM) -> Started:
  """Runs stage `name` (in WORKDIR/<name>, with config section `section_name`, default
  `name`; the policy starts from stage `policy_from`'s model) with the algorithm
  `build(cfg, tok, mesh, score_stats)` gives;
  `initial_params(algo, mesh, policy_dir, reward_dir, score_stats)` -> the trained roles'
  parameters of a fresh run."""
  section = cfg[section_name or name]
  field = f'config.{section_name or name}.reward'
  mesh = sharding.make_mesh(cfg)
  os.makedirs(loop.stage_dir(workdir, name), exist_ok=True)
  host_rewards = rewards_lib.HostRewards(section.reward, field)  # a user's module: fail now
  policy_dir = common.init_dir(cfg, workdir, policy_from)
  reward_dir = ckpt_lib.checkpoints_dir(workdir, REWARD_FROM)
  tok = common.recorded_tokenizer(cfg, workdir, common.checkpoint_meta(policy_dir), name)
  score_stats = None
  if host_rewards.spec.uses_model:
    score_stats = common.checkpoint_meta(reward_dir).get('score_stats')
    if section.normalize_scores and not score_stats:
      print(f'[{name}] the reward model in {reward_dir} records no score_stats (written before '
            'the reward stage stored them): its scores enter the reward unnormalised; re-run '
            f'the reward stage, or set config.{name}.normalize_scores=False to silence this.',
            flush=True)
  algo = dataclasses.replace(build(cfg, tok, mesh, score_stats), name=name)
  frozen = {}
  if algo.roles.reference is not None and not algo.roles.reference_is_policy_base:
    frozen['reference'] = common.params_from_checkpoint(
        policy_dir, mesh, algo.roles.reference, what=f'{name}: the reference (SFT) model')[0]
  if algo.roles.reward is not None:
    frozen['reward'] = common.params_from_checkpoint(
        reward_dir, mesh, algo.roles.reward, what=f'{name}: the reward model')[0]
  data = make_prompt_data(cfg, section_name or name, tok, **common.process_info())
  print(f'[{name}] prompts: {common.format_stats(data.stats)}; reward {section.reward}',
        flush=True)
  if section.get('ptx_coef'):
    data.ptx_iter = make_pretrain_data(cfg, tok, **common.process_info()).train_iter

  def init_state():
    params = initial_params(algo, mesh, policy_dir, reward_dir, score_stats)
    return roles_lib.make_state(params, section, cfg.seed, algo.optimizers, algo.shardings, mesh)

  meta = {'stage': name, 'tokenizer': tok.path, 'init_from': policy_dir,
          'reward': section.reward, 'config': cfg.to_json_best_effort()}
  if algo.roles.reward is not None or algo.roles.value is not None:
    meta['reward_from'] = reward_dir
  inputs = rl_loop.Inputs(data, tok, frozen, host_rewards, mesh, cfg.seed, init_state, meta)
  result = rl_loop.run(algo, inputs, cfg, workdir)
  return Started(result, algo, inputs, policy_dir, reward_dir, policy_from)


def policy_params(algo, mesh, policy_dir, seed, name) -> dict:
  """The policy's starting weights: the SFT model (a fresh value head if it carries one),
  with fresh adapters under config.lora."""
  return start_params(algo.roles.policy, mesh, policy_dir, seed, f'{name}: the policy (SFT model)',
                      fresh=('scalar_head',) if algo.roles.policy.scalar_head else ())


def policy_only(cfg, name: str) -> Callable:
  """`initial_params` of a stage whose only trained role is the policy (GRPO and kin)."""
  def init(algo, mesh, policy_dir, reward_dir, score_stats):
    del reward_dir, score_stats
    return {'policy': policy_params(algo, mesh, policy_dir, cfg.seed, name)}
  return init


def start_params(mcfg, mesh, directory, seed, what, fresh=()) -> dict:
  """A trained role's starting weights read from `directory` as the plain model, then (when
  `mcfg` has adapters) fresh adapters beside its kernels."""
  params = common.params_from_checkpoint(directory, mesh, lora.plain(mcfg), what=what,
                                         fresh=fresh, seed=seed)[0]
  if not mcfg.lora_rank:
    return params
  adapters = common.fresh_adapters(mcfg, mesh, seed)
  return lora.combine(params, adapters)


def ppo_initial_params(cfg, name: str):
  """PPO's starting weights: the policy from SFT and, unless the policy carries the value
  head, the value model from the reward model, its head put on the scale of the
  standardised reward (the rewards are (score - mean) / std; the raw head is not)."""
  def init(algo, mesh, policy_dir, reward_dir, score_stats):
    params = {'policy': policy_params(algo, mesh, policy_dir, cfg.seed, name)}
    if algo.roles.value is not None:
      value = start_params(algo.roles.value, mesh, reward_dir, cfg.seed,
                           f'{name}: the value model (reward model)')
      if cfg.ppo.normalize_scores:
        stats = score_stats or common.checkpoint_meta(reward_dir).get('score_stats')
        value = value_on_reward_scale(value, stats)
      params['value'] = value
    return params
  return init


def value_on_reward_scale(params: dict, score_stats) -> dict:
  """A reward model's parameters with its scalar head rescaled to predict the
  standardised score (score - mean) / std."""
  if not score_stats:
    return params
  head = params['scalar_head']
  std = max(float(score_stats['std']), 1e-6)
  scaled = {'kernel': head['kernel'] / std,
            'bias': (head['bias'] - jnp.float32(score_stats['mean'])) / std}
  return dict(params, scalar_head=jax.tree.map(lambda new, old: new.astype(old.dtype),
                                               scaled, head))


def write_eval(cfg, workdir: str, name: str, run: Started) -> dict:
  """WORKDIR/<name>/eval.json: held-out greedy gold accuracy (per task) of the policy and of
  the model it started from (keyed 'sft', or 'base' for a start from the pretrained or
  published model), and their mean reward-model score when the stage holds one."""
  section, algo, inputs = run.algo.section, run.algo, run.inputs
  finished = int(jax.device_get(run.result.state['step'])) == section.steps
  if not finished or common.evaluated_before(run.result, workdir, name):
    return {}
  start = 'sft' if run.policy_from == 'sft' else 'base'
  sft_mcfg = model_lib.ModelConfig.from_config(cfg)
  sft_params = inputs.frozen.get('reference') or common.params_from_checkpoint(
      run.policy_dir, inputs.mesh, sft_mcfg, what=f'{name}: the model it started from')[0]
  eval_set = tasks.heldout_eval_set(section.eval_per_task, seed=cfg.seed)
  prompts = evaluation.prompts_for('chat', inputs.tok, eval_set)
  questions = [[{'role': 'user', 'content': e.prompt}] for e in eval_set]
  report = {}
  policy_mcfg, policy_gd, policy = common.merged_model(algo.roles.policy,
                                                       run.result.state['policy']['params'])
  for model, (gd, params, mcfg) in {
      start: (model_lib.abstract_model(sft_mcfg)[0], sft_params, sft_mcfg),
      name: (policy_gd, policy, policy_mcfg)}.items():
    replies = sampling.generate(gd, params, mcfg, inputs.tok, prompts,
                                max_new_tokens=cfg.sft.eval_tokens)
    report[model] = evaluation.accuracy_of('chat', eval_set, [t for t, _ in replies])
    if 'reward' in inputs.frozen:
      scores = scoring.score_replies(model_lib.abstract_model(algo.roles.reward)[0],
                                     inputs.frozen['reward'],
                                     algo.roles.reward, inputs.tok,
                                     [(q, t, f) for q, (t, f) in zip(questions, replies)])
      report[model]['reward_score'] = float(np.mean(scores))
  report['n_prompts'] = len(eval_set)
  report['reward'] = section.reward

  def summary(path):
    line = (f'[{name}] held-out greedy accuracy: {start} {report[start]["accuracy"]:.1%} -> '
            f'{name} {report[name]["accuracy"]:.1%}')
    if 'reward_score' in report[name]:
      sft, own = report[start]['reward_score'], report[name]['reward_score']
      line += f'; reward-model score of those replies: {start} {sft:+.3f} -> {name} {own:+.3f}'
    return line + f'  ({path})'
  return common.write_eval(workdir, name, report, summary)

