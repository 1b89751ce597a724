"""LoRA: adapters that start as the base model, train alone, shard like their kernels, merge
exactly, and checkpoint without the base."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from jaxgpt import sharding
from jaxgpt import model as model_lib
from jaxgpt.model import lora
from jaxgpt.train import metrics, trainer


def lora_cfg(mesh=(1, 1, 1), family='llama', rank=4, targets=lora.TARGETS):
  cfg = helpers.tiny_config(family, mesh=mesh, batch_size=8)
  if family == 'gemma3':  # a sliding-window layer and a global one
    cfg.model.sliding_window, cfg.model.window_pattern = 4, 'SG'
  cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets = rank, 8.0, targets
  return cfg


@functools.cache
def models(family='llama'):
  """(plain mcfg, adapted mcfg, base params, adapter-initialised params) on one device."""
  cfg = lora_cfg(family=family)
  base_mcfg = model_lib.ModelConfig.from_config(cfg)
  mcfg = lora.adapted(base_mcfg, cfg.lora)
  base = helpers.random_params(base_mcfg, seed=0, std=0.1)
  fresh = jax.device_get(model_lib.fresh_params(mcfg, seed=1))
  adapters = {k: v for k, v in lora.trainable(fresh).items()}
  return cfg, base_mcfg, mcfg, base, lora.combine(base, adapters)


def logits(mcfg, params, tokens_bt):
  graphdef = model_lib.abstract_model(mcfg)[0]
  return np.asarray(jax.jit(lambda p, t: model_lib.merge(graphdef, p)(t))(params, tokens_bt))


TOKENS = np.random.default_rng(0).integers(0, 256, (2, 12)).astype(np.int32)


@pytest.mark.parametrize('family', ['llama', 'gpt2', 'gemma3'])
def test_lora_at_init_is_the_base_model(family):
  _, base_mcfg, mcfg, base, params = models(family)
  # Every projection has its adapter; B starts at zero, A does not.
  n_adapted = sum(1 for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]
                  if p[-1].key == 'lora_b')
  assert n_adapted == (7 if family != 'gpt2' else 6)
  assert all(not np.any(b) for b in jax.tree.leaves(
      lora._select(params, lambda path: path[-1].key == 'lora_b')))
  np.testing.assert_array_equal(logits(mcfg, params, TOKENS), logits(base_mcfg, base, TOKENS))


def perturbed(params, seed=3):
  """Adapters with non-zero B, so they change the model."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(
      lambda p, x: rng.normal(0, 0.2, x.shape).astype(x.dtype) if p[-1].key == 'lora_b' else x,
      params)


def test_merged_model_equals_the_adapted_forward_and_the_base_is_shared():
  _, base_mcfg, mcfg, base, params = models()
  params = perturbed(params)
  adapted = logits(mcfg, params, TOKENS)
  assert np.abs(adapted - logits(base_mcfg, base, TOKENS)).max() > 1e-2  # adapters matter
  merged = jax.jit(lambda p: lora.merged(p, mcfg.lora_alpha / mcfg.lora_rank))(params)
  assert not lora.has_adapters(merged)
  np.testing.assert_allclose(logits(base_mcfg, merged, TOKENS), adapted, atol=2e-5, rtol=1e-5)
  # The reference with adapters off is the base, from the same arrays (no copy).
  off = lora.frozen(params)
  assert jax.tree.structure(off) == jax.tree.structure(base)
  assert all(a is b for a, b in zip(jax.tree.leaves(off), jax.tree.leaves(lora.frozen(params))))
  np.testing.assert_array_equal(logits(base_mcfg, off, TOKENS), logits(base_mcfg, base, TOKENS))


def test_gradients_reach_adapters_and_scalar_head_only():
  cfg, _, mcfg, _, params = models()
  head_mcfg = dataclasses.replace(mcfg, scalar_head=True)
  full = perturbed(lora.combine(params, {'scalar_head': jax.device_get(
      model_lib.fresh_params(head_mcfg, 0)['scalar_head'])}))
  assert set(lora.trainable(full)) == {'blocks', 'scalar_head'}
  graphdef = model_lib.abstract_model(head_mcfg)[0]

  def loss_fn(model, batch):
    s = model.scalars(model.hidden(batch['inputs'])).sum() + model(batch['inputs']).mean()
    return s, {'loss': s, 'weight': jnp.float32(1.0)}
  grads, _ = jax.jit(trainer.make_grad_fn(graphdef, loss_fn, 1, mcfg.rules))(
      full, {'inputs': TOKENS})
  paths = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(grads)[0]}
  assert paths and all('lora_' in p or 'scalar_head' in p for p in paths), paths
  assert all(np.any(g) for g in jax.tree.leaves(grads))  # every adapter gets a gradient


@pytest.mark.parametrize('mesh', [(2, 2, 2), (1, 2, 4)])
def test_lora_step_on_a_mesh_equals_one_device(mesh):
  def step(mesh_shape):
    cfg = lora_cfg(mesh=mesh_shape)
    mcfg = lora.adapted(model_lib.ModelConfig.from_config(cfg), cfg.lora)
    return helpers.one_train_step(cfg, mcfg, trainer.lm_loss_fn(), helpers.random_batch(cfg))
  loss, grads, params = step(mesh)
  assert set(jax.tree.leaves(jax.tree_util.tree_map_with_path(
      lambda p, _: p[-1].key, grads))) == {'lora_a', 'lora_b'}
  helpers.assert_same_step((loss, grads, params), step((1, 1, 1)))


def test_adapters_shard_like_their_kernels():
  cfg = lora_cfg(mesh=(1, 2, 4))
  mcfg = lora.adapted(model_lib.ModelConfig.from_config(cfg), cfg.lora)
  mesh = sharding.make_mesh(cfg, helpers.devices_for((1, 2, 4)))
  _, abstract, logical = model_lib.abstract_model(mcfg)
  sh = sharding.param_shardings(abstract, logical, mesh, mcfg.rules)
  q = sh['blocks']['attn']['q']
  kernel, a, b = q['kernel'].spec, q['lora_a'].spec, q['lora_b'].spec
  assert tuple(a) == tuple(kernel[:2]) + (None,)        # (layers, embed | rank)
  assert tuple(b) == (kernel[0], None) + tuple(kernel[2:])  # (layers, rank | heads, head_dim)


def test_model_flops_of_a_lora_update_leave_out_frozen_weight_gradients():
  cfg, base_mcfg, mcfg, base, params = models()
  n_base, n_adapters = model_lib.count_params(base), model_lib.count_params(lora.trainable(params))
  seq = cfg.data.seq_len
  full = metrics.flops_per_token(base_mcfg, seq, n_base)
  adapted = metrics.flops_per_token(mcfg, seq, n_base + n_adapters, trained_params=n_adapters)
  attn = full - 6 * (n_base - (0 if base_mcfg.tied else base_mcfg.padded_vocab_size *
                                base_mcfg.d_model))
  # frozen: forward + input gradient (4 a parameter); adapters: 6 each
  assert adapted == pytest.approx(full - 2 * (full - attn) / 6 + 6 * n_adapters)
  head = base_mcfg.padded_vocab_size * base_mcfg.d_model
  quarter = metrics.flops_per_token(base_mcfg, seq, n_base, head_positions=seq // 4)
  assert quarter == pytest.approx(full - 6 * head * (1 - (seq // 4) / seq))


def dir_bytes(path):
  import os
  return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path)
             for f in files)


@pytest.mark.slow
def test_lora_sft_reward_dpo_save_adapters_and_read_back_merged(smoke_run, tmp_path):
  """SFT, the reward model and DPO with config.lora on the smoke run's models: each
  checkpoint holds adapters (and the reward model's head), not the base; a reader gets
  the base with the adapters merged, equal to the trained adapted model's outputs."""
  import os
  import shutil
  from jaxgpt import run as run_lib
  from jaxgpt.inference import loading
  from jaxgpt.train import checkpoint as ckpt_lib
  workdir = smoke_run[0]
  wd = str(tmp_path / 'lora')
  shutil.copytree(os.path.join(workdir, 'pretrain'), os.path.join(wd, 'pretrain'))
  common = {'lora.rank': 4, 'tokenizer.path': os.path.join(workdir, 'tokenizer.model'),
            'sft.steps': 2, 'reward.steps': 2, 'dpo.steps': 2}
  for stage in ('sft', 'reward', 'dpo'):
    result = run_lib.run(helpers.smoke_config(stage=stage, **common), wd)[stage]
    directory = ckpt_lib.checkpoints_dir(wd, stage)
    saved = ckpt_lib.Checkpointer(directory, async_save=False)
    step = saved.latest_step()
    meta = saved.read_meta(step)
    saved.close()
    assert meta['lora']['params']['rank'] == 4
    # The saved state is the adapters (and head) with their optimizer moments: a fraction of
    # the base's bytes, which the pretraining checkpoint holds with its moments.
    assert dir_bytes(os.path.join(directory, str(step))) < 0.5 * dir_bytes(
        os.path.join(wd, 'pretrain', 'checkpoints'))
    trained = lora.trainable(result.state['params'])
    expected_heads = {'scalar_head'} if stage == 'reward' else set()
    assert {k for k in trained if k != 'blocks'} == expected_heads
    if stage == 'reward':
      continue
    loaded = loading.load(wd, stage)
    assert not lora.has_adapters(loaded.params)
    adapted_mcfg = lora.adapted(loaded.mcfg, helpers.smoke_config(**common).lora)
    got = logits(loaded.mcfg, jax.device_get(loaded.params), TOKENS[:, :8] % 500)
    want = logits(adapted_mcfg, jax.device_get(result.state['params']), TOKENS[:, :8] % 500)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
