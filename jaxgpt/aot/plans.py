"""What each stage compiles, as abstract programs that `jaxgpt.aot.compile_fit` measures.

A `Step` lowers one of a stage's jitted programs for a number of rows, built from the
same functions and shardings the stage runs, on abstract arguments (nothing is
allocated). A `Plan` adds what every device holds for the whole stage: the parameters of
every model and the optimizer state.

    pretrain / sft: train step, eval step, sampler prefill, sampler generation
    reward:         train step, eval step (pairs of sequences)
    ppo, grpo:      update (the trained roles), score (the rollout's forward passes of
                    every role), sampler generation (the rollout)

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
from jaxgpt.data import reward as reward_data
from jaxgpt.model import lora
from jaxgpt.inference import sampling
from jaxgpt.rl import grpo as grpo_algo
from jaxgpt.rl import loop as rl_loop
from jaxgpt.rl import ppo as ppo_algo
from jaxgpt.stages import PIPELINE, ppo_checker
from jaxgpt.stages import dpo as dpo_stage
from jaxgpt.train import metrics, optim, trainer

LM_KEYS = ('inputs', 'targets', 'weights', 'segment_ids', 'positions')
SECTION_OF = {'ppo_checker': 'ppo', 'grpo_base': 'grpo'}  # stages whose config section has another name


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
  if stage != 'pretrain':  # config.lora: adapters beside the frozen kernels
    mcfg = lora.adapted(mcfg, cfg.lora)
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


def pair_plan(cfg, stage: str, mesh) -> Plan:
  """The reward model's Bradley-Terry loss, or DPO's preference loss on the policy, over
  (B, 2, T) comparison pairs."""
  t = config_lib.stage_train_config(cfg, stage)
  mcfg = lora.adapted(model_lib.ModelConfig.for_stage(cfg, stage), cfg.lora)
  _, _, seq = reward_data.reward_shape(cfg, 1, stage)
  batch_sh = sharding.batch_sharding(mesh, mcfg.rules)
  loss_fn = (trainer.reward_loss_fn(cfg.reward.center) if stage == 'reward'
             else dpo_stage.loss_fn(cfg))

  def batch(rows):
    out = {k: _spec((rows, 2, seq), jnp.int32, batch_sh)
           for k in ('tokens', 'positions', 'segment_ids')}
    out['readout'] = _spec((rows, 2), jnp.int32, batch_sh)
    out.update({k: _spec((rows,), jnp.float32, batch_sh) for k in ('margin', 'weight')})
    if stage == 'dpo':
      out['reply_mask'] = _spec((rows, 2, seq), jnp.int32, batch_sh)
      if cfg.dpo.loss != 'simpo':
        out['ref_logp'] = _spec((rows, 2), jnp.float32, batch_sh)
    return out

  field = (f'config.{stage}.batch_size' if cfg[stage].batch_size else 'config.train.batch_size')
  _, state, n, steps = _train_and_eval(
      f'{stage} ', mcfg, mesh, t, loss_fn, batch, lambda r: f'{r}x2x{seq}', 2 * seq, seq, field,
      _batch_unit(cfg, mesh, t.micro_batches))
  return Plan(stage, mesh, n, bytes_per_device(state['params']), _opt_bytes(state), steps)


def online_rl_plan(cfg, stage: str, mesh, prompt_len: int) -> Plan:
  """PPO or GRPO: the minibatch update of the trained roles, the scoring pass over a
  rollout, and the rollout itself; the frozen roles (reference, reward) stay resident."""
  section = SECTION_OF.get(stage, stage)
  if stage == 'ppo_checker':
    cfg = ppo_checker.stage_config(cfg)
  elif stage == 'grpo_base':
    cfg = config_lib.with_grpo_base(cfg)
  s = cfg[section]
  tok = types.SimpleNamespace(reward_id=1, pad_id=0, end_of_turn_id=2, eot_id=3)  # values only
  algo = {'ppo': ppo_algo.build, 'grpo': grpo_algo.build}[section](cfg, tok, mesh, None)
  roles, graphdefs = algo.roles, algo.graphdefs
  batch_sh = sharding.batch_sharding(mesh, roles.policy.rules)
  repl = sharding.replicated(mesh)
  state = sharding.abstract_with_shardings(algo.abstract, algo.shardings)
  frozen = {r: model_lib.abstract_sharded_params(m, mesh)[1] for r, m in roles.frozen().items()}
  trained = {r: state[r]['params'] for r in roles.trained()}
  n_new = s.response_tokens
  prompt = prompt_len or cfg.model.max_seq_len - n_new - 1
  width = prompt + n_new + 1  # prompt, response, <|reward|> readout

  def b(shape, dtype):
    return _spec(shape, dtype, batch_sh)

  def rollout(rows):
    out = sampling.SampleOutput(
        tokens=b((rows, n_new), jnp.int32), logprobs=b((rows, n_new), jnp.float32),
        response_mask=b((rows, n_new), jnp.int32), lengths=b((rows,), jnp.int32),
        finished=b((rows,), jnp.bool_),
        entropy=b((rows, n_new), jnp.float32) if s.old_logp == 'sampler' else None)
    return (trained, frozen, _spec((), jnp.float32, repl), rl_loop.Rollout(
        b((rows, prompt), jnp.int32), b((rows,), jnp.int32), out, b((rows,), jnp.float32),
        b((rows,), jnp.float32)))

  def minibatch(rows):
    # The batch `prepare` makes, cut to `rows`: the exact keys and shapes of the algorithm.
    with jax.set_mesh(mesh):
      whole = jax.eval_shape(algo.prepare, *rollout(s.rollout_batch))[0]
    out = {k: b((rows,) + v.shape[1:], v.dtype) for k, v in whole.items()}
    if s.get('ptx_coef'):
      out['ptx'] = {k: _spec((cfg.train.batch_size, cfg.data.seq_len),
                             jnp.float32 if k == 'weights' else jnp.int32, batch_sh)
                    for k in LM_KEYS}
    return out

  counts = {r: model_lib.count_params(algo.abstract[r]['params']) for r in roles.trained()}
  ctx = width - 1
  per_token = {r: metrics.flops_per_token(getattr(roles, r), ctx, counts[r]) for r in counts}
  # The value head on the policy's trunk runs the trunk a second time (rollout.values).
  passes = 2 if roles.policy.scalar_head else 1

  def update_flops(rows):
    return rows * ctx * (passes * per_token['policy'] + per_token.get('value', 0.0))

  forwards = 1 + len(frozen) + (roles.value is not None)

  def score_flops(rows):  # forward passes of the policy, frozen roles and value model
    return rows * ctx * forwards * per_token['policy'] / 3
  unit = _batch_unit(cfg, mesh, s.micro_batches)
  trained_bytes = bytes_per_device(trained)
  steps = [
      Step(f'{stage} update', s.batch_size, lambda r: f'{r}x{width}',
           lambda r: _lower(algo.update, mesh, state, minibatch(r)), update_flops,
           bytes_per_device(state), f'config.{section}.batch_size', unit),
      Step(f'{stage} score', s.rollout_batch, lambda r: f'{r}x{width}',
           lambda r: _lower(algo.prepare, mesh, *rollout(r)), score_flops,
           trained_bytes + bytes_per_device(frozen), unit=_batch_unit(cfg, mesh, 1)),
  ]
  steps += sampler_steps(graphdefs['policy'], roles.policy, mesh, trained['policy'],
                         counts['policy'], s.rollout_batch, prompt, n_new)[1:]
  steps[-1].name = 'rollout'
  return Plan(stage, mesh, sum(counts.values()), trained_bytes + bytes_per_device(frozen),
              bytes_per_device(state) - trained_bytes, steps)


def plan(cfg, stage: str, mesh, decode_rows: int = 0, prompt_len: int = 0) -> Plan:
  """The programs of `stage` on `mesh`. decode_rows / prompt_len: the sampler's batch
  and prompt width (0: the stage's own: PPO's rollout batch, else one row per data-
  parallel device; the longest prompt that leaves room for the response)."""
  if stage in ('pretrain', 'sft'):
    rows = decode_rows or sampling.batch_multiple(mesh, sharding.rules_tuple(cfg.mesh.rules))
    return lm_plan(cfg, stage, mesh, rows, prompt_len)
  if stage in ('reward', 'dpo'):
    return pair_plan(cfg, stage, mesh)
  if stage in ('ppo', 'ppo_checker', 'grpo', 'grpo_base'):
    return online_rl_plan(cfg, stage, mesh, prompt_len)
  raise config_lib.ConfigError(f'--stage={stage!r} must be one of {PIPELINE}.')
