"""Device mesh, logical-axis rules and the shardings of parameters, state and batches.

Parameters name their axes logically ('embed', 'mlp', ...); one rules table maps each
logical name to mesh axes ('data', 'fsdp', 'tensor'). Activations use their own
names ('act_batch', ...) so weights and activations can be mapped separately.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from jaxgpt import config as config_lib

MESH_AXES = config_lib.MESH_AXES

# Which config field sets the size of each logical weight axis (for error messages).
_AXIS_FIELDS = {
    'vocab': 'config.model.vocab_size',
    'embed': 'config.model.d_model',
    'mlp': 'config.model.d_ff',
    'q_heads': 'config.model.n_heads',
    'kv_heads': 'config.model.n_kv_heads',
    'head_dim': 'config.model.head_dim',
    'positions': 'config.model.max_seq_len',
    'layers': 'config.model.n_layers',
}


def rules_tuple(rules) -> tuple:
  """Config rules (lists from overrides, or tuples) as a hashable tuple of pairs."""
  out = []
  for name, axes in rules:
    if isinstance(axes, (list, tuple)):
      axes = tuple(axes) if len(axes) != 1 else axes[0]
    out.append((name, axes))
  return tuple(out)


def with_overrides(rules, overrides) -> tuple:
  """`rules` with the entries `overrides` names replaced (e.g. config.mesh.decode_rules)."""
  rules, overrides = rules_tuple(rules), rules_tuple(overrides)
  replaced = dict(overrides)
  return tuple((n, replaced.pop(n) if n in replaced else a) for n, a in rules) + tuple(
      replaced.items())


def make_mesh(cfg, devices=None) -> jax.sharding.Mesh:
  """The ('data', 'fsdp', 'tensor') mesh from config.mesh; fails naming the field."""
  devices = list(devices if devices is not None else jax.devices())
  sizes = config_lib.mesh_shape(cfg, len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def logical_to_spec(logical_axes, rules) -> P:
  """PartitionSpec for logical axis names; a mesh axis is used at most once."""
  table = dict(rules)
  used, out = set(), []
  for name in logical_axes:
    mesh_axes = table.get(name) if name is not None else None
    if mesh_axes is None:
      out.append(None)
      continue
    mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
    mesh_axes = tuple(a for a in mesh_axes if a not in used)
    used.update(mesh_axes)
    out.append(mesh_axes if len(mesh_axes) > 1 else (mesh_axes[0] if mesh_axes else None))
  return P(*out)


def constrain(x, logical_axes, rules):
  """Sharding constraint on an activation, a no-op outside `jax.set_mesh`."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_axes, rules))


def _axis_size(mesh, mesh_axes) -> int:
  if mesh_axes is None:
    return 1
  mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else mesh_axes
  return int(np.prod([mesh.shape[a] for a in mesh_axes]))


def param_shardings(abstract_params, logical_specs, mesh, rules,
                    rules_field='config.mesh.rules'):
  """NamedShardings for a parameter tree; fails if a mesh axis does not divide a dim.

  `logical_specs` is the same tree with PartitionSpecs of logical names; `rules_field` is
  the config field `rules` comes from (for the error message).
  """
  def one(path, leaf, logical):
    spec = logical_to_spec(tuple(logical), rules)
    for dim, logical_name, mesh_axes in zip(leaf.shape, tuple(logical), spec):
      size = _axis_size(mesh, mesh_axes)
      if dim % size:
        field = _AXIS_FIELDS.get(logical_name, f"axis '{logical_name}'")
        note = {'kv_heads': ' (gpt2 uses config.model.n_heads)',
                'vocab': ' (or pad it: config.model.vocab_multiple)'}.get(logical_name, '')
        raise config_lib.ConfigError(
            f'{field}={dim} (parameter {jax.tree_util.keystr(path)}) is not divisible '
            f'by {size}: {rules_field} maps its logical axis {logical_name!r} to mesh '
            f'axes {mesh_axes!r} of that size. Change {field}{note} or config.mesh, or map '
            f"{logical_name!r} to None in {rules_field} (('{logical_name}', None)) to "
            'keep it whole.')
    return NamedSharding(mesh, spec)

  return jax.tree_util.tree_map_with_path(
      one, abstract_params, logical_specs, is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh, rules) -> NamedSharding:
  """Sharding of batch arrays (rows first): rows over the data-parallel axes."""
  return NamedSharding(mesh, logical_to_spec(('act_batch',), rules))


def abstract_with_shardings(tree, shardings):
  """ShapeDtypeStructs carrying the target shardings: what to restore or compile for."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
