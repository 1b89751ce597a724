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

import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxgpt import losses, sharding
from jaxgpt import model as model_lib
from jaxgpt.data import chat, tasks
from jaxgpt.data.pretrain import make_pretrain_data
from jaxgpt.data.prompts import make_prompt_data
from jaxgpt.evals import accuracy as evaluation
from jaxgpt.inference import sampling, scoring
from jaxgpt.rl import algo, rollout
from jaxgpt.stages import common
from jaxgpt.train import loop, optim, trainer
from jaxgpt.train import checkpoint as ckpt_lib
from jaxgpt.train import metrics as metrics_lib

NAME = 'ppo'
POLICY_FROM, REWARD_FROM = 'sft', 'reward'


@dataclasses.dataclass(frozen=True)
class Roles:
  """Model settings by role; `value` is None when the policy carries the value head."""
  policy: model_lib.ModelConfig
  value: model_lib.ModelConfig | None
  reference: model_lib.ModelConfig
  reward: model_lib.ModelConfig

  @classmethod
  def from_config(cls, cfg) -> 'Roles':
    p = cfg.ppo
    frozen = jnp.dtype(p.frozen_dtype)
    policy = model_lib.ModelConfig.from_config(cfg, scalar_head=p.value_from == 'policy')
    reward = model_lib.ModelConfig.from_config(cfg, scalar_head=True, lm_head=False)
    return cls(policy=policy, value=reward if p.value_from == 'reward' else None,
               reference=dataclasses.replace(policy, scalar_head=False, param_dtype=frozen),
               reward=dataclasses.replace(reward, param_dtype=frozen))

  def trained(self) -> dict:
    return {'policy': self.policy, **({'value': self.value} if self.value else {})}


def role_optimizers(cfg, updates_per_iteration: int) -> dict:
  """(optimizer, schedule) per trained role: config.train's AdamW with the role's lr,
  warm-up and cosine decay counted in optimizer updates."""
  p = cfg.ppo
  out = {}
  for role, lr in (('policy', p.lr), ('value', p.value_lr)):
    t = ml_collections.ConfigDict(cfg.train.to_dict())
    t.lr = lr
    t.steps = p.steps * updates_per_iteration
    t.warmup_steps = p.warmup_steps * updates_per_iteration
    out[role] = (optim.make_optimizer(t), optim.schedule(t))
  return out


def abstract_state(roles: Roles, optimizers, mesh):
  """(graphdefs, abstract state, shardings) of {'step', role: {'params', 'opt_state'},
  'kl_coef', 'rng'}, nothing allocated."""
  repl = sharding.replicated(mesh)
  graphdefs, state, shardings = {}, {}, {}
  for role, mcfg in roles.trained().items():
    graphdef, abstract_params, logical = model_lib.abstract_model(mcfg)
    param_sh = sharding.param_shardings(abstract_params, logical, mesh, mcfg.rules)
    opt = optimizers[role][0]
    abstract = {'params': abstract_params, 'opt_state': jax.eval_shape(opt.init, abstract_params)}
    sh = trainer.state_shardings(abstract, param_sh, opt, mesh)
    graphdefs[role] = graphdef
    state[role] = abstract
    shardings[role] = {'params': sh['params'], 'opt_state': sh['opt_state']}
  state.update(step=jax.ShapeDtypeStruct((), jnp.int32),
               kl_coef=jax.ShapeDtypeStruct((), jnp.float32),
               rng=jax.eval_shape(lambda: jax.random.PRNGKey(0)))
  shardings.update(step=repl, kl_coef=repl, rng=repl)
  return graphdefs, state, shardings


def initial_state(cfg, workdir, roles, optimizers, shardings, mesh):
  """Policy from the SFT checkpoint, value model from the reward model's."""
  policy_dir = common.init_dir(cfg, workdir, POLICY_FROM)
  value_head = ('scalar_head',) if roles.value is None else ()
  params = {'policy': common.params_from_checkpoint(
      policy_dir, mesh, roles.policy, what=f'{NAME}: the policy (SFT model)', fresh=value_head,
      seed=cfg.seed)[0]}
  if roles.value is not None:
    params['value'] = common.params_from_checkpoint(
        ckpt_lib.stage_dir(workdir, REWARD_FROM), mesh, roles.value,
        what=f'{NAME}: the value model (reward model)')[0]
  return make_state(params, cfg, optimizers, shardings, mesh)


def make_state(params, cfg, optimizers, shardings, mesh):
  """The iteration-0 state around trained roles' parameters (fresh optimizer states)."""
  state = {'step': jnp.zeros((), jnp.int32), 'kl_coef': jnp.float32(cfg.ppo.kl_coef),
           'rng': jax.random.PRNGKey(cfg.seed)}
  with jax.set_mesh(mesh):
    for role, p in params.items():
      opt = optimizers[role][0]
      state[role] = {'params': p, 'opt_state': jax.jit(
          opt.init, out_shardings=shardings[role]['opt_state'])(p)}
  return jax.device_put(state, {k: shardings[k] for k in state})


# -- the jitted pieces ------------------------------------------------------------------------


def make_prepare(graphdefs, frozen_graphdefs, roles, cfg, tok, score_stats, score_fn=None):
  """(trained params, frozen params, beta, prompts, lengths, samples) -> (batch, metrics).

  `score_fn(frozen, tokens_bw, mask_bt, readout_b) -> scores_b` replaces the reward model
  (tests use a programmatic reward); by default the frozen reward model scores.
  """
  p = cfg.ppo
  if score_fn is None:
    def score_fn(frozen, tokens_bw, mask_bt, readout_b):
      del mask_bt
      return rollout.scores(model_lib.merge(frozen_graphdefs['reward'], frozen['reward']),
                            tokens_bw, readout_b)

  def prepare(params, frozen, beta, prompt_bp, length_b, out):
    tokens_bw, mask_bt, readout_b = rollout.assemble(prompt_bp, length_b, out.tokens,
                                                     out.lengths, tok.reward_id, tok.pad_id)
    policy = model_lib.merge(graphdefs['policy'], params['policy'])
    old_logp_bt, logits_btv = rollout.log_probs(policy, tokens_bw, p.temperature)
    reference = model_lib.merge(frozen_graphdefs['reference'], frozen['reference'])
    ref_logp_bt, _ = rollout.log_probs(reference, tokens_bw, p.temperature)
    value_model = (policy if roles.value is None
                   else model_lib.merge(graphdefs['value'], params['value']))
    values_bt = rollout.values(value_model, tokens_bw) * mask_bt
    raw_b = score_fn(frozen, tokens_bw, mask_bt, readout_b)
    rewards_b = rollout.score_rewards(raw_b, out.finished, stats=score_stats,
                                      normalize=p.normalize_scores,
                                      missing_eot_penalty=p.missing_eot_penalty)
    adv = rollout.advantages(old_logp_bt, ref_logp_bt, values_bt, rewards_b, mask_bt, beta, p)
    n_tokens = jnp.maximum(mask_bt.sum(), 1.0)
    batch = {'tokens': tokens_bw, 'mask': mask_bt, 'old_logp': old_logp_bt * mask_bt,
             'old_values': values_bt, 'advantages': adv['advantages'],
             'returns': adv['returns']}
    metrics = {
        'scores': raw_b.mean(), 'rewards': rewards_b.mean(),
        'rlhf_reward': adv['token_rewards'].sum(axis=1).mean(),
        'kl': rollout.kl_estimate(old_logp_bt, ref_logp_bt, mask_bt),
        'kl_penalty_estimator': adv['kl_bt'].sum(axis=1).mean(),
        'entropy': algo.entropy_sum(logits_btv, mask_bt) / n_tokens,
        'response_length': out.lengths.mean(), 'eot_rate': out.finished.mean(),
        'values': algo.masked_mean(values_bt, mask_bt),
        'returns': algo.masked_mean(adv['returns'], mask_bt),
        'explained_variance': algo.explained_variance(values_bt, adv['returns'], mask_bt),
        'response_tokens': mask_bt.sum()}
    return batch, metrics

  return prepare


def make_loss_fns(cfg, roles):
  p = cfg.ppo

  def policy_loss_fn(model, batch):
    logp_bt, logits_btv = rollout.log_probs(model, batch['tokens'], p.temperature)
    mask = batch['mask']
    loss_sum, stats = algo.policy_loss_sum(logp_bt, batch['old_logp'], batch['advantages'],
                                           mask, p.clip)
    entropy = algo.entropy_sum(logits_btv, mask)
    total = loss_sum - p.entropy_coef * entropy
    sums = dict(stats, policy_loss=loss_sum, update_entropy=entropy, weight=mask.sum())
    if 'ptx' in batch:  # scaled so that (sum over micro-batches) / weight is the mean NLL
      ptx = batch['ptx']
      _, nll_sum = losses.masked_lm_loss_sum(model(ptx['inputs'], ptx['positions']),
                                             ptx['targets'], ptx['weights'])
      scale = jax.lax.stop_gradient(mask.sum() / jnp.maximum(ptx['weights'].sum(), 1.0))
      total = total + p.ptx_coef * nll_sum * scale
      sums['ptx_loss'] = nll_sum * scale
    if roles.value is None:  # the value head rides on the policy's trunk
      v_sum, v_stats = algo.value_loss_sum(rollout.values(model, batch['tokens']),
                                           batch['old_values'], batch['returns'], mask,
                                           p.value_clip)
      total = total + p.value_coef * v_sum
      sums.update(v_stats, value_loss=v_sum)
    return total, sums

  def value_loss_fn(model, batch):
    mask = batch['mask']
    v_sum, v_stats = algo.value_loss_sum(rollout.values(model, batch['tokens']),
                                         batch['old_values'], batch['returns'], mask,
                                         p.value_clip)
    return v_sum, dict(v_stats, value_loss=v_sum, weight=mask.sum())

  return {'policy': policy_loss_fn, 'value': value_loss_fn}


def make_update(graphdefs, optimizers, loss_fns, micro_batches, rules):
  """(state, minibatch) -> (state, metrics): one optimizer step of every trained role."""
  grad_fns = {role: trainer.make_grad_fn(graphdefs[role], loss_fns[role], micro_batches, rules)
              for role in graphdefs}

  def update(state, batch):
    state = dict(state)
    metrics = {}
    finite = jnp.bool_(True)
    for role, grad_fn in grad_fns.items():
      opt, schedule = optimizers[role]
      params = state[role]['params']
      grads, sums = grad_fn(params, batch)
      updates, opt_state = opt.update(grads, state[role]['opt_state'], params)
      params = optax.apply_updates(params, updates)
      state[role] = {'params': params, 'opt_state': opt_state}
      denom = jnp.maximum(sums['weight'], 1.0)
      metrics.update({k: v / denom for k, v in sums.items() if k != 'weight'})
      metrics[f'{role}_grad_norm'] = optax.tree.norm(grads)
      metrics[f'{role}_lr'] = schedule(_update_count(opt_state))
      finite &= jax.tree.reduce(jnp.logical_and,
                                jax.tree.map(lambda x: jnp.all(jnp.isfinite(x)), params))
    metrics['params_finite'] = finite
    return state, metrics

  return update


def _update_count(opt_state):
  """Updates applied so far, read from the optimizer's own step counter."""
  counts = [x for x in jax.tree.leaves(opt_state) if x.dtype == jnp.int32 and x.ndim == 0]
  return counts[0] if counts else jnp.int32(0)


# -- the iteration ----------------------------------------------------------------------------


def run(cfg, workdir: str) -> loop.Result:
  p = cfg.ppo
  mesh = sharding.make_mesh(cfg)
  roles = Roles.from_config(cfg)
  rules = roles.policy.rules
  out_dir = loop.stage_dir(workdir, NAME)
  os.makedirs(out_dir, exist_ok=True)
  policy_dir = common.init_dir(cfg, workdir, POLICY_FROM)
  reward_dir = ckpt_lib.stage_dir(workdir, REWARD_FROM)
  reference, sft_meta = common.params_from_checkpoint(policy_dir, mesh, roles.reference,
                                                      what=f'{NAME}: the reference (SFT) model')
  reward_params, reward_meta = common.params_from_checkpoint(
      reward_dir, mesh, roles.reward, what=f'{NAME}: the reward model')
  frozen = {'reference': reference, 'reward': reward_params}
  frozen_graphdefs = {'reference': model_lib.abstract_model(roles.reference)[0],
                      'reward': model_lib.abstract_model(roles.reward)[0]}
  tok = common.tokenizer_from(cfg, workdir, sft_meta, NAME)
  data = make_prompt_data(cfg, tok, **common.process_info())
  print(f'[{NAME}] prompts: {common.format_stats(data.stats)}', flush=True)

  minibatches = p.rollout_batch // p.batch_size
  optimizers = role_optimizers(cfg, minibatches * p.epochs)
  graphdefs, abstract, shardings = abstract_state(roles, optimizers, mesh)
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
  prepare = jax.jit(make_prepare(graphdefs, frozen_graphdefs, roles, cfg, tok,
                                 reward_meta.get('score_stats')),
                    out_shardings=(batch_sh, repl))
  update = jax.jit(make_update(graphdefs, optimizers, make_loss_fns(cfg, roles),
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
  if step == p.steps and not (result.steps_run == 0 and
                              os.path.exists(os.path.join(out_dir, 'eval.json'))):
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
  kw = dict(max_new_tokens=cfg.sft.eval_tokens, seed=cfg.seed)
  report = {}
  for name, (gd, prm, mcfg) in {
      'sft': (frozen_graphdefs['reference'], frozen['reference'], roles.reference),
      'ppo': (graphdef, params, roles.policy)}.items():
    acc = evaluation.task_accuracy(gd, prm, mcfg, tok, 'chat', eval_set, **kw)
    prompts = [[{'role': 'user', 'content': e.prompt}] for e in eval_set]
    replies = sampling.generate_text(gd, prm, mcfg, tok,
                                     [chat.render_prompt(m, tok) for m in prompts], **kw)
    scores = scoring.score_replies(frozen_graphdefs['reward'], frozen['reward'], roles.reward,
                                   tok, list(zip(prompts, replies)))
    report[name] = dict(acc, reward_score=float(np.mean(scores)))
  report['n_prompts'] = len(eval_set)
  if jax.process_index() == 0:
    path = os.path.join(loop.stage_dir(workdir, NAME), 'eval.json')
    with open(path, 'w', encoding='utf-8') as f:
      json.dump(report, f, indent=1)
    print(f'[{NAME}] held-out greedy accuracy: sft {report["sft"]["accuracy"]:.1%} -> ppo '
          f'{report["ppo"]["accuracy"]:.1%}; reward-model score: sft '
          f'{report["sft"]["reward_score"]:+.3f} -> ppo {report["ppo"]["reward_score"]:+.3f}  '
          f'({path})', flush=True)
  return report
