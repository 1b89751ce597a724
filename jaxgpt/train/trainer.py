"""Train state and the pure, jitted train step shared by the stages.

The state is a plain pytree `{'step', 'params', 'opt_state', 'rng'}`; a stage
supplies a loss function `loss_fn(model, batch) -> (loss_sum, sums)` where `sums`
holds per-step additive quantities and must include 'weight' (the normaliser,
e.g. the number of target tokens). The step adds losses and gradients over
micro-batches and divides once by the total weight of the whole step, so
accumulation gives the same update as one large batch.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from jaxgpt import losses, sharding
from jaxgpt import model as model_lib
from jaxgpt.model import lora

LossFn = Callable[..., tuple]


def state_shardings(abstract_state, param_shardings, optimizer, mesh):
  """Shardings for the whole train state: optimizer moments follow their parameters (only
  the trained ones have any: with LoRA, the adapters and a scalar head)."""
  repl = sharding.replicated(mesh)
  opt = optax.tree_map_params(optimizer, lambda _, s: s, abstract_state['opt_state'],
                              lora.trainable(param_shardings),
                              transform_non_params=lambda _: repl)
  return {'step': repl, 'params': param_shardings, 'opt_state': opt, 'rng': repl}


def _init_state_fn(mcfg, optimizer, seed: int):
  def init(params):
    if params is None:
      params = model_lib.fresh_params(mcfg, seed)
    return {'step': jnp.zeros((), jnp.int32), 'params': params,
            'opt_state': optimizer.init(lora.trainable(params)),
            'rng': jax.random.PRNGKey(seed)}
  return init


def abstract_train_state(mcfg, mesh, optimizer):
  """(graphdef, abstract state, shardings) without allocating anything."""
  graphdef, abstract_params, logical = model_lib.abstract_model(mcfg)
  param_sh = sharding.param_shardings(abstract_params, logical, mesh, mcfg.rules)
  abstract_state = jax.eval_shape(_init_state_fn(mcfg, optimizer, 0), abstract_params)
  return graphdef, abstract_state, state_shardings(abstract_state, param_sh, optimizer, mesh)


def create_train_state(mcfg, mesh, optimizer, seed: int, params=None):
  """(graphdef, state, shardings) with every array created in its sharding.

  `params` (already sharded) is used instead of a fresh init when given, e.g. the
  previous stage's weights.
  """
  graphdef, _, shardings = abstract_train_state(mcfg, mesh, optimizer)
  init = _init_state_fn(mcfg, optimizer, seed)
  with jax.set_mesh(mesh):
    if params is None:
      state = jax.jit(lambda: init(None), out_shardings=shardings)()
    else:
      state = jax.jit(init, in_shardings=(shardings['params'],), out_shardings=shardings)(params)
  return graphdef, state, shardings


def _split_micro_batches(batch, n: int):
  """(B, ...) -> (n, B/n, ...) taking every n-th row, so each micro-batch keeps the
  rows each device already holds (no resharding)."""
  def one(x):
    x = x.reshape(x.shape[0] // n, n, *x.shape[1:])
    return jnp.swapaxes(x, 0, 1)
  return jax.tree.map(one, batch)


def make_grad_fn(graphdef, loss_fn: LossFn, micro_batches: int, rules):
  """(params, batch) -> (grads, sums): gradients of the step's normalised loss with respect
  to the trained parameters (`lora.trainable`: all of them, or the adapters and a scalar
  head), a tree shaped like those."""

  def sum_grads(params, batch):
    base = lora.frozen(params)

    def f(p):
      return loss_fn(model_lib.merge(graphdef, lora.combine(base, p)), batch)
    (_, sums), grads = jax.value_and_grad(f, has_aux=True)(lora.trainable(params))
    return grads, sums

  def grad_fn(params, batch):
    grads, sums = _summed_over_micro_batches(sum_grads, params, batch, micro_batches, rules)
    denom = jnp.maximum(sums['weight'], 1.0)
    grads = jax.tree.map(lambda g: (g / denom).astype(g.dtype), grads)
    return grads, sums

  return grad_fn


def _summed_over_micro_batches(fn, params, batch, micro_batches: int, rules):
  """fn(params, batch) for a tree of sums, computed over `micro_batches` slices of the
  batch in a scan (one slice's activations live at a time) and added up."""
  if micro_batches == 1:
    return fn(params, batch)
  micro = _split_micro_batches(batch, micro_batches)

  def body(acc, mb):
    mb = jax.tree.map(
        lambda x: sharding.constrain(x, ('act_batch',) + (None,) * (x.ndim - 1), rules), mb)
    return jax.tree.map(jnp.add, acc, fn(params, mb)), None

  first = jax.tree.map(lambda x: x[0], micro)
  zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(fn, params, first))
  return jax.lax.scan(body, zeros, micro)[0]


def apply_gradients(optimizer, grads, state):
  """(params, opt_state) after one optimizer step on the trained parameters; the frozen
  ones (a LoRA base) pass through untouched."""
  trained = lora.trainable(state['params'])
  updates, opt_state = optimizer.update(grads, state['opt_state'], trained)
  params = lora.combine(lora.frozen(state['params']), optax.apply_updates(trained, updates))
  return params, opt_state


def make_train_step(graphdef, optimizer, loss_fn: LossFn, micro_batches: int, rules,
                    lr_schedule=None):
  """The pure step `(state, batch) -> (state, metrics)`; metrics are step means."""
  grad_fn = make_grad_fn(graphdef, loss_fn, micro_batches, rules)

  def train_step(state, batch):
    grads, sums = grad_fn(state['params'], batch)
    params, opt_state = apply_gradients(optimizer, grads, state)
    denom = jnp.maximum(sums['weight'], 1.0)
    metrics = {k: v / denom for k, v in sums.items() if k != 'weight'}
    metrics['weight'] = sums['weight']
    metrics['grad_norm'] = optax.tree.norm(grads)
    # The loop refuses to checkpoint a state whose parameters overflowed.
    metrics['params_finite'] = jax.tree.reduce(
        jnp.logical_and, jax.tree.map(lambda p: jnp.all(jnp.isfinite(p)), params))
    if lr_schedule is not None:
      metrics['lr'] = lr_schedule(state['step'])
    new_state = {'step': state['step'] + 1, 'params': params, 'opt_state': opt_state,
                 'rng': state['rng']}
    return new_state, metrics

  return train_step


def make_eval_step(graphdef, loss_fn: LossFn, param_shardings, mesh, rules, batch_keys,
                   micro_batches: int = 1):
  """Jitted `(params, batch) -> sums` (loss sums and weight) for validation, summed over
  `micro_batches` slices of the batch as the train step does: an eval batch is as large
  as a train batch, and its activations (the logits above all) do not fit whole either."""
  def sums_of(params, batch):
    return loss_fn(model_lib.merge(graphdef, params), batch)[1]

  def eval_step(params, batch):
    return _summed_over_micro_batches(sums_of, params, batch, micro_batches, rules)
  batch_sh = {k: sharding.batch_sharding(mesh, rules) for k in batch_keys}
  return jax.jit(eval_step, in_shardings=(param_shardings, batch_sh),
                 out_shardings=sharding.replicated(mesh))


def lm_loss_fn(z_loss: float = 0.0, use_segment_ids: bool = False,
               loss_chunk: int = 0, loss_positions: int = 0) -> LossFn:
  """Masked next-token cross-entropy over batch['weights'] (pretraining and SFT);
  `loss_chunk` > 0 computes it that many positions at a time (config.train.loss_chunk);
  `loss_positions` > 0 runs the LM head on only the first that many weighted positions
  of each row (config.train.loss_positions)."""

  def loss_fn(model, batch):
    segment_ids = batch['segment_ids'] if use_segment_ids else None
    if loss_positions:
      return _loss_at_targets(model, batch, segment_ids, loss_positions, z_loss)
    if loss_chunk:
      h_btd = model.hidden(batch['inputs'], batch['positions'], segment_ids)
      loss_sum, nll_sum = losses.chunked_lm_loss_sum(h_btd, model.logits, batch['targets'],
                                                     batch['weights'], loss_chunk, z_loss)
    else:
      logits_btv = model(batch['inputs'], batch['positions'], segment_ids)
      loss_sum, nll_sum = losses.masked_lm_loss_sum(logits_btv, batch['targets'],
                                                    batch['weights'], z_loss)
    return loss_sum, {'loss': nll_sum, 'weight': batch['weights'].sum()}

  return loss_fn


def _loss_at_targets(model, batch, segment_ids, k: int, z_loss: float):
  """The LM loss with the head and its softmax over the vocabulary on k positions a row
  (those with weight first, in order) instead of all t: SFT rows hold a few reply tokens
  among many prompt tokens. Weighted positions past k are left out; their share is
  the 'dropped_targets' metric."""
  h_btd = model.hidden(batch['inputs'], batch['positions'], segment_ids)
  weights_bt = batch['weights']
  k = min(k, weights_bt.shape[1])
  idx_bk = jnp.argsort(-(weights_bt > 0).astype(jnp.int32), axis=1, stable=True)[:, :k]
  h_bkd = jnp.take_along_axis(h_btd, idx_bk[..., None], axis=1)
  weights_bk = jnp.take_along_axis(weights_bt, idx_bk, axis=1)
  targets_bk = jnp.take_along_axis(batch['targets'], idx_bk, axis=1)
  loss_sum, nll_sum = losses.masked_lm_loss_sum(model.logits(h_bkd), targets_bk, weights_bk,
                                                z_loss)
  kept = weights_bk.sum()
  return loss_sum, {'loss': nll_sum, 'weight': kept,
                    'dropped_targets': weights_bt.sum() - kept}


def pair_scores_bt2(model, batch):
  """(b, 2) scores of a batch of pairs: chosen and rejected in one forward."""
  b = batch['tokens'].shape[0]
  flat = lambda x: x.reshape((2 * b,) + x.shape[2:])  # noqa: E731  (b, 2, ...) -> (2b, ...)
  scores = model.score(flat(batch['tokens']), flat(batch['positions']),
                       flat(batch['segment_ids']), flat(batch['readout']))
  return scores.reshape(b, 2)


def reward_loss_fn(center: float = 0.0) -> LossFn:
  """Pairwise -log sigmoid(r_chosen - r_rejected - margin) (+ centering) over batch['weight']
  (the reward model)."""
  def loss_fn(model, batch):
    scores_b2 = pair_scores_bt2(model, batch)
    return losses.pairwise_reward_loss_sum(scores_b2[:, 0], scores_b2[:, 1], batch['weight'],
                                           batch['margin'], center)
  return loss_fn


def pair_logps_b2(model, batch):
  """(b, 2) summed log-probs of each pair's replies (batch['reply_mask'] marks their
  tokens; chosen and rejected in one forward), and (b, 2) their token counts. The logits
  at position t predict token t + 1, so a reply token's log-prob is read one place before it."""
  b = batch['tokens'].shape[0]
  flat = lambda x: x.reshape((2 * b,) + x.shape[2:])  # noqa: E731  (b, 2, ...) -> (2b, ...)
  tokens_bt = flat(batch['tokens'])
  logits_btv = model(tokens_bt, flat(batch['positions']), flat(batch['segment_ids']))
  mask_bt = flat(batch['reply_mask'])[:, 1:].astype(jnp.float32)
  logps_bt = losses.token_log_probs(logits_btv[:, :-1], tokens_bt[:, 1:])
  logps_b = jnp.sum(logps_bt * mask_bt, axis=-1)
  return logps_b.reshape(b, 2), mask_bt.sum(axis=-1).reshape(b, 2)


def preference_loss_fn(loss: str, beta: float, label_smoothing: float = 0.0,
                       gamma: float = 0.0, nll_coef: float = 0.0) -> LossFn:
  """DPO / IPO / SimPO on pairs (`losses.preference_loss_sum`) over batch['weight']; the
  reference's log-probs come with the batch (`ref_logp`), computed once before training."""
  def loss_fn(model, batch):
    logps_b2, lengths_b2 = pair_logps_b2(model, batch)
    ref = batch.get('ref_logp')
    return losses.preference_loss_sum(
        logps_b2[:, 0], logps_b2[:, 1], batch['weight'], loss=loss, beta=beta,
        ref_chosen_b=None if ref is None else ref[:, 0],
        ref_rejected_b=None if ref is None else ref[:, 1], label_smoothing=label_smoothing,
        len_chosen_b=jnp.maximum(lengths_b2[:, 0], 1.0),
        len_rejected_b=jnp.maximum(lengths_b2[:, 1], 1.0), gamma=gamma, nll_coef=nll_coef)
  return loss_fn


def jit_train_step(train_step, shardings, mesh, rules, batch_keys):
  """Compile once with explicit in/out shardings; the old state is donated."""
  batch_sh = {k: sharding.batch_sharding(mesh, rules) for k in batch_keys}
  return jax.jit(train_step, in_shardings=(shardings, batch_sh),
                 out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=(0,))
