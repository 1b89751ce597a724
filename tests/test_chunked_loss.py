"""The chunked cross-entropy (config.train.loss_chunk) and the one over weighted positions
only (config.train.loss_positions) equal the whole-sequence one."""

import jax
import numpy as np
import pytest

import helpers
from jaxgpt import sharding
from jaxgpt import config as config_lib
from jaxgpt import model as model_lib
from jaxgpt.train import trainer


def loss_and_grads(family, mesh_shape, loss_chunk, loss_positions=0):
  """(sums, grads) of the LM loss (z-loss, packed segments) on a tiny model."""
  cfg = helpers.tiny_config(family, mesh=mesh_shape, seq_len=16)
  mesh = sharding.make_mesh(cfg, helpers.devices_for(mesh_shape))
  mcfg = model_lib.ModelConfig.from_config(cfg)
  graphdef, abstract, logical = model_lib.abstract_model(mcfg)
  param_sh = sharding.param_shardings(abstract, logical, mesh, mcfg.rules)
  params = jax.device_put(helpers.random_params(mcfg, seed=0), param_sh)
  loss_fn = trainer.lm_loss_fn(z_loss=1e-3, use_segment_ids=True, loss_chunk=loss_chunk,
                               loss_positions=loss_positions)
  grad_fn = trainer.make_grad_fn(graphdef, loss_fn, 1, mcfg.rules)
  batch = helpers.random_batch(cfg, segments=True)
  batch_sh = {k: sharding.batch_sharding(mesh, mcfg.rules) for k in batch}
  with jax.set_mesh(mesh):
    grads, sums = jax.jit(grad_fn, in_shardings=(param_sh, batch_sh),
                          out_shardings=(param_sh, None))(params, batch)
  return jax.device_get((sums, grads))


@pytest.mark.parametrize('family', ['llama', 'gpt2'])  # gpt2: logits from the tied embedding
def test_chunked_loss_on_8_devices_equals_whole_loss_on_one(family):
  # 16 positions in chunks of 6: three chunks, the last padded with weight-0 positions.
  ref_sums, ref_grads = loss_and_grads(family, (1, 1, 1), loss_chunk=0)
  sums, grads = loss_and_grads(family, (2, 2, 2), loss_chunk=6)
  for k in ('loss', 'weight'):
    np.testing.assert_allclose(sums[k], ref_sums[k], rtol=1e-5)
  scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(ref_grads))
  for (path, g), ref in zip(jax.tree_util.tree_flatten_with_path(grads)[0],
                            jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(g, ref, rtol=1e-4, atol=1e-5 * scale,
                               err_msg=jax.tree_util.keystr(path))


def test_loss_at_weighted_positions_on_8_devices_equals_whole_loss_on_one():
  """The LM head on the 16 - (zero-weight positions) weighted positions only: the same loss
  and gradients; on fewer positions than a row has targets, the rest are counted."""
  ref_sums, ref_grads = loss_and_grads('llama', (1, 1, 1), loss_chunk=0)
  sums, grads = loss_and_grads('llama', (2, 2, 2), loss_chunk=0, loss_positions=16)
  np.testing.assert_allclose(sums['loss'], ref_sums['loss'], rtol=1e-5)
  assert sums['weight'] == ref_sums['weight'] and sums['dropped_targets'] == 0
  for g, ref in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(g, ref, rtol=1e-4, atol=1e-6)
  few, _ = loss_and_grads('llama', (1, 1, 1), loss_chunk=0, loss_positions=4)
  assert few['weight'] == 16 * 4 and few['dropped_targets'] == ref_sums['weight'] - 64


def test_negative_loss_chunk_is_a_config_error():
  cfg = helpers.tiny_config()
  cfg.train.loss_chunk = -1
  with pytest.raises(config_lib.ConfigError, match='config.train.loss_chunk=-1'):
    config_lib.validate(cfg, 1)


def test_eval_step_in_micro_batches_equals_the_whole_batch():
  """The eval step sums its loss over config.train.micro_batches slices (an eval batch is
  a train batch: whole, its logits need not fit)."""
  cfg = helpers.tiny_config(mesh=(2, 2, 2), seq_len=16)
  mesh = sharding.make_mesh(cfg, helpers.devices_for((2, 2, 2)))
  mcfg = model_lib.ModelConfig.from_config(cfg)
  graphdef, abstract, logical = model_lib.abstract_model(mcfg)
  param_sh = sharding.param_shardings(abstract, logical, mesh, mcfg.rules)
  params = jax.device_put(helpers.random_params(mcfg, seed=0), param_sh)
  batch = helpers.random_batch(cfg)
  loss_fn = trainer.lm_loss_fn(loss_chunk=6)

  def sums(micro_batches):
    step = trainer.make_eval_step(graphdef, loss_fn, param_sh, mesh, mcfg.rules, list(batch),
                                  micro_batches)
    with jax.set_mesh(mesh):
      return jax.device_get(step(params, batch))

  whole, micro = sums(1), sums(2)
  for k in ('loss', 'weight'):
    np.testing.assert_allclose(micro[k], whole[k], rtol=1e-5)
