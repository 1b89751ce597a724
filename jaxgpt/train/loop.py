"""The training loop of the LM-style stages, and the pieces every stage's loop is made of.

Pieces (PPO composes them around its own rollout -> update iteration):
`open_checkpointer`, `resume` (restore the newest checkpoint or initialise),
`ensure_finite` (never save a diverged state), `Saver` (saves once more on a stop),
`StopFlag` (SIGTERM -> clean stop),
`evaluate`, `peak_flops`, `finish` (final_metrics.json, or the "already finished" line).

`train` is the loop of pretraining, SFT and the reward model: one batch per optimizer
step. A stage hands over a `Stage` (its model settings, loss, data and sampler) and the
loop resumes or initialises the state, steps, logs, evaluates, samples, checkpoints,
and stops cleanly on SIGTERM / Ctrl-C (saving first, so a pre-empted job resumes where
it stopped).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
from typing import Any, Callable

import jax
import numpy as np

from jaxgpt import sharding
from jaxgpt import model as model_lib
from jaxgpt.model import lora
from jaxgpt.train import optim, trainer
from jaxgpt.train import checkpoint as ckpt_lib
from jaxgpt.train import lora_checkpoint
from jaxgpt.train import metrics as metrics_lib


@dataclasses.dataclass
class Stage:
  """What a stage gives the loop."""
  name: str                      # 'pretrain', 'sft', ...: the run lives in WORKDIR/<name>
  cfg: Any                       # the full experiment config
  train_cfg: Any                 # config.train with the stage's overrides
  mcfg: model_lib.ModelConfig
  mesh: jax.sharding.Mesh
  loss_fn: trainer.LossFn        # (model, batch) -> (loss_sum, sums incl. 'loss', 'weight')
  data: Any                      # .train_iter (grain iterator), .val_batches(n), .stats
  init_params: Callable[[], Any] | None = None   # starting weights; None -> random init
  sample_fn: Callable[[Any, Any], list[tuple[str, str]]] | None = None  # (graphdef, params)
  meta: dict = dataclasses.field(default_factory=dict)  # stored with every checkpoint
  # Tokens one process's batch feeds the model (for tokens/s; None -> batch['inputs'].size)
  # and what its training FLOPs per token (for MFU) depend on: 6N + attention over rows of
  # `seq_len` (None: config.data.seq_len), 4 for parameters LoRA freezes, the output head
  # on `head_positions` of a row (0: all).
  count_tokens: Callable[[dict], int] | None = None
  seq_len: int | None = None
  head_positions: int = 0
  # (graphdef, state) -> extra meta for the final checkpoint (e.g. reward score stats).
  final_meta: Callable[[Any, Any], dict] | None = None
  perplexity: bool = True        # report val_perplexity = exp(val_loss) (LM stages)


@dataclasses.dataclass
class Result:
  graphdef: Any
  state: Any
  shardings: Any
  final_metrics: dict
  steps_run: int = 0             # 0 when the stage had already finished


class StopFlag:
  """Turns SIGTERM (pre-emption) into a clean stop after the current step."""

  def __init__(self):
    self.stop = False
    self._previous = None

  def __enter__(self):
    def handler(signum, frame):
      del signum, frame
      self.stop = True
    try:
      self._previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
      self._previous = None
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def stage_dir(workdir: str, name: str) -> str:
  return os.path.join(workdir, name)


def global_batch(local: dict[str, np.ndarray], mesh, rules) -> dict[str, jax.Array]:
  """This process's rows -> global arrays sharded over the data-parallel axes."""
  sh = sharding.batch_sharding(mesh, rules)
  return {k: jax.make_array_from_process_local_data(sh, v) for k, v in local.items()}


def open_checkpointer(cfg, workdir: str, name: str) -> ckpt_lib.Checkpointer:
  """The checkpointer of WORKDIR/<name>/checkpoints with config.checkpoint's policy."""
  return ckpt_lib.Checkpointer(
      ckpt_lib.checkpoints_dir(workdir, name), every_steps=cfg.checkpoint.every_steps,
      every_minutes=cfg.checkpoint.every_minutes, max_to_keep=cfg.checkpoint.max_to_keep,
      on_damaged=cfg.checkpoint.on_damaged)


def resume(name: str, ckpt, abstract_state, shardings, data_iter, init_fn, meta=None):
  """(state, meta) of the newest checkpoint (the data iterator moved to its position),
  or (init_fn(), {}) for a fresh run. A damaged newest checkpoint is handled by
  config.checkpoint.on_damaged (see `Checkpointer.restore_newest`). A LoRA state's
  checkpoint holds its adapters only: they go back onto the base of `init_fn()`, which
  must be the one the run's `meta` names and the checkpoint records (`lora_checkpoint`)."""
  view = lora_checkpoint.checkpoint_view
  target = sharding.abstract_with_shardings(view(abstract_state), view(shardings))
  latest, state, saved_meta = ckpt.restore_newest(
      target, data_iter, log=lambda line: print(f'[{name}] {line}', flush=True))
  if latest is None:
    return init_fn(), {}
  if lora_checkpoint.has_adapters(abstract_state):
    state = lora_checkpoint.on_base(state, init_fn(), saved_meta, ckpt.step_dir(latest),
                                    lora_checkpoint.bases_of(meta or {}))
  print(f'[{name}] resumed from {ckpt.directory}/{latest}', flush=True)
  return state, saved_meta


def save(ckpt, step: int, state, data_iter, meta: dict) -> None:
  """One checkpoint of `state` (of a LoRA state, its trained part: `lora_checkpoint`)."""
  ckpt.save(step, lora_checkpoint.checkpoint_view(state), data_iter, meta)


def ensure_finite(name: str, step: int, loss, params_ok, ckpt) -> None:
  """Raise (so nothing is saved) when the loss or the parameters stopped being finite."""
  loss, params_ok = jax.device_get((loss, params_ok))
  if not (np.isfinite(loss) and params_ok):
    what = f'loss is {loss}' if not np.isfinite(loss) else 'parameters are not finite'
    raise FloatingPointError(
        f'[{name}] {what} at step {step}; stopping without saving (last good '
        f'checkpoint: {ckpt.latest_step()}). Lower the learning rate or raise the warm-up.')


class Saver:
  """A run's `save(step)` plus the last step it saved, so that a stop (SIGTERM, Ctrl-C)
  saves the current step exactly once."""

  def __init__(self, save_fn, saved_step: int):
    self._save_fn = save_fn
    self.saved_step = saved_step

  def save(self, step: int) -> None:
    self._save_fn(step)
    self.saved_step = step

  def ensure_saved(self, step: int) -> None:
    if self.saved_step != step:
      self.save(step)


def drive(name: str, unit: str, start: int, total: int, one_step, ckpt, saver: Saver, writer,
          mesh, last: dict, after_save=None) -> int:
  """The loop every stage shares: `one_step(step) -> metrics` from `start` to `total`,
  saving when the checkpoint policy says so and at the end; a SIGTERM saves the current
  step and stops, Ctrl-C saves and re-raises. `last['metrics']` holds the newest metrics
  (what `saver` checks before it writes). Returns the step reached."""
  step = start
  with jax.set_mesh(mesh), StopFlag() as stop:
    try:
      while step < total:
        last['metrics'] = one_step(step)
        step += 1
        if ckpt.due(step) or step == total:
          saver.save(step)
        if after_save is not None:
          after_save(step)
        if stop.stop:
          saver.ensure_saved(step)
          writer.log_text(f'[{name}] SIGTERM: saved {unit} {step}; re-run to resume.')
          break
    except KeyboardInterrupt:
      writer.log_text(f'[{name}] interrupted: saving {unit} {step}; re-run to resume.')
      saver.ensure_saved(step)  # a step past start has its metrics
      raise
    finally:
      ckpt.close()
      writer.close()
  return step


def peak_flops(t, mcfg) -> float:
  """Peak FLOP/s of all devices: config.train.peak_flops per device, else measured."""
  if t.peak_flops:
    return t.peak_flops * jax.device_count()
  return metrics_lib.measure_peak_flops(mcfg.dtype) * jax.process_count()


def finish(name: str, out_dir: str, start: int, steps: int, final_metrics: dict,
           steps_field: str) -> None:
  """final_metrics.json of a run that trained, or the line saying how to continue one
  that had already finished."""
  if start >= steps:
    print(f'[{name}] already at step {start}; raise {steps_field} to continue.', flush=True)
  elif jax.process_index() == 0:
    with open(os.path.join(out_dir, 'final_metrics.json'), 'w', encoding='utf-8') as f:
      json.dump({k: float(v) for k, v in final_metrics.items()}, f, indent=1)


def trained_count(params) -> str:
  """'N parameters', or with LoRA 'n of N parameters trained (LoRA adapters)'."""
  total = model_lib.count_params(params)
  if not lora_checkpoint.has_adapters({'params': params}):
    return f'{total:,} parameters'
  return (f'{model_lib.count_params(lora.trainable(params)):,} of {total:,} parameters trained '
          '(LoRA)')


def evaluate(eval_step, params, batches, mesh, rules, perplexity=True) -> dict[str, float]:
  """Mean validation loss (and perplexity) over the given batches."""
  total: dict[str, float] = {}
  for b in batches:
    sums = jax.device_get(eval_step(params, global_batch(b, mesh, rules)))
    for k, v in sums.items():
      total[k] = total.get(k, 0.0) + float(v)
  if not total or total.get('weight', 0) == 0:
    return {}
  out = {f'val_{k}': v / total['weight'] for k, v in total.items() if k != 'weight'}
  if perplexity and 'val_loss' in out:
    out['val_perplexity'] = math.exp(min(out['val_loss'], 50.0))
  return out


def train(stage: Stage, workdir: str) -> Result:
  """Runs (or resumes) the stage to config steps; returns the final state."""
  cfg, t, mesh, rules = stage.cfg, stage.train_cfg, stage.mesh, stage.mcfg.rules
  out_dir = stage_dir(workdir, stage.name)
  ckpt = open_checkpointer(cfg, workdir, stage.name)
  optimizer = optim.make_optimizer(t)
  graphdef, abstract_state, shardings = trainer.abstract_train_state(stage.mcfg, mesh, optimizer)
  n_params = model_lib.count_params(abstract_state['params'])

  def init():
    params = stage.init_params() if stage.init_params is not None else None
    return trainer.create_train_state(stage.mcfg, mesh, optimizer, cfg.seed, params)[1]

  meta = dict(stage.meta, stage=stage.name, n_params=n_params)
  state, _ = resume(stage.name, ckpt, abstract_state, shardings, stage.data.train_iter, init,
                    meta)
  meta.update(lora_checkpoint.record(state, {'params': stage.mcfg},
                                     lora_checkpoint.bases_of(meta)))
  start = int(jax.device_get(state['step']))
  print(f'[{stage.name}] {trained_count(abstract_state["params"])}; mesh {dict(mesh.shape)}; '
        f'steps {start} -> {t.steps}', flush=True)

  step_fn = trainer.make_train_step(graphdef, optimizer, stage.loss_fn, t.micro_batches, rules,
                                    lr_schedule=optim.schedule(t))
  first = next(stage.data.train_iter) if start < t.steps else None
  batch_keys = list(first.keys()) if first is not None else ['inputs']
  jit_step = trainer.jit_train_step(step_fn, shardings, mesh, rules, batch_keys)
  eval_step = trainer.make_eval_step(graphdef, stage.loss_fn, shardings['params'], mesh, rules,
                                     batch_keys, t.micro_batches)
  val_batches = stage.data.val_batches(t.eval_batches)
  writer = metrics_lib.MetricsWriter(out_dir, stage=stage.name, total_steps=t.steps,
                                     start_step=start)
  peak = peak_flops(t, stage.mcfg)
  params_shape = abstract_state['params']
  trained = (model_lib.count_params(lora.trainable(params_shape))
             if lora.has_adapters(params_shape) else None)
  step_flops = metrics_lib.flops_per_token(
      stage.mcfg, stage.seq_len or cfg.data.seq_len, n_params, trained_params=trained,
      head_positions=stage.head_positions)
  count_tokens = stage.count_tokens or (lambda b: int(b['inputs'].size))

  def check_finite(step, metrics):
    ensure_finite(stage.name, step, metrics['loss'], metrics['params_finite'], ckpt)

  final_metrics: dict = {}
  clock = {'start': None, 'step': start, 'tokens': 0}  # throughput since the last log

  def one_step(step: int) -> dict:
    nonlocal state, first
    local = first if first is not None else next(stage.data.train_iter)
    first = None
    state, metrics = jit_step(state, global_batch(local, mesh, rules))
    step += 1
    clock['tokens'] += count_tokens(local) * jax.process_count()
    if clock['start'] is None:  # the first step includes compilation: time from here
      jax.block_until_ready(metrics)
      clock.update(start=time.perf_counter(), step=step, tokens=0)
    if step % t.log_every == 0 or step == t.steps:
      metrics = jax.device_get(metrics)
      check_finite(step, metrics)
      logged = {k: v for k, v in metrics.items() if k != 'params_finite'}
      elapsed = time.perf_counter() - clock['start']
      if step > clock['step'] and elapsed > 0:
        logged['tokens_per_sec'] = clock['tokens'] / elapsed
        logged['mfu'] = logged['tokens_per_sec'] * step_flops / peak
      writer.write(step, logged)
      writer.progress(step, logged)
      final_metrics.update(logged)
      clock.update(start=time.perf_counter(), step=step, tokens=0)
    if val_batches and (step % t.eval_every == 0 or step == t.steps):
      val = evaluate(eval_step, state['params'], val_batches, mesh, rules, stage.perplexity)
      writer.write(step, val)
      writer.log_text(f'[{stage.name}] step {step}: ' +
                      ', '.join(f'{k} {v:.4f}' for k, v in val.items()))
      final_metrics.update(val)
    if stage.sample_fn is not None and (step % t.sample_every == 0 or step == t.steps):
      writer.samples(step, stage.sample_fn(graphdef, state['params']))
    if step == t.steps and stage.final_meta is not None:
      meta.update(stage.final_meta(graphdef, state))
    return metrics

  def after_save(step: int) -> None:
    if clock['step'] != step and (step % t.eval_every == 0 or step % t.sample_every == 0):
      # Evaluation and sampling are not training: restart the throughput clock.
      clock.update(start=time.perf_counter(), step=step, tokens=0)

  def save_step(step):
    check_finite(step, last['metrics'])  # never save a diverged state
    save(ckpt, step, state, stage.data.train_iter, dict(meta, step=step))

  last = {}
  step = drive(stage.name, 'step', start, t.steps, one_step, ckpt, Saver(save_step, start), writer,
               mesh, last, after_save)
  finish(stage.name, out_dir, start, t.steps, final_metrics,
         'config.train.steps' if stage.name == 'pretrain' else f'config.{stage.name}.steps')
  return Result(graphdef, state, shardings, final_metrics, steps_run=step - start)
