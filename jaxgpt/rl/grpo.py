"""GRPO, Dr. GRPO and RLOO as algorithms of the online-RL loop (`rl.loop`): no value model.

Each prompt is sampled `group_size` (K) times; a reply's advantage is its sequence reward
against its group's (`rl.group.group_advantages`: GRPO (r - mean) / std, Dr. GRPO r - mean,
RLOO r - mean of the other K-1), the same for every token of the reply. The policy loss is
PPO's clipped surrogate on those advantages, aggregated per reply (GRPO) or over a fixed
token budget (Dr. GRPO). The KL to the reference enters either as GRPO's k3 term in the loss
(`config.grpo.kl_in='loss'`) or, as in PPO, as -beta * KL in the reward (`'reward'`); with
kl_coef 0 no reference is held. Roles: the **policy** is trained; the **reference** (SFT)
and the **reward** model (only when the reward spec has a `model` term) are frozen.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp

from jaxgpt import model as model_lib
from jaxgpt.inference import sampling
from jaxgpt.rl import algo, group, rollout
from jaxgpt.rl import loop as rl_loop
from jaxgpt.rl import rewards as rewards_lib
from jaxgpt.rl import roles as roles_lib

NAME = 'grpo'


def loss_aggregation(section) -> str:
  if section.loss_aggregation != 'auto':
    return section.loss_aggregation
  return 'token_sum' if section.advantage == 'dr_grpo' else 'seq_mean'


def make_roles(cfg) -> roles_lib.Roles:
  g = cfg.grpo
  uses_model = rewards_lib.parse_reward_spec(g.reward, 'config.grpo.reward').uses_model
  return roles_lib.Roles.build(cfg, g, reference=g.kl_coef > 0, reward=uses_model)


def shares_prompt(section, mcfg, mesh) -> tuple[bool, bool]:
  """(scoring, update): whether the log-probs of the scoring pass, and of the update, run
  each group's prompt once for its K rows (`rollout.group_prefix`). Both need
  config.grpo.share_prompt, K > 1 and groups that divide evenly over the devices the rows
  are spread on; the update also needs whole groups in every minibatch (batch_size a
  multiple of K, no micro-batches) and unrolled layers (a stacked cache is read in a loop
  of data-dependent length, which has no gradient). Groups split unevenly over the row
  shards gave the right values but wrong gradients on the (2, 2, 2) test mesh (XLA 0.10.2),
  so they take the whole rows."""
  k = int(section.group_size)
  multiple = sampling.batch_multiple(mesh, mcfg.rules)
  scoring = bool(section.share_prompt) and k > 1 and sampling.whole_groups_per_shard(
      section.rollout_batch, k, multiple)
  update = (scoring and int(section.micro_batches) == 1 and not mcfg.scan_layers and
            sampling.whole_groups_per_shard(section.batch_size, k, multiple))
  return scoring, update


def make_prepare(graphdefs, frozen_graphdefs, roles, section, tok, score_stats,
                 share_update: bool = False):
  """(trained params, frozen params, beta, Rollout, width, reply_width, prefix_width) ->
  (batch, metrics), rows laid out `width` wide (`rollout.assemble`). `prefix_width` (None:
  whole rows): every group's prompt fits in it, and the log-probs run it once a group; with
  `share_update` the batch carries each row's first `prefix_width` tokens for the update's
  pass to do the same."""
  g = section
  model_weight = rewards_lib.parse_reward_spec(g.reward, 'config.grpo.reward').model_weight
  score_fn = (None if roles.reward is None
              else rollout.reward_model_score_fn(frozen_graphdefs['reward']))

  def prepare(params, frozen, beta, r: rl_loop.Rollout, width=None, reply_width=None,
              prefix_width=None):
    policy = model_lib.merge(graphdefs['policy'], params['policy'])
    reference = (None if roles.reference is None
                 else model_lib.merge(frozen_graphdefs['reference'],
                                 roles_lib.reference_params(frozen, params)))
    rm_score = None if score_fn is None else functools.partial(score_fn, frozen)
    s = rollout.score(r, policy, reference, rm_score, tok, g, model_weight=model_weight,
                      stats=score_stats, width=width, reply_width=reply_width,
                      group=None if prefix_width is None else (g.group_size, prefix_width))
    mask_bt, rewards_b = s.mask_bt, s.rewards_b
    if s.ref_logp_bt is not None and g.kl_in == 'reward':
      kl_bt = algo.kl_per_token(s.logp_bt, s.ref_logp_bt, g.kl_estimator, g.kl_clamp) * mask_bt
      rewards_b = rewards_b - beta * kl_bt.sum(axis=1)
    adv_b = group.group_advantages(rewards_b, g.group_size, g.advantage)
    batch = {'tokens': s.tokens_bw, 'mask': mask_bt, 'window': s.window_bn,
             'old_logp': s.logp_bt * mask_bt, 'advantages': adv_b}
    if share_update and prefix_width is not None:
      batch['prefix'] = s.tokens_bw[:, :prefix_width]
    if s.ref_logp_bt is not None and g.kl_in == 'loss':
      batch['ref_logp'] = s.ref_logp_bt * mask_bt
    metrics = rollout.rollout_metrics(r, s, rewards_b)
    metrics.update(group.group_stats(rewards_b, r.correct_b, g.group_size))
    metrics['advantage_abs'] = jnp.abs(adv_b).mean()
    return batch, metrics

  return prepare


def make_loss_fn(section):
  g = section
  aggregation = loss_aggregation(g)
  kl_coef = g.kl_coef if g.kl_in == 'loss' else 0.0

  def policy_loss_fn(model, batch):
    window = batch.get('window')  # None: the LM head at every position
    prefix = batch.get('prefix')  # whole groups in order (minibatch_rows(group=K))
    prefix_gp = None if prefix is None else prefix[::g.group_size]
    logp_bt, logits_bnv = rollout.log_probs(model, batch['tokens'], g.temperature, window,
                                            prefix_gp)
    mask = batch['mask']
    loss_sum, stats = group.group_policy_loss_sum(
        logp_bt, batch['old_logp'], batch['advantages'], mask, g.clip, aggregation,
        g.response_tokens, ref_logp_bt=batch.get('ref_logp'), kl_coef=kl_coef,
        kl_clamp=g.kl_clamp)
    metrics = dict(stats, policy_loss=loss_sum)
    if not g.entropy_coef:
      # Not computed at all: its exponentials over the window's vocabulary were a tenth of
      # the update at 135M parameters. (Computed and cut with stop_gradient, as PPO's, the
      # sharded update's collectives deadlocked on the 2x2x2 CPU mesh of
      # tests/test_grpo.py, XLA 0.10.2; left out, they do not.)
      return loss_sum, metrics
    weights_bt, _ = group.token_loss_weights(mask, aggregation, g.response_tokens)
    entropy = algo.entropy_sum(logits_bnv, rollout.in_window(weights_bt, window))
    return loss_sum - g.entropy_coef * entropy, dict(metrics, update_entropy=entropy)

  return policy_loss_fn


def build(cfg, tok, mesh, score_stats) -> rl_loop.Algorithm:
  """GRPO (or Dr. GRPO, RLOO) on `mesh`: roles, optimizer, abstract state, jitted pieces."""
  g = cfg.grpo
  roles = make_roles(cfg)
  optimizers, graphdefs, abstract, shardings, frozen_graphdefs = roles_lib.setup(cfg, g, roles,
                                                                                mesh)
  rules = roles.policy.rules
  share_scoring, share_update = shares_prompt(g, roles.policy, mesh)
  prepare = rl_loop.jit_prepare(make_prepare(graphdefs, frozen_graphdefs, roles, g, tok,
                                             score_stats, share_update), mesh, rules,
                                static=('width', 'reply_width', 'prefix_width'))
  update, epochs = rl_loop.jit_updates(
      rl_loop.make_update(graphdefs, optimizers, {'policy': make_loss_fn(g)}, g.micro_batches,
                          rules), shardings, mesh, rules)
  return rl_loop.Algorithm(NAME, g, roles, graphdefs, abstract, shardings, optimizers,
                           prepare, update, epochs, group_size=int(g.group_size),
                           share_prompt=share_scoring,
                           minibatch_group=int(g.group_size) if share_update else 1)
