"""Sharded loss, gradients and one optimizer update equal the single-device result."""

import functools

import jax
import numpy as np
import pytest

import helpers
from jaxgpt import sharding
from jaxgpt import model as model_lib
from jaxgpt.train import optim, trainer

MESHES = [(1, 8, 1), (8, 1, 1), (2, 2, 2), (1, 2, 4)]
# (scan, remat, micro_batches); 'dots_saveable' is checked against the others on one
# device below.
VARIANTS = [(True, 'full', 2), (False, 'none', 2)]
# Every mesh runs both families and both variants, each variant with the other family
# (a 2 x 2 Latin square per mesh: half the compiles of the full product).
CASES = [(mesh, family, VARIANTS[(i + j) % 2])
         for i, mesh in enumerate(MESHES) for j, family in enumerate(['llama', 'gpt2'])]


@functools.cache
def initial_state(family):
  """The train state of a fresh init, on the host (same for every mesh and variant)."""
  cfg = helpers.tiny_config(family)
  mesh = sharding.make_mesh(cfg, jax.devices()[:1])
  mcfg = model_lib.ModelConfig.from_config(cfg)
  _, state, _ = trainer.create_train_state(mcfg, mesh, optim.make_optimizer(cfg.train), seed=0)
  return jax.device_get(state)


def one_step(cfg, devices):
  """Loss, gradients and updated params of one train step on the given devices."""
  mesh = sharding.make_mesh(cfg, devices)
  mcfg = model_lib.ModelConfig.from_config(cfg)
  opt = optim.make_optimizer(cfg.train)
  graphdef, abstract_params, logical = model_lib.abstract_model(mcfg)
  param_sh = sharding.param_shardings(abstract_params, logical, mesh, mcfg.rules)
  host_state = initial_state(cfg.model.family)
  shardings = trainer.state_shardings(host_state, param_sh, opt, mesh)
  state = jax.device_put(host_state, shardings)
  loss_fn = trainer.lm_loss_fn(z_loss=1e-4, use_segment_ids=True)
  grad_fn = trainer.make_grad_fn(graphdef, loss_fn, cfg.train.micro_batches, mcfg.rules)
  step = trainer.make_train_step(graphdef, opt, loss_fn, cfg.train.micro_batches, mcfg.rules)
  batch = helpers.random_batch(cfg, segments=True)
  batch_sh = {k: sharding.batch_sharding(mesh, mcfg.rules) for k in batch}
  with jax.set_mesh(mesh):
    grads, _ = jax.jit(grad_fn, in_shardings=(param_sh, batch_sh),
                       out_shardings=(param_sh, None))(state['params'], batch)
    jit_step = trainer.jit_train_step(step, shardings, mesh, mcfg.rules, batch.keys())
    new_state, metrics = jit_step(state, batch)
  return jax.device_get((metrics['loss'], grads, new_state['params']))


@functools.cache
def reference(family, scan, remat, micro):
  cfg = helpers.tiny_config(family, mesh=(1, 1, 1), scan=scan, remat=remat, micro_batches=micro)
  return one_step(cfg, jax.devices()[:1])


def assert_trees_close(a, b, rtol, atol, what):
  flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
  flat_b = jax.tree.leaves(b)
  for (path, x), y in zip(flat_a, flat_b):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol,
                               err_msg=f'{what} {jax.tree_util.keystr(path)}')


@pytest.mark.parametrize(
    'mesh,family,variant', CASES,
    ids=['x'.join(map(str, m)) + f'-{f}-' + ('scan_remat' if v[0] else 'plain')
         for m, f, v in CASES])
def test_sharded_step_matches_single_device(mesh, family, variant):
  scan, remat, micro = variant
  cfg = helpers.tiny_config(family, mesh=mesh, scan=scan, remat=remat, micro_batches=micro)
  loss, grads, params = one_step(cfg, helpers.devices_for(mesh))
  ref_loss, ref_grads, ref_params = reference(family, scan, remat, micro)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(ref_grads))
  assert_trees_close(grads, ref_grads, rtol=1e-4, atol=1e-5 * scale, what='grad')
  assert_trees_close(params, ref_params, rtol=1e-5, atol=1e-6, what='param')


@pytest.mark.parametrize('family', ['llama', 'gpt2'])
def test_scan_remat_and_accumulation_do_not_change_the_step(family):
  """Unrolled vs scanned layers, remat and 1 vs 2 micro-batches give the same step."""
  base_loss, base_grads, base_params = reference(family, False, 'none', 1)
  for variant in [(True, 'full', 2), (False, 'none', 2), (True, 'dots_saveable', 1)]:
    loss, grads, params = reference(family, *variant)
    np.testing.assert_allclose(loss, base_loss, rtol=1e-6)
    assert_trees_close(grads, base_grads, rtol=1e-4, atol=1e-7, what=f'grad {variant}')
    assert_trees_close(params, base_params, rtol=1e-5, atol=1e-6, what=f'param {variant}')
