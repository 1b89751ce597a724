"""PPO for RLHF (Ouyang et al. 2022): the models by role, the jitted scoring pass that turns
rollouts into a training batch, the clipped losses and the update of every trained role.

Roles: the **policy** and the **value** model are trained, each with its own optimizer;
the **reference** (SFT) and the **reward** model are frozen. `make_prepare` gives, in one
jitted pass over a rollout, log-probs at logits / T of policy and reference, values,
reward-model scores, per-token rewards (-beta * KL, plus the standardised score at the
last token), GAE advantages whitened over the whole batch, and returns; `make_update`
one optimizer step of every trained role on a minibatch. The stage (`jaxgpt.stages.ppo`)
reads the checkpoints and runs the iterations.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import optax

from jaxgpt import losses, sharding
from jaxgpt import model as model_lib
from jaxgpt.rl import algo, rollout
from jaxgpt.train import optim, trainer


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
    adv = rollout.advantages(old_logp_bt, ref_logp_bt, values_bt, rewards_b, mask_bt, beta,
                             kl_estimator=p.kl_estimator, kl_clamp=p.kl_clamp, gamma=p.gamma,
                             lam=p.lam)
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


