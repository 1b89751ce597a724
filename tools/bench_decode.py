r"""Decoding throughput with and without the KV cache, on whatever devices exist.

    python tools/bench_decode.py --config experiments/tiny.py --batch 8 \
        --prompt_len 64 --new_tokens 64

Random parameters of the experiment's model, greedy decoding of `--new_tokens` tokens
for a batch of `--prompt_len`-token prompts, no stop ids (every step runs):

* cache:    `jaxgpt.sampling.sample` — prefill once, then one token per step against
            the KV cache (a compiled while_loop);
* no cache: a compiled fori_loop that reruns the full forward over the whole
            (batch, prompt_len + new_tokens) buffer every step and reads the logits at
            the newest position (causal attention makes the not-yet-written tail
            irrelevant; a fixed shape keeps it to one compilation).

Both produce the same tokens (checked and printed). Tokens/s counts new tokens,
batch * new_tokens / wall time of one whole generation (prefill included), best of
`--repeats` runs after a compiling warm-up. Figures only: tests never use timings.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from jaxgpt import model as model_lib
from jaxgpt import sampling, sharding

_CONFIG = config_flags.DEFINE_config_file('config', 'experiments/tiny.py', 'experiment config')
_BATCH = flags.DEFINE_integer('batch', 8, 'prompts decoded together')
_PROMPT_LEN = flags.DEFINE_integer('prompt_len', 64, 'tokens per prompt')
_NEW_TOKENS = flags.DEFINE_integer('new_tokens', 64, 'tokens generated per prompt')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'timed runs per variant (best is reported)')
_SEED = flags.DEFINE_integer('seed', 0, 'parameter and prompt seed')


def recompute_fn(graphdef, n_new: int):
  """Greedy decoding without a cache: the full forward over the buffer every step."""

  def run(params, prompts_bp):
    b, p = prompts_bp.shape
    seq_bt = jnp.zeros((b, p + n_new), jnp.int32).at[:, :p].set(prompts_bp)

    def step(i, carry):
      seq_bt, out_bn = carry
      model = model_lib.merge(graphdef, params)
      hidden_btd = model.hidden(seq_bt)
      last_b1d = jax.lax.dynamic_slice_in_dim(hidden_btd, p + i - 1, 1, axis=1)
      tok_b = jnp.argmax(model.logits(last_b1d)[:, 0], axis=-1).astype(jnp.int32)
      seq_bt = jax.lax.dynamic_update_index_in_dim(seq_bt, tok_b, p + i, axis=1)
      out_bn = jax.lax.dynamic_update_index_in_dim(out_bn, tok_b, i, axis=1)
      return seq_bt, out_bn

    out_bn = jnp.zeros((b, n_new), jnp.int32)
    return jax.lax.fori_loop(0, n_new, step, (seq_bt, out_bn))[1]

  return run


def timed(fn, repeats):
  start = time.perf_counter()
  out = jax.block_until_ready(fn())
  first = time.perf_counter() - start
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - start)
  return out, first, best


def main(argv):
  del argv
  cfg = _CONFIG.value
  b, p, n = _BATCH.value, _PROMPT_LEN.value, _NEW_TOKENS.value
  mcfg = model_lib.ModelConfig.from_config(cfg)
  mesh = sharding.make_mesh(cfg)
  if p + n > mcfg.max_seq_len:
    raise app.UsageError(f'--prompt_len + --new_tokens = {p + n} exceeds '
                         f'config.model.max_seq_len={mcfg.max_seq_len}.')
  mult = sampling.batch_multiple(mesh, mcfg.rules)
  if b % mult:
    raise app.UsageError(f'--batch={b} must be a multiple of {mult} (data-parallel devices).')

  graphdef, params = model_lib.init_params(mcfg, mesh, _SEED.value)
  prompts = np.random.default_rng(_SEED.value).integers(
      0, mcfg.vocab_size, size=(b, p)).astype(np.int32)
  lengths = np.full((b,), p, np.int32)
  devices = jax.devices()
  print(f'devices: {len(devices)} x {devices[0].device_kind} ({jax.default_backend()}), '
        f'mesh {dict(mesh.shape)}')
  print(f'model: {mcfg.family}, {model_lib.count_params(params) / 1e6:.2f}M params, '
        f'd_model={mcfg.d_model}, layers={mcfg.n_layers}, vocab={mcfg.vocab_size}, '
        f'dtype={mcfg.dtype.name}')
  print(f'batch={b} prompt_len={p} new_tokens={n} (greedy, best of {_REPEATS.value})')

  settings = sampling.SamplingConfig(max_new_tokens=n, temperature=0.0)
  key = jax.random.PRNGKey(0)
  cached, c_first, c_best = timed(
      lambda: sampling.sample(graphdef, params, mcfg, prompts, lengths, key, settings).tokens,
      _REPEATS.value)

  param_sh = jax.tree.map(lambda x: x.sharding, params)
  batch_sh = sharding.batch_sharding(mesh, mcfg.rules)
  recompute = jax.jit(recompute_fn(graphdef, n), in_shardings=(param_sh, batch_sh),
                      out_shardings=batch_sh)
  prompts_dev = jax.device_put(prompts, batch_sh)

  def run_recompute():
    with jax.set_mesh(mesh):
      return recompute(params, prompts_dev)

  full, f_first, f_best = timed(run_recompute, _REPEATS.value)

  new = b * n
  print(f'{"":10s} {"first call s":>13s} {"best s":>8s} {"ms/token step":>14s} {"tokens/s":>10s}')
  for name, first, best in (('kv cache', c_first, c_best), ('no cache', f_first, f_best)):
    print(f'{name:10s} {first:13.2f} {best:8.3f} {1e3 * best / n:14.2f} {new / best:10.1f}')
  print(f'speed-up with the cache: {f_best / c_best:.1f}x; '
        f'greedy tokens agree: {bool(np.array_equal(np.asarray(cached), np.asarray(full)))}')


if __name__ == '__main__':
  app.run(main)
