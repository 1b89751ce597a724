"""Set-up every stage shares: mesh, model settings, tokenizer, starting weights, eval.json."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
from jax.experimental import multihost_utils

from jaxgpt import sharding
from jaxgpt import model as model_lib
from jaxgpt.data import tokenizer as tokenizer_lib
from jaxgpt.data.pretrain import load_or_train_tokenizer
from jaxgpt.hf import importer as hf_import
from jaxgpt.model import lora
from jaxgpt.train import checkpoint as ckpt_lib
from jaxgpt.train import lora_checkpoint
from jaxgpt.train import loop


def mesh_and_model(cfg, *, scalar_head=False):
  mesh = sharding.make_mesh(cfg)
  return mesh, model_lib.ModelConfig.from_config(cfg, scalar_head=scalar_head)


def train_or_load_tokenizer(cfg, workdir: str) -> tokenizer_lib.Tokenizer:
  """The run's tokenizer: config.tokenizer.path, or WORKDIR/tokenizer.model
  (trained from the pretraining corpus the first time, by process 0 alone)."""
  if jax.process_count() > 1:
    if jax.process_index() == 0:
      load_or_train_tokenizer(cfg, workdir)
    multihost_utils.sync_global_devices('jaxgpt: tokenizer ready')
  tok = load_or_train_tokenizer(cfg, workdir)
  tokenizer_lib.check_vocab(tok, cfg.model.vocab_size)
  return tok


def process_info() -> dict[str, int]:
  return {'process_index': jax.process_index(), 'process_count': jax.process_count()}


def format_stats(stats: dict) -> str:
  return ', '.join(f'{k} {v:,}' for k, v in stats.items() if isinstance(v, (int, float)))


def init_dir(cfg, workdir: str, previous: str) -> str:
  """Where a stage's starting weights come from: config.checkpoint.init_from, or the
  previous stage's checkpoints in the same workdir (for 'pretrain', config.checkpoint.base
  when one is set: the published model in place of pretraining)."""
  if cfg.checkpoint.init_from:
    return cfg.checkpoint.init_from
  if previous == 'pretrain' and cfg.checkpoint.base:
    return cfg.checkpoint.base
  return ckpt_lib.checkpoints_dir(workdir, previous)


def params_from_checkpoint(directory: str, mesh, mcfg, *, what: str, fresh=(), seed: int = 0,
                           key_path=('params',)):
  """(params, meta) of the newest checkpoint in `directory` (at `key_path` of its state),
  placed in `mcfg`'s shardings on `mesh`. Top-level entries named in `fresh` (e.g. a new
  'scalar_head') are initialised instead of read; entries the checkpoint has but `mcfg`
  lacks (the LM head of an SFT model, for a reward model) are not read at all.
  `directory` 'hf:DIR' reads a Hugging Face model directory instead, 'gguf:FILE' (or a
  known model's name) a GGUF file (`jaxgpt.hf.importer`). A LoRA run's checkpoint gives
  its recorded base with the adapters merged in (`lora_params`)."""
  if hf_import.is_published(directory):
    source = hf_import.ModelSource.from_spec(directory)
    params = hf_import.load_params(source, mesh, mcfg, skip=fresh)
    return dict(params, **fresh_entries(mesh, mcfg, fresh, seed)), {'hf_source': source.path}
  try:
    lora_record = checkpoint_meta(directory).get(lora_checkpoint.META_KEY, {})
  except ckpt_lib.CheckpointError:  # damaged: the read below names it and what to do
    lora_record = {}
  if '/'.join(key_path) in lora_record:
    return lora_params(directory, lora_record['/'.join(key_path)], mesh, mcfg, what=what,
                       fresh=fresh, seed=seed, key_path=key_path)
  _, target = model_lib.abstract_sharded_params(mcfg, mesh)
  wanted = {k: v for k, v in target.items() if k not in fresh}
  params, meta, _ = ckpt_lib.restore_latest_params(directory, wanted, what=what,
                                                   key_path=key_path)
  return dict(params, **fresh_entries(mesh, mcfg, fresh, seed)), meta


def lora_params(directory: str, record: dict, mesh, mcfg, *, what: str, fresh=(), seed: int = 0,
                key_path=('params',)):
  """(params, meta) of a LoRA run's newest checkpoint as the plain model `mcfg`: the base
  it records (read as `params_from_checkpoint` reads any start), its adapters merged into
  the kernels once, and its scalar head when it trained one."""
  adapted = dataclasses.replace(mcfg, lora_rank=int(record['rank']),
                                lora_alpha=float(record['alpha']),
                                lora_targets=tuple(record['targets']))
  _, adapted_target = model_lib.abstract_sharded_params(adapted, mesh)
  trained_target = {k: v for k, v in lora.trainable(adapted_target).items() if k not in fresh}
  trained, meta, _ = ckpt_lib.restore_latest_params(directory, trained_target, what=what,
                                                    key_path=key_path)
  head = ('scalar_head',) if mcfg.scalar_head else ()
  base, _ = params_from_checkpoint(record['base'], mesh, mcfg, what=f'{what}: its LoRA base',
                                   fresh=tuple(set(fresh) | set(head)), seed=seed)
  _, target = model_lib.abstract_sharded_params(mcfg, mesh)
  scale = adapted.lora_alpha / adapted.lora_rank
  with jax.set_mesh(mesh):
    params = jax.jit(lambda b, t: lora.merged(lora.combine(b, t), scale),
                     out_shardings=jax.tree.map(lambda x: x.sharding, target))(base, trained)
  return params, meta


def merged_model(mcfg, params):
  """(plain mcfg, its graphdef, params) of a model that may carry adapters: each adapter
  folded into its kernel once, in the kernel's sharding (the sampler then runs the plain
  model, no low-rank terms per step)."""
  plain = lora.plain(mcfg)
  graphdef = model_lib.abstract_model(plain)[0]
  if not mcfg.lora_rank:
    return mcfg, graphdef, params
  shardings = jax.tree.map(lambda x: x.sharding, lora.without_adapters(params))
  merged = jax.jit(lambda p: lora.merged(p, mcfg.lora_alpha / mcfg.lora_rank),
                   out_shardings=shardings)(params)
  return plain, graphdef, merged


def with_adapters(cfg, mesh, mcfg, params):
  """(mcfg, params) of a stage that trains: with config.lora.rank > 0, `mcfg` with adapters
  and `params` (the stage's start, placed on `mesh`) with fresh adapters beside its
  kernels; else both unchanged."""
  adapted = lora.adapted(mcfg, cfg.lora)
  if adapted is mcfg:
    return mcfg, params
  return adapted, lora.combine(params, fresh_adapters(adapted, mesh, cfg.seed))


def fresh_adapters(mcfg, mesh, seed: int) -> dict:
  """Freshly initialised adapters (A Gaussian, B zeros) of the adapted model `mcfg`, placed
  in their shardings on `mesh`: a tree of the adapters alone."""
  _, target = model_lib.abstract_sharded_params(mcfg, mesh)

  def adapters_of(tree):
    return {k: v for k, v in lora.trainable(tree).items() if k != 'scalar_head'}
  with jax.set_mesh(mesh):
    return jax.jit(lambda: adapters_of(model_lib.fresh_params(mcfg, seed)),
                   out_shardings=jax.tree.map(lambda x: x.sharding, adapters_of(target)))()


def start_from(cfg, workdir: str, stage: str, directory: str, mesh, mcfg, *, what: str):
  """(params, tokenizer) a stage starts from: the newest checkpoint in `directory` (its
  `init_dir`; named `what` in errors), placed for `mcfg` on `mesh`, and the tokenizer that
  checkpoint was trained with."""
  params, meta = params_from_checkpoint(directory, mesh, mcfg, what=what)
  return params, recorded_tokenizer(cfg, workdir, meta, stage)


def checkpoint_meta(directory: str) -> dict:
  """The meta of the newest checkpoint in `directory` ({} for 'hf:DIR', 'gguf:FILE' or none
  yet)."""
  if hf_import.is_published(directory) or not os.path.isdir(directory):
    return {}
  reader = ckpt_lib.Checkpointer(directory, async_save=False)
  try:
    step = reader.latest_step()
    return {} if step is None else reader.read_meta(step)
  finally:
    reader.close()


def fresh_entries(mesh, mcfg, names, seed: int) -> dict:
  """Freshly initialised top-level parameter entries (e.g. a new 'scalar_head'), placed
  in their shardings on `mesh`."""
  if not names:
    return {}
  _, target = model_lib.abstract_sharded_params(mcfg, mesh)
  shardings = {k: jax.tree.map(lambda x: x.sharding, target[k]) for k in names}
  with jax.set_mesh(mesh):
    return jax.jit(lambda: {k: model_lib.fresh_params(mcfg, seed)[k] for k in names},
                   out_shardings=shardings)()


def recorded_tokenizer(cfg, workdir: str, base_meta: dict, stage: str) -> tokenizer_lib.Tokenizer:
  """The previous run's tokenizer (its checkpoint records which), unless config names one."""
  path = cfg.tokenizer.path or base_meta.get('tokenizer') or os.path.join(workdir,
                                                                          'tokenizer.model')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{stage}: tokenizer {path} not found; set config.tokenizer.path.')
  tok = tokenizer_lib.load(path, chat_template=cfg.tokenizer.chat_template)
  tokenizer_lib.check_vocab(tok, cfg.model.vocab_size)
  return tok


# -- eval.json: what a stage measured after training ------------------------------------------


def eval_path(workdir: str, name: str) -> str:
  return os.path.join(loop.stage_dir(workdir, name), 'eval.json')


def evaluated_before(result: loop.Result, workdir: str, name: str) -> bool:
  """A stage that had already finished (no step run now) keeps the eval.json it wrote then."""
  return result.steps_run == 0 and os.path.exists(eval_path(workdir, name))


def write_eval(workdir: str, name: str, report: dict, summary) -> dict:
  """WORKDIR/<name>/eval.json, and `summary(path)` on the console (process 0 only)."""
  if jax.process_index() == 0:
    path = eval_path(workdir, name)
    with open(path, 'w', encoding='utf-8') as f:
      json.dump(report, f, indent=1)
    print(summary(path), flush=True)
  return report
