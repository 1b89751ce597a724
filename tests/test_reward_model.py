"""The reward model: score read at the readout token, the pairwise loss, sharded gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from jaxgpt import losses, sharding
from jaxgpt import model as model_lib
from jaxgpt.train import trainer

T = 24


def rm_setup(family, mesh_shape=(1, 1, 1)):
  cfg = helpers.tiny_config(family, mesh=mesh_shape, seq_len=T)
  cfg.model.max_seq_len = 32
  mcfg = model_lib.ModelConfig.for_stage(cfg, 'reward')
  mesh = sharding.make_mesh(cfg, helpers.devices_for(mesh_shape))
  graphdef = model_lib.abstract_model(mcfg)[0]
  params = helpers.place(helpers.random_params(mcfg, seed=1), mcfg, mesh)
  return cfg, mcfg, mesh, graphdef, params


@pytest.mark.parametrize('family', ['llama', 'gpt2'])
def test_reward_model_has_no_lm_head_and_a_scaled_scalar_head(family):
  cfg = helpers.tiny_config(family)
  mcfg = model_lib.ModelConfig.for_stage(cfg, 'reward')
  _, abstract, _ = model_lib.abstract_model(mcfg)
  assert 'lm_head' not in abstract and 'scalar_head' in abstract
  head = jax.device_get(model_lib.fresh_params(mcfg, seed=0)['scalar_head'])
  d = cfg.model.d_model
  assert float(head['bias']) == 0.0
  assert abs(float(np.std(head['kernel'])) - (d + 1) ** -0.5) < 0.3 * (d + 1) ** -0.5


def _scores(graphdef, params, mesh, tokens, positions, segment_ids, readout):
  with jax.set_mesh(mesh):
    fn = jax.jit(lambda p, *a: model_lib.merge(graphdef, p).score(*a))
    return np.asarray(jax.device_get(fn(params, tokens, positions, segment_ids, readout)))


@pytest.mark.parametrize('family', ['llama', 'gpt2'])
def test_score_is_read_at_the_readout_token_whatever_surrounds_it(family):
  """Padding side and amount, the row's place in the batch, and tokens after the readout
  leave every score unchanged."""
  cfg, mcfg, mesh, graphdef, params = rm_setup(family)
  rng = np.random.default_rng(0)
  lengths = [5, 12, 17, 9]
  seqs = [rng.integers(3, cfg.model.vocab_size, n) for n in lengths]

  def right_padded(width, tail_garbage=False):
    b = len(seqs)
    tokens = np.zeros((b, width), np.int32)
    seg = np.zeros((b, width), np.int32)
    for i, s in enumerate(seqs):
      tokens[i, :len(s)] = s
      seg[i, :len(s)] = 1
      if tail_garbage:  # real tokens after the readout, in the same segment
        tokens[i, len(s):] = rng.integers(3, cfg.model.vocab_size, width - len(s))
        seg[i, len(s):] = 1
    pos = np.broadcast_to(np.arange(width), (b, width)).astype(np.int32)
    return tokens, pos, seg, np.array([len(s) - 1 for s in seqs], np.int32)

  def left_padded(width):
    b = len(seqs)
    tokens = np.zeros((b, width), np.int32)
    seg = np.zeros((b, width), np.int32)
    pos = np.zeros((b, width), np.int32)
    for i, s in enumerate(seqs):
      tokens[i, width - len(s):] = s
      seg[i, width - len(s):] = 1
      pos[i, width - len(s):] = np.arange(len(s))
    return tokens, pos, seg, np.full((b,), width - 1, np.int32)

  ref = _scores(graphdef, params, mesh, *right_padded(T))
  np.testing.assert_allclose(_scores(graphdef, params, mesh, *right_padded(32)), ref,
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(_scores(graphdef, params, mesh, *right_padded(T, True)), ref,
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(_scores(graphdef, params, mesh, *left_padded(T)), ref,
                             rtol=1e-5, atol=1e-5)
  perm = np.array([2, 0, 3, 1])
  shuffled = tuple(x[perm] for x in right_padded(T))
  np.testing.assert_allclose(_scores(graphdef, params, mesh, *shuffled), ref[perm],
                             rtol=1e-5, atol=1e-5)
  # ... and the score does depend on the readout token's own prefix.
  tokens, pos, seg, readout = right_padded(T)
  tokens[0, 2] = (tokens[0, 2] + 1) % cfg.model.vocab_size
  assert abs(_scores(graphdef, params, mesh, tokens, pos, seg, readout)[0] - ref[0]) > 1e-6


def test_pairwise_loss_and_its_gradient_equal_hand_computed_values():
  r_c = jnp.array([1.0, 0.5, -1.0, 2.0])
  r_r = jnp.array([0.0, 1.0, -1.0, 0.0])
  margin = jnp.array([0.0, 0.0, 0.5, 1.0])
  weight = jnp.array([1.0, 0.5, 0.5, 0.0])  # a K=2... set split in two, a padding pair
  center = 0.01

  def total(rc, rr):
    return losses.pairwise_reward_loss_sum(rc, rr, weight, margin, center)

  loss_sum, sums = total(r_c, r_r)
  sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
  d = np.array([1.0, -0.5, -0.5, 1.0])  # r_c - r_r - margin
  w = np.array([1.0, 0.5, 0.5, 0.0])
  nll = -np.log(sig(d))
  expected = (w * nll).sum() + center * (w * np.array([1.0, 1.5, -2.0, 2.0]) ** 2).sum()
  np.testing.assert_allclose(float(loss_sum), expected, rtol=1e-6)
  np.testing.assert_allclose(float(sums['loss']), (w * nll).sum(), rtol=1e-6)
  assert float(sums['weight']) == 2.0
  assert float(sums['accuracy']) == 1.0  # pair 0 right, pair 1 wrong, pair 2 a tie
  np.testing.assert_allclose(float(sums['margin']), 1.0 - 0.25 + 0.0, rtol=1e-6)
  g_c, g_r = jax.grad(lambda a, b: total(a, b)[0], argnums=(0, 1))(r_c, r_r)
  s = np.array([1.0, 1.5, -2.0, 2.0])
  np.testing.assert_allclose(np.asarray(g_c), -w * sig(-d) + 2 * center * w * s, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(g_r), w * sig(-d) + 2 * center * w * s, rtol=1e-5)


def pair_batch(cfg, seed=0):
  rng = np.random.default_rng(seed)
  b, v = cfg.train.batch_size, cfg.model.vocab_size
  lengths = rng.integers(4, T + 1, size=(b, 2))
  tokens = rng.integers(3, v, size=(b, 2, T)).astype(np.int32)
  seg = (np.arange(T)[None, None] < lengths[..., None]).astype(np.int32)
  tokens = np.where(seg > 0, tokens, 0).astype(np.int32)
  pos = np.where(seg > 0, np.arange(T)[None, None], 0).astype(np.int32)
  return {'tokens': tokens, 'positions': pos, 'segment_ids': seg,
          'readout': (lengths - 1).astype(np.int32),
          'margin': rng.random(b).astype(np.float32),
          'weight': np.where(np.arange(b) < b - 2, 0.5, 0.0).astype(np.float32)}


def reward_step(family, mesh_shape, micro_batches=1):
  cfg = helpers.tiny_config(family, mesh=mesh_shape, seq_len=T, micro_batches=micro_batches)
  cfg.model.max_seq_len = 32
  return helpers.one_train_step(cfg, model_lib.ModelConfig.for_stage(cfg, 'reward'),
                                trainer.reward_loss_fn(center=0.01), pair_batch(cfg))


@pytest.mark.parametrize('family,mesh', [('llama', (2, 2, 2)), ('gpt2', (1, 2, 4))],
                         ids=lambda x: x if isinstance(x, str) else 'x'.join(map(str, x)))
def test_sharded_reward_step_matches_one_device(family, mesh):
  helpers.assert_same_step(reward_step(family, mesh, micro_batches=2),
                           reward_step(family, (1, 1, 1)))
