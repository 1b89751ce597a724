"""Stage 4, RLHF with PPO: the SFT model, steered by the reward model, against a KL leash.

Models by role, all on one mesh: the **policy** (from WORKDIR/sft, or
config.checkpoint.init_from) and the **value** model (from WORKDIR/reward, as InstructGPT
does; `config.ppo.value_from='policy'` puts a value head on the policy's trunk instead)
are trained, each with its own optimizer and learning rate; the **reference** (the SFT
weights) and the **reward** model are frozen: never donated, updated or given optimizer
state, and held in `config.ppo.frozen_dtype`.

One iteration: take `rollout_batch` prompts -> sample responses with the KV-cache sampler
on the policy's parameters in place (temperature T, full distribution) -> one jitted
pass gives log-probs at logits / T of policy and reference, values, reward-model scores,
per-token rewards (-beta * KL, plus the standardised score at the last token), GAE
advantages whitened over the whole batch, and returns -> `epochs` passes over reshuffled
minibatches of the clipped policy and value losses -> the adaptive KL controller
updates beta. The state (both trained roles' parameters and optimizer states, beta, rng)
and the prompt iterator's position are checkpointed, so a stopped run resumes exactly.

With `config.ppo.ptx_coef` > 0 every policy update also takes one pretraining batch and
adds ptx_coef times its next-token loss (PPO-ptx, InstructGPT); that iterator's position is
kept in the checkpoint's meta.
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt import sharding
from jaxgpt import model as model_lib
from jaxgpt.data import tasks
from jaxgpt.data.pretrain import make_pretrain_data
from jaxgpt.data.prompts import make_prompt_data
from jaxgpt.evals import accuracy as evaluation
from jaxgpt.inference import sampling, scoring
from jaxgpt.rl import algo
from jaxgpt.rl import ppo as ppo_algo
from jaxgpt.stages import common
from jaxgpt.train import loop
from jaxgpt.train import checkpoint as ckpt_lib
from jaxgpt.train import metrics as metrics_lib

NAME = 'ppo'
POLICY_FROM, REWARD_FROM = 'sft', 'reward'


def initial_state(cfg, workdir, roles, optimizers, shardings, mesh):
  """Policy from the SFT checkpoint, value model from the reward model's."""
  policy_dir = common.init_dir(cfg, workdir, POLICY_FROM)
  value_head = ('scalar_head',) if roles.value is None else ()
  params = {'policy': common.params_from_checkpoint(
      policy_dir, mesh, roles.policy, what=f'{NAME}: the policy (SFT model)', fresh=value_head,
      seed=cfg.seed)[0]}
  if roles.value is not None:
    params['value'] = common.params_from_checkpoint(
        ckpt_lib.checkpoints_dir(workdir, REWARD_FROM), mesh, roles.value,
        what=f'{NAME}: the value model (reward model)')[0]
  return ppo_algo.make_state(params, cfg, optimizers, shardings, mesh)


# -- the iteration ----------------------------------------------------------------------------


def run(cfg, workdir: str) -> loop.Result:
  p = cfg.ppo
  mesh = sharding.make_mesh(cfg)
  roles = ppo_algo.Roles.from_config(cfg)
  rules = roles.policy.rules
  out_dir = loop.stage_dir(workdir, NAME)
  os.makedirs(out_dir, exist_ok=True)
  policy_dir = common.init_dir(cfg, workdir, POLICY_FROM)
  reward_dir = ckpt_lib.checkpoints_dir(workdir, REWARD_FROM)
  reference, sft_meta = common.params_from_checkpoint(policy_dir, mesh, roles.reference,
                                                      what=f'{NAME}: the reference (SFT) model')
  reward_params, reward_meta = common.params_from_checkpoint(
      reward_dir, mesh, roles.reward, what=f'{NAME}: the reward model')
  frozen = {'reference': reference, 'reward': reward_params}
  frozen_graphdefs = {'reference': model_lib.abstract_model(roles.reference)[0],
                      'reward': model_lib.abstract_model(roles.reward)[0]}
  tok = common.recorded_tokenizer(cfg, workdir, sft_meta, NAME)
  data = make_prompt_data(cfg, tok, **common.process_info())
  print(f'[{NAME}] prompts: {common.format_stats(data.stats)}', flush=True)

  minibatches = p.rollout_batch // p.batch_size
  optimizers = ppo_algo.role_optimizers(cfg, minibatches * p.epochs)
  graphdefs, abstract, shardings = ppo_algo.abstract_state(roles, optimizers, mesh)
  ckpt = loop.open_checkpointer(cfg, workdir, NAME)
  state, resumed_meta = loop.resume(
      NAME, ckpt, abstract, shardings, data.train_iter,
      lambda: initial_state(cfg, workdir, roles, optimizers, shardings, mesh))
  if p.ptx_coef:
    data.ptx_iter = make_pretrain_data(cfg, tok, **common.process_info()).train_iter
    if resumed_meta.get('ptx_data'):
      data.ptx_iter.set_state(resumed_meta['ptx_data'])
  start = int(jax.device_get(state['step']))
  n_params = {r: model_lib.count_params(abstract[r]['params']) for r in roles.trained()}
  print(f'[{NAME}] trained roles {n_params}, frozen: reference, reward '
        f'({p.frozen_dtype}); mesh {dict(mesh.shape)}; iterations {start} -> {p.steps}',
        flush=True)

  batch_sh = sharding.batch_sharding(mesh, rules)
  repl = sharding.replicated(mesh)
  prepare = jax.jit(ppo_algo.make_prepare(graphdefs, frozen_graphdefs, roles, cfg, tok,
                                 reward_meta.get('score_stats')),
                    out_shardings=(batch_sh, repl))
  update = jax.jit(ppo_algo.make_update(graphdefs, optimizers, ppo_algo.make_loss_fns(cfg, roles),
                               p.micro_batches, rules),
                   in_shardings=(shardings, batch_sh), out_shardings=(shardings, repl),
                   donate_argnums=(0,))
  take = jax.jit(lambda batch, idx: jax.tree.map(lambda x: x[idx], batch),
                 out_shardings=batch_sh)
  settings = sampling.SamplingConfig(max_new_tokens=p.response_tokens,
                                     temperature=p.temperature,
                                     stop_ids=sampling.default_stop_ids(tok), pad_id=tok.pad_id)
  writer = metrics_lib.MetricsWriter(out_dir, stage=NAME, total_steps=p.steps, start_step=start)
  meta = {'stage': NAME, 'tokenizer': tok.path, 'init_from': policy_dir,
          'reward_from': reward_dir, 'config': cfg.to_json_best_effort()}
  final_metrics: dict = {}
  step = start
  metrics = None

  def save(step):
    loop.ensure_finite(NAME, step, metrics['policy_loss'], metrics['params_finite'], ckpt)
    extra = {'ptx_data': data.ptx_iter.get_state()} if data.ptx_iter is not None else {}
    ckpt.save(step, state, data.train_iter, dict(meta, step=step, **extra))

  saver = loop.Saver(save, start)

  with jax.set_mesh(mesh), loop.StopFlag() as stop:
    try:
      while step < p.steps:
        state, metrics = iteration(state, step, cfg, roles, graphdefs['policy'], data, prepare,
                                   update, take, settings, frozen, mesh)
        step += 1
        logged = {k: v for k, v in metrics.items() if k != 'params_finite'}
        writer.write(step, logged)
        writer.progress(step, {'loss': logged['policy_loss'], **logged},
                        show=('scores', 'kl', 'kl_coef', 'entropy', 'response_length',
                              'clipfrac', 'iteration_seconds'))
        final_metrics.update(logged)
        if ckpt.due(step) or step == p.steps:
          saver.save(step)
        if stop.stop:
          saver.ensure_saved(step)
          writer.log_text(f'[{NAME}] SIGTERM: saved iteration {step}; re-run to resume.')
          break
    except KeyboardInterrupt:
      writer.log_text(f'[{NAME}] interrupted: saving iteration {step}; re-run to resume.')
      saver.ensure_saved(step)  # a step past start has its metrics
      raise
    finally:
      ckpt.close()
      writer.close()
  loop.finish(NAME, out_dir, start, p.steps, final_metrics, 'config.ppo.steps')
  result = loop.Result(graphdefs['policy'], state, shardings, final_metrics,
                       steps_run=step - start)
  if step == p.steps and not common.evaluated_before(result, workdir, NAME):
    write_eval(cfg, workdir, tok, roles, graphdefs['policy'], state['policy']['params'],
               frozen_graphdefs, frozen, mesh)
  return result


def iteration(state, step, cfg, roles, policy_graphdef, data, prepare, update, take, settings,
              frozen, mesh):
  """One PPO iteration: rollout -> score -> advantages -> epochs of minibatch updates."""
  p = cfg.ppo
  times = {}
  t0 = time.perf_counter()
  prompts = loop.global_batch(next(data.train_iter), mesh, roles.policy.rules)
  repl = sharding.replicated(mesh)
  rng, sample_key = jax.device_put(tuple(jax.random.split(state['rng'])), repl)
  beta = float(jax.device_get(state['kl_coef']))
  state = dict(state, rng=rng)
  params = {r: state[r]['params'] for r in roles.trained()}
  out = sampling.sample(policy_graphdef, params['policy'], roles.policy,
                        prompts['prompt'], prompts['length'], sample_key, settings)
  jax.block_until_ready(out.tokens)
  times['generate'] = time.perf_counter() - t0
  t0 = time.perf_counter()
  batch, roll_metrics = prepare(params, frozen, state['kl_coef'], prompts['prompt'],
                                prompts['length'], out)
  roll_metrics = jax.device_get(roll_metrics)
  times['score'] = time.perf_counter() - t0

  t0 = time.perf_counter()
  per_update = []
  for epoch in range(p.epochs):
    order = np.random.default_rng([cfg.seed, step, epoch]).permutation(p.rollout_batch)
    for i in range(p.rollout_batch // p.batch_size):
      idx = np.sort(order[i * p.batch_size:(i + 1) * p.batch_size]).astype(np.int32)
      minibatch = take(batch, idx)
      if data.ptx_iter is not None:
        minibatch['ptx'] = loop.global_batch(next(data.ptx_iter), mesh, roles.policy.rules)
      state, m = update(state, minibatch)
      per_update.append(m)
  per_update = jax.device_get(per_update)
  times['update'] = time.perf_counter() - t0

  new_beta = algo.adaptive_kl_coef(beta, float(roll_metrics['kl']), p.rollout_batch,
                                   p.kl_target, p.kl_horizon)
  state['kl_coef'] = jax.device_put(jnp.float32(new_beta), repl)
  state['step'] = state['step'] + 1

  metrics = {k: float(v) for k, v in roll_metrics.items()}
  for k in per_update[0]:
    if k == 'params_finite':
      continue
    metrics[k] = float(np.mean([float(m[k]) for m in per_update]))
  metrics['params_finite'] = all(bool(m['params_finite']) for m in per_update)
  ratio_var = metrics.pop('ratio_sq') - metrics['ratio'] ** 2
  metrics['ratio_var'] = max(ratio_var, 0.0)
  metrics['ratio_first'] = float(per_update[0]['ratio'])
  metrics['approxkl_first'] = float(per_update[0]['approxkl'])
  metrics['kl_coef'] = beta
  metrics['iteration_seconds'] = sum(times.values())
  tokens = float(roll_metrics['response_tokens'])
  for phase, seconds in times.items():
    metrics[f'{phase}_seconds'] = seconds
    metrics[f'{phase}_tokens_per_sec'] = tokens * (p.epochs if phase == 'update' else 1) / max(
        seconds, 1e-9)
  return state, metrics


# -- evaluation -------------------------------------------------------------------------------


def write_eval(cfg, workdir, tok, roles, graphdef, params, frozen_graphdefs, frozen, mesh):
  """WORKDIR/ppo/eval.json: held-out gold accuracy (greedy) and RM score, PPO vs SFT."""
  eval_set = tasks.heldout_eval_set(cfg.ppo.eval_per_task, seed=cfg.seed)
  report = {}
  for name, (gd, prm, mcfg) in {
      'sft': (frozen_graphdefs['reference'], frozen['reference'], roles.reference),
      'ppo': (graphdef, params, roles.policy)}.items():
    prompts = [[{'role': 'user', 'content': e.prompt}] for e in eval_set]
    replies = sampling.generate_text(gd, prm, mcfg, tok,
                                     evaluation.prompts_for('chat', tok, eval_set),
                                     max_new_tokens=cfg.sft.eval_tokens)
    acc = evaluation.accuracy_of('chat', eval_set, replies)
    scores = scoring.score_replies(frozen_graphdefs['reward'], frozen['reward'], roles.reward,
                                   tok, list(zip(prompts, replies)))
    report[name] = dict(acc, reward_score=float(np.mean(scores)))
  report['n_prompts'] = len(eval_set)
  return common.write_eval(workdir, NAME, report, lambda path: (
      f'[{NAME}] held-out greedy accuracy: sft {report["sft"]["accuracy"]:.1%} -> ppo '
      f'{report["ppo"]["accuracy"]:.1%}; reward-model score: sft '
      f'{report["sft"]["reward_score"]:+.3f} -> ppo {report["ppo"]["reward_score"]:+.3f}  '
      f'({path})'))
