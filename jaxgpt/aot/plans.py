"""What each stage compiles, as abstract programs that `jaxgpt.aot.compile_fit` measures.

A `Step` lowers one of a stage's jitted programs for a number of rows, built from the
same functions and shardings the stage runs, on abstract arguments (nothing is
allocated). A `Plan` adds what every device holds for the whole stage: the parameters of
every model and the optimizer state.

    pretrain / sft: train step, eval step, sampler prefill, sampler generation
    reward:         train step, eval step (pairs of sequences)
    ppo:            update (policy and value), score (the rollout's forward passes of
                    all four roles), sampler generation (the rollout)

The sampler programs are `sampling.decode_fn`, as evaluation and PPO run it: 'prefill'
asks for one token (the prompt's forward pass), 'generate' for the whole response (the
prefill, then one decode step per token in a while loop over the KV cache).
"""

from __future__ import annotations

import dataclasses
import math
import types
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxgpt import sharding
from jaxgpt import config as config_lib
from jaxgpt import model as model_lib
from jaxgpt.inference import sampling
from jaxgpt.rl import ppo as ppo_algo
from jaxgpt.train import metrics, optim, trainer

LM_KEYS = ('inputs', 'targets', 'weights', 'segment_ids', 'positions')
PPO_KEYS = ('mask', 'old_logp', 'old_values', 'advantages', 'returns')


@dataclasses.dataclass
class Step:
  """One compiled program of a stage."""
  name: str
  rows: int                              # batch rows the stage runs it with
  shape: Callable[[int], str]            # rows -> e.g. '32x2048', for the table
  lower: Callable[[int], Any]            # rows -> jax.stages.Lowered
  flops: Callable[[int], float]          # rows -> model FLOPs of one call, all devices
  state_bytes: float                     # per device: long-lived state among its arguments
  batch_field: str = ''                  # the config field `rows` comes from (searchable)
  unit: int = 1                          # rows must be a multiple of this
  decode_weight_bytes: float = 0.0       # a sampler program: per device, the weights as it
                                         # decodes with them (a copy, when cast or resharded)


@dataclasses.dataclass
class Plan:
  stage: str
  mesh: Any
  n_params: int                          # of the trained model(s)
  params_bytes: float                    # per device: every model's parameters
  opt_bytes: float                       # per device: optimizer state, step, rng
  steps: list[Step]

  @property
  def state_bytes(self) -> float:
    return self.params_bytes + self.opt_bytes


def bytes_per_device(tree) -> float:
  """Bytes of one device's shard of every array in `tree` (ShapeDtypeStructs with
  shardings)."""
  total = 0
  for x in jax.tree.leaves(tree):
    shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
    total += math.prod(shape) * jnp.dtype(x.dtype).itemsize
  return float(total)


def _spec(shape, dtype, sharding_):
  return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding_)


def _lower(jitted, mesh, *args):
  with jax.set_mesh(mesh):  # activation constraints need the mesh while tracing
    return jitted.lower(*args)


def _batch_unit(cfg, mesh, micro_batches: int) -> int:
  return micro_batches * config_lib.BatchShards(cfg, dict(mesh.shape)).size


def _forward_flops_per_token(mcfg, context: int, n_params: int) -> float:
  return metrics.flops_per_token(mcfg, context, n_params) / 3  # forward = a third of 6N


def _train_and_eval(name_prefix, mcfg, mesh, t, loss_fn, batch_fn, shape, tokens_per_row,
                    context, batch_field, unit):
  """(graphdef, abstract state, parameter count, [train step, eval step]) of the train
  state of `mcfg` and a loss over `batch_fn(rows)`."""
  rules = mcfg.rules
  optimizer = optim.make_optimizer(t)
  graphdef, abstract_state, shardings = trainer.abstract_train_state(mcfg, mesh, optimizer)
  state = sharding.abstract_with_shardings(abstract_state, shardings)
  keys = list(batch_fn(unit).keys())
  train = trainer.jit_train_step(
      trainer.make_train_step(graphdef, optimizer, loss_fn, t.micro_batches, rules,
                              lr_schedule=optim.schedule(t)), shardings, mesh, rules, keys)
  evaluate = trainer.make_eval_step(graphdef, loss_fn, shardings['params'], mesh, rules, keys,
                                    t.micro_batches)
  n = model_lib.count_params(abstract_state['params'])
  per_token = metrics.flops_per_token(mcfg, context, n)
  params_bytes = bytes_per_device(state['params'])
  steps = [
      Step(f'{name_prefix}train', t.batch_size, shape,
           lambda r: _lower(train, mesh, state, batch_fn(r)),
           lambda r: per_token * tokens_per_row * r, bytes_per_device(state), batch_field, unit),
      Step(f'{name_prefix}eval', t.batch_size, shape,
           lambda r: _lower(evaluate, mesh, state['params'], batch_fn(r)),
           lambda r: per_token / 3 * tokens_per_row * r, params_bytes, unit=unit),
  ]
  return graphdef, state, n, steps


def sampler_steps(graphdef, mcfg, mesh, params, n_params, rows, prompt_len, new_tokens,
                  names=('prefill', 'generate')) -> list[Step]:
  """`sampling.decode_fn` for (rows, prompt_len) prompts: one new token, and all of them."""
  batch_sh = sharding.batch_sharding(mesh, mcfg.rules)
  repl = sharding.replicated(mesh)
  param_sh = jax.tree.map(lambda x: x.sharding, params)
  key = jax.eval_shape(lambda: jax.random.PRNGKey(0))
  p, n = prompt_len, new_tokens
  unit = sampling.batch_multiple(mesh, mcfg.rules)

  def lower(n_new):
    out_sh = sampling.SampleOutput(tokens=batch_sh, logprobs=batch_sh, response_mask=batch_sh,
                                   lengths=batch_sh, finished=batch_sh)
    jitted = jax.jit(sampling.decode_fn(graphdef, mcfg, sampling.SamplingConfig(n_new)),
                     in_shardings=(param_sh, batch_sh, batch_sh, repl), out_shardings=out_sh)
    return lambda r: _lower(jitted, mesh, params, _spec((r, p), jnp.int32, batch_sh),
                            _spec((r,), jnp.int32, batch_sh), _spec(key.shape, key.dtype, repl))

  def prefill_flops(rows):
    return rows * p * _forward_flops_per_token(mcfg, p, n_params)

  def generate_flops(rows):  # the prefill, then n - 1 steps attending to the whole cache
    return prefill_flops(rows) + rows * (n - 1) * _forward_flops_per_token(mcfg, p + n - 1,
                                                                          n_params)

  params_bytes = bytes_per_device(params)
  weights = decode_weight_bytes(mcfg, mesh, params)
  return [Step(names[0], rows, lambda r: f'{r}x{p}', lower(1), prefill_flops, params_bytes,
               unit=unit, decode_weight_bytes=weights),
          Step(names[1], rows, lambda r: f'{r}x({p}+{n})', lower(n), generate_flops,
               params_bytes, unit=unit, decode_weight_bytes=weights)]


def decode_weight_bytes(mcfg, mesh, params) -> float:
  """Per device: the weights as `sampling.decoding_weights` prepares them, cast to the
  decoding dtype and in the decode layout (config.mesh.decode_rules): replicated over
  'fsdp', they cost fsdp times the bytes of a training shard."""
  mcfg = sampling.decoding_model(None, mcfg)[1]
  layout = sampling.decode_layout(mcfg)
  shardings = (jax.tree.map(lambda x: x.sharding, params) if layout is None
               else sampling.decode_param_shardings(mcfg, mesh, layout))

  def one(path, x, sharding_):
    cast = getattr(path[-1], 'key', None) in sampling.CAST_ONCE
    return _spec(x.shape, mcfg.dtype if cast else x.dtype, sharding_)

  return bytes_per_device(jax.tree_util.tree_map_with_path(one, params, shardings))


def _opt_bytes(state) -> float:
  return bytes_per_device(state) - bytes_per_device(state['params'])


def lm_plan(cfg, stage: str, mesh, decode_rows: int, prompt_len: int) -> Plan:
  """Pretraining or SFT: the LM loss over (B, seq_len) rows, and the sampler."""
  t = cfg.train if stage == 'pretrain' else config_lib.stage_train_config(cfg, stage)
  mcfg = model_lib.ModelConfig.from_config(cfg)
  segments = bool(cfg.data.segment_ids) if stage == 'pretrain' else bool(cfg.sft.packing)
  loss_fn = trainer.lm_loss_fn(t.z_loss, segments, t.loss_chunk)
  seq = cfg.data.seq_len
  batch_sh = sharding.batch_sharding(mesh, mcfg.rules)

  def batch(rows):
    return {k: _spec((rows, seq), jnp.float32 if k == 'weights' else jnp.int32, batch_sh)
            for k in LM_KEYS}

  graphdef, state, n, steps = _train_and_eval(
      '', mcfg, mesh, t, loss_fn, batch, lambda r: f'{r}x{seq}', seq, seq,
      'config.train.batch_size', _batch_unit(cfg, mesh, t.micro_batches))
  new_tokens = t.sample_tokens if stage == 'pretrain' else cfg.sft.eval_tokens
  steps += sampler_steps(graphdef, mcfg, mesh, state['params'], n, decode_rows,
                         prompt_len or mcfg.max_seq_len - new_tokens, new_tokens)
  return Plan(stage, mesh, n, bytes_per_device(state['params']), _opt_bytes(state), steps)


def reward_plan(cfg, mesh) -> Plan:
  """The reward model's Bradley-Terry loss over (B, 2, T) pairs."""
  t = config_lib.stage_train_config(cfg, 'reward')
  mcfg = model_lib.ModelConfig.for_stage(cfg, 'reward')
  seq = cfg.reward.seq_len or cfg.data.seq_len
  batch_sh = sharding.batch_sharding(mesh, mcfg.rules)

  def batch(rows):
    out = {k: _spec((rows, 2, seq), jnp.int32, batch_sh)
           for k in ('tokens', 'positions', 'segment_ids')}
    out['readout'] = _spec((rows, 2), jnp.int32, batch_sh)
    out.update({k: _spec((rows,), jnp.float32, batch_sh) for k in ('margin', 'weight')})
    return out

  field = 'config.reward.batch_size' if cfg.reward.batch_size else 'config.train.batch_size'
  _, state, n, steps = _train_and_eval(
      'reward ', mcfg, mesh, t, trainer.reward_loss_fn(cfg.reward.center), batch,
      lambda r: f'{r}x2x{seq}', 2 * seq, seq, field, _batch_unit(cfg, mesh, t.micro_batches))
  return Plan('reward', mesh, n, bytes_per_device(state['params']), _opt_bytes(state), steps)


def ppo_plan(cfg, mesh, prompt_len: int) -> Plan:
  """PPO: the minibatch update of policy (and value model), the scoring pass over a
  rollout, and the rollout itself; the reference and reward models stay resident."""
  p = cfg.ppo
  roles = ppo_algo.Roles.from_config(cfg)
  rules = roles.policy.rules
  batch_sh = sharding.batch_sharding(mesh, rules)
  repl = sharding.replicated(mesh)
  optimizers = ppo_algo.role_optimizers(cfg, p.rollout_batch // p.batch_size * p.epochs)
  graphdefs, abstract, shardings = ppo_algo.abstract_state(roles, optimizers, mesh)
  state = sharding.abstract_with_shardings(abstract, shardings)
  frozen, frozen_graphdefs = {}, {}
  for role in ('reference', 'reward'):
    frozen_graphdefs[role], frozen[role] = model_lib.abstract_sharded_params(
        getattr(roles, role), mesh)
  trained = {r: state[r]['params'] for r in roles.trained()}
  n_new = p.response_tokens
  prompt = prompt_len or cfg.model.max_seq_len - n_new - 1
  width = prompt + n_new + 1  # prompt, response, <|reward|> readout

  def minibatch(rows):
    out = {'tokens': _spec((rows, width), jnp.int32, batch_sh)}
    out.update({k: _spec((rows, width - 1), jnp.float32, batch_sh) for k in PPO_KEYS})
    if p.ptx_coef:
      out['ptx'] = {k: _spec((cfg.train.batch_size, cfg.data.seq_len),
                             jnp.float32 if k == 'weights' else jnp.int32, batch_sh)
                    for k in LM_KEYS}
    return out

  update = jax.jit(ppo_algo.make_update(graphdefs, optimizers,
                                         ppo_algo.make_loss_fns(cfg, roles), p.micro_batches,
                                         rules),
                   in_shardings=(shardings, batch_sh), out_shardings=(shardings, repl),
                   donate_argnums=(0,))
  tok = types.SimpleNamespace(reward_id=1, pad_id=0)  # ids only enter as values
  prepare = jax.jit(ppo_algo.make_prepare(graphdefs, frozen_graphdefs, roles, cfg, tok, None),
                    out_shardings=(batch_sh, repl))

  def rollout(rows):
    def b(shape, dtype):
      return _spec(shape, dtype, batch_sh)
    out = sampling.SampleOutput(
        tokens=b((rows, n_new), jnp.int32), logprobs=b((rows, n_new), jnp.float32),
        response_mask=b((rows, n_new), jnp.int32), lengths=b((rows,), jnp.int32),
        finished=b((rows,), jnp.bool_))
    return (trained, frozen, _spec((), jnp.float32, repl), b((rows, prompt), jnp.int32),
            b((rows,), jnp.int32), out)

  counts = {r: model_lib.count_params(abstract[r]['params']) for r in roles.trained()}
  ctx = width - 1
  per_token = {r: metrics.flops_per_token(getattr(roles, r), ctx, counts[r]) for r in counts}
  # The value head on the policy's trunk runs the trunk a second time (rollout.values).
  passes = 2 if roles.value is None else 1

  def update_flops(rows):
    return rows * ctx * (passes * per_token['policy'] + per_token.get('value', 0.0))

  def score_flops(rows):  # forward passes of policy, reference, value and reward models
    return rows * ctx * 4 * per_token['policy'] / 3
  unit = _batch_unit(cfg, mesh, p.micro_batches)
  trained_bytes = bytes_per_device(trained)
  steps = [
      Step('ppo update', p.batch_size, lambda r: f'{r}x{width}',
           lambda r: _lower(update, mesh, state, minibatch(r)), update_flops,
           bytes_per_device(state), 'config.ppo.batch_size', unit),
      Step('ppo score', p.rollout_batch, lambda r: f'{r}x{width}',
           lambda r: _lower(prepare, mesh, *rollout(r)), score_flops,
           trained_bytes + bytes_per_device(frozen), unit=_batch_unit(cfg, mesh, 1)),
  ]
  steps += sampler_steps(graphdefs['policy'], roles.policy, mesh, trained['policy'],
                         counts['policy'], p.rollout_batch, prompt, n_new)[1:]
  steps[-1].name = 'rollout'
  return Plan('ppo', mesh, sum(counts.values()), trained_bytes + bytes_per_device(frozen),
              bytes_per_device(state) - trained_bytes, steps)


def plan(cfg, stage: str, mesh, decode_rows: int = 0, prompt_len: int = 0) -> Plan:
  """The programs of `stage` on `mesh`. decode_rows / prompt_len: the sampler's batch
  and prompt width (0: the stage's own: PPO's rollout batch, else one row per data-
  parallel device; the longest prompt that leaves room for the response)."""
  if stage in ('pretrain', 'sft'):
    rows = decode_rows or sampling.batch_multiple(mesh, sharding.rules_tuple(cfg.mesh.rules))
    return lm_plan(cfg, stage, mesh, rows, prompt_len)
  if stage == 'reward':
    return reward_plan(cfg, mesh)
  if stage == 'ppo':
    return ppo_plan(cfg, mesh, prompt_len)
  raise config_lib.ConfigError(f'--stage={stage!r} must be one of pretrain, sft, reward, ppo.')
