r"""Train-step throughput, MFU and peak memory beside PyTorch peers, on the same model.

    python tools/bench_train.py --config experiments/bench_33m.py      # + experiments/tiny.py
    python tools/bench_train.py --config experiments/bench_135m.py --also= --lora_rank=16

For the experiment (and each `--also` experiment file), random parameters and random
token rows of config.train.batch_size x config.data.seq_len:

* jaxgpt:  the pretraining step (`trainer.make_train_step` with the LM loss, the optax
           chain of config.train, `jit_train_step`: compiled once, state donated);
* pytorch: the Hugging Face model of the same architecture holding the same weights
           (`jaxgpt.hf.torch_peer`): forward, mean cross-entropy, backward,
           global-norm clipping and AdamW with the same hyper-parameters (decay on
           matrices only); eager, then with the model under `torch.compile` (inductor;
           its first step compiles; `--notorch_compile` skips it); when `transformers`
           and `torch` are installed (`--nopytorch` skips both).

With `config.train.loss_positions` > 0 the loss is on that many positions at the end of
each row (SFT-style: a reply after its prompt); jaxgpt runs its LM head there only, the
peer on every position (as transformers and TRL do). `--lora_rank` > 0 times a LoRA
update too (every projection; the peer through `peft`, when installed).

tokens/s = batch x seq_len / seconds per step, best of `--repeats` steps after a warm-up;
MFU = tokens/s x `metrics.flops_per_token` / the peak measured here in the experiment's
compute dtype (`metrics.measure_peak_flops`, a large matmul on every local device;
`--peak_tflops` sets it). Both peers count the same FLOPs per token, the model's: 6 N, 4
for each frozen parameter of a LoRA update (no weight gradient), the output head on the
positions with a loss only. Peak memory: the most resident memory during the timed steps
above what was resident before the first one (activations, gradients, temporaries; Linux
only).
Figures only: tests never use timings.
"""

from __future__ import annotations

import importlib.util
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from ml_collections import config_flags

from jaxgpt import errors, sharding
from jaxgpt import config as config_lib
from jaxgpt import model as model_lib
from jaxgpt.hf import torch_peer
from jaxgpt.model import lora
from jaxgpt.train import kernel_profile, loop, metrics, optim, trainer

_CONFIG = config_flags.DEFINE_config_file('config', 'experiments/bench_33m.py',
                                          'experiment config')
_ALSO = flags.DEFINE_list('also', ['experiments/tiny.py'],
                          'more experiment files to measure the same way ("" for none)')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'timed steps per peer (best is reported)')
_SEED = flags.DEFINE_integer('seed', 0, 'parameter and data seed')
_PYTORCH = flags.DEFINE_bool('pytorch', True, 'also time the PyTorch peers (when installed)')
_TORCH_COMPILE = flags.DEFINE_bool(
    'torch_compile', True, 'also time the PyTorch peer under torch.compile (with --pytorch; '
    'a compile that fails here is one line)')
_TORCH_THREADS = flags.DEFINE_integer('torch_threads', 0, 'torch intra-op threads; 0: its default')
_PEAK = flags.DEFINE_float('peak_tflops', 0.0, 'peak FLOP/s in TFLOP/s; 0: measured here')
_PROFILE = flags.DEFINE_string(
    'profile', None, 'a folder: trace one more jaxgpt step of each update with jax.profiler '
    'there and print its top kernel kinds (XLA:CPU kernels included)')
_LORA_RANK = flags.DEFINE_integer('lora_rank', 0, 'also time a LoRA update of this rank (0: no)')


def load_experiment(path: str):
  spec = importlib.util.spec_from_file_location(
      'experiment_' + os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _resident_kib(field: str) -> int:
  with open('/proc/self/status') as f:
    return next(int(line.split()[1]) for line in f if line.startswith(field + ':'))


def timed_steps(step, repeats: int) -> tuple[float, float, float]:
  """(first call seconds, best seconds of `repeats` more calls, peak MiB) of `step()`;
  peak: resident memory during the calls above what was resident before (nan off Linux)."""
  try:
    with open('/proc/self/clear_refs', 'w') as f:
      f.write('5')  # restart the kernel's high-water mark of resident memory
    before = _resident_kib('VmRSS')
  except OSError:
    before = None
  start = time.perf_counter()
  step()
  first, best = time.perf_counter() - start, float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    step()
    best = min(best, time.perf_counter() - start)
  peak = float('nan') if before is None else (_resident_kib('VmHWM') - before) / 1024
  return first, best, peak


def random_rows(cfg, seed: int) -> np.ndarray:
  b, t = cfg.train.batch_size, cfg.data.seq_len
  return np.random.default_rng(seed).integers(
      0, cfg.model.vocab_size, size=(b, t + 1)).astype(np.int32)


def loss_weights(cfg, b: int, t: int) -> np.ndarray:
  """1 where the loss is taken: every position, or the last config.train.loss_positions."""
  weights_bt = np.ones((b, t), np.float32)
  weights_bt[:, :t - (cfg.train.loss_positions or t)] = 0
  return weights_bt


# -- the peers ---------------------------------------------------------------------------------


def jaxgpt_step(cfg, mcfg, mesh, rows):
  """(step() running one train step, the initial host parameters)."""
  b, t = rows.shape[0], rows.shape[1] - 1
  opt = optim.make_optimizer(cfg.train)
  graphdef, state, shardings = trainer.create_train_state(mcfg, mesh, opt, _SEED.value)
  params = jax.device_get(state['params'])
  loss_fn = trainer.lm_loss_fn(cfg.train.z_loss, bool(cfg.data.segment_ids),
                               cfg.train.loss_chunk, cfg.train.loss_positions)  # as the stages
  batch = {'inputs': rows[:, :-1], 'targets': rows[:, 1:], 'weights': loss_weights(cfg, b, t),
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


def pytorch_step(cfg, mcfg, params, rows, lora_rank: int = 0, compiled: bool = False):
  """(step() of the PyTorch peer, eager or under `torch.compile` (`compiled`), or None,
  and the line saying why not)."""
  peer = torch_peer.causal_lm(mcfg, params, threads=_TORCH_THREADS.value)
  if peer is None:
    return None, 'transformers / torch not installed: no PyTorch peer (pip install .[hf])'
  import torch  # pylint: disable=import-outside-toplevel
  model, about = peer
  if lora_rank:
    try:
      import peft  # pylint: disable=import-outside-toplevel
    except ImportError:
      return None, 'peft not installed: no PyTorch LoRA peer (pip install peft)'
    targets = [f'{t}_proj' for t in cfg.lora.targets]  # config.lora's, in LLaMA's HF names
    model = peft.get_peft_model(model, peft.LoraConfig(
        r=lora_rank, lora_alpha=cfg.lora.alpha, lora_dropout=0.0, target_modules=targets))
    about += f', peft {peft.__version__} LoRA r={lora_rank}'
  model.train()
  if compiled:  # the forward and (through AOTAutograd) the backward; the optimizer eager
    model = torch.compile(model)
    about += ', torch.compile (inductor)'
  print(f'pytorch peer: {about}')
  t = cfg.train
  trained = [p for p in model.parameters() if p.requires_grad]
  matrices = [p for p in trained if p.ndim >= 2]
  others = [p for p in trained if p.ndim < 2]
  decay = t.weight_decay if t.decay != 'none' else 0.0
  opt = torch.optim.AdamW(
      [{'params': matrices, 'weight_decay': decay},
       {'params': others, 'weight_decay': decay if t.decay == 'all' else 0.0}],
      lr=t.lr, betas=(t.b1, t.b2), eps=t.eps)
  tokens = torch.from_numpy(rows.astype(np.int64))
  inputs, targets = tokens[:, :-1], tokens[:, 1:].clone()
  targets[torch.from_numpy(loss_weights(cfg, *targets.shape) == 0)] = -100  # no loss there

  # bfloat16 compute: torch's autocast (bf16 matmuls, float32 weights), as jaxgpt's dtype.
  bf16 = mcfg.dtype == jnp.bfloat16
  if bf16:
    print('pytorch peer: torch.autocast(cpu, bfloat16)')

  def step():
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=bf16):
      logits = model(input_ids=inputs).logits
    loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                             targets.reshape(-1), ignore_index=-100)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if t.clip_norm > 0:
      torch.nn.utils.clip_grad_norm_(trained, t.clip_norm)
    opt.step()

  return step, ''


# -- main --------------------------------------------------------------------------------------


PEERS = {False: 'pytorch eager', True: 'torch.compile'}


def update_setup(cfg, mcfg, mesh, rows, lora_rank: int = 0):
  """(cfg, mcfg, jaxgpt step(), params without adapters, adapter count or None) of one
  kind of update: full, or LoRA of `lora_rank`."""
  if lora_rank:
    cfg = cfg.copy_and_resolve_references()
    cfg.lora.rank = lora_rank
    lora.validate(cfg)
    mcfg = lora.adapted(mcfg, cfg.lora)
  step, params = jaxgpt_step(cfg, mcfg, mesh, rows)
  if not lora_rank:
    return cfg, mcfg, step, params, None
  return cfg, mcfg, step, lora.without_adapters(params), model_lib.count_params(
      lora.trainable(params))


def bench_jaxgpt(cfg, mcfg, mesh, rows, lora_rank: int = 0):
  """[(peer, first s, best s, peak MiB)] of jaxgpt's update (full, or LoRA of
  `lora_rank`), the model's parameter count (without adapters) and the adapters' (None
  for a full update)."""
  _, mcfg, step, params, n_adapters = update_setup(cfg, mcfg, mesh, rows, lora_rank)
  results = [('jaxgpt',) + timed_steps(step, _REPEATS.value)]
  if _PROFILE.value:
    kind = f'lora{lora_rank}' if lora_rank else 'full'
    kernel_profile.traced(step, f'{_PROFILE.value}/d{mcfg.d_model}-l{mcfg.n_layers}-{kind}',
                          f'one jaxgpt step, {"LoRA" if lora_rank else "full"} update')
  return results, model_lib.count_params(params), n_adapters


def bench_peers(cfg, mcfg, mesh, rows, lora_rank: int = 0):
  """[(peer, first s, best s, peak MiB)] of the PyTorch peers' same update, on the seeded
  weights jaxgpt's state starts from."""
  cfg, mcfg, step, params, _ = update_setup(cfg, mcfg, mesh, rows, lora_rank)
  del step  # its state (never stepped): what the peers' peak memory is measured above
  results = []
  for compiled in (False, True) if _TORCH_COMPILE.value else (False,):
    torch_step, why_not = pytorch_step(cfg, lora.plain(mcfg), params, rows, lora_rank,
                                       compiled)
    if torch_step is None:
      print(why_not)
      break
    try:
      results.append((PEERS[compiled],) + timed_steps(torch_step, _REPEATS.value))
    except Exception as e:  # pylint: disable=broad-except  # inductor needs a C++ compiler
      if not compiled:
        raise
      first_line = (str(e).strip().splitlines() or [''])[0][:200]
      print(f'torch.compile peer: not measured ({type(e).__name__}: {first_line})')
  return results


def bench(name, cfg, peak):
  config_lib.validate(cfg, jax.device_count())
  mcfg = model_lib.ModelConfig.from_config(cfg)
  mesh = sharding.make_mesh(cfg)
  rows = random_rows(cfg, _SEED.value)
  b, t = rows.shape[0], rows.shape[1] - 1
  updates = [('full', 0)] + ([(f'LoRA r={_LORA_RANK.value}', _LORA_RANK.value)]
                             if _LORA_RANK.value else [])
  # Every jaxgpt update first, then the peers: a torch run beside could slow what follows.
  timed = [(kind,) + bench_jaxgpt(cfg, mcfg, mesh, rows, rank) for kind, rank in updates]
  if _PYTORCH.value:
    for (kind, results, _, _), (_, rank) in zip(timed, updates):
      results += bench_peers(cfg, mcfg, mesh, rows, rank)
  n_params = timed[0][2]
  fpt = {kind: metrics.flops_per_token(mcfg, t, n_params + (n_adapters or 0),
                                       trained_params=n_adapters,
                                       head_positions=cfg.train.loss_positions)
         for kind, _, _, n_adapters in timed}
  loss_on = (f'loss on the last {cfg.train.loss_positions} positions of each row'
             if cfg.train.loss_positions else 'loss on every position')
  print(f'\n{name}: {mcfg.family}, {n_params / 1e6:.1f}M params, d_model={mcfg.d_model}, '
        f'layers={mcfg.n_layers}, heads={mcfg.n_heads}, d_ff={mcfg.d_ff}, '
        f'vocab={mcfg.vocab_size}, {mcfg.dtype.name}; batch {b} x {t} = {b * t} tokens, '
        f'{loss_on}; MFLOP/token ' + ', '.join(f'{k} {v / 1e6:.1f}' for k, v in fpt.items()))
  print(f'{"":25s} {"first s":>8s} {"best s":>8s} {"tokens/s":>9s} {"MFU":>7s} {"vs eager":>9s} '
        f'{"vs compile":>11s} {"peak MiB":>9s}')
  for kind, results, _, _ in timed:
    best_of = dict((r[0], r[2]) for r in results)
    for peer_name, first, best, peak_mib in results:
      tps = b * t / best
      ratios = [f'{best_of[p] / best:{w - 1}.2f}x' if p in best_of else ' ' * (w - 1) + '-'
                for p, w in ((PEERS[False], 9), (PEERS[True], 11))]
      print(f'{peer_name + ", " + kind:25s} {first:8.2f} {best:8.3f} {tps:9.0f} '
            f'{100 * tps * fpt[kind] / peak:6.2f}% {" ".join(ratios)} {peak_mib:9.0f}')


def main(argv):
  del argv
  if _PROFILE.value:
    kernel_profile.prepare(_PROFILE.value)  # before the backend starts (below)
  devices = jax.devices()
  print(f'devices: {len(devices)} x {devices[0].device_kind} ({jax.default_backend()}); '
        f'best of {_REPEATS.value} steps')
  peaks = {}

  def peak_for(cfg):
    """--peak_tflops, else a matmul's FLOP/s measured here in the config's compute dtype."""
    if _PEAK.value:
      return _PEAK.value * 1e12
    dtype = jnp.dtype(cfg.model.dtype)
    if dtype not in peaks:
      peaks[dtype] = metrics.measure_peak_flops(dtype) * jax.process_count()
      print(f'peak {peaks[dtype] / 1e9:.1f} GFLOP/s in {dtype.name} (measured here)')
    return peaks[dtype]

  experiments = [(os.path.basename(config_flags.get_config_filename(flags.FLAGS['config'])),
                  _CONFIG.value)] + [(os.path.basename(p), load_experiment(p))
                                     for p in _ALSO.value if p]
  for name, cfg in experiments:
    bench(name, cfg, peak_for(cfg))


if __name__ == '__main__':
  errors.run(main, 'bench_train')
