r"""Throughput of the RLHF stages' hot paths, on whatever devices exist.

    python tools/bench_rlhf.py --config experiments/tiny.py

Random parameters of the experiment's models, random token ids, stand-in special ids (pad 0,
<|end|> 1, end-of-text 2, <|reward|> 3). Figures only: tests never use timings. Timed
figures are the best of --repeats runs after a compiling warm-up ("first s").

1. The jitted train step (`trainer.make_train_step` + `jit_train_step`) of the SFT loss and
   of the reward loss on the same model, full sequences (every token real); MFU =
   tokens/s x `metrics.flops_per_token` of each model / `metrics.measure_peak_flops` here.
2. Sampling the reward stage's comparisons: K responses per prompt for --prompts ~24-token
   prompts at temperature 1, chunks of --chunk rows as the stage does; new tokens are those
   each row sampled (up to its stop id); the stage's prompts are extrapolated per row.
3. One iteration of the online-RL loop (`rl.loop.Iteration`) for PPO with config.ppo
   (policy = reference, random reward models as value and reward), then for GRPO with
   config.grpo (rollout_batch / group_size prompts, each sampled group_size times; no value
   model, no reward model unless config.grpo.reward has a `model` term): generate / score /
   update seconds and shares from its metrics, mean over --iterations after a warm-up;
   beside PPO's, `sampling.sample` alone on the same batch, with PPO's settings and as
   `tools/bench_decode.py`'s cache variant (greedy, no stop ids).
4. Beside each of 3., in the same process, TRL's trainer on the same shapes: PPOTrainer
   (trl.experimental.ppo, last shipped in trl 1.12) and GRPOTrainer, on the same prompt
   ids, the same policy weights (`jaxgpt.hf.torch_peer`, so replies run as long), a
   reference copy and random value / reward models of the reward model's shape; the
   config's rollout batch, minibatches, epochs, response budget, temperature, clip and KL
   coefficient. Phases are timed by wrapping TRL's generation and marking its first
   training forward (PPO) or the end of `_generate_and_score_completions` (GRPO); an
   iteration ends at TRL's `on_step_end` (GRPO: after rollout_batch / batch_size steps).
   torch flushes float32 denormals, as XLA does. Without trl installed this part is one
   line saying what to install.

   python tools/bench_rlhf.py --config experiments/tiny.py --parts=ppo,grpo,trl
   `--parts=...,tunix` adds Google's Tunix beside GRPO: tools/peer_tunix_grpo.py, run by
   --tunix_python (a venv with google-tunix; its pins need not match ours), on the same
   prompt ids and model shape with random weights of its own, its GRPOLearner sampling the
   whole rollout batch at once and accumulating the minibatches' gradients. Without the
   venv this part is one line saying how to make it.

   python tools/bench_rlhf.py --config experiments/bench_135m.py --parts=grpo,trl,tunix
5. `--parts=update` (not run by default): PPO's update program alone, the per-minibatch
   loop as it was against the one compiled scan, at the full width and trimmed widths, in
   interleaved rounds (a shared machine's load swings hit both).
"""

from __future__ import annotations

import time
import types

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from ml_collections import config_flags

from jaxgpt import errors, sharding
from jaxgpt import config as config_lib
from jaxgpt import model as model_lib
from jaxgpt.inference import sampling
from jaxgpt.rl import grpo as grpo_algo
from jaxgpt.rl import loop as rl_loop
from jaxgpt.rl import ppo as ppo_algo
from jaxgpt.rl import roles as roles_lib
from jaxgpt.rl import rollout
from jaxgpt.train import kernel_profile, loop, metrics, optim, trainer

_CONFIG = config_flags.DEFINE_config_file('config', 'experiments/tiny.py', 'experiment config')
_PROMPTS = flags.DEFINE_integer('prompts', 256, 'task prompts sampled for in part 2')
_CHUNK = flags.DEFINE_integer('chunk', 1024, 'rows decoded together in part 2 (the stage: 1024)')
_REPEATS = flags.DEFINE_integer('repeats', 2, 'timed runs per measurement (best is reported)')
_ITERATIONS = flags.DEFINE_integer('iterations', 2, 'timed PPO iterations after the warm-up')
_SEED = flags.DEFINE_integer('seed', 0, 'parameter and data seed')
_PROFILE = flags.DEFINE_string(
    'profile', None, 'a folder: trace one more (untimed) PPO / GRPO iteration with '
    'jax.profiler there and print its top kernel kinds (XLA:CPU kernels included)')
_TORCH_THREADS = flags.DEFINE_integer(
    'torch_threads', 0, "TRL's torch intra-op threads (0: torch's default); on a loaded "
    'machine 1 thread can beat 2, whose OpenMP workers wait on each other')
PARTS = ('train', 'sampling', 'update', 'ppo', 'grpo', 'trl', 'tunix')
_PARTS = flags.DEFINE_list('parts', ['train', 'sampling', 'ppo', 'grpo', 'trl'],
                           'what to measure: train (steps), sampling, update (PPO\'s update '
                           'program before / after, trimmed), ppo, grpo, trl (TRL beside '
                           'each of ppo and grpo, in this process), tunix (Tunix beside grpo, '
                           'in --tunix_python\'s venv)')
_TUNIX_PYTHON = flags.DEFINE_string(
    'tunix_python', '/tmp/tunix-venv/bin/python',
    'the python of a venv with google-tunix, which runs tools/peer_tunix_grpo.py for '
    '--parts=tunix')
flags.register_validator('parts', lambda v: set(v) <= set(PARTS),
                         f'--parts takes a comma-separated list of {", ".join(PARTS)}')

TOK = types.SimpleNamespace(pad_id=0, end_of_turn_id=1, eot_id=2, reward_id=3,
                            chat=types.SimpleNamespace(stop_ids=(1, 2)))  # where sampling stops
PROMPT_LEN = (18, 31)  # prompt lengths drawn from [18, 30]: ~24 tokens, like task prompts


def timed(fn, repeats):
  """(last output, first call seconds, best seconds of `repeats` later calls)."""
  start = time.perf_counter()
  out = jax.block_until_ready(fn())
  first, best = time.perf_counter() - start, float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - start)
  return out, first, best


def random_prompts(rng, rows, vocab, room):
  """(ids (rows, P), lengths (rows,)): right-padded random prompts, P a multiple of 16."""
  lengths = rng.integers(*PROMPT_LEN, size=rows).astype(np.int32)
  width = min(-(-int(lengths.max()) // 16) * 16, room)
  lengths = np.minimum(lengths, width)
  ids = rng.integers(4, vocab, size=(rows, width)).astype(np.int32)
  ids[np.arange(width)[None, :] >= lengths[:, None]] = TOK.pad_id
  return ids, lengths


# -- 1. train steps -----------------------------------------------------------------------------


def bench_step(cfg, stage, mcfg, loss_fn, batch, seq_len, mesh, peak):
  t = config_lib.stage_train_config(cfg, stage)
  opt = optim.make_optimizer(t)
  graphdef, state, shardings = trainer.create_train_state(mcfg, mesh, opt, _SEED.value)
  step = trainer.jit_train_step(
      trainer.make_train_step(graphdef, opt, loss_fn, t.micro_batches, mcfg.rules,
                              lr_schedule=optim.schedule(t)),
      shardings, mesh, mcfg.rules, list(batch))
  tokens = int(np.count_nonzero(batch['segment_ids']))  # real (non-padding) tokens
  fpt = metrics.flops_per_token(mcfg, seq_len, model_lib.count_params(state['params']))
  gbatch = loop.global_batch(batch, mesh, mcfg.rules)
  holder = {'state': state}  # each call donates the old state

  def run():
    holder['state'], m = step(holder['state'], gbatch)
    return m

  with jax.set_mesh(mesh):
    _, first, best = timed(run, _REPEATS.value)
  return {'tokens': tokens, 'first': first, 'best': best, 'tps': tokens / best,
          'fpt': fpt, 'mfu': tokens / best * fpt / peak}


def part_train_steps(cfg, mesh, rng):
  lm_cfg = model_lib.ModelConfig.from_config(cfg)
  rm_cfg = model_lib.ModelConfig.for_stage(cfg, 'reward')
  peak = metrics.measure_peak_flops(lm_cfg.dtype) * jax.process_count()
  b, t = config_lib.stage_train_config(cfg, 'sft').batch_size, cfg.data.seq_len
  seq = rng.integers(4, lm_cfg.vocab_size, size=(b, t + 1)).astype(np.int32)
  sft_batch = {'inputs': seq[:, :-1], 'targets': seq[:, 1:],
               'weights': np.ones((b, t), np.float32), 'segment_ids': np.ones((b, t), np.int32),
               'positions': np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy()}
  rb = config_lib.stage_train_config(cfg, 'reward').batch_size  # reward.batch_size or train's
  rt = cfg.reward.seq_len or cfg.data.seq_len
  rm_batch = {'tokens': rng.integers(4, rm_cfg.vocab_size, size=(rb, 2, rt)).astype(np.int32),
              'positions': np.broadcast_to(np.arange(rt, dtype=np.int32), (rb, 2, rt)).copy(),
              'segment_ids': np.ones((rb, 2, rt), np.int32),
              'readout': np.full((rb, 2), rt - 1, np.int32),  # <|reward|> is the last token
              'margin': np.zeros((rb,), np.float32), 'weight': np.ones((rb,), np.float32)}
  rows = {
      'sft': (f'{b} x {t}', bench_step(
          cfg, 'sft', lm_cfg, trainer.lm_loss_fn(cfg.train.z_loss, bool(cfg.sft.packing)),
          sft_batch, t, mesh, peak)),
      'reward': (f'{rb} x 2 x {rt}', bench_step(
          cfg, 'reward', rm_cfg, trainer.reward_loss_fn(cfg.reward.center), rm_batch, rt,
          mesh, peak))}
  print(f'\n1. train step, random parameters (best of {_REPEATS.value}); peak '
        f'{peak / 1e9:.1f} GFLOP/s measured here ({lm_cfg.dtype.name} matmul, all devices)')
  print(f'{"loss":8s} {"batch":>14s} {"tokens":>7s} {"first s":>8s} {"best s":>8s} '
        f'{"tokens/s":>10s} {"MFLOP/token":>12s} {"MFU":>7s}')
  for name, (shape, r) in rows.items():
    print(f'{name:8s} {shape:>14s} {r["tokens"]:7d} {r["first"]:8.2f} {r["best"]:8.3f} '
          f'{r["tps"]:10.0f} {r["fpt"] / 1e6:12.2f} {100 * r["mfu"]:6.2f}%')
  s, r = rows['sft'][1], rows['reward'][1]
  print(f'reward / sft: tokens/s {r["tps"] / s["tps"]:.2f}x, MFU {r["mfu"] / s["mfu"]:.2f}x '
        f'(FLOP/token {r["fpt"] / s["fpt"]:.2f}x: no LM head, T={rt} vs {t})')


# -- 2. sampling comparisons ----------------------------------------------------------------------


def part_sampling(cfg, mesh, rng):
  mcfg = model_lib.ModelConfig.from_config(cfg)
  graphdef, params = model_lib.init_params(mcfg, mesh, _SEED.value)
  r = cfg.reward
  k, n = int(r.samples_per_prompt), int(r.response_tokens)
  mult = sampling.batch_multiple(mesh, mcfg.rules)
  rows = _PROMPTS.value * k
  chunk = -(-min(_CHUNK.value, rows) // mult) * mult
  padded = -(-rows // chunk) * chunk
  ids, lengths = random_prompts(rng, padded, mcfg.vocab_size, mcfg.max_seq_len - n)
  lengths[rows:] = 1  # padding rows: one-token dummy prompts, as generate() pads
  key = jax.random.PRNGKey(_SEED.value)
  settings = sampling.SamplingConfig(max_new_tokens=n, temperature=1.0, pad_id=TOK.pad_id,
                                     stop_ids=sampling.default_stop_ids(TOK))
  out, first, best = timed(lambda: [
      sampling.sample(graphdef, params, mcfg, ids[s:s + chunk], lengths[s:s + chunk],
                      jax.random.fold_in(key, s), settings).lengths
      for s in range(0, padded, chunk)], _REPEATS.value)
  new = int(np.concatenate([np.asarray(x) for x in out])[:rows].sum())
  stage_rows = sum(-(-q * k // _CHUNK.value) * _CHUNK.value
                   for q in (int(r.prompts), int(r.heldout_prompts)))
  print(f'\n2. sampling comparisons: K={k} responses of {n} tokens at T=1 (stop ids on), '
        f'~24-token prompts, chunks of {chunk} rows (best of {_REPEATS.value})')
  print(f'{"prompts":>22s} {"rows":>6s} {"first s":>8s} {"best s":>8s} {"new tokens":>11s} '
        f'{"tokens/s":>10s}')
  print(f'{_PROMPTS.value:22d} {rows:6d} {first:8.2f} {best:8.3f} {new:11d} {new / best:10.0f}')
  print(f'{f"{r.prompts} + {r.heldout_prompts} (stage)":>22s} {stage_rows:6d} {"":8s} '
        f'{best / padded * stage_rows:8.1f} {"":11s} {"(extrapolated per padded row)"}')


# -- 3. one PPO iteration -------------------------------------------------------------------------


def part_online_rl(cfg, mesh, rng, name: str):
  """One iteration of the online-RL loop for `name` ('ppo' or 'grpo') on random models."""
  p = cfg[name]
  build = {'ppo': lambda: ppo_algo.build(cfg, TOK, mesh, None),
           'grpo': lambda: grpo_algo.build(cfg, TOK, mesh, None)}[name]
  algo = build()
  roles, graphdefs = algo.roles, algo.graphdefs
  seed = _SEED.value
  params = {'policy': model_lib.init_params(roles.policy, mesh, seed)[1]}
  if roles.value is not None:
    params['value'] = model_lib.init_params(roles.value, mesh, seed + 1)[1]
  frozen = {}
  if roles.reference is not None:  # the policy's random LM, copied (the policy gets donated)
    frozen['reference'] = jax.tree.map(
        lambda x: jnp.array(x, roles.reference.param_dtype, copy=True),
        {k: v for k, v in params['policy'].items() if k != 'scalar_head'})
  if roles.reward is not None:
    frozen['reward'] = model_lib.init_params(roles.reward, mesh, seed + 2)[1]
  init_policy = jax.device_get(params['policy'])  # for TRL's peer (the state gets donated)
  state = roles_lib.make_state(params, p, seed, algo.optimizers, algo.shardings, mesh)
  room = roles.policy.max_seq_len - p.response_tokens - 1
  prompts = p.rollout_batch // algo.group_size
  batches = [dict(zip(('prompt', 'length'), random_prompts(rng, prompts, roles.policy.vocab_size,
                                                           room)))
             for _ in range(1 + _ITERATIONS.value + bool(_PROFILE.value))]
  width = batches[0]['prompt'].shape[1]
  data = types.SimpleNamespace(train_iter=iter(batches), ptx_iter=None)  # no PPO-ptx mix
  # Random models and ids: no text to check, so no host reward terms (the checker's cost
  # on decoded replies is the tiny recipe's `reward_seconds`).
  iteration = rl_loop.Iteration(algo, rl_loop.Inputs(data, TOK, frozen, None, mesh, seed, None,
                                                     {}))
  got, walls = [], []
  with jax.set_mesh(mesh):
    for step in range(1 + _ITERATIONS.value):
      start = time.perf_counter()
      state, m = iteration(state, step)
      walls.append(time.perf_counter() - start)
      got.append(m)
    if _PROFILE.value:  # one more iteration, traced (tracing slows it: not timed)
      state, _ = kernel_profile.traced(lambda: iteration(state, 1 + _ITERATIONS.value),
                                       f'{_PROFILE.value}/{name}',
                                       f'{name.upper()}: one more iteration, traced')
  def mean(key):
    return float(np.mean([m[key] for m in got[1:]]))
  phases = {ph: mean(f'{ph}_seconds') for ph in ('generate', 'score', 'update')}
  total = sum(phases.values())
  group = f', group_size={algo.group_size}' if algo.group_size > 1 else ''
  print(f'\n{name.upper()} iteration: rollout_batch={p.rollout_batch}{group}, prompt width '
        f'{width}, response_tokens={p.response_tokens}, T={p.temperature}, {p.epochs} epochs x '
        f'{p.rollout_batch // p.batch_size} minibatches of {p.batch_size}; mean of '
        f'{len(got) - 1} iterations after a warm-up of {walls[0]:.1f} s')
  print(f'{"phase":10s} {"seconds":>8s} {"share":>7s} {"tokens/s":>10s}')
  for ph, sec in phases.items():
    print(f'{ph:10s} {sec:8.3f} {100 * sec / total:6.1f}% {mean(f"{ph}_tokens_per_sec"):10.0f}')
  print(f'{"sum":10s} {total:8.3f}   (iteration wall {np.mean(walls[1:]):.3f} s; '
        f'{mean("response_tokens"):.0f} response tokens per rollout; update tokens/s counts '
        f'every epoch)')
  ours = {'roles': roles, 'policy': init_policy, 'batches': batches, 'phases': phases}
  if name != 'ppo':
    return ours
  settings = iteration.settings
  policy = state['policy']['params']
  ids, lengths = batches[0]['prompt'], batches[0]['length']
  n = p.response_tokens
  print(f'sampling.sample alone, {p.rollout_batch} x {width} prompts, {n} new tokens '
        f'(best of {_REPEATS.value})')
  print(f'{"settings":28s} {"first s":>8s} {"best s":>8s} {"new tokens":>11s} {"tokens/s":>10s}')
  for name, s, key in (
      ('as PPO (T, stop ids)', settings, jax.random.PRNGKey(1)),
      ('greedy, no stop ids', sampling.SamplingConfig(max_new_tokens=n, temperature=0.0),
       jax.random.PRNGKey(0))):
    out, first, best = timed(lambda s=s, key=key: sampling.sample(
        graphdefs['policy'], policy, roles.policy, ids, lengths, key, s).lengths, _REPEATS.value)
    new = int(np.asarray(out).sum())
    print(f'{name:28s} {first:8.2f} {best:8.3f} {new:11d} {new / best:10.0f}')
  print(f'(the greedy row is tools/bench_decode.py --config <this config> --batch '
        f'{p.rollout_batch} --prompt_len {width} --new_tokens {n}, jaxgpt)')
  return ours


# -- 4. TRL's trainers on the same shapes ----------------------------------------------------------

TRL_VERSION = '1.12.0'  # the last release that ships PPOTrainer (trl.experimental.ppo)


class PhaseClock:
  """Seconds of each phase of each iteration of a TRL trainer, from wrappers around its
  generation and its first training forward, and a callback at every iteration's end."""

  def __init__(self):
    self.rows, self.now = [], None

  def start(self):
    self.now = {'t0': time.perf_counter(), 'generate': 0.0, 'scored_at': None}

  def timed(self, fn, phase):
    def wrapper(*args, **kwargs):
      start = time.perf_counter()
      try:
        return fn(*args, **kwargs)
      finally:
        self.now[phase] += time.perf_counter() - start
        self.now.setdefault('generated_at', time.perf_counter())
    return wrapper

  def mark_scored(self):
    if self.now['scored_at'] is None:
      self.now['scored_at'] = time.perf_counter()

  def end(self):
    n, t = self.now, time.perf_counter()
    total = t - n['t0']
    scored = n['scored_at'] or t
    update = t - scored
    self.rows.append({'generate': n['generate'], 'score': total - n['generate'] - update,
                      'update': update, 'total': total})
    self.start()


def trl_tokenizer(vocab_size):
  """A word-level tokenizer of ids 't0' .. 't{V-1}' (pad t0, end of turn t1 as EOS): TRL
  needs one to decode and (GRPO) to encode prompts; the models see the same ids as jaxgpt's."""
  import tokenizers  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(
      {f't{i}': i for i in range(vocab_size)}, unk_token='t0'))
  tk.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  tk.decoder = tokenizers.decoders.WordPiece()  # joins tokens with spaces
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=tk, pad_token=f't{TOK.pad_id}', eos_token=f't{TOK.end_of_turn_id}',
      padding_side='left')


def hf_models(cfg, roles, policy_params, seed):
  """(policy, reference, value, reward): the policy with jaxgpt's policy weights (so its
  replies have the same lengths), the reference its copy, value and reward models randomly
  initialised transformers sequence classifiers of the reward model's shape."""
  import copy  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  from jaxgpt.hf import torch_peer, weights  # pylint: disable=import-outside-toplevel
  torch.manual_seed(seed)
  # XLA flushes float32 denormals to zero on CPU; eager torch does not, and random small
  # weights then put denormals in the backward pass and Adam's moments, 7-10x slower here.
  torch.set_flush_denormal(True)
  policy, about = torch_peer.causal_lm(roles.policy, policy_params,
                                       threads=_TORCH_THREADS.value)
  fields = weights.hf_config_from_model(model_lib.ModelConfig.for_stage(cfg, 'reward'),
                                        head='score', special_ids={'pad_token_id': TOK.pad_id})
  rm_config = transformers.AutoConfig.for_model(fields.pop('model_type'), **fields)
  value, reward = (transformers.AutoModelForSequenceClassification.from_config(rm_config)
                   for _ in range(2))
  for m in (policy, value, reward):
    m.config.pad_token_id = TOK.pad_id
    # TRL names its run after the model; one built from a config has no name.
    m.config._name_or_path = 'jaxgpt-peer'  # pylint: disable=protected-access
  policy.generation_config.pad_token_id = TOK.pad_id
  return policy, copy.deepcopy(policy), value, reward, about + ', denormals flushed'


def trl_ppo(cfg, roles, policy_params, batches, workdir):
  """Seconds per phase of TRL's PPOTrainer iterations on `batches` (after a warm-up)."""
  import datasets  # pylint: disable=import-outside-toplevel
  from trl.experimental.ppo import PPOConfig, PPOTrainer  # pylint: disable=import-outside-toplevel
  from trl.experimental.ppo import ppo_trainer  # pylint: disable=import-outside-toplevel
  p = cfg.ppo
  tok = trl_tokenizer(roles.policy.vocab_size)
  rows = [list(map(int, ids[:n])) for b in batches for ids, n in zip(b['prompt'], b['length'])]
  data = datasets.Dataset.from_dict({'input_ids': rows})
  policy, reference, value, reward, about = hf_models(cfg, roles, policy_params, _SEED.value)
  args = PPOConfig(
      output_dir=workdir, per_device_train_batch_size=p.rollout_batch,
      gradient_accumulation_steps=1, num_mini_batches=p.rollout_batch // p.batch_size,
      num_ppo_epochs=p.epochs, local_rollout_forward_batch_size=p.rollout_batch,
      response_length=p.response_tokens, temperature=p.temperature,
      stop_token_id=TOK.end_of_turn_id, missing_eos_penalty=-p.missing_eot_penalty,
      kl_coef=p.kl_coef, cliprange=p.clip, cliprange_value=p.value_clip, gamma=p.gamma,
      lam=p.lam, learning_rate=p.lr, total_episodes=len(rows), num_sample_generations=0,
      report_to='none', save_strategy='no', logging_steps=10**6, disable_tqdm=True,
      use_cpu=True, bf16=False, seed=_SEED.value, dataloader_num_workers=0)
  trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=reference,
                       reward_model=reward, value_model=value, train_dataset=data,
                       eval_dataset=data)
  clock = PhaseClock()
  forward = ppo_trainer.forward

  def timed_forward(model, *a, **kw):
    if isinstance(model, ppo_trainer.PolicyAndValueWrapper):
      clock.mark_scored()  # the first training forward: rollout scoring is over
    return forward(model, *a, **kw)

  ppo_trainer.batch_generation = clock.timed(ppo_trainer.batch_generation, 'generate')
  ppo_trainer.forward = timed_forward
  trainer.add_callback(IterationEnd(clock))
  clock.start()
  trainer.train()
  return clock.rows[1:], about + f', trl {_trl_version()}'


def trl_grpo(cfg, roles, policy_params, batches, workdir):
  """Seconds per phase of TRL's GRPOTrainer iterations (one generation of rollout_batch
  completions, then rollout_batch / batch_size optimizer steps) after a warm-up."""
  import datasets  # pylint: disable=import-outside-toplevel
  from trl import GRPOConfig, GRPOTrainer  # pylint: disable=import-outside-toplevel
  g = cfg.grpo
  tok = trl_tokenizer(roles.policy.vocab_size)
  prompts = [' '.join(f't{int(i)}' for i in ids[:n])
             for b in batches for ids, n in zip(b['prompt'], b['length'])]
  data = datasets.Dataset.from_dict({'prompt': prompts})
  policy, _, _, _, about = hf_models(cfg, roles, policy_params, _SEED.value)
  # GRPOTrainer loads its reference from the policy's path: give it one.
  path = f'{workdir}/policy'
  policy.save_pretrained(path)
  policy.config._name_or_path = path  # pylint: disable=protected-access
  steps = g.rollout_batch // g.batch_size  # optimizer steps per generation
  args = GRPOConfig(
      output_dir=workdir, per_device_train_batch_size=g.batch_size,
      gradient_accumulation_steps=1, steps_per_generation=steps, num_iterations=g.epochs,
      num_generations=g.group_size, max_completion_length=g.response_tokens,
      temperature=g.temperature, beta=g.kl_coef, epsilon=g.clip, loss_type='grpo',
      learning_rate=g.lr, max_steps=steps * len(batches), report_to='none',
      save_strategy='no', logging_steps=10**6, disable_tqdm=True, use_cpu=True, bf16=False,
      seed=_SEED.value, dataloader_num_workers=0, shuffle_dataset=False)

  def reward(prompts, completions, **kwargs):  # a host reward as cheap as the checker
    del prompts, kwargs
    return [float(len(c) % 3) for c in completions]

  trainer = GRPOTrainer(model=policy, reward_funcs=reward, args=args, train_dataset=data,
                        processing_class=tok)
  clock = PhaseClock()
  trainer._generate = clock.timed(trainer._generate, 'generate')  # pylint: disable=protected-access
  score = trainer._generate_and_score_completions  # pylint: disable=protected-access

  def generate_and_score(*a, **kw):
    out = score(*a, **kw)
    clock.mark_scored()
    return out

  trainer._generate_and_score_completions = generate_and_score  # pylint: disable=protected-access
  trainer.add_callback(IterationEnd(clock, every=steps))
  clock.start()
  trainer.train()
  return clock.rows[1:], about + f', trl {_trl_version()}'


def _trl_version():
  import trl  # pylint: disable=import-outside-toplevel
  return trl.__version__


def IterationEnd(clock, every=1):  # pylint: disable=invalid-name
  """A transformers callback closing `clock`'s iteration every `every` optimizer steps."""
  import transformers  # pylint: disable=import-outside-toplevel

  class _End(transformers.TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
      if state.global_step % every == 0:
        clock.end()

  return _End()


def part_trl(cfg, name, ours):
  """TRL's trainer for `name` on the shapes, prompts and policy weights of our run; prints
  both splits and the ratio, or one line naming what to install."""
  try:
    import trl  # pylint: disable=import-outside-toplevel,unused-import
    import datasets  # pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    print(f'\n{name.upper()} beside TRL: not measured (pip install trl=={TRL_VERSION} to compare)')
    return
  import tempfile  # pylint: disable=import-outside-toplevel
  with tempfile.TemporaryDirectory() as workdir:
    fn = {'ppo': trl_ppo, 'grpo': trl_grpo}[name]
    try:
      rows, about = fn(cfg, ours['roles'], ours['policy'], ours['batches'], workdir)
    except ImportError as e:
      print(f'\n{name.upper()} beside TRL: not measured ({e}; pip install trl=={TRL_VERSION})')
      return
  theirs = {k: float(np.mean([r[k] for r in rows])) for k in ('generate', 'score', 'update',
                                                               'total')}
  print_beside(f'{name.upper()} beside TRL ({about}); the same prompts, shapes and policy '
               f'weights; mean of {len(rows)} iterations after a warm-up', 'TRL',
               ours['phases'], theirs)


def print_beside(title, peer, mine, theirs):
  """Both sides' seconds per phase and the ratio."""
  print(f'\n{title}')
  print(f'{"phase":10s} {"jaxgpt s":>9s} {peer + " s":>9s} {"jaxgpt / " + peer:>14s}')
  for ph in ('generate', 'score', 'update'):
    print(f'{ph:10s} {mine[ph]:9.3f} {theirs[ph]:9.3f} {mine[ph] / theirs[ph]:13.2f}x')
  total = sum(mine.values())
  print(f'{"iteration":10s} {total:9.3f} {theirs["total"]:9.3f} '
        f'{total / theirs["total"]:13.2f}x')


# -- 4b. Tunix's GRPO learner on the same shapes, in its own venv ---------------------------------

TUNIX_VERSION = '0.1.7'


def part_tunix(cfg, ours):
  """tools/peer_tunix_grpo.py run by --tunix_python (a venv with google-tunix) on our GRPO
  run's prompt ids and shapes; prints both sides and the ratio, or one line naming why not."""
  import json  # pylint: disable=import-outside-toplevel
  import os  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  import tempfile  # pylint: disable=import-outside-toplevel
  python = _TUNIX_PYTHON.value
  how = (f'python -m venv /tmp/tunix-venv && /tmp/tunix-venv/bin/pip install '
         f'google-tunix=={TUNIX_VERSION}; then --tunix_python=/tmp/tunix-venv/bin/python')
  if not python or not os.path.exists(python):
    print(f'\nGRPO beside Tunix: not measured (no --tunix_python {python or ""}; {how})')
    return
  g, m = cfg.grpo, ours['roles'].policy
  prompts = [ids[:n].tolist() for b in ours['batches'] for ids, n in zip(b['prompt'], b['length'])]
  with tempfile.NamedTemporaryFile('w', suffix='.json') as f:
    json.dump(prompts, f)
    f.flush()
    args = {'vocab_size': m.vocab_size, 'd_model': m.d_model, 'n_layers': m.n_layers,
            'n_heads': m.n_heads, 'n_kv_heads': m.n_kv_heads, 'head_dim': m.head_dim,
            'ffn_hidden': m.d_ff, 'rope_theta': m.rope_theta, 'norm_eps': m.norm_eps,
            'prompts_per_iteration': g.rollout_batch // g.group_size,
            'generations': g.group_size, 'max_new_tokens': g.response_tokens,
            'temperature': g.temperature, 'beta': g.kl_coef, 'epsilon': g.clip,
            'epochs': g.epochs, 'minibatches': g.rollout_batch // g.batch_size,
            'learning_rate': g.lr, 'iterations': _ITERATIONS.value, 'seed': _SEED.value,
            'prompts_json': f.name, 'minibatching': 'grad_accumulation'}
    cmd = [python, os.path.join(os.path.dirname(__file__), 'peer_tunix_grpo.py')]
    cmd += [f'--{k}={v}' for k, v in args.items()] + ([] if m.tied else ['--untied_embeddings'])
    run = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if run.returncode != 0:
    why = (run.stderr.strip().splitlines() or ['no output'])[-1]
    print(f'\nGRPO beside Tunix: not measured (exit {run.returncode}: {why})')
    return
  theirs = json.loads(run.stdout.strip().splitlines()[-1])
  print_beside(f'GRPO beside Tunix ({theirs["about"]}); the same prompt ids and shapes; mean of '
               f'{theirs["iterations"]} iterations after a warm-up, replies '
               f'{theirs["mean_reply_tokens"]:.0f} tokens', 'Tunix', ours['phases'], theirs)


# -- 5. the update alone: before / after ----------------------------------------------------------


def part_update(cfg, mesh, rng):
  """One PPO iteration's epochs x minibatches of updates on random batches, interleaved
  rounds of: one jitted update per minibatch (a gather and a dispatch each, the entropy's
  backward kept, the LM head at every position: the loop as it was) and the one compiled
  scan with the LM head over the reply window, each at the full width
  P + N + 1 and at trimmed widths. Interleaving keeps a shared machine's load swings out
  of the comparison."""
  p = cfg.ppo
  n_rows, room = p.rollout_batch, cfg.model.max_seq_len - p.response_tokens - 1
  full = min(-(-PROMPT_LEN[1] // 16) * 16, room) + p.response_tokens + 1
  widths = sorted({full, 40, 32}, reverse=True)
  old_cfg = cfg.copy_and_resolve_references()
  old_cfg.ppo.entropy_coef = 1e-12  # a non-zero weight keeps the entropy's backward pass
  algos = {'before': ppo_algo.build(old_cfg, TOK, mesh, None),
           'after': ppo_algo.build(cfg, TOK, mesh, None)}
  roles = algos['after'].roles
  params = {'policy': model_lib.init_params(roles.policy, mesh, _SEED.value)[1]}
  if roles.value is not None:
    params['value'] = model_lib.init_params(roles.value, mesh, _SEED.value + 1)[1]
  host = jax.device_get(params)
  rows_ub = rl_loop.minibatch_rows(p, _SEED.value, 0)
  take = jax.jit(lambda batch, idx: jax.tree.map(lambda x: x[idx], batch),
                 out_shardings=sharding.batch_sharding(mesh, roles.policy.rules))

  def batch_of(w, window):
    """Rows whose prompt + reply + readout fill at most w tokens (replies up to N); with
    `window`, the LM head runs over the reply window of N positions only, as in the loop."""
    n_b = rng.integers(1, p.response_tokens + 1, n_rows)
    n_b = np.minimum(n_b, w - 1 - 2)
    length_b = np.minimum(rng.integers(*PROMPT_LEN, n_rows), w - 1 - n_b)
    t = np.arange(w - 1)[None, :]
    mask = ((t >= length_b[:, None] - 1) & (t <= (length_b + n_b)[:, None] - 2)).astype(
        np.float32)
    batch = {'tokens': rng.integers(4, roles.policy.vocab_size, (n_rows, w)).astype(np.int32),
             'mask': mask, 'old_logp': -7.6 * mask, 'returns': 0.3 * mask,
             'old_values': 0.1 * mask,
             'advantages': rng.standard_normal((n_rows, w - 1)).astype(np.float32) * mask}
    if window:
      batch['window'] = np.asarray(rollout.reply_window(mask, p.response_tokens))
    return loop.global_batch(batch, mesh, roles.policy.rules)

  def runner(name, w):
    algo = algos[name]
    holder = {'state': roles_lib.make_state(jax.device_put(host), p, _SEED.value,
                                            algo.optimizers, algo.shardings, mesh)}
    batch = batch_of(w, window=name == 'after')

    def run():
      if name == 'after':
        holder['state'], m = algo.epochs(holder['state'], batch, rows_ub, None)
        return m
      out = []
      for idx in rows_ub:
        holder['state'], m = algo.update(holder['state'], take(batch, idx))
        out.append(m)
      return out
    return run

  runs = {(name, w): runner(name, w) for w in widths for name in algos}
  times = {k: [] for k in runs}
  with jax.set_mesh(mesh):
    for fn in runs.values():  # compile
      jax.block_until_ready(fn())
    for _ in range(max(3, _REPEATS.value)):
      for k, fn in runs.items():
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times[k].append(time.perf_counter() - start)
  print(f'\nPPO update alone: {len(rows_ub)} updates of {p.batch_size} rows (policy + value), '
        f'{len(times[next(iter(times))])} interleaved rounds; seconds (best / median)')
  print(f'{"width":>6s} {"before (loop)":>16s} {"after (scan)":>16s} {"after / before":>15s}')
  base = np.min(times[('before', full)])
  for w in widths:
    b, a = times[('before', w)], times[('after', w)]
    print(f'{w:6d} {np.min(b):7.3f} / {np.median(b):6.3f} {np.min(a):7.3f} / {np.median(a):6.3f} '
          f'{np.min(a) / np.min(b):14.2f}x   (after / before at full width: '
          f'{np.min(a) / base:.2f}x)')


def main(argv):
  del argv
  if _PROFILE.value:
    kernel_profile.prepare(_PROFILE.value)  # before the backend starts (below)
  cfg = _CONFIG.value
  config_lib.validate(cfg, jax.device_count())
  mesh = sharding.make_mesh(cfg)
  mcfg = model_lib.ModelConfig.from_config(cfg)
  devices = jax.devices()
  print(f'devices: {len(devices)} x {devices[0].device_kind} ({jax.default_backend()}), '
        f'mesh {dict(mesh.shape)}')
  print(f'model: {mcfg.family}, d_model={mcfg.d_model}, layers={mcfg.n_layers}, '
        f'vocab={mcfg.vocab_size}, dtype={mcfg.dtype.name}, param_dtype='
        f'{jnp.dtype(mcfg.param_dtype).name}, frozen_dtype={cfg.ppo.frozen_dtype}')
  rng = np.random.default_rng(_SEED.value)
  start = time.perf_counter()
  parts = set(_PARTS.value)
  if 'train' in parts:
    part_train_steps(cfg, mesh, rng)
  if 'sampling' in parts:
    part_sampling(cfg, mesh, rng)
  if 'update' in parts:
    part_update(cfg, mesh, rng)
  for name in ('ppo', 'grpo'):
    if name in parts:
      ours = part_online_rl(cfg, mesh, rng, name)
      if 'trl' in parts:
        part_trl(cfg, name, ours)
      if name == 'grpo' and 'tunix' in parts:
        part_tunix(cfg, ours)
  print(f'\ntotal {time.perf_counter() - start:.0f} s')


if __name__ == '__main__':
  errors.run(main, 'bench_rlhf')
