"""The online-RL loop that PPO, GRPO, Dr. GRPO and RLOO share.

An iteration: take a batch of prompts (each repeated `group_size` times, in consecutive
rows) -> sample replies with the KV-cache sampler on the policy's parameters in place ->
rewards of the decoded replies on the host (the checker, a user's functions; per process,
on its own rows) -> the algorithm's jitted `prepare` (log-probs, the reward model's score,
advantages) -> `epochs` passes of shuffled minibatch updates -> the algorithm's KL
controller. An algorithm (`Algorithm`) supplies only its roles, `prepare` and `update`;
resume, checkpoints, metrics and the stop flag are the shared `train.loop` pieces.

Three things keep the update cheap. Rows are laid out only as wide as the batch needs: the
longest prompt + reply + readout, rounded up to a multiple of `ROW_MULTIPLE` (capped at
the full P + N + 1), so a batch of short replies does not pay for the response budget and
the compiled widths stay few (GRPO's update with each group's prompt run once, and no
reward model, lays rows out full width: there only the prompt and the reply window run,
and one width compiles once). The LM head and its softmax run only over a window of the
longest reply's length (rounded the same way) from each row's first reply position
(`rollout.reply_window`): the prompt's positions cost the trunk alone. And every epoch's
minibatch updates run as one compiled program (`make_epochs`: a scan over the minibatches'
row indices, drawn on the host from (seed, step, epoch) as before), not one dispatch and
one gather per minibatch.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jax.sharding import NamedSharding, PartitionSpec as P

from jaxgpt import sharding
from jaxgpt import model as model_lib
from jaxgpt.inference import sampling
from jaxgpt.model import lora
from jaxgpt.rl import roles as roles_lib
from jaxgpt.train import lora_checkpoint, loop, trainer
from jaxgpt.train import metrics as metrics_lib


class Rollout(NamedTuple):
  """One iteration's samples, global arrays batch-sharded like the prompts."""
  prompt_bp: jax.Array       # (B, P) right-padded prompts, each group_size times in a row
  length_b: jax.Array        # (B,) prompt lengths
  out: sampling.SampleOutput
  host_reward_b: jax.Array   # (B,) float32 weighted sum of the host reward terms
  correct_b: jax.Array       # (B,) float32 1 where the task checker accepts the reply


@dataclasses.dataclass
class Algorithm:
  """What an online-RL algorithm gives the loop."""
  name: str                  # the stage: it lives in WORKDIR/<name>
  section: Any               # its config section (config.ppo, config.grpo)
  roles: roles_lib.Roles
  graphdefs: dict            # trained role -> graphdef
  abstract: dict             # the state's abstract arrays and its shardings
  shardings: dict
  optimizers: dict           # trained role -> (optimizer, schedule)
  prepare: Callable          # jitted (params, frozen, beta, Rollout, width) -> (batch, metrics)
  update: Callable           # jitted (state, minibatch) -> (state, metrics): one step
  epochs: Callable           # jitted (state, batch, rows_ub, ptx) -> (state, metrics per step)
  kl_controller: Callable[[float, float], float] | None = None  # (beta, kl) -> next beta
  group_size: int = 1
  share_prompt: bool = False  # prepare runs each group's prompt once (takes prefix_width)
  minibatch_group: int = 1   # minibatches of whole groups of this many consecutive rows
  section_name: str = ''     # the config section's name, for messages (default: name)

  def __post_init__(self):
    self.section_name = self.section_name or self.name


@dataclasses.dataclass
class Inputs:
  """What the stage reads for the loop."""
  data: Any                  # data.prompts.PromptData (ptx_iter set for PPO-ptx)
  tok: Any
  frozen: dict               # frozen role -> params
  host_rewards: Any          # rl.rewards.HostRewards; None: no host terms, no checker
  mesh: Any
  seed: int
  init_state: Callable[[], dict]
  meta: dict                 # stored with every checkpoint


def make_update(graphdefs, optimizers, loss_fns, micro_batches, rules):
  """(state, minibatch) -> (state, metrics): one optimizer step of every trained role."""
  grad_fns = {role: trainer.make_grad_fn(graphdefs[role], loss_fns[role], micro_batches, rules)
              for role in graphdefs}

  def update(state, batch):
    state = dict(state)
    metrics = {}
    finite = jnp.bool_(True)
    for role, grad_fn in grad_fns.items():
      opt, schedule = optimizers[role]
      grads, sums = grad_fn(state[role]['params'], batch)
      params, opt_state = trainer.apply_gradients(opt, grads, state[role])
      state[role] = {'params': params, 'opt_state': opt_state}
      denom = jnp.maximum(sums['weight'], 1.0)
      metrics.update({k: v / denom for k, v in sums.items() if k != 'weight'})
      metrics[f'{role}_grad_norm'] = optax.tree.norm(grads)
      metrics[f'{role}_lr'] = schedule(_update_count(opt_state))
      finite &= jax.tree.reduce(jnp.logical_and,
                                jax.tree.map(lambda x: jnp.all(jnp.isfinite(x)), params))
    metrics['params_finite'] = finite
    return state, metrics

  return update


def _update_count(opt_state):
  """Updates applied so far, read from the optimizer's own step counter."""
  counts = [x for x in jax.tree.leaves(opt_state) if x.dtype == jnp.int32 and x.ndim == 0]
  return counts[0] if counts else jnp.int32(0)


def jit_prepare(prepare_fn, mesh, rules, static=('width', 'reply_width')):
  """`prepare(params, frozen, beta, rollout, width=None, reply_width=None, ...)`, compiled
  once per value of its `static` arguments (row width, reply window; GRPO's prefix width)."""
  return jax.jit(prepare_fn, static_argnames=static,
                 out_shardings=(sharding.batch_sharding(mesh, rules), sharding.replicated(mesh)))


def jit_update(update_fn, shardings, mesh, rules):
  return jax.jit(update_fn, in_shardings=(shardings, sharding.batch_sharding(mesh, rules)),
                 out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=(0,))


def make_epochs(update_fn, rules):
  """(state, batch, rows_ub, ptx_u) -> (state, metrics_u): `update_fn` on minibatch
  batch[rows_ub[u]] (plus pretraining batch ptx_u[u], unless ptx is None) for u = 0, 1, ...
  in one scan, metrics stacked along u."""

  def epochs(state, batch, rows_ub, ptx_u=None):
    def step(state, xs):
      rows_b, ptx = xs
      minibatch = {k: sharding.constrain(x[rows_b], ('act_batch',) + (None,) * (x.ndim - 1),
                                         rules) for k, x in batch.items()}
      if ptx is not None:
        minibatch['ptx'] = ptx
      return update_fn(state, minibatch)

    return jax.lax.scan(step, state, (rows_ub, ptx_u))

  return epochs


def stacked_sharding(mesh, rules) -> NamedSharding:
  """(steps, rows, ...) arrays: one batch per update, each batch-sharded."""
  return NamedSharding(mesh, P(None, *sharding.batch_sharding(mesh, rules).spec))


def jit_updates(update_fn, shardings, mesh, rules):
  """(one step, every epoch's steps) of `update_fn`, compiled on `mesh`."""
  epochs = jax.jit(make_epochs(update_fn, rules),
                   in_shardings=(shardings, sharding.batch_sharding(mesh, rules),
                                 sharding.replicated(mesh), stacked_sharding(mesh, rules)),
                   out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=(0,))
  return jit_update(update_fn, shardings, mesh, rules), epochs


# Rows are laid out to a multiple of this many tokens (or the full P + N + 1): few widths,
# so few compiles of `prepare` and of the update program.
ROW_MULTIPLE = 8


def row_width(used: int, full: int, multiple: int = ROW_MULTIPLE) -> int:
  """The laid-out width of a batch whose longest row (prompt + reply + readout) is `used`."""
  return min(full, max(multiple, -(-used // multiple) * multiple))


def process_rows(x) -> np.ndarray:
  """This process's rows of a batch-sharded global array, in the order it fed them."""
  if jax.process_count() == 1:
    return np.asarray(jax.device_get(x))
  shards = {}
  for s in x.addressable_shards:
    shards.setdefault(s.index[0].start or 0, np.asarray(s.data))
  return np.concatenate([shards[k] for k in sorted(shards)])


def group_rows(local: dict, group_size: int) -> dict:
  """Each prompt row `group_size` times in consecutive rows: group g is rows g*K .. g*K+K-1
  (a process's groups stay on that process, so its host rewards see whole groups)."""
  return {k: np.repeat(v, group_size, axis=0) for k, v in local.items()}


def informative_first(rewards_b: np.ndarray, group_size: int, groups: int) -> np.ndarray:
  """Row indices of `groups` whole groups of K = group_size consecutive rows: first the groups
  whose rewards are not all equal (the only ones with a learning signal), then the others,
  each set in draw order, the kept groups back in draw order (DAPO's dynamic sampling, at a
  fixed batch size)."""
  r_gk = np.asarray(rewards_b).reshape(-1, group_size)
  informative = r_gk.max(axis=1) > r_gk.min(axis=1)
  keep = np.sort(np.concatenate([np.flatnonzero(informative),
                                 np.flatnonzero(~informative)])[:groups])
  return (keep[:, None] * group_size + np.arange(group_size)).ravel()


def row_fields(rows) -> dict[str, list]:
  """The prompt rows' other fields, column by column (None where a row lacks one)."""
  names = sorted({k for r in rows for k in r.fields})
  return {k: [r.fields.get(k) for r in rows] for k in names}


class Iteration:
  """One iteration of `algo` on `inputs`: (state, step) -> (state, metrics)."""

  def __init__(self, algo: Algorithm, inputs: Inputs):
    self.algo, self.inputs = algo, inputs
    s, tok = algo.section, inputs.tok
    self.rules = algo.roles.policy.rules
    # prompt + reply + readout of the longest row, replicated: every process reads it
    self.longest = jax.jit(lambda length_b, n_b: jnp.stack([jnp.max(length_b + n_b) + 1,
                                                             jnp.max(n_b)]),
                           out_shardings=sharding.replicated(inputs.mesh))
    self.settings = sampling.SamplingConfig(
        max_new_tokens=s.response_tokens, temperature=s.temperature,
        stop_ids=sampling.default_stop_ids(tok), pad_id=tok.pad_id,
        prompt_group=algo.group_size,  # group_rows: each prompt prefilled once a group
        # old_logp='sampler': the update's old log-probs and the entropy metric recorded here
        logprob_temperature=s.temperature, entropy=s.old_logp == 'sampler')
    self.oversample = int(s.get('oversample', 1))
    # With LoRA the sampler runs the merged weights (W + scale A B, folded once an iteration)
    # on the plain model: no low-rank terms in every decoding step.
    policy = algo.roles.policy
    self.sampler_mcfg = lora.plain(policy)
    self.sampler_graphdef = algo.graphdefs['policy']
    self.for_sampler = lambda p: p  # noqa: E731
    if policy.lora_rank:
      self.sampler_graphdef = model_lib.abstract_model(self.sampler_mcfg)[0]
      self.for_sampler = jax.jit(functools.partial(
          lora.merged, scale=policy.lora_alpha / policy.lora_rank))

  def host_rewards(self, local, out):
    """(host reward, checker verdict) of this process's rows, as global arrays."""
    inp = self.inputs
    if inp.host_rewards is None:
      zeros_b = np.zeros(len(local['prompt']), np.float32)
      return loop.global_batch({'reward': zeros_b, 'correct': zeros_b}, inp.mesh, self.rules)
    tokens_bn, n_b = process_rows(out.tokens), process_rows(out.lengths)
    completions = [inp.tok.chat.reply(tokens_bn[i, :n_b[i]])[0]
                   for i in range(len(n_b))]
    rows = [inp.data.rows[int(r)] for r in local['row']]
    prompts, fields = [r.text for r in rows], row_fields(rows)
    reward_b, per_source, _ = inp.host_rewards(prompts, completions, fields)
    correct_b = per_source.get('checker')  # the checker's verdict, once
    if correct_b is None:
      correct_b = inp.host_rewards.correct(prompts, completions, fields)
    return loop.global_batch({'reward': reward_b.astype(np.float32),
                              'correct': np.asarray(correct_b, np.float32)}, inp.mesh, self.rules)

  def keep_informative(self, local, prompts, out, host):
    """With config.<section>.oversample = m > 1, m times the prompts were drawn and sampled:
    keep one batch's worth of groups, those whose host rewards differ first. Each process
    chooses among its own groups. Returns the kept (local, prompts, out, host) and the
    sampled rows' statistics."""
    algo, inp = self.algo, self.inputs
    reward_b, correct_b = process_rows(host['reward']), process_rows(host['correct'])
    keep = informative_first(reward_b, algo.group_size, len(reward_b) // self.oversample //
                             algo.group_size)
    r_gk = reward_b.reshape(-1, algo.group_size)
    drawn = {'drawn_gold': float(correct_b.mean()),
             'drawn_equal_reward_groups': float(np.mean(r_gk.max(axis=1) == r_gk.min(axis=1)))}

    def rows(tree):
      return loop.global_batch({f: process_rows(x)[keep] for f, x in tree.items()}, inp.mesh,
                               self.rules)
    out = type(out)(**rows({f.name: getattr(out, f.name) for f in dataclasses.fields(out)
                            if getattr(out, f.name) is not None}))
    return ({f: v[keep] for f, v in local.items()}, rows(prompts), out, rows(host)), drawn

  def ptx_batches(self, s):
    """PPO-ptx: one pretraining batch per update, stacked (None without the mix)."""
    it = self.inputs.data.ptx_iter
    if it is None:
      return None
    local = [next(it) for _ in range(s.epochs * (s.rollout_batch // s.batch_size))]
    sh = stacked_sharding(self.inputs.mesh, self.rules)
    return {k: jax.make_array_from_process_local_data(sh, np.stack([b[k] for b in local]))
            for k in local[0]}

  def __call__(self, state, step: int):
    algo, inp, s = self.algo, self.inputs, self.algo.section
    times = {}
    t0 = time.perf_counter()
    drawn = [next(inp.data.train_iter) for _ in range(self.oversample)]
    local = group_rows({k: np.concatenate([d[k] for d in drawn]) for k in drawn[0]},
                       algo.group_size)
    prompts = loop.global_batch({k: local[k] for k in ('prompt', 'length')}, inp.mesh, self.rules)
    repl = sharding.replicated(inp.mesh)
    rng, sample_key = jax.device_put(tuple(jax.random.split(state['rng'])), repl)
    beta = float(jax.device_get(state['kl_coef']))
    state = dict(state, rng=rng)
    params = {r: state[r]['params'] for r in algo.roles.trained()}
    out = sampling.sample(self.sampler_graphdef, self.for_sampler(params['policy']),
                          self.sampler_mcfg, prompts['prompt'], prompts['length'], sample_key,
                          self.settings)
    jax.block_until_ready(out.tokens)
    times['generate'] = time.perf_counter() - t0

    t0 = time.perf_counter()
    host = self.host_rewards(local, out)
    drawn_stats = {}
    if self.oversample > 1:
      (local, prompts, out, host), drawn_stats = self.keep_informative(local, prompts, out, host)
    times['reward'] = time.perf_counter() - t0

    t0 = time.perf_counter()
    p = prompts['prompt'].shape[1]
    full = p + s.response_tokens + 1
    longest_row, longest_reply = (int(x) for x in self.longest(prompts['length'], out.lengths))
    reply_width = row_width(longest_reply, s.response_tokens)
    # Where the update runs each group's prompt once, only the prompt (once a group) and the
    # reply window (each row) go through the model: the row's width costs nothing, and one
    # width means one compile of prepare and the update per reply window, not per pair. A
    # reward model still reads whole rows: with one, the rows stay trimmed.
    fixed = algo.minibatch_group > 1 and algo.roles.reward is None
    width = full if fixed else row_width(longest_row, full)
    shared = {'prefix_width': min(p, width)} if algo.share_prompt else {}
    batch, roll_metrics = algo.prepare(params, inp.frozen, state['kl_coef'], Rollout(
        prompts['prompt'], prompts['length'], out, host['reward'], host['correct']),
        width=width, reply_width=reply_width, **shared)
    roll_metrics = jax.device_get(roll_metrics)
    times['score'] = time.perf_counter() - t0

    t0 = time.perf_counter()
    state, stacked = algo.epochs(state, batch,
                                 minibatch_rows(s, inp.seed, step, algo.minibatch_group),
                                 self.ptx_batches(s))
    stacked = jax.device_get(stacked)
    per_update = [{k: v[u] for k, v in stacked.items()} for u in range(len(stacked['ratio']))]
    times['update'] = time.perf_counter() - t0

    if algo.kl_controller is not None:
      state['kl_coef'] = jax.device_put(
          jnp.float32(algo.kl_controller(beta, float(roll_metrics['kl']))), repl)
    state['step'] = state['step'] + 1
    metrics = summarise(roll_metrics, per_update)
    metrics.update(drawn_stats)
    metrics['kl_coef'] = beta
    metrics['row_width'] = width  # tokens per laid-out row (see row_width)
    metrics['reply_width'] = reply_width  # positions the LM head runs at (rollout.reply_window)
    metrics['iteration_seconds'] = sum(times.values())
    tokens = float(roll_metrics['response_tokens'])
    for phase, seconds in times.items():
      metrics[f'{phase}_seconds'] = seconds
      if phase != 'reward':
        metrics[f'{phase}_tokens_per_sec'] = tokens * (s.epochs if phase == 'update' else 1) / max(
            seconds, 1e-9)
    return state, metrics


def minibatch_rows(section, seed: int, step: int, group: int = 1) -> np.ndarray:
  """(epochs x minibatches, batch_size) int32: each update's rows, every epoch a fresh
  permutation of the rollout batch from (seed, step, epoch), so a resumed run takes the
  same minibatches. `group` > 1: a permutation of whole groups of `group` consecutive rows,
  each minibatch's groups in order (an update that runs each group's prompt once)."""
  s = section
  units, per_minibatch = s.rollout_batch // group, s.batch_size // group
  rows = []
  for epoch in range(s.epochs):
    order = np.random.default_rng([seed, step, epoch]).permutation(units)
    rows += [(np.sort(order[i:i + per_minibatch])[:, None] * group + np.arange(group)).ravel()
             for i in range(0, units - per_minibatch + 1, per_minibatch)]
  return np.stack(rows).astype(np.int32)


def summarise(roll_metrics: dict, per_update: list[dict]) -> dict:
  """The iteration's metrics: the rollout's, and the mean over its updates (the ratio's
  variance, its first value and the first approxkl kept apart)."""
  metrics = {k: float(v) for k, v in roll_metrics.items()}
  for k in per_update[0]:
    if k != 'params_finite':
      metrics[k] = float(np.mean([float(m[k]) for m in per_update]))
  metrics['params_finite'] = all(bool(m['params_finite']) for m in per_update)
  ratio_var = metrics.pop('ratio_sq') - metrics['ratio'] ** 2
  metrics['ratio_var'] = max(ratio_var, 0.0)
  metrics['ratio_first'] = float(per_update[0]['ratio'])
  metrics['approxkl_first'] = float(per_update[0]['approxkl'])
  return metrics


# What the console's progress line shows of an iteration.
PROGRESS_KEYS = ('scores', 'gold', 'kl', 'kl_coef', 'entropy', 'response_length', 'clipfrac',
                 'iteration_seconds')


def run(algo: Algorithm, inputs: Inputs, cfg, workdir: str) -> loop.Result:
  """Runs (or resumes) `algo` to `section.steps` iterations; returns the final state."""
  s, name, data = algo.section, algo.name, inputs.data
  out_dir = loop.stage_dir(workdir, name)
  ckpt = loop.open_checkpointer(cfg, workdir, name)
  state, resumed_meta = loop.resume(name, ckpt, algo.abstract, algo.shardings, data.train_iter,
                                    inputs.init_state, inputs.meta)
  lora_meta = lora_checkpoint.record(
      state, {f'{r}/params': m for r, m in algo.roles.trained().items()},
      lora_checkpoint.bases_of(inputs.meta))
  if data.ptx_iter is not None and resumed_meta.get('ptx_data'):
    data.ptx_iter.set_state(resumed_meta['ptx_data'])
  start = int(jax.device_get(state['step']))
  n_params = {r: loop.trained_count(algo.abstract[r]['params']) for r in algo.roles.trained()}
  frozen = ', '.join(algo.roles.frozen()) or 'none'
  print(f'[{name}] trained roles {n_params}, frozen: {frozen} ({s.frozen_dtype}); mesh '
        f'{dict(inputs.mesh.shape)}; iterations {start} -> {s.steps}', flush=True)
  iteration = Iteration(algo, inputs)
  writer = metrics_lib.MetricsWriter(out_dir, stage=name, total_steps=s.steps, start_step=start)
  final_metrics: dict = {}

  def one_step(step: int) -> dict:
    nonlocal state
    state, metrics = iteration(state, step)
    logged = {k: v for k, v in metrics.items() if k != 'params_finite'}
    writer.write(step + 1, logged)
    writer.progress(step + 1, {'loss': logged['policy_loss'], **logged}, show=PROGRESS_KEYS)
    final_metrics.update(logged)
    return metrics

  def save(step):
    metrics = last['metrics']
    loop.ensure_finite(name, step, metrics['policy_loss'], metrics['params_finite'], ckpt)
    extra = {'ptx_data': data.ptx_iter.get_state()} if data.ptx_iter is not None else {}
    loop.save(ckpt, step, state, data.train_iter,
              dict(inputs.meta, step=step, **lora_meta, **extra))

  last = {}
  step = loop.drive(name, 'iteration', start, s.steps, one_step, ckpt, loop.Saver(save, start),
                    writer, inputs.mesh, last)
  loop.finish(name, out_dir, start, s.steps, final_metrics, f'config.{algo.section_name}.steps')
  return loop.Result(algo.graphdefs['policy'], state, algo.shardings, final_metrics,
                     steps_run=step - start)
