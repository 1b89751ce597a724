r"""Pretraining step throughput and MFU beside a PyTorch eager peer, on the same model.

    python tools/bench_train.py --config experiments/bench_33m.py      # + experiments/tiny.py

For the experiment (and each `--also` experiment file), random parameters and random
token rows of config.train.batch_size x config.data.seq_len:

* jaxgpt:  the pretraining step (`trainer.make_train_step` with the LM loss, the optax
           chain of config.train, `jit_train_step`: compiled once, state donated);
* pytorch: the Hugging Face model of the same architecture holding the same weights
           (`jaxgpt.hf.torch_peer`), eager (no torch.compile): forward, mean
           cross-entropy, backward, global-norm clipping and AdamW with the same
           hyper-parameters (decay on matrices only); when `transformers` and `torch`
           are installed (`--nopytorch` skips it).

tokens/s = batch x seq_len / seconds per step, best of `--repeats` steps after a warm-up;
MFU = tokens/s x `metrics.flops_per_token` / the peak measured here
(`metrics.measure_peak_flops`, a large matmul on every local device; `--peak_tflops`
sets it). Both peers count the same FLOPs per token. Figures only: tests never use
timings.
"""

from __future__ import annotations

import importlib.util
import os
import time

import jax
import numpy as np
from absl import flags
from ml_collections import config_flags

from jaxgpt import errors, sharding
from jaxgpt import config as config_lib
from jaxgpt import model as model_lib
from jaxgpt.hf import torch_peer
from jaxgpt.train import loop, metrics, optim, trainer

_CONFIG = config_flags.DEFINE_config_file('config', 'experiments/bench_33m.py',
                                          'experiment config')
_ALSO = flags.DEFINE_list('also', ['experiments/tiny.py'],
                          'more experiment files to measure the same way ("" for none)')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'timed steps per peer (best is reported)')
_SEED = flags.DEFINE_integer('seed', 0, 'parameter and data seed')
_PYTORCH = flags.DEFINE_bool('pytorch', True, 'also time the PyTorch eager peer (when installed)')
_TORCH_THREADS = flags.DEFINE_integer('torch_threads', 0, 'torch intra-op threads; 0: its default')
_PEAK = flags.DEFINE_float('peak_tflops', 0.0, 'peak FLOP/s in TFLOP/s; 0: measured here')


def load_experiment(path: str):
  spec = importlib.util.spec_from_file_location(
      'experiment_' + os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def timed_steps(step, repeats: int) -> tuple[float, float]:
  """(first call seconds, best seconds of `repeats` more calls) of `step()`."""
  start = time.perf_counter()
  step()
  first, best = time.perf_counter() - start, float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    step()
    best = min(best, time.perf_counter() - start)
  return first, best


def random_rows(cfg, seed: int) -> np.ndarray:
  b, t = cfg.train.batch_size, cfg.data.seq_len
  return np.random.default_rng(seed).integers(
      0, cfg.model.vocab_size, size=(b, t + 1)).astype(np.int32)


# -- the peers ---------------------------------------------------------------------------------


def jaxgpt_step(cfg, mcfg, mesh, rows):
  """(step() running one train step, the initial host parameters)."""
  b, t = rows.shape[0], rows.shape[1] - 1
  opt = optim.make_optimizer(cfg.train)
  graphdef, state, shardings = trainer.create_train_state(mcfg, mesh, opt, _SEED.value)
  params = jax.device_get(state['params'])
  loss_fn = trainer.lm_loss_fn(cfg.train.z_loss, bool(cfg.data.segment_ids),
                               cfg.train.loss_chunk)  # as the pretraining stage
  batch = {'inputs': rows[:, :-1], 'targets': rows[:, 1:], 'weights': np.ones((b, t), np.float32),
           'positions': np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
           'segment_ids': np.ones((b, t), np.int32)}
  step_fn = trainer.jit_train_step(
      trainer.make_train_step(graphdef, opt, loss_fn, cfg.train.micro_batches, mcfg.rules,
                              lr_schedule=optim.schedule(cfg.train)),
      shardings, mesh, mcfg.rules, list(batch))
  gbatch = loop.global_batch(batch, mesh, mcfg.rules)
  holder = {'state': state}  # each call donates the old state

  def step():
    with jax.set_mesh(mesh):
      holder['state'], m = step_fn(holder['state'], gbatch)
    jax.block_until_ready(m)

  return step, params


def pytorch_step(cfg, mcfg, params, rows):
  """step() of the eager PyTorch peer, or None when transformers / torch are missing."""
  peer = torch_peer.causal_lm(mcfg, params, threads=_TORCH_THREADS.value)
  if peer is None:
    return None
  import torch  # pylint: disable=import-outside-toplevel
  model, about = peer
  model.train()
  print(f'pytorch peer: {about}')
  t = cfg.train
  matrices = [p for p in model.parameters() if p.ndim >= 2]
  others = [p for p in model.parameters() if p.ndim < 2]
  decay = t.weight_decay if t.decay != 'none' else 0.0
  opt = torch.optim.AdamW(
      [{'params': matrices, 'weight_decay': decay},
       {'params': others, 'weight_decay': decay if t.decay == 'all' else 0.0}],
      lr=t.lr, betas=(t.b1, t.b2), eps=t.eps)
  tokens = torch.from_numpy(rows.astype(np.int64))
  inputs, targets = tokens[:, :-1], tokens[:, 1:]

  def step():
    logits = model(input_ids=inputs).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             targets.reshape(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if t.clip_norm > 0:
      torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip_norm)
    opt.step()

  return step


# -- main --------------------------------------------------------------------------------------


def bench(name, cfg, peak):
  config_lib.validate(cfg, jax.device_count())
  mcfg = model_lib.ModelConfig.from_config(cfg)
  mesh = sharding.make_mesh(cfg)
  rows = random_rows(cfg, _SEED.value)
  b, t = rows.shape[0], rows.shape[1] - 1
  step, params = jaxgpt_step(cfg, mcfg, mesh, rows)
  n_params = model_lib.count_params(params)
  fpt = metrics.flops_per_token(mcfg, t, n_params)
  results = [('jaxgpt',) + timed_steps(step, _REPEATS.value)]
  if _PYTORCH.value:
    peer = pytorch_step(cfg, mcfg, params, rows)
    if peer is None:
      print('transformers / torch not installed: no PyTorch peer (pip install .[hf])')
    else:
      results.append(('pytorch eager',) + timed_steps(peer, _REPEATS.value))
  print(f'\n{name}: {mcfg.family}, {n_params / 1e6:.1f}M params, d_model={mcfg.d_model}, '
        f'layers={mcfg.n_layers}, heads={mcfg.n_heads}, d_ff={mcfg.d_ff}, '
        f'vocab={mcfg.vocab_size}, {mcfg.dtype.name}; batch {b} x {t} = {b * t} tokens, '
        f'{fpt / 1e6:.1f} MFLOP/token')
  print(f'{"":14s} {"first s":>8s} {"best s":>8s} {"tokens/s":>9s} {"MFU":>7s} {"vs torch":>9s}')
  torch_best = dict((r[0], r[2]) for r in results).get('pytorch eager')
  for peer_name, first, best in results:
    tps = b * t / best
    ratio = f'{torch_best / best:8.2f}x' if torch_best else '        -'
    print(f'{peer_name:14s} {first:8.2f} {best:8.3f} {tps:9.0f} {100 * tps * fpt / peak:6.2f}% '
          f'{ratio}')


def main(argv):
  del argv
  peak = _PEAK.value * 1e12 or metrics.measure_peak_flops() * jax.process_count()
  devices = jax.devices()
  print(f'devices: {len(devices)} x {devices[0].device_kind} ({jax.default_backend()}); '
        f'peak {peak / 1e9:.1f} GFLOP/s ({"--peak_tflops" if _PEAK.value else "measured here"}); '
        f'best of {_REPEATS.value} steps')
  bench(os.path.basename(config_flags.get_config_filename(flags.FLAGS['config'])),
        _CONFIG.value, peak)
  for path in [p for p in _ALSO.value if p]:
    bench(os.path.basename(path), load_experiment(path), peak)


if __name__ == '__main__':
  errors.run(main, 'bench_train')
