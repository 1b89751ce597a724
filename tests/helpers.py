"""Tiny configs and shared builders for the tests."""

from __future__ import annotations

import importlib.util
import os

import jax
import numpy as np

from jaxgpt import config as config_lib

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))


def load_experiment(name):
  """The module experiments/<name>.py (experiments are files, not a package)."""
  spec = importlib.util.spec_from_file_location(
      f'experiment_{name}', os.path.join(ROOT, 'experiments', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_tool(name):
  """The module tools/<name>.py (tools are scripts, not a package)."""
  spec = importlib.util.spec_from_file_location(
      f'tool_{name}', os.path.join(ROOT, 'tools', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def set_fields(cfg, **dotted):
  """cfg with dotted-name fields set, e.g. set_fields(cfg, **{'train.steps': 4})."""
  for name, value in dotted.items():
    *parents, leaf = name.split('.')
    node = cfg
    for p in parents:
      node = node[p]
    node[leaf] = value
  return cfg


def smoke_config(**dotted):
  """experiments/tiny.py:smoke (seconds-long, real data) with dotted overrides."""
  return set_fields(load_experiment('tiny').get_config('smoke'), **dotted)


def tiny_config(family='llama', *, mesh=(1, 1, 1), scan=True, remat='none', micro_batches=1,
                batch_size=16, seq_len=16, vocab=256):
  """A model small enough to compile in a second, with dims every test mesh divides."""
  cfg = config_lib.base_config()
  m = cfg.model
  m.family = family
  m.vocab_size = vocab
  m.d_model = 64
  m.n_layers = 2
  m.n_heads = 8
  m.n_kv_heads = 4 if family == 'llama' else 8
  m.d_ff = 128
  m.max_seq_len = 32
  m.scan_layers = scan
  m.remat = remat
  cfg.tokenizer.vocab_size = vocab
  cfg.data.seq_len = seq_len
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = mesh
  t = cfg.train
  t.batch_size = batch_size
  t.micro_batches = micro_batches
  t.steps = 10
  t.warmup_steps = 2
  t.lr = 1e-2
  return cfg


def random_batch(cfg, seed=0, *, segments=False):
  """A (B, T) LM batch with random tokens and a few zero weights."""
  rng = np.random.default_rng(seed)
  b, t, v = cfg.train.batch_size, cfg.data.seq_len, cfg.model.vocab_size
  tokens = rng.integers(0, v, size=(b, t + 1)).astype(np.int32)
  weights = (rng.random((b, t)) > 0.1).astype(np.float32)
  if segments:
    boundary = rng.integers(1, t, size=(b, 1))
    segment_ids = np.where(np.arange(t)[None] < boundary, 1, 2).astype(np.int32)
    positions = np.where(segment_ids == 1, np.arange(t)[None],
                         np.arange(t)[None] - boundary).astype(np.int32)
  else:
    segment_ids = np.ones((b, t), np.int32)
    positions = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy()
  return {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:], 'weights': weights,
          'segment_ids': segment_ids, 'positions': positions}


def devices_for(mesh_shape):
  n = int(np.prod(mesh_shape))
  return jax.devices()[:n]


def random_params(mcfg, seed=0, std=0.1):
  """Host (numpy) parameters for `mcfg` without compiling anything: every leaf random,
  norm scales around 1, so a wrong mapping of any one of them shows in the outputs."""
  from jaxgpt import model as model_lib
  _, abstract, _ = model_lib.abstract_model(mcfg)
  rng = np.random.default_rng(seed)

  def one(path, leaf):
    noise = rng.normal(0.0, std, leaf.shape)
    if getattr(path[-1], 'key', None) == 'scale':
      noise = 1.0 + noise
    return noise.astype(leaf.dtype)

  return jax.tree_util.tree_map_with_path(one, abstract)


def place(params, mcfg, mesh):
  """`params` put on `mesh` in their parameter shardings."""
  from jaxgpt import sharding
  from jaxgpt import model as model_lib
  _, abstract, logical = model_lib.abstract_model(mcfg)
  return jax.device_put(params, sharding.param_shardings(abstract, logical, mesh, mcfg.rules))


def one_train_step(cfg, mcfg, loss_fn, batch, seed=2):
  """(loss, grads, updated params) of one jitted train step of `loss_fn` on `batch`, from
  random parameters, on the mesh of `cfg` (the first devices), with config.train's
  optimizer and micro-batches: what sharded-step parity tests compare across meshes."""
  from jaxgpt import sharding
  from jaxgpt import model as model_lib
  from jaxgpt.train import optim, trainer
  mesh_shape = tuple(int(cfg.mesh[a]) for a in ('data', 'fsdp', 'tensor'))
  mesh = sharding.make_mesh(cfg, devices_for(mesh_shape))
  micro_batches = cfg.train.micro_batches
  opt = optim.make_optimizer(cfg.train)
  graphdef, abstract_params, logical = model_lib.abstract_model(mcfg)
  param_sh = sharding.param_shardings(abstract_params, logical, mesh, mcfg.rules)
  host = {'step': np.zeros((), np.int32), 'params': random_params(mcfg, seed=seed),
          'rng': jax.random.PRNGKey(0)}
  from jaxgpt.model import lora
  host['opt_state'] = jax.device_get(opt.init(lora.trainable(host['params'])))
  shardings = trainer.state_shardings(host, param_sh, opt, mesh)
  state = jax.device_put(host, shardings)
  grad_fn = trainer.make_grad_fn(graphdef, loss_fn, micro_batches, mcfg.rules)
  step = trainer.make_train_step(graphdef, opt, loss_fn, micro_batches, mcfg.rules)
  batch_sh = {k: sharding.batch_sharding(mesh, mcfg.rules) for k in batch}
  with jax.set_mesh(mesh):
    grads, _ = jax.jit(grad_fn, in_shardings=(param_sh, batch_sh),
                       out_shardings=(lora.trainable(param_sh), None))(state['params'], batch)
    new_state, metrics = trainer.jit_train_step(step, shardings, mesh, mcfg.rules,
                                                batch.keys())(state, batch)
  return jax.device_get((metrics['loss'], grads, new_state['params']))


def assert_same_step(got, ref):
  """`one_train_step` results on a sharded mesh equal one device's: loss, gradients (to a
  tolerance scaled by the largest) and the updated parameters."""
  (loss, grads, params), (ref_loss, ref_grads, ref_params) = got, ref
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(ref_grads))
  assert scale > 0
  for (path, g), r in zip(jax.tree_util.tree_flatten_with_path(grads)[0],
                          jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5 * scale,
                               err_msg=f'grad {jax.tree_util.keystr(path)}')
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
