"""Creating parameters already sharded: abstract init -> shardings -> jitted init."""

from __future__ import annotations

import jax
from flax import nnx

from jaxgpt import sharding
from jaxgpt.model.transformer import ModelConfig, Transformer


def abstract_model(mcfg: ModelConfig):
  """(graphdef, abstract params, logical specs) without allocating any parameter; also
  under `jax.set_mesh` (e.g. the sampler's, inside jit), where nnx would otherwise read
  the logical axis names as mesh axes."""
  with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), ())):
    abstract = nnx.eval_shape(lambda: Transformer(mcfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract, nnx.Param)
  return graphdef, nnx.to_pure_dict(state), nnx.to_pure_dict(nnx.get_partition_spec(state))


def init_params(mcfg: ModelConfig, mesh, seed: int):
  """(graphdef, params): parameters initialised directly into their shardings."""
  graphdef, abstract_params, logical = abstract_model(mcfg)
  shardings = sharding.param_shardings(abstract_params, logical, mesh, mcfg.rules)

  with jax.set_mesh(mesh):
    params = jax.jit(lambda: fresh_params(mcfg, seed), out_shardings=shardings)()
  return graphdef, params


def fresh_params(mcfg: ModelConfig, seed: int):
  """Randomly initialised parameters as a pure dict (call under jit to place them)."""
  return nnx.to_pure_dict(nnx.state(Transformer(mcfg, rngs=nnx.Rngs(seed)), nnx.Param))


def abstract_sharded_params(mcfg: ModelConfig, mesh):
  """(graphdef, ShapeDtypeStructs carrying each parameter's sharding on `mesh`): the
  target to restore parameters into."""
  graphdef, abstract_params, logical = abstract_model(mcfg)
  shardings = sharding.param_shardings(abstract_params, logical, mesh, mcfg.rules)
  return graphdef, sharding.abstract_with_shardings(abstract_params, shardings)


def merge(graphdef, params) -> Transformer:
  """The module view of a parameter tree (inside or outside jit)."""
  return nnx.merge(graphdef, params)


def count_params(params) -> int:
  """Number of parameters in a (possibly abstract) tree."""
  return sum(int(x.size) for x in jax.tree.leaves(params))
