"""Loading a trained stage for inference (shared by `jaxgpt.cli.sample` and `jaxgpt.cli.chat`).

`load(workdir, stage)` reads the newest checkpoint of WORKDIR/<stage>/checkpoints:
the experiment config recorded in its meta (so no experiment file is needed), only the
parameters (no optimizer state, no data iterator), and the tokenizer the run used.

The inference mesh puts every device on the 'data' axis (parameters replicated, rows
spread over devices) unless `mesh` overrides some axes, e.g. {'tensor': 8} or the
`--mesh=tensor=8` flag for a model that does not fit on one device.
"""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

import jax
import ml_collections
from absl import app, flags, logging

from jaxgpt import sharding
from jaxgpt import config as config_lib
from jaxgpt import model as model_lib
from jaxgpt.data import tokenizer as tokenizer_lib
from jaxgpt.stages import RL_STAGES
from jaxgpt.train import checkpoint as ckpt_lib
from jaxgpt.train import lora_checkpoint

# Stages whose checkpoint holds a language model one can sample from.
GENERATIVE_STAGES = ('pretrain', 'sft', 'dpo', 'ppo', 'ppo_checker', 'grpo', 'grpo_base')
# Stages whose checkpoint holds a model that scores replies (`jaxgpt.cli.score`).
SCORING_STAGES = ('reward',)


class InferenceError(RuntimeError):
  """A run cannot be loaded; the message says why and which command creates it."""


def _damaged(e: ckpt_lib.DamagedCheckpointError) -> InferenceError:
  """Inference never moves files: say how the training run deals with it."""
  return InferenceError(f'{e} Run its stage\'s training command again: it moves the damaged '
                        'step aside and redoes it from the newest good checkpoint.')


class Loaded(NamedTuple):
  graphdef: Any
  params: Any
  mcfg: model_lib.ModelConfig
  tokenizer: tokenizer_lib.Tokenizer
  cfg: ml_collections.ConfigDict
  stage: str = 'sft'         # what the checkpoint holds ('import': an imported model)


def _train_command(workdir: str, stage: str) -> str:
  """The command that trains `stage` into `workdir` (with the run's own experiment file)."""
  extra = '' if stage == 'pretrain' else f' --config.stage={stage}'
  return f'python -m jaxgpt.main --config experiments/tiny.py --workdir {workdir}{extra}'


def check_stage(stage: str, allowed=GENERATIVE_STAGES) -> None:
  if stage == 'reward' and allowed == GENERATIVE_STAGES:
    raise InferenceError(
        "stage 'reward' holds a reward model, which scores text and cannot generate it "
        f'(score with python -m jaxgpt.cli.score); use one of {GENERATIVE_STAGES}.')
  if stage not in allowed:
    raise InferenceError(f'unknown stage {stage!r}; use one of {allowed}.')


def latest_checkpoint(workdir: str, stage: str,
                      allowed=GENERATIVE_STAGES) -> tuple[str, int, dict]:
  """(checkpoints directory, newest finished step, its meta) of WORKDIR/<stage>; fails
  saying what to run when there is none."""
  check_stage(stage, allowed)
  if not os.path.isdir(workdir):
    raise InferenceError(
        f'workdir {workdir} does not exist; train a model first, e.g.: '
        f'{_train_command(workdir, "pretrain")}')
  directory = ckpt_lib.checkpoints_dir(workdir, stage)
  if not os.path.isdir(directory):
    present = sorted(s for s in allowed if os.path.isdir(ckpt_lib.checkpoints_dir(workdir, s)))
    raise InferenceError(
        f'{workdir} has no {stage} stage ({directory} does not exist; stages with '
        f'checkpoints here: {present or "none"}); create it with, e.g.: '
        f'{_train_command(workdir, stage)}')
  reader = ckpt_lib.Checkpointer(directory, async_save=False)
  try:
    step = reader.latest_step()
    if step is None:
      raise InferenceError(
          f'{directory} holds no finished checkpoint; run (or resume) the stage, e.g.: '
          f'{_train_command(workdir, stage)}')
    try:
      meta = reader.read_meta(step)
    except ckpt_lib.DamagedCheckpointError as e:
      raise _damaged(e) from e
  finally:
    reader.close()
  return directory, step, meta


def params_key(stage: str) -> tuple[str, ...]:
  """Where a stage's checkpoint keeps the parameters a user samples from or exports."""
  return ('policy', 'params') if stage in RL_STAGES else ('params',)  # RL: the policy's


def parse_mesh(text: str | None) -> dict[str, int]:
  """'tensor=2,data=-1' -> {'tensor': 2, 'data': -1}; '' -> {}."""
  out: dict[str, int] = {}
  for part in (text or '').split(','):
    part = part.strip()
    if not part:
      continue
    name, sep, value = part.partition('=')
    name = name.strip()
    if not sep or name not in config_lib.MESH_AXES:
      raise InferenceError(
          f'--mesh {text!r}: expected comma-separated AXIS=SIZE with AXIS one of '
          f'{config_lib.MESH_AXES}, e.g. --mesh=data=1,tensor=8.')
    try:
      out[name] = int(value)
    except ValueError:
      raise InferenceError(f'--mesh {text!r}: size {value!r} of {name} is not an integer.') \
          from None
  return out


def config_from_meta(meta: dict, where: str) -> ml_collections.ConfigDict:
  """The experiment config recorded in a checkpoint's meta (JSON), rules as tuples."""
  raw = meta.get('config')
  if raw is None:
    raise InferenceError(
        f'{where}: the checkpoint does not record its config (written before checkpoints '
        'did); re-run the stage with a newer jaxgpt, or convert it.')
  recorded = json.loads(raw) if isinstance(raw, str) else dict(raw)
  # Fields added to the schema after the checkpoint was written keep their defaults.
  d = _merged(config_lib.base_config().to_dict(), recorded)
  d['mesh']['rules'] = sharding.rules_tuple(d['mesh']['rules'])
  return ml_collections.ConfigDict(d)


def _merged(base: dict, override: dict) -> dict:
  out = dict(base)
  for k, v in override.items():
    out[k] = _merged(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
  return out


def _tokenizer(workdir: str, meta: dict, model_vocab: int,
               chat_template: str) -> tokenizer_lib.Tokenizer:
  candidates = [p for p in (meta.get('tokenizer'), os.path.join(workdir, 'tokenizer.model'))
                if p]
  for path in candidates:
    if os.path.exists(path):
      tok = tokenizer_lib.load(path, chat_template=chat_template)
      tokenizer_lib.check_vocab(tok, model_vocab)
      return tok
  raise InferenceError(f'tokenizer not found (looked at {candidates}).')


def checkpoint_dir_meta(checkpoint: str) -> tuple[str, int, dict]:
  """(directory, newest finished step, its meta) of a checkpoints directory given by path:
  a stage's WORKDIR/<stage>/checkpoints or what `tools/convert_hf.py import` wrote."""
  directory = os.path.abspath(checkpoint)
  if not os.path.isdir(directory):
    raise InferenceError(f'--checkpoint {directory} does not exist; give a checkpoints '
                         'directory (WORKDIR/<stage>/checkpoints, or one tools/convert_hf.py '
                         'import wrote).')
  reader = ckpt_lib.Checkpointer(directory, async_save=False)
  try:
    step = reader.latest_step()
    if step is None:
      raise InferenceError(f'--checkpoint {directory} holds no finished checkpoint.')
    try:
      meta = reader.read_meta(step)
    except ckpt_lib.DamagedCheckpointError as e:
      raise _damaged(e) from e
  finally:
    reader.close()
  return directory, step, meta


def load(workdir: str | None = None, stage: str = 'sft', *, checkpoint: str | None = None,
         mesh: dict[str, int] | str | None = None, allowed=GENERATIVE_STAGES) -> Loaded:
  """(graphdef, params, mcfg, tokenizer, cfg) of the newest checkpoint of WORKDIR/<stage>,
  or of the checkpoints directory `checkpoint` (the stage then comes from its record: an
  imported model is 'import'): a language model (pretrain, sft, ppo's policy, an imported
  model), or with allowed=SCORING_STAGES the reward model.

  `mesh` overrides axes of the inference mesh (default data=-1, fsdp=1, tensor=1).
  """
  jax.config.update('jax_threefry_partitionable', True)  # as in training: mesh-independent
  if checkpoint is not None:
    directory, step, meta = checkpoint_dir_meta(checkpoint)
    stage = meta.get('stage', 'import')
    if stage != 'import':
      check_stage(stage, allowed)
    workdir = os.path.dirname(os.path.dirname(directory))
  else:
    directory, step, meta = latest_checkpoint(workdir, stage, allowed)
  cfg = config_from_meta(meta, f'{directory}/{step}')
  overrides = parse_mesh(mesh) if isinstance(mesh, str) or mesh is None else dict(mesh)
  unknown = set(overrides) - set(config_lib.MESH_AXES)
  if unknown:
    raise InferenceError(f'mesh overrides {sorted(unknown)}: axes are {config_lib.MESH_AXES}.')
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = -1, 1, 1
  for axis, size in overrides.items():
    cfg.mesh[axis] = int(size)
  try:
    device_mesh = sharding.make_mesh(cfg)
  except config_lib.ConfigError as e:
    raise InferenceError(f'inference mesh --mesh={overrides}: {e}') from e
  mcfg = model_lib.ModelConfig.for_stage(cfg, stage)
  try:
    graphdef, target = model_lib.abstract_sharded_params(mcfg, device_mesh)
  except config_lib.ConfigError as e:
    raise InferenceError(f'inference mesh {dict(device_mesh.shape)}: {e}') from e
  try:
    if '/'.join(params_key(stage)) in meta.get(lora_checkpoint.META_KEY, {}):
      from jaxgpt.stages import common  # pylint: disable=import-outside-toplevel
      params = common.params_from_checkpoint(directory, device_mesh, mcfg, what='--checkpoint',
                                             key_path=params_key(stage))[0]  # adapters merged
    else:
      params = ckpt_lib.restore_subtree(directory, step, target, params_key(stage))
  except ckpt_lib.DamagedCheckpointError as e:
    raise _damaged(e) from e
  tok = _tokenizer(workdir, meta, mcfg.vocab_size, cfg.tokenizer.chat_template)
  return Loaded(graphdef, params, mcfg, tok, cfg, stage)


# -- flags shared by the command-line tools ---------------------------------------------------


def define_flags() -> None:
  """The flags `jaxgpt.cli.sample` and `jaxgpt.cli.chat` share (each defined once per process)."""
  specs = [
      (flags.DEFINE_string, 'workdir', None, 'Run directory written by jaxgpt.main.'),
      (flags.DEFINE_string, 'checkpoint', None, 'A checkpoints directory instead of --workdir '
       'and --stage: one tools/convert_hf.py import wrote, or WORKDIR/<stage>/checkpoints.'),
      (flags.DEFINE_string, 'stage', 'sft', f'Which stage to load: one of {GENERATIVE_STAGES}.'),
      (flags.DEFINE_string, 'mesh', '', 'Inference mesh overrides, e.g. "data=1,tensor=8" '
       '(default: every device on the data axis).'),
      (flags.DEFINE_integer, 'max_new_tokens', 128, 'Most tokens generated per response.'),
      (flags.DEFINE_float, 'temperature', 0.8, '0 -> greedy.'),
      (flags.DEFINE_integer, 'top_k', 40, '0 -> off.'),
      (flags.DEFINE_float, 'top_p', 1.0, '1 -> off.'),
      (flags.DEFINE_integer, 'seed', 0, 'Sampling seed.'),
  ]
  for define, name, default, help_text in specs:
    if name not in flags.FLAGS:
      define(name, default, help_text)


def start_cli(argv) -> None:
  """What the tools check first: no stray arguments, a --workdir or a --checkpoint (not
  both); quiet logs."""
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}.')
  logging.set_verbosity(logging.WARNING)
  check_source()


def check_source() -> None:
  """Exactly one of --workdir (with --stage) and --checkpoint."""
  given = [f for f in ('workdir', 'checkpoint') if f in flags.FLAGS and flags.FLAGS[f].value]
  if len(given) != 1:
    raise app.UsageError('give --workdir (with --stage) or --checkpoint, one of them.')


def load_from_flags(**kw) -> Loaded:
  """`load` of what --workdir / --stage or --checkpoint and --mesh name."""
  f = flags.FLAGS
  return load(f.workdir, f.stage, checkpoint=f.checkpoint, mesh=f.mesh, **kw)
