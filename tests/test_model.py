"""The decoder: KV-cache decoding, document masking, learning, the 7B shape, scalar head."""

import dataclasses
import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import helpers
from jaxgpt import sharding
from jaxgpt import config as config_lib
from jaxgpt import model as model_lib
from jaxgpt.model import families
from jaxgpt.train import optim, trainer

MESH = (2, 2, 2)
ROOT = pathlib.Path(__file__).resolve().parents[1]


@functools.cache
def setup(family, scan=True, mesh_shape=MESH, scalar_head=False):
  """(cfg, mcfg, mesh, graphdef, params placed on the mesh) with random weights."""
  cfg = helpers.tiny_config(family, mesh=mesh_shape, scan=scan, batch_size=4)
  if family == 'gemma3':  # a sliding-window layer (4 positions, its own RoPE base), a global one
    m = cfg.model
    m.sliding_window, m.window_pattern, m.rope_theta, m.local_rope_theta = 4, 'SG', 1e6, 1e4
  mcfg = model_lib.ModelConfig.from_config(cfg, scalar_head=scalar_head)
  mesh = sharding.make_mesh(cfg, helpers.devices_for(mesh_shape))
  graphdef, _, _ = model_lib.abstract_model(mcfg)
  # Scanned and unrolled models share one parameter tree (and so the same weights).
  params = helpers.random_params(mcfg, seed=0, std=0.1)
  return cfg, mcfg, mesh, graphdef, helpers.place(params, mcfg, mesh)


# -- KV cache -----------------------------------------------------------------------------

PROMPT_LENS = np.array([5, 9, 3, 12], np.int32)  # rows of different lengths, right-padded
SEQ = 16
STEPS = SEQ - int(PROMPT_LENS.min())              # single steps until the shortest row ends
CACHE = int(PROMPT_LENS.max()) + STEPS             # 25 slots (< max_seq_len = 32)


def full_and_cached(graphdef, mcfg, params, tokens_bt, lens_b):
  """Full-forward logits, prefill logits and the logits of each single decode step.

  The prompt is right-padded with token 0 past each row's length; step s feeds row r
  its true token at position lens[r] + s (the last token again once a row is done).
  """
  model = model_lib.merge(graphdef, params)
  b, t = tokens_bt.shape
  full_btv = model(tokens_bt)
  p = int(PROMPT_LENS.max())
  pos_p = jnp.broadcast_to(jnp.arange(p), (b, p))
  prompt_bp = jnp.where(pos_p < lens_b[:, None], tokens_bt[:, :p], 0)
  h_bpd, cache = model.decode(prompt_bp, pos_p, model_lib.init_cache(mcfg, b, CACHE))
  prefill_bpv = model.logits(h_bpd)

  def step(cache, s):
    pos_b = lens_b + s
    tok_b1 = jnp.take_along_axis(tokens_bt, jnp.minimum(pos_b, t - 1)[:, None], axis=1)
    h_b1d, cache = model.decode(tok_b1, pos_b[:, None], cache)
    return cache, model.logits(h_b1d)[:, 0]

  _, steps_sbv = jax.lax.scan(step, cache, jnp.arange(STEPS))
  return full_btv, prefill_bpv, steps_sbv


@pytest.mark.parametrize('scan', [True, False], ids=['scan', 'unrolled'])
@pytest.mark.parametrize('family', ['llama', 'gpt2', 'gemma3'])
def test_kv_cache_decoding_matches_full_forward(family, scan):
  cfg, mcfg, mesh, graphdef, params = setup(family, scan)
  tokens = np.random.default_rng(1).integers(0, cfg.model.vocab_size, (4, SEQ)).astype(np.int32)
  rows = sharding.batch_sharding(mesh, mcfg.rules)
  fn = jax.jit(functools.partial(full_and_cached, graphdef, mcfg),
               in_shardings=(jax.tree.map(lambda x: x.sharding, params), rows, rows))
  with jax.set_mesh(mesh):
    full, prefill, steps = jax.device_get(fn(params, tokens, PROMPT_LENS))
  assert np.abs(full).max() > 0.5  # weights large enough for attention to be selective
  for r, n in enumerate(PROMPT_LENS):
    np.testing.assert_allclose(prefill[r, :n], full[r, :n], rtol=1e-5, atol=1e-5,
                               err_msg=f'prefill row {r}')
    n_steps = SEQ - n
    np.testing.assert_allclose(steps[:n_steps, r], full[r, n:], rtol=1e-5, atol=1e-5,
                               err_msg=f'decode steps row {r}')


# -- families -----------------------------------------------------------------------------

def test_a_family_is_only_its_switches():
  """family='gemma3' is LLaMA with Gemma 3's switches set: the same model config, the same
  parameter tree; a switch set in the config wins over the family's (Qwen 3 without its
  q/k norms has LLaMA's tree)."""
  gemma = helpers.tiny_config('gemma3')
  gemma.model.sliding_window = 4
  llama = helpers.tiny_config('llama')
  llama.model.update(families.preset('gemma3'), sliding_window=4, n_kv_heads=8)
  as_gemma = dataclasses.replace(model_lib.ModelConfig.from_config(llama), family='gemma3')
  assert as_gemma == model_lib.ModelConfig.from_config(gemma)
  qwen3 = helpers.tiny_config('llama')
  qwen3.model.family, qwen3.model.qk_norm = 'qwen3', False
  trees = [jax.tree.structure(model_lib.abstract_model(model_lib.ModelConfig.from_config(c))[1])
           for c in (qwen3, helpers.tiny_config('llama'), gemma)]
  assert trees[0] == trees[1] != trees[2]
  assert model_lib.ModelConfig.from_config(gemma).layer_windows == (4, 4)  # 'SSSSSG', 2 layers


# -- segment ids --------------------------------------------------------------------------

@pytest.mark.parametrize('family', ['llama', 'gpt2'])
def test_segment_ids_block_attention_across_documents(family):
  """Row 0: doc 1 (6 tokens) + doc 2 (10); row 1: the same with doc 1 changed; row 2:
  doc 2 alone at the start. Doc 2's logits are the same in all three rows."""
  cfg, mcfg, mesh, graphdef, params = setup(family)
  rng = np.random.default_rng(2)
  v, n1, n2 = cfg.model.vocab_size, 6, 10
  doc1, doc1_other, doc2 = (rng.integers(0, v, n) for n in (n1, n1, n2))
  pad = rng.integers(0, v, n1)
  tokens = np.stack([np.r_[doc1, doc2], np.r_[doc1_other, doc2], np.r_[doc2, pad],
                     np.r_[doc1, doc2]]).astype(np.int32)
  two_docs = np.r_[np.zeros(n1), np.ones(n2)]
  segments = np.stack([two_docs, two_docs, 1 - two_docs[::-1], two_docs]).astype(np.int32)
  restart = lambda a, b: np.r_[np.arange(a), np.arange(b)]  # noqa: E731
  positions = np.stack([restart(n1, n2), restart(n1, n2), restart(n2, n1),
                        restart(n1, n2)]).astype(np.int32)
  rows = sharding.batch_sharding(mesh, mcfg.rules)
  fn = jax.jit(lambda p, t, pos, seg: model_lib.merge(graphdef, p)(t, pos, seg),
               in_shardings=(jax.tree.map(lambda x: x.sharding, params), rows, rows, rows))
  with jax.set_mesh(mesh):
    logits = np.asarray(fn(params, tokens, positions, segments))
  np.testing.assert_allclose(logits[1, n1:], logits[0, n1:], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(logits[2, :n2], logits[0, n1:], rtol=1e-5, atol=1e-5)
  assert np.abs(logits[1, :n1] - logits[0, :n1]).max() > 1e-2  # doc 1 did change


# -- learning -----------------------------------------------------------------------------

def test_tiny_model_overfits_one_batch():
  cfg = helpers.tiny_config('llama', batch_size=4, seq_len=16)
  t = cfg.train
  t.lr, t.warmup_steps, t.min_lr_ratio, t.steps, t.weight_decay = 1e-2, 1, 1.0, 10_000, 0.0
  mcfg = model_lib.ModelConfig.from_config(cfg)
  mesh = sharding.make_mesh(cfg, jax.devices()[:1])
  opt = optim.make_optimizer(t)
  graphdef, state, shardings = trainer.create_train_state(mcfg, mesh, opt, seed=0)
  batch = helpers.random_batch(cfg, seed=3)
  batch['weights'] = np.ones_like(batch['weights'])
  step = trainer.make_train_step(graphdef, opt, trainer.lm_loss_fn(), 1, mcfg.rules)
  jit_step = trainer.jit_train_step(step, shardings, mesh, mcfg.rules, batch.keys())
  batch = jax.device_put(batch, sharding.batch_sharding(mesh, mcfg.rules))
  losses = []
  with jax.set_mesh(mesh):
    for _ in range(80):
      state, metrics = jit_step(state, batch)
      losses.append(metrics['loss'])
  losses = np.asarray(jax.device_get(losses))
  assert losses[0] > 5.0, losses[0]          # ~log(256) at init
  assert losses[-1] < 0.05, losses[-10:]


# -- LLaMA-7B, abstractly -----------------------------------------------------------------

def _experiment(name):
  return helpers.load_experiment(name).get_config()


def test_llama_7b_abstract_state_has_6_7b_params_and_allocates_nothing():
  cfg = _experiment('llama_7b')
  sizes = config_lib.validate(cfg, 8)
  assert sizes == {'data': 1, 'fsdp': 8, 'tensor': 1}
  mcfg = model_lib.ModelConfig.from_config(cfg)
  live_before = sum(a.nbytes for a in jax.live_arrays())

  _, abstract_params, _ = model_lib.abstract_model(mcfg)
  n = model_lib.count_params(abstract_params)
  assert n == 6_738_415_616, n  # the LLaMA-7B paper's count (untied head, no biases)

  # the trainer's path: abstract params -> AdamW init under eval_shape -> state shardings
  mesh = sharding.make_mesh(cfg, jax.devices())
  opt = optim.make_optimizer(cfg.train)
  _, state, state_sh = trainer.abstract_train_state(mcfg, mesh, opt)
  leaves = jax.tree.leaves(state)
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
  assert jax.tree.structure(state['params']) == jax.tree.structure(abstract_params)
  # AdamW's two moments have one float32 entry per parameter each
  assert model_lib.count_params(state['opt_state']) == pytest.approx(2 * n, abs=100)
  total_bytes = sum(x.size * x.dtype.itemsize for x in leaves)
  assert total_bytes == pytest.approx(3 * 4 * n, abs=100)  # float32 params + mu + nu

  # AdamW's moments are sharded like their parameters; FSDP over 8 devices leaves each
  # device 1/8 of the params and moments
  for moment in ('mu', 'nu'):
    assert optax.tree.get(state_sh['opt_state'], moment) == state_sh['params']
  per_device = sum(np.prod(sh.shard_shape(x.shape)) * x.dtype.itemsize
                   for x, sh in zip(leaves, jax.tree.leaves(state_sh)))
  assert per_device == pytest.approx(total_bytes / 8, rel=1e-3)

  live_after = sum(a.nbytes for a in jax.live_arrays())
  assert live_after - live_before < 1e6  # nothing of the model's size was allocated


@pytest.mark.parametrize('name,count', [('llama3_8b', 8_030_261_248), ('qwen3_8b', 8_190_735_360),
                                        ('gemma3_1b', 999_885_952)])
def test_family_experiments_have_the_published_parameter_counts(name, count):
  """The experiment files' architectures have exactly the published models' parameters
  (Llama 3.1 8B, Qwen3 8B, Gemma 3 1B), counted abstractly."""
  mcfg = model_lib.ModelConfig.from_config(_experiment(name))
  assert model_lib.count_params(model_lib.abstract_model(mcfg)[1]) == count


# -- scalar head --------------------------------------------------------------------------

def test_scalar_head_gives_one_float32_per_position():
  cfg, mcfg, mesh, graphdef, params = setup('llama', mesh_shape=(1, 1, 1), scalar_head=True)
  assert mcfg.scalar_head and 'scalar_head' in params
  tokens = np.random.default_rng(4).integers(0, 256, (4, 16)).astype(np.int32)

  @jax.jit
  def fn(params, tokens):
    model = model_lib.merge(graphdef, params)
    h = model.hidden(tokens)
    return h, model.scalars(h)

  with jax.set_mesh(mesh):
    hidden, scalars = jax.device_get(fn(params, tokens))
  assert scalars.shape == (4, 16) and scalars.dtype == np.float32
  head = jax.device_get(params['scalar_head'])
  np.testing.assert_allclose(scalars, hidden @ head['kernel'] + head['bias'], rtol=1e-5,
                             atol=1e-5)


# -- bfloat16 compute ---------------------------------------------------------------------

@pytest.mark.parametrize('family', ['llama', 'gpt2'])
def test_bfloat16_compute_keeps_float32_params_and_tracks_float32(family):
  """compute dtype bf16 (as gpt2_124m / llama_7b use): the step stays close to fp32 and
  parameters and optimizer state stay float32, on a sharded mesh."""
  out = {}
  for dtype in ('float32', 'bfloat16'):
    cfg = helpers.tiny_config(family, mesh=(2, 2, 2), remat='dots_saveable')
    cfg.model.dtype = dtype
    mesh = sharding.make_mesh(cfg, helpers.devices_for((2, 2, 2)))
    mcfg = model_lib.ModelConfig.from_config(cfg)
    opt = optim.make_optimizer(cfg.train)
    graphdef, state, shardings = trainer.create_train_state(mcfg, mesh, opt, seed=0)
    batch = helpers.random_batch(cfg)
    step = trainer.jit_train_step(trainer.make_train_step(graphdef, opt, trainer.lm_loss_fn(), 1,
                                                          mcfg.rules),
                                  shardings, mesh, mcfg.rules, batch.keys())
    with jax.set_mesh(mesh):
      new_state, metrics = step(state, batch)
    out[dtype] = jax.device_get(metrics)
    assert {x.dtype for x in jax.tree.leaves(new_state['params'])} == {jnp.dtype('float32')}
  np.testing.assert_allclose(out['bfloat16']['loss'], out['float32']['loss'], rtol=1e-2)
  np.testing.assert_allclose(out['bfloat16']['grad_norm'], out['float32']['grad_norm'], rtol=3e-2)


@pytest.mark.parametrize('eqn, x_shape, w_shape', [('btd,df->btf', (2, 3, 4), (4, 5)),
                                                   ('btNh,Nhd->btd', (2, 3, 2, 4), (2, 4, 5))])
def test_einsum_f32_sums_gradients_are_the_float32_ones_rounded(eqn, x_shape, w_shape):
  """bf16 operands summed in float32 (what XLA:CPU runs on AMX): the value and both
  gradients equal float32 arithmetic on the same bf16 numbers, rounded to bf16 (within
  one bf16 step: the sums may run in another order)."""
  from jaxgpt.model import layers  # pylint: disable=import-outside-toplevel
  kx, kw, kg = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, x_shape).astype(jnp.bfloat16)
  w = jax.random.normal(kw, w_shape).astype(jnp.bfloat16)
  y_shape = jax.eval_shape(lambda: jnp.einsum(eqn, x, w)).shape
  g = jax.random.normal(kg, y_shape).astype(jnp.bfloat16)

  def vjp(f, *args):
    y, back = jax.vjp(f, *args)
    return (y,) + back(g.astype(y.dtype))

  got = vjp(lambda a, b: layers.einsum_f32_sums(eqn, a, b), x, w)
  want = vjp(lambda a, b: jnp.einsum(eqn, a, b),
             x.astype(jnp.float32), w.astype(jnp.float32))
  for a, b in zip(got, want):
    assert a.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                               rtol=2 ** -7, atol=2 ** -7)
