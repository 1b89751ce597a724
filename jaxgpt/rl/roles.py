"""The models of an online-RL stage by role, and the state the loop trains and checkpoints.

Roles (tunix's word): the **policy** is always trained; PPO also trains a **value** model
(unless the policy carries the value head); the **reference** (the SFT model, for the KL)
and the **reward** model are frozen: never donated, updated or given optimizer state, held
in `frozen_dtype`, and absent when the algorithm does not need them (no reward model when
the reward spec has no `model` term, no reference without a KL term).

The state: {'step', 'kl_coef', 'rng', role: {'params', 'opt_state'} per trained role}.
With config.lora the trained roles carry adapters (only they, and a value head, train) and
the reference is the policy's base with the adapters off, read from the policy's state.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections

from jaxgpt import model as model_lib
from jaxgpt import sharding
from jaxgpt.model import lora
from jaxgpt.train import optim, trainer


@dataclasses.dataclass(frozen=True)
class Roles:
  """Model settings by role; a role an algorithm does not use is None."""
  policy: model_lib.ModelConfig
  value: model_lib.ModelConfig | None = None
  reference: model_lib.ModelConfig | None = None
  reward: model_lib.ModelConfig | None = None

  @classmethod
  def build(cls, cfg, section, *, value_head: str = '', reference: bool = True,
            reward: bool = True) -> 'Roles':
    """value_head: '' (none), 'policy' (a scalar head on the policy's trunk) or 'reward'
    (a separate value model shaped like the reward model)."""
    frozen = jnp.dtype(section.frozen_dtype)
    policy = model_lib.ModelConfig.from_config(cfg, scalar_head=value_head == 'policy')
    rm = model_lib.ModelConfig.for_stage(cfg, 'reward')
    return cls(policy=lora.adapted(policy, cfg.lora),
               value=lora.adapted(rm, cfg.lora) if value_head == 'reward' else None,
               reference=(dataclasses.replace(policy, scalar_head=False, param_dtype=frozen)
                          if reference else None),
               reward=dataclasses.replace(rm, param_dtype=frozen) if reward else None)

  @property
  def reference_is_policy_base(self) -> bool:
    """With LoRA the reference is the policy with its adapters off: the policy's own base
    arrays, never a second copy (`reference_params`)."""
    return self.reference is not None and bool(self.policy.lora_rank)

  def trained(self) -> dict:
    return {'policy': self.policy, **({'value': self.value} if self.value else {})}

  def frozen(self) -> dict:
    return {r: m for r, m in (('reference', self.reference), ('reward', self.reward)) if m}


def reference_params(frozen: dict, params: dict):
  """The reference's parameters: its own frozen copy, or (LoRA) the policy's base."""
  if 'reference' in frozen:
    return frozen['reference']
  return lora.frozen(params['policy'])


def role_optimizers(cfg, section, roles: Roles, updates_per_iteration: int) -> dict:
  """(optimizer, schedule) per trained role: config.train's AdamW with the role's lr
  (`lr`, `value_lr`), warm-up and cosine decay counted in optimizer updates."""
  out = {}
  for role in roles.trained():
    t = ml_collections.ConfigDict(cfg.train.to_dict())
    t.lr = section.lr if role == 'policy' else section.value_lr
    t.steps = section.steps * updates_per_iteration
    t.warmup_steps = section.warmup_steps * updates_per_iteration
    out[role] = (optim.make_optimizer(t), optim.schedule(t))
  return out


def abstract_state(roles: Roles, optimizers, mesh):
  """(graphdefs, abstract state, shardings) of the trained roles' state, nothing allocated."""
  repl = sharding.replicated(mesh)
  graphdefs, state, shardings = {}, {}, {}
  for role, mcfg in roles.trained().items():
    graphdef, abstract_params, logical = model_lib.abstract_model(mcfg)
    param_sh = sharding.param_shardings(abstract_params, logical, mesh, mcfg.rules)
    opt = optimizers[role][0]
    abstract = {'params': abstract_params,
                'opt_state': jax.eval_shape(opt.init, lora.trainable(abstract_params))}
    sh = trainer.state_shardings(abstract, param_sh, opt, mesh)
    graphdefs[role] = graphdef
    state[role] = abstract
    shardings[role] = {'params': sh['params'], 'opt_state': sh['opt_state']}
  state.update(step=jax.ShapeDtypeStruct((), jnp.int32),
               kl_coef=jax.ShapeDtypeStruct((), jnp.float32),
               rng=jax.eval_shape(lambda: jax.random.PRNGKey(0)))
  shardings.update(step=repl, kl_coef=repl, rng=repl)
  return graphdefs, state, shardings


def setup(cfg, section, roles: Roles, mesh):
  """What every algorithm's `build` starts from: (optimizers, graphdefs, abstract state,
  shardings, frozen roles' graphdefs), the schedules counted in the section's updates
  (epochs x minibatches an iteration)."""
  updates = section.rollout_batch // section.batch_size * section.epochs
  optimizers = role_optimizers(cfg, section, roles, updates)
  graphdefs, abstract, shardings = abstract_state(roles, optimizers, mesh)
  frozen_graphdefs = {r: model_lib.abstract_model(m)[0] for r, m in roles.frozen().items()}
  return optimizers, graphdefs, abstract, shardings, frozen_graphdefs


def make_state(params, section, seed: int, optimizers, shardings, mesh):
  """The iteration-0 state around trained roles' parameters (fresh optimizer states)."""
  state = {'step': jnp.zeros((), jnp.int32), 'kl_coef': jnp.float32(section.kl_coef),
           'rng': jax.random.PRNGKey(seed)}
  with jax.set_mesh(mesh):
    for role, p in params.items():
      opt = optimizers[role][0]
      state[role] = {'params': p, 'opt_state': jax.jit(
          opt.init, out_shardings=shardings[role]['opt_state'])(lora.trainable(p))}
  return jax.device_put(state, {k: shardings[k] for k in state})
