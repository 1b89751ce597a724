"""Attention kernels (`jaxgpt.model.attention_kernels`): splash equals XLA, and `auto`
picks the kernel each platform should get.

Splash runs in Pallas' interpreter here (CPU); on a TPU the same code compiles to the
Mosaic kernel (tests/test_aot.py compiles it for a TPU slice). cuDNN runs only on a GPU.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from jaxgpt import sharding
from jaxgpt import model as model_lib
from jaxgpt.model import attention_kernels as ak

B, T, N, K, H = 2, 128, 4, 2, 32   # GQA: two query heads per key/value head


def qkv_and_segments(t=T, seed=0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.normal(size=(B, t, N, H)), dtype)
  k = jnp.asarray(rng.normal(size=(B, t, K, H)), dtype)
  v = jnp.asarray(rng.normal(size=(B, t, K, H)), dtype)
  # Row 0: three packed documents; row 1: one document, then padding (segment 0).
  seg = np.stack([np.repeat([1, 2, 3], [t // 2, t // 4, t - t // 2 - t // 4]),
                  np.r_[np.ones(t - 9), np.zeros(9)]]).astype(np.int32)
  return q, k, v, jnp.asarray(seg)


def xla(q, k, v, seg):
  return ak.attend(q, k, v, seg, attention='xla')


def splash(q, k, v, seg):
  return ak.attend(q, k, v, seg, attention='splash')


def loss_and_grads(fn, q, k, v, seg):
  """A loss that weighs every output differently, so each gradient entry matters."""
  w = jnp.asarray(np.random.default_rng(9).normal(size=q.shape), jnp.float32)
  loss = lambda q, k, v: jnp.sum(fn(q, k, v, seg).astype(jnp.float32) * w)  # noqa: E731
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)


def test_splash_equals_xla_forward_and_gradients_with_segments_and_gqa():
  q, k, v, seg = qkv_and_segments()
  np.testing.assert_allclose(jax.jit(splash)(q, k, v, seg), jax.jit(xla)(q, k, v, seg),
                             rtol=1e-5, atol=1e-5)
  (loss, grads), (ref_loss, ref_grads) = (loss_and_grads(f, q, k, v, seg) for f in (splash, xla))
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  for name, g, ref in zip('qkv', grads, ref_grads):
    assert g.shape == ref.shape
    np.testing.assert_allclose(g, ref, rtol=1e-4, atol=1e-5, err_msg=f'd{name}')


def test_splash_pads_rows_that_are_not_whole_blocks():
  """40 positions, no segment ids: padded to one 128-block, the padding cut off again."""
  q, k, v, _ = qkv_and_segments(t=40, seed=1)
  np.testing.assert_allclose(jax.jit(splash)(q, k, v, None), jax.jit(xla)(q, k, v, None),
                             rtol=1e-5, atol=1e-5)
  grads = jax.grad(lambda k: jnp.sum(splash(q, k, v, None) ** 2))(k)
  ref = jax.grad(lambda k: jnp.sum(xla(q, k, v, None) ** 2))(k)
  np.testing.assert_allclose(grads, ref, rtol=1e-4, atol=1e-5)


def test_splash_inside_shard_map_on_a_mesh_equals_one_device():
  """Rows over ('data', 'fsdp'), heads over 'tensor': each device runs splash on its part."""
  cfg = helpers.tiny_config(mesh=(2, 1, 2))
  mesh = sharding.make_mesh(cfg, helpers.devices_for((2, 1, 2)))
  rules = sharding.rules_tuple(cfg.mesh.rules)
  q, k, v, seg = qkv_and_segments(seed=2)
  fn = jax.jit(lambda q, k, v, s: ak.attend(q, k, v, s, attention='splash', rules=rules))
  with jax.set_mesh(mesh):
    y = fn(q, k, v, seg)
  np.testing.assert_allclose(y, jax.jit(xla)(q, k, v, seg), rtol=1e-5, atol=1e-5)


def test_model_with_splash_matches_xla_logits():
  """The whole llama forward (GQA, packed rows of 16 positions padded to a block)."""
  cfg = helpers.tiny_config('llama')
  batch = helpers.random_batch(cfg, segments=True)
  args = (batch['inputs'], batch['positions'], batch['segment_ids'])
  logits = {}
  for attention in ('splash', 'xla'):
    mcfg = model_lib.ModelConfig.from_config(
        helpers.set_fields(cfg, **{'model.attention': attention}))
    graphdef = model_lib.abstract_model(mcfg)[0]
    params = helpers.random_params(mcfg)  # the same for both (seeded)
    logits[attention] = jax.jit(lambda p, g=graphdef: model_lib.merge(g, p)(*args))(params)
  np.testing.assert_allclose(logits['splash'], logits['xla'], rtol=1e-4, atol=1e-4)


# -- which kernel -------------------------------------------------------------------------

@pytest.mark.parametrize('platform,dtype,seq_len,head_dim,kernel', [
    ('tpu', 'bfloat16', 2048, 128, 'splash'),
    ('tpu', 'float32', 200, 64, 'splash'),     # padded to 256
    ('tpu', 'bfloat16', 64, 128, 'xla'),       # shorter than one splash block
    ('gpu', 'bfloat16', 1024, 128, 'cudnn'),
    ('gpu', 'float16', 1024, 64, 'cudnn'),
    ('gpu', 'float32', 1024, 128, 'xla'),      # cuDNN flash attention is 16-bit only
    ('gpu', 'bfloat16', 1024, 256, 'xla'),     # head wider than cuDNN takes
    ('gpu', 'bfloat16', 1023, 128, 'xla'),     # cuDNN's masked backward wants even lengths
    ('cpu', 'bfloat16', 2048, 128, 'xla'),
])
def test_auto_picks_the_kernel_of_the_platform(platform, dtype, seq_len, head_dim, kernel):
  chosen, why = ak.choose('auto', platform, seq_len=seq_len, head_dim=head_dim, dtype=dtype)
  assert chosen == kernel, why
  for explicit in ('xla', 'cudnn', 'splash'):  # a named kernel is taken as named
    assert ak.choose(explicit, platform, seq_len=seq_len, head_dim=head_dim,
                     dtype=dtype)[0] == explicit
  with pytest.raises(ValueError, match="config.model.attention='flash'"):
    ak.choose('flash', platform, seq_len=seq_len, head_dim=head_dim, dtype=dtype)


def test_platform_is_the_meshs_devices_and_attend_dispatches_on_it(monkeypatch):
  cfg = helpers.tiny_config(mesh=(2, 1, 1))
  mesh = sharding.make_mesh(cfg, helpers.devices_for((2, 1, 1)))
  seen = []
  with jax.set_mesh(mesh):
    jax.jit(lambda x: seen.append(ak.platform()) or x).lower(jnp.ones(2))
  assert seen == ['cpu'] and ak.platform() == jax.default_backend()

  q, k, v, seg = qkv_and_segments()
  calls = []
  monkeypatch.setattr(jax.nn, 'dot_product_attention',
                      lambda *a, implementation=None, **kw: calls.append(implementation) or a[0])
  for platform, dtype, expected in (('gpu', jnp.bfloat16, 'cudnn'), ('cpu', jnp.bfloat16, 'xla'),
                                    ('gpu', jnp.float32, 'xla')):
    monkeypatch.setattr(ak, 'platform', lambda p=platform: p)
    ak.attend(q.astype(dtype), k.astype(dtype), v.astype(dtype), seg, attention='auto')
    assert calls[-1] == expected, (platform, dtype)
  # On a TPU, auto traces the Pallas splash kernel (compiled, not interpreted).
  monkeypatch.setattr(ak, 'platform', lambda: 'tpu')
  jaxpr = jax.make_jaxpr(lambda *a: ak.attend(*a, attention='auto'))(q, k, v, seg)
  assert 'pallas_call' in str(jaxpr) and 'interpret=True' not in str(jaxpr)


@pytest.mark.skipif(jax.default_backend() != 'gpu', reason='cuDNN flash attention needs an '
                    'NVIDIA GPU (this machine has none)')
def test_cudnn_equals_xla_on_a_gpu():
  q, k, v, seg = qkv_and_segments(dtype=jnp.bfloat16)
  cudnn = lambda q, k, v, s: ak.attend(q, k, v, s, attention='cudnn')  # noqa: E731
  np.testing.assert_allclose(np.asarray(jax.jit(cudnn)(q, k, v, seg), np.float32),
                             np.asarray(jax.jit(xla)(q, k, v, seg), np.float32),
                             rtol=2e-2, atol=2e-2)
  (_, grads), (_, ref_grads) = (loss_and_grads(f, q, k, v, seg) for f in (cudnn, xla))
  for name, g, ref in zip('qkv', grads, ref_grads):
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(ref, np.float32),
                               rtol=5e-2, atol=5e-2, err_msg=f'd{name}')


def test_splash_equals_xla_with_a_layer_window_and_scale():
  """A layer's window arrives traced (as from the scan over layers): splash picks its local
  or causal kernel with lax.cond, XLA masks; both with a score scale that is not 1/sqrt(h).
  One compile each, run for a global layer (0) and a sliding-window one (24)."""
  q, k, v, seg = qkv_and_segments(seed=3)

  def fn(kind):
    def attend(q, k, v, w):
      return ak.attend(q, k, v, seg, attention=kind, window=w, scale=0.1, sliding_window=24)
    loss = lambda q, k, v, w: jnp.sum(attend(q, k, v, w) ** 2)  # noqa: E731
    return jax.jit(lambda q, k, v, w: (attend(q, k, v, w), jax.grad(loss, argnums=1)(q, k, v, w)))

  splash_fn, xla_fn = fn('splash'), fn('xla')
  outs = {}
  for window in (0, 24):
    (got, got_dk), (want, want_dk) = (f(q, k, v, jnp.int32(window)) for f in (splash_fn, xla_fn))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=f'window {window}')
    np.testing.assert_allclose(got_dk, want_dk, rtol=1e-4, atol=1e-5, err_msg=f'window {window}')
    outs[window] = np.asarray(want)
  assert np.abs(outs[24] - outs[0]).max() > 1e-2  # the window changed the result
