"""LoRA: low-rank adapters beside the projection kernels, and the parameter trees around them.

With config.lora.rank = r > 0, each targeted projection y = x W gets two parameters beside
its kernel, A (the kernel's input dims x r, Gaussian) and B (r x its output dims, zeros),
and computes y = x W + (alpha / r) (x A) B: at initialisation exactly the base model. A
and B carry the kernel's logical axes on their kernel-side dims (the rank dim is never
sharded), so they are placed like the kernel they adapt on any mesh.

What trains: the adapters, plus a scalar head (reward / value) when the model has one; the
base stays frozen. `trainable` / `frozen` split a parameter tree by that rule (trees with
no adapter train whole), `combine` puts the halves back, `merged` folds each adapter into
its kernel (W + (alpha / r) A B) for the sampler of a next stage, export and inference.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt import config as config_lib

TARGETS = ('q', 'k', 'v', 'o', 'gate', 'up', 'down')
ADAPTERS = ('lora_a', 'lora_b')


def adapted(mcfg, lora_cfg):
  """`mcfg` with config.lora's adapters on (unchanged when lora.rank is 0)."""
  if not lora_cfg.rank:
    return mcfg
  return dataclasses.replace(mcfg, lora_rank=int(lora_cfg.rank),
                             lora_alpha=float(lora_cfg.alpha or lora_cfg.rank),
                             lora_targets=tuple(lora_cfg.targets))


def plain(mcfg):
  """`mcfg` without adapters (the reference model, a merged model)."""
  return dataclasses.replace(mcfg, lora_rank=0, lora_alpha=0.0, lora_targets=())


def validate(cfg) -> None:
  """config.lora's fields."""
  lo = cfg.lora
  if not isinstance(lo.rank, int) or lo.rank < 0:
    raise config_lib.ConfigError(f'config.lora.rank={lo.rank!r} must be an int >= 0 (0: off).')
  targets = tuple(lo.targets) if isinstance(lo.targets, (tuple, list)) else (lo.targets,)
  unknown = [t for t in targets if t not in TARGETS]
  if unknown or (lo.rank and not targets):
    raise config_lib.ConfigError(
        f'config.lora.targets={lo.targets!r}: name one or more of {TARGETS} '
        "(e.g. \"--config.lora.targets=('q','v')\").")
  if lo.alpha < 0:
    raise config_lib.ConfigError(f'config.lora.alpha={lo.alpha} must be >= 0 (0: alpha = rank).')


def _key(path_entry) -> str:
  return getattr(path_entry, 'key', str(path_entry))


def _trainable_path(path, with_adapters: bool) -> bool:
  if not with_adapters:
    return True
  names = [_key(p) for p in path]
  return names[-1] in ADAPTERS or 'scalar_head' in names


def has_adapters(tree) -> bool:
  return any(_key(path[-1]) in ADAPTERS
             for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0])


def _select(tree, keep):
  """The nested-dict subtree of the leaves whose path `keep` accepts (empty dicts dropped)."""
  def walk(node, path):
    if not isinstance(node, dict):
      return node if keep(path) else None
    out = {}
    for k, v in node.items():
      sub = walk(v, path + (jax.tree_util.DictKey(k),))
      if sub is not None and not (isinstance(sub, dict) and not sub):
        out[k] = sub
    return out
  return walk(tree, ())


def trainable(tree):
  """What trains in a parameter tree (or a tree shaped like one): the adapters and a scalar
  head when it has adapters, else all of it."""
  with_adapters = has_adapters(tree)
  return _select(tree, lambda path: _trainable_path(path, with_adapters))


def frozen(tree):
  """The rest of `tree`: its base, when it has adapters (else {}); the same arrays, not a
  copy (the reference model of PPO and GRPO under LoRA)."""
  with_adapters = has_adapters(tree)
  return _select(tree, lambda path: not _trainable_path(path, with_adapters))


def combine(*trees):
  """Deep merge of nested dicts with disjoint (or later-wins) leaves."""
  out: dict = {}
  for tree in trees:
    for k, v in tree.items():
      if isinstance(v, dict) and isinstance(out.get(k), dict):
        out[k] = combine(out[k], v)
      else:
        out[k] = v
  return out


def without_adapters(tree):
  """`tree` less its adapters (what `merged` returns, a scalar head kept)."""
  return _select(tree, lambda path: _key(path[-1]) not in ADAPTERS)


def merged(params, scale: float):
  """Every adapter folded into its kernel, W + scale A B (scale = alpha / rank); the tree
  without adapters (call under jit to keep the shardings)."""
  def walk(node):
    if not isinstance(node, dict):
      return node
    if 'lora_a' in node:
      a, b, w = node['lora_a'], node['lora_b'], node['kernel']
      lead = a.ndim + b.ndim - 2 - w.ndim      # stacked layers in front
      r = a.shape[-1]
      a2 = a.reshape(a.shape[:lead] + (-1, r)).astype(jnp.float32)
      b2 = b.reshape(b.shape[:lead] + (r, -1)).astype(jnp.float32)
      delta = jnp.einsum('...ir,...ro->...io', a2, b2).reshape(w.shape)
      node = {k: v for k, v in node.items() if k not in ADAPTERS}
      node['kernel'] = (w.astype(jnp.float32) + scale * delta).astype(w.dtype)
      return node
    return {k: walk(v) for k, v in node.items()}
  return walk(params)


def fingerprint(base) -> list[float]:
  """Per-leaf float64 sums of a base model's parameters (in path order): what a LoRA
  checkpoint records of the base it was trained on, to refuse another base on resume."""
  sums = jax.tree.map(lambda x: jnp.sum(jnp.abs(x.astype(jnp.float32))), base)
  return [float(v) for v in jax.tree.leaves(jax.device_get(sums))]


def same_base(recorded, current, rtol: float = 1e-4) -> bool:
  recorded, current = np.asarray(recorded, np.float64), np.asarray(current, np.float64)
  return recorded.shape == current.shape and bool(np.allclose(recorded, current, rtol=rtol))
