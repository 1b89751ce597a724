r"""Decoding throughput against the memory-bandwidth limit, beside Hugging Face `generate`.

    python tools/bench_decode.py --config experiments/bench_33m.py         # batch 1, 8, 64
    python tools/bench_decode.py --config experiments/tiny.py --batch 8 --norecompute
    python tools/bench_decode.py --config experiments/bench_135m.py:bf16 --batch=1,64 \
        --prompt_len=64 --new_tokens=24 --norecompute --nohf --nomatmuls --lora_rank=16

Random parameters of the experiment's model, greedy, `--prompt_len`-token prompts,
`--new_tokens` new tokens, no stop ids (every step runs). For each batch size:

* jaxgpt:       `jaxgpt.inference.sampling.sample` (a prefill, then one token per step against the
                KV cache, one compiled while_loop);
* transformers: `generate` of the PyTorch model holding the same weights
                (`jaxgpt.hf.torch_peer`; bfloat16 when jaxgpt decodes in it), greedy with
                its KV cache, when `transformers` and `torch` are installed (`--nohf`
                skips it);
* weight matmuls: a compiled loop of the same number of steps that only multiplies a
                (batch, in) activation by every weight matrix once per step (each layer's
                kernels and the output head), as XLA runs it: the floor under a decode
                step that no cache or attention work can remove (`--nomatmuls` skips it);
* low-rank term: with `--lora_rank` r > 0, the sampler on the model with rank-r adapters
                beside its kernels (random, non-zero B), computing x W + s (x A) B at every
                step, beside the `jaxgpt` row on the merged weights W + s A B (what PPO and
                GRPO sample with; the heading gives the merge's time, paid once an
                iteration); `agree` compares the two;
* grouped:      with `--group` K > 1, the batch is B / K prompts each K times in a row (GRPO's
                groups, every row decoded on its own), and this row samples it with
                `prompt_group=K`: each prompt prefilled once, its cache copied to its K rows
                (what the RL loop does); the other rows prefill every row;
* no cache:     a compiled loop that reruns the full forward over the whole
                (batch, prompt_len + new_tokens) buffer every step (`--norecompute`
                skips it: it is slow).

tokens/s = batch * new_tokens / wall time of one whole generation (prefill included),
best of `--repeats` runs after a warm-up call. Bandwidth: a decode step has to read at
least every weight it multiplies (all parameters but the embedding table, of which it
reads B rows, unless the table is also the output head) and the keys and values of the
filled cache slots; `MB/step` is that, averaged over the generation's steps (the
prefill counted as one), and `BW util` = (MB/step / seconds per step) / peak
bandwidth. The peak is a large array copy measured here (read + write bytes) on CPU,
the chip's published figure on a GPU or TPU (`--bandwidth_gbs` sets it). `agree` is
the share of new tokens equal to jaxgpt's (float round-off can flip a near-tie on
random weights, and everything after it). Figures only: tests never use timings.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from jaxgpt import errors, sharding
from jaxgpt import config as config_lib
from jaxgpt import model as model_lib
from jaxgpt.hf import torch_peer
from jaxgpt.inference import sampling
from jaxgpt.model import lora
from jaxgpt.train import kernel_profile

_CONFIG = config_flags.DEFINE_config_file('config', 'experiments/bench_33m.py',
                                          'experiment config')
_BATCH = flags.DEFINE_list('batch', ['1', '8', '64'], 'batch sizes (prompts decoded together)')
_PROMPT_LEN = flags.DEFINE_integer('prompt_len', 32, 'tokens per prompt')
_NEW_TOKENS = flags.DEFINE_integer('new_tokens', 256, 'tokens generated per prompt')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'timed runs per variant (best is reported)')
_SEED = flags.DEFINE_integer('seed', 0, 'parameter and prompt seed')
_RECOMPUTE = flags.DEFINE_bool('recompute', True, 'also time the no-cache variant (slow)')
_MATMULS = flags.DEFINE_bool('matmuls', True, "also time the step's weight matmuls alone")
_HF = flags.DEFINE_bool('hf', True, 'also time transformers generate (when installed)')
_TORCH_THREADS = flags.DEFINE_integer('torch_threads', 0, 'torch intra-op threads; 0: its default')
_GROUP = flags.DEFINE_integer('group', 1, 'rows in runs of this many identical prompts; > 1 '
                               'also times the sampler prefilling each run once')
_PROFILE = flags.DEFINE_string(
    'profile', None, 'a folder: trace one more jaxgpt generation per batch size with '
    'jax.profiler there and print its top kernel kinds (XLA:CPU kernels included)')
_LORA_RANK = flags.DEFINE_integer('lora_rank', 0, 'also time sampling with rank-r adapters '
                                  'unmerged (config.lora.targets; 0: no)')
_BANDWIDTH = flags.DEFINE_float('bandwidth_gbs', 0.0,
                                'peak memory bandwidth in GB/s; 0: measured on CPU, '
                                'published on a known GPU / TPU')

# Published peak memory bandwidth, GB/s, by a substring of `device_kind` (first match).
PUBLISHED_GBS = (
    ('H200', 4800), ('H100 NVL', 3900), ('H100 PCIe', 2000), ('H100', 3350),
    ('A100-SXM4-80GB', 2039), ('A100 80GB PCIe', 1935), ('A100', 1555), ('L40S', 864),
    ('A10G', 600), ('L4', 300), ('T4', 320), ('V100', 900),
    ('TPU v6', 1640), ('TPU v5p', 2765), ('TPU v5', 819), ('TPU v4', 1228),
)


# -- bandwidth ---------------------------------------------------------------------------------


def measured_copy_gbs(megabytes: int = 256, repeats: int = 5) -> float:
  """GB/s of a large array copy on the default device (read + write bytes), the best of a
  jitted in-place add and, on CPU, numpy's copy."""
  n = megabytes * 2**20 // 4
  add = jax.jit(lambda x: x + 1.0, donate_argnums=0)
  x = add(jnp.zeros((n,), jnp.float32)).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    x = add(x).block_until_ready()
    best = min(best, time.perf_counter() - start)
  gbs = 2 * 4 * n / best / 1e9
  if jax.default_backend() == 'cpu':
    a, b = np.ones(n, np.float32), np.empty(n, np.float32)
    for _ in range(repeats):
      start = time.perf_counter()
      np.copyto(b, a)
      gbs = max(gbs, 2 * a.nbytes / (time.perf_counter() - start) / 1e9)
  return gbs


def published_gbs(device_kind: str) -> float | None:
  for name, gbs in PUBLISHED_GBS:
    if name.lower() in device_kind.lower():
      return float(gbs)
  return None


def bytes_per_step(mcfg, params, batch: int, prompt_len: int, new_tokens: int) -> float:
  """Bytes a decode step must move at least, averaged over a generation (see the doc)."""
  dtype = jnp.dtype(mcfg.decode_dtype or mcfg.dtype)
  itemsize = dtype.itemsize
  n_weights = model_lib.count_params(params)
  if not mcfg.tied:  # the lookup reads B rows of the table, not all of it
    n_weights -= (mcfg.padded_vocab_size - batch) * mcfg.d_model
  per_slot = 2 * mcfg.n_layers * batch * mcfg.n_kv_heads * mcfg.head_dim * itemsize
  mean_filled = prompt_len + (new_tokens - 1) / 2  # slots read by step i: prompt_len + i
  return n_weights * itemsize + per_slot * (mean_filled + 1)  # + the new slot's write


# -- the variants ------------------------------------------------------------------------------


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


def weight_matrices(mcfg, params) -> list:
  """Every matrix a decode step multiplies by, one layer at a time, as (in, out) arrays in
  the decode dtype: kernels with their input dims merged (the leading dims whose
  product is d_model or d_ff), and the output head (the embedding, transposed, when
  tied)."""
  dtype = mcfg.decode_dtype or mcfg.dtype
  mats = []
  for path, w in jax.tree_util.tree_flatten_with_path(jax.device_get(params))[0]:
    name = getattr(path[-1], 'key', None)
    if name == 'embed' and mcfg.tied:
      mats.append(np.ascontiguousarray(w.T))
      continue
    if name != 'kernel':
      continue
    stacked = any(getattr(k, 'key', None) == 'blocks' for k in path)
    for layer in (w if stacked else [w]):
      n_in = next(i for i in range(1, layer.ndim)
                  if np.prod(layer.shape[:i]) in (mcfg.d_model, mcfg.d_ff))
      mats.append(layer.reshape(int(np.prod(layer.shape[:n_in])), -1))
  return [jnp.asarray(m, dtype) for m in mats]


def weight_matmuls_fn(mats, batch: int, n_steps: int):
  """A compiled loop of `n_steps` steps that each multiply a (batch, in) activation by every
  matrix once, as XLA runs it: the part of a decode step no cache or attention change can
  remove (its ms/step against the sampler's shows what bounds the sampler)."""
  width = max(m.shape[0] for m in mats)
  dtype = mats[0].dtype

  @jax.jit
  def run(mats, x_bd):
    def step(i, outs):
      x = x_bd + i.astype(dtype)  # a new input every step: nothing to hoist out of the loop
      return tuple(x[:, :m.shape[0]] @ m for m in mats)

    outs = tuple(jnp.zeros((batch, m.shape[1]), dtype) for m in mats)
    return jax.lax.fori_loop(0, n_steps, step, outs)

  x_bd = jnp.asarray(np.random.default_rng(0).standard_normal((batch, width)), dtype)
  return lambda: run(mats, x_bd)


def adapted_params(cfg, mcfg, mesh, rank: int):
  """(graphdef, params, mcfg, merge seconds, merged params) of the model with rank-`rank`
  adapters on config.lora.targets, B drawn from N(0, 0.01^2) (at zeros the low-rank term
  would cost its work but change no token)."""
  cfg = cfg.copy_and_resolve_references()
  cfg.lora.rank = rank
  lora.validate(cfg)
  mcfg = lora.adapted(mcfg, cfg.lora)
  graphdef, params = model_lib.init_params(mcfg, mesh, _SEED.value)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  keys = jax.random.split(jax.random.PRNGKey(_SEED.value + 1), len(leaves))
  params = jax.tree_util.tree_unflatten(treedef, [
      x + 0.01 * jax.random.normal(k, x.shape, x.dtype) if path[-1].key == 'lora_b' else x
      for (path, x), k in zip(leaves, keys)])
  merge = jax.jit(lambda p: lora.merged(p, mcfg.lora_alpha / mcfg.lora_rank))
  jax.block_until_ready(merge(params))  # compiled once, as in the RL loop
  start = time.perf_counter()
  merged = jax.block_until_ready(merge(params))
  return graphdef, params, mcfg, time.perf_counter() - start, merged


def hf_generate_fn(mcfg, params):
  """`run(prompts_bp) -> new tokens (B, N)` with transformers' greedy `generate` on the
  same weights (CPU torch, in bfloat16 when jaxgpt decodes in it, else float32), or None
  when transformers / torch are missing."""
  peer = torch_peer.causal_lm(mcfg, params, threads=_TORCH_THREADS.value)
  if peer is None:
    return None
  import torch  # pylint: disable=import-outside-toplevel
  model, about = peer
  if jnp.dtype(mcfg.decode_dtype or mcfg.dtype) == jnp.bfloat16:
    model.to(torch.bfloat16)
    about += ', weights and compute in bfloat16'
  model.eval()
  model.generation_config.eos_token_id = None  # no stop ids: every step runs
  print(about)

  def run(prompts_bp, n_new):
    ids = torch.from_numpy(np.asarray(prompts_bp, np.int64))
    with torch.no_grad():
      out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                           max_new_tokens=n_new, do_sample=False, use_cache=True,
                           pad_token_id=0)
    return out[:, ids.shape[1]:].numpy()

  return run


def timed(fn, repeats):
  """(output, first call seconds, best seconds of `repeats` more calls)."""
  start = time.perf_counter()
  out = jax.block_until_ready(fn())
  first = time.perf_counter() - start
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - start)
  return out, first, best


# -- main --------------------------------------------------------------------------------------


def bench_batch(b, cfg, mcfg, mesh, graphdef, params, hf_run, mats, peak_gbs, adapted=None):
  p, n = _PROMPT_LEN.value, _NEW_TOKENS.value
  prompts = np.random.default_rng(_SEED.value).integers(
      0, mcfg.vocab_size, size=(b, p)).astype(np.int32)
  group = _GROUP.value
  prompts = np.repeat(prompts[:b // group], group, axis=0)
  lengths = np.full((b,), p, np.int32)
  settings = sampling.SamplingConfig(max_new_tokens=n, temperature=0.0)
  key = jax.random.PRNGKey(0)
  rows = []
  ours, first, best = timed(
      lambda: sampling.sample(graphdef, params, mcfg, prompts, lengths, key, settings).tokens,
      _REPEATS.value)
  ours = np.asarray(ours)
  rows.append(('jaxgpt', first, best, 1.0))
  if _PROFILE.value:
    kernel_profile.traced(
        lambda: sampling.sample(graphdef, params, mcfg, prompts, lengths, key, settings).tokens,
        f'{_PROFILE.value}/batch{b}', f'one jaxgpt generation at batch {b}')
  if group > 1:
    grouped = dataclasses.replace(settings, prompt_group=group)
    shared, first, best = timed(
        lambda: sampling.sample(graphdef, params, mcfg, prompts, lengths, key, grouped).tokens,
        _REPEATS.value)
    rows.append(('grouped', first, best, float(np.mean(np.asarray(shared) == ours))))
  if adapted is not None:
    a_graphdef, a_params, a_mcfg = adapted
    low_rank, first, best = timed(
        lambda: sampling.sample(a_graphdef, a_params, a_mcfg, prompts, lengths, key,
                                settings).tokens, _REPEATS.value)
    rows.append(('low-rank term', first, best, float(np.mean(np.asarray(low_rank) == ours))))
  if hf_run is not None:
    theirs, first, best = timed(lambda: hf_run(prompts, n), _REPEATS.value)
    rows.append(('transformers', first, best, float(np.mean(theirs == ours))))
  if mats is not None:
    _, first, best = timed(weight_matmuls_fn(mats, b, n), _REPEATS.value)
    rows.append(('weight matmuls', first, best, float('nan')))
  if _RECOMPUTE.value:
    param_sh = jax.tree.map(lambda x: x.sharding, params)
    batch_sh = sharding.batch_sharding(mesh, mcfg.rules)
    recompute = jax.jit(recompute_fn(graphdef, n), in_shardings=(param_sh, batch_sh),
                        out_shardings=batch_sh)
    prompts_dev = jax.device_put(prompts, batch_sh)

    def run_recompute():
      with jax.set_mesh(mesh):
        return recompute(params, prompts_dev)

    full, first, best = timed(run_recompute, _REPEATS.value)
    rows.append(('no cache', first, best, float(np.mean(np.asarray(full) == ours))))

  step_bytes = bytes_per_step(mcfg, params, b, p, n)
  print(f'\nbatch {b}: {step_bytes / 1e6:.1f} MB must move per step')
  print(f'{"":14s} {"first s":>8s} {"best s":>8s} {"ms/step":>8s} {"tokens/s":>9s} '
        f'{"GB/s":>7s} {"BW util":>8s} {"vs HF":>6s} {"agree":>6s}')
  hf_best = dict((r[0], r[2]) for r in rows).get('transformers')
  for name, first, best, agree in rows:
    gbs = step_bytes * n / best / 1e9
    vs_hf = f'{hf_best / best:5.2f}x' if hf_best else '     -'
    agreed = '     -' if np.isnan(agree) else f'{100 * agree:5.1f}%'
    print(f'{name:14s} {first:8.2f} {best:8.3f} {1e3 * best / n:8.2f} {b * n / best:9.1f} '
          f'{gbs:7.1f} {100 * gbs / peak_gbs:7.1f}% {vs_hf} {agreed}')
  return rows


def main(argv):
  del argv
  if _PROFILE.value:
    kernel_profile.prepare(_PROFILE.value)  # before the backend starts (below)
  cfg = _CONFIG.value
  config_lib.validate(cfg, jax.device_count())
  if not all(x.isdigit() and int(x) > 0 for x in _BATCH.value):
    raise app.UsageError(f'--batch={",".join(_BATCH.value)}: batch sizes must be whole '
                         'numbers >= 1, e.g. --batch=1,8,64.')
  batches = [int(x) for x in _BATCH.value]
  p, n = _PROMPT_LEN.value, _NEW_TOKENS.value
  mcfg = model_lib.ModelConfig.from_config(cfg)
  mesh = sharding.make_mesh(cfg)
  if p + n > mcfg.max_seq_len:
    raise app.UsageError(f'--prompt_len + --new_tokens = {p + n} exceeds '
                         f'config.model.max_seq_len={mcfg.max_seq_len}.')
  mult = sampling.batch_multiple(mesh, mcfg.rules)
  if any(b % mult for b in batches):
    raise app.UsageError(f'--batch={batches}: each must be a multiple of {mult} '
                         '(data-parallel devices).')
  if _GROUP.value < 1 or any(b % _GROUP.value for b in batches):
    raise app.UsageError(f'--group={_GROUP.value}: must be >= 1 and divide every batch '
                         f'size ({batches}).')

  adapted = None
  if _LORA_RANK.value:
    a_graphdef, a_params, a_mcfg, merge_s, params = adapted_params(cfg, mcfg, mesh,
                                                                   _LORA_RANK.value)
    adapted = (a_graphdef, a_params, a_mcfg)
    graphdef = model_lib.abstract_model(mcfg)[0]  # the merged tree's (no adapters)
  else:
    graphdef, params = model_lib.init_params(mcfg, mesh, _SEED.value)
  devices = jax.devices()
  kind = devices[0].device_kind
  measured = measured_copy_gbs()
  published = published_gbs(kind) if jax.default_backend() != 'cpu' else None
  peak = _BANDWIDTH.value or published or measured
  source = ('--bandwidth_gbs' if _BANDWIDTH.value else
            'published' if published else 'measured array copy')
  print(f'devices: {len(devices)} x {kind} ({jax.default_backend()}), mesh {dict(mesh.shape)}')
  print(f'model: {mcfg.family}, {model_lib.count_params(params) / 1e6:.2f}M params, '
        f'd_model={mcfg.d_model}, layers={mcfg.n_layers}, heads={mcfg.n_heads}, '
        f'd_ff={mcfg.d_ff}, vocab={mcfg.vocab_size}, '
        f'dtype={jnp.dtype(mcfg.decode_dtype or mcfg.dtype).name}')
  print(f'prompt_len={p} new_tokens={n} greedy, no stop ids, best of {_REPEATS.value}; '
        f'peak bandwidth {peak:.1f} GB/s ({source}; copy measured here {measured:.1f} GB/s)')
  if adapted is not None:
    print(f'LoRA rank {_LORA_RANK.value} on {tuple(cfg.lora.targets)}: the jaxgpt row samples '
          f'the merged weights (merge {merge_s:.3f} s, once), "low-rank term" the adapters '
          'unmerged')
  hf_run = None
  if _HF.value:
    hf_run = hf_generate_fn(mcfg, params)
    if hf_run is None:
      print('transformers / torch not installed: no Hugging Face peer (pip install .[hf])')
  mats = weight_matrices(mcfg, params) if _MATMULS.value else None
  for b in batches:
    bench_batch(b, cfg, mcfg, mesh, graphdef, params, hf_run, mats, peak, adapted)


if __name__ == '__main__':
  errors.run(main, 'bench_decode')
