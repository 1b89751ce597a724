"""PPO for RLHF (Ouyang et al. 2022) as an algorithm of the online-RL loop (`rl.loop`).

Roles: the **policy** and the **value** model are trained, each with its own optimizer
(`config.ppo.value_from='policy'` puts the value head on the policy's trunk instead); the
**reference** (SFT) is frozen, and so is the **reward** model when the reward spec
(`config.ppo.reward`) has a `model` term. `make_prepare` gives, in one jitted pass over a
rollout, log-probs at logits / T of policy and reference, values, the reward-model score,
the sequence reward (reward model, host terms, missing-end penalty), per-token rewards
(-beta * KL, plus the sequence reward at the last token), GAE advantages whitened over the
whole batch, and returns; the losses are the clipped policy and value losses, with an
optional entropy bonus and pretraining mix (PPO-ptx); the adaptive KL controller of
Ziegler et al. moves beta.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxgpt import losses
from jaxgpt import model as model_lib
from jaxgpt.rl import algo, rollout
from jaxgpt.rl import loop as rl_loop
from jaxgpt.rl import rewards as rewards_lib
from jaxgpt.rl import roles as roles_lib

NAME = 'ppo'


def make_roles(cfg) -> roles_lib.Roles:
  p = cfg.ppo
  uses_model = rewards_lib.parse_reward_spec(p.reward, 'config.ppo.reward').uses_model
  return roles_lib.Roles.build(cfg, p, value_head=p.value_from, reward=uses_model)


def make_prepare(graphdefs, frozen_graphdefs, roles, section, tok, score_stats, score_fn=None):
  """(trained params, frozen params, beta, Rollout, width) -> (batch, metrics), rows laid
  out `width` wide (`rollout.assemble`).

  `score_fn(frozen, tokens_bw, mask_bt, readout_b) -> scores_b` replaces the reward model
  (tests use a programmatic reward); by default the frozen reward model scores, when the
  reward spec has a `model` term.
  """
  p = section
  model_weight = rewards_lib.parse_reward_spec(p.reward, 'config.ppo.reward').model_weight
  if score_fn is None and roles.reward is not None:
    score_fn = rollout.reward_model_score_fn(frozen_graphdefs['reward'])
  elif score_fn is not None:
    model_weight = 1.0  # a test's programmatic score stands in for the reward model

  def prepare(params, frozen, beta, r: rl_loop.Rollout, width=None, reply_width=None):
    policy = model_lib.merge(graphdefs['policy'], params['policy'])
    reference = model_lib.merge(frozen_graphdefs['reference'],
                                 roles_lib.reference_params(frozen, params))
    rm_score = None if score_fn is None else functools.partial(score_fn, frozen)
    s = rollout.score(r, policy, reference, rm_score, tok, p, model_weight=model_weight,
                      stats=score_stats, width=width, reply_width=reply_width)
    mask_bt = s.mask_bt
    value_model = (policy if roles.value is None
                   else model_lib.merge(graphdefs['value'], params['value']))
    values_bt = rollout.values(value_model, s.tokens_bw) * mask_bt
    adv = rollout.advantages(s.logp_bt, s.ref_logp_bt, values_bt, s.rewards_b, mask_bt, beta,
                             kl_estimator=p.kl_estimator, kl_clamp=p.kl_clamp, gamma=p.gamma,
                             lam=p.lam)
    batch = {'tokens': s.tokens_bw, 'mask': mask_bt, 'window': s.window_bn,
             'old_logp': s.logp_bt * mask_bt, 'old_values': values_bt,
             'advantages': adv['advantages'], 'returns': adv['returns']}
    metrics = rollout.rollout_metrics(r, s, s.rewards_b)
    metrics.update({
        'rlhf_reward': adv['token_rewards'].sum(axis=1).mean(),
        'kl_penalty_estimator': adv['kl_bt'].sum(axis=1).mean(),
        'values': algo.masked_mean(values_bt, mask_bt),
        'returns': algo.masked_mean(adv['returns'], mask_bt),
        'explained_variance': algo.explained_variance(values_bt, adv['returns'], mask_bt)})
    return batch, metrics

  return prepare


def make_loss_fns(section, roles):
  p = section

  def policy_loss_fn(model, batch):
    window = batch.get('window')  # None: the LM head at every position
    logp_bt, logits_bnv = rollout.log_probs(model, batch['tokens'], p.temperature, window)
    mask = batch['mask']
    loss_sum, stats = algo.policy_loss_sum(logp_bt, batch['old_logp'], batch['advantages'],
                                           mask, p.clip)
    entropy = algo.entropy_sum(algo.grad_unless_zero(p.entropy_coef, logits_bnv),
                               rollout.in_window(mask, window))
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


def build(cfg, tok, mesh, score_stats, score_fn=None) -> rl_loop.Algorithm:
  """PPO on `mesh`: roles, optimizers, abstract state, jitted prepare and update."""
  p = cfg.ppo
  roles = make_roles(cfg)
  optimizers, graphdefs, abstract, shardings, frozen_graphdefs = roles_lib.setup(cfg, p, roles,
                                                                                mesh)
  rules = roles.policy.rules
  prepare = rl_loop.jit_prepare(make_prepare(graphdefs, frozen_graphdefs, roles, p, tok,
                                             score_stats, score_fn), mesh, rules)
  update, epochs = rl_loop.jit_updates(
      rl_loop.make_update(graphdefs, optimizers, make_loss_fns(p, roles), p.micro_batches, rules),
      shardings, mesh, rules)

  def kl_controller(beta, kl):
    return float(algo.adaptive_kl_coef(beta, kl, p.rollout_batch, p.kl_target, p.kl_horizon))

  return rl_loop.Algorithm(NAME, p, roles, graphdefs, abstract, shardings, optimizers,
                           prepare, update, epochs, kl_controller)
