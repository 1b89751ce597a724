"""Checkpoints restore into any mesh; periodic saves by steps or by minutes."""

import time

import jax
import numpy as np
import pytest

import helpers
from jaxgpt import sharding
from jaxgpt import model as model_lib
from jaxgpt.train import optim, trainer
from jaxgpt.train import checkpoint as ckpt_lib


def _state_on(mesh_shape):
  cfg = helpers.tiny_config('llama', mesh=mesh_shape)
  mesh = sharding.make_mesh(cfg, helpers.devices_for(mesh_shape))
  mcfg = model_lib.ModelConfig.from_config(cfg)
  opt = optim.make_optimizer(cfg.train)
  _, abstract, shardings = trainer.abstract_train_state(mcfg, mesh, opt)
  return mesh, mcfg, opt, abstract, shardings


@pytest.mark.parametrize('target_mesh', [(2, 2, 2), (1, 1, 1), (1, 2, 4)],
                         ids=lambda m: 'x'.join(map(str, m)))
def test_restore_into_another_mesh(tmp_path, target_mesh):
  mesh, mcfg, opt, _, _ = _state_on((1, 8, 1))
  _, state, _ = trainer.create_train_state(mcfg, mesh, opt, seed=3)
  saver = ckpt_lib.Checkpointer(str(tmp_path), async_save=False)
  saver.save(7, state, meta={'note': 'x'})
  saver.close()

  _, _, _, abstract, shardings = _state_on(target_mesh)
  reader = ckpt_lib.Checkpointer(str(tmp_path))
  restored, meta = reader.restore(7, sharding.abstract_with_shardings(abstract, shardings))
  reader.close()
  assert meta == {'note': 'x'}
  for a, b, sh in zip(jax.tree.leaves(state), jax.tree.leaves(restored),
                      jax.tree.leaves(shardings)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert b.sharding == sh


def test_periodic_saves_by_steps_and_by_minutes(tmp_path):
  by_steps = ckpt_lib.Checkpointer(str(tmp_path / 'a'), every_steps=5)
  assert [s for s in range(1, 16) if by_steps.due(s)] == [5, 10, 15]
  by_steps.close()
  by_time = ckpt_lib.Checkpointer(str(tmp_path / 'b'), every_minutes=0.5 / 60)
  assert not by_time.due(1)
  time.sleep(0.6)
  assert by_time.due(2)
  by_time.close()
