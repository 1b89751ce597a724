"""Checkpoints: orbax CheckpointManager holding the train state, the data iterator and
a small JSON record, restorable into any mesh.

Layout: DIR/<stage>/checkpoints/<step>/{state, data, meta}. orbax writes each step
into a temporary directory and renames it when complete, so a crash or an error
during a save never replaces a good checkpoint; `max_to_keep` old steps are kept.

A step whose files do not read back (truncated, overwritten, half-copied) raises
`DamagedCheckpointError` naming the step and the file or tensor; a model that does not
match the checkpoint raises a plain `CheckpointError`. Only the first is ever moved
aside, to DIR/<stage>/damaged_checkpoints/ (`Checkpointer.restore_newest`).
"""

from __future__ import annotations

import json
import os
import re
import sys
import time

import grain
import jax
import orbax.checkpoint as ocp


def checkpoints_dir(workdir: str, stage: str) -> str:
  """WORKDIR/<stage>/checkpoints: where a stage's run keeps its checkpoints."""
  return os.path.join(workdir, stage, 'checkpoints')


class CheckpointError(RuntimeError):
  """A checkpoint cannot be read; the message names it and what to do."""


class DamagedCheckpointError(CheckpointError):
  """A step's files do not read back; the message names the step and what failed."""

  def __init__(self, step_dir: str, detail: str):
    super().__init__(f'checkpoint {step_dir} is damaged: {detail}.')
    self.step_dir = step_dir


# tensorstore's status for bytes that do not decode or are missing; a model that does not
# match the checkpoint is an orbax ValueError without one.
_DAMAGE_STATUS = re.compile(r'\b(DATA_LOSS|OUT_OF_RANGE|NOT_FOUND|FAILED_PRECONDITION): (.*)')
_TENSOR = re.compile(r'Error reading "([^"/]+)/')
_LOCAL_FILE = re.compile(r'local file "([^"]+)"')
_SPEC_DUMP = re.compile(r'\s*\[tensorstore_spec.*', re.S)


def _chain(e: BaseException | None) -> list[BaseException]:
  out = []
  while e is not None and e not in out:
    out.append(e)
    e = e.__cause__ or e.__context__
  return out


def _first_sentence(text: str) -> str:
  """The gist of a library message: its first line (and the line a trailing ':' points
  at), without tensorstore's spec dump, cut at a sentence end."""
  lines = [line.strip() for line in _SPEC_DUMP.sub('', text).splitlines() if line.strip()]
  gist = ' '.join(lines[:2] if lines and lines[0].endswith(':') else lines[:1])
  end = gist.find('. ', 40)
  return (gist[:end] if end > 0 else gist.rstrip('.'))[:300]


def _bad_json_file(step_dir: str) -> str | None:
  """The first of a step's JSON files (orbax's metadata, meta, the data iterator
  position) that does not parse."""
  for root, dirs, files in os.walk(step_dir):
    dirs[:] = sorted(d for d in dirs if d != 'd' and not d.startswith('ocdbt.'))
    for name in sorted(files):
      if name.endswith('.ocdbt') or name == 'commit_success.txt':
        continue
      path = os.path.join(root, name)
      try:
        with open(path, 'rb') as f:
          json.loads(f.read().decode('utf-8'))
      except (ValueError, OSError) as e:
        return f'{os.path.relpath(path, step_dir)} does not read back ({_first_sentence(str(e))})'
  return None


def damage(step_dir: str, error: BaseException) -> str | None:
  """What is damaged in `step_dir`, from its files and the error of a failed read; None
  when nothing points at damage (e.g. a model that does not match the checkpoint)."""
  if not os.path.isdir(os.path.join(step_dir, 'state')):
    return 'its state/ directory is missing'
  bad = _bad_json_file(step_dir)
  if bad:
    return bad
  for e in _chain(error):
    text = _SPEC_DUMP.sub('', str(e))
    status = _DAMAGE_STATUS.search(text)
    if status:
      files = _LOCAL_FILE.findall(text)
      where = os.path.relpath(files[-1], step_dir) if files else 'state'
      tensor = _TENSOR.search(text)
      where += f' (tensor {tensor.group(1)})' if tensor else ''
      reason = _first_sentence(text.rsplit('": ', 1)[-1])  # after the last quoted name
      return f'{where}: {status.group(1)}: {reason}'
    if isinstance(e, (FileNotFoundError, EOFError, UnicodeDecodeError, json.JSONDecodeError)):
      return f'{type(e).__name__}: {_first_sentence(str(e))}'
  return None


_quiet_reads = False


def _quiet_abandoned_reads() -> None:
  """When one read of a restore fails, orbax's other reads of that step still finish in
  background threads and report 'Event loop is closed' (or their own read error) as
  unraisable exceptions, at random moments from then to the interpreter's exit: noise
  next to the one message that reports the failure. Called before every restore (they
  can fire before the failure reaches us); drops those two kinds only."""
  global _quiet_reads
  if _quiet_reads:
    return
  _quiet_reads = True
  previous = sys.unraisablehook

  def hook(unraisable):
    text = str(unraisable.exc_value)
    if 'Event loop is closed' in text or 'Encountered error while reading array' in text:
      return
    previous(unraisable)
  sys.unraisablehook = hook


def read_error(step_dir: str, error: BaseException, what: str = '') -> CheckpointError:
  """The error to raise for a failed read (of `what`) of `step_dir`: damaged, or not
  this model."""
  detail = damage(step_dir, error)
  if detail:
    return DamagedCheckpointError(step_dir, detail)
  return CheckpointError(
      f'cannot read {what + " of " if what else ""}checkpoint {step_dir}: '
      f'{_first_sentence(str(error))}. config.model.* (and for a resume, the optimizer '
      'settings) must match the run that wrote it; or use another --workdir.')


class Checkpointer:
  """Periodic (steps and/or minutes) and final saves of one stage's run."""

  def __init__(self, directory: str, *, every_steps: int = 0, every_minutes: float = 0.0,
               max_to_keep: int = 2, async_save: bool = True, on_damaged: str = 'stop'):
    self.directory = os.path.abspath(directory)
    self.on_damaged = on_damaged  # see restore_newest
    self.every_steps = every_steps
    self.every_minutes = every_minutes
    self._last_save_time = time.monotonic()
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save),
        item_names=('state', 'data', 'meta'))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def due(self, step: int) -> bool:
    """Whether a periodic save is due after `step`."""
    if self.every_steps and step % self.every_steps == 0:
      return True
    minutes = (time.monotonic() - self._last_save_time) / 60
    return bool(self.every_minutes) and minutes >= self.every_minutes

  def save(self, step: int, state, data_iter=None, meta: dict | None = None) -> None:
    items = {'state': ocp.args.StandardSave(state), 'meta': ocp.args.JsonSave(meta or {})}
    if data_iter is not None:
      items['data'] = grain.checkpoint.CheckpointSave(data_iter)
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)
    self._last_save_time = time.monotonic()

  def restore(self, step: int, abstract_state, data_iter=None):
    """(state, meta) at `step`, the state placed by the abstract state's shardings.

    `data_iter` (if given) is advanced to the saved position in place.
    """
    items = {'state': ocp.args.StandardRestore(abstract_state), 'meta': ocp.args.JsonRestore()}
    if data_iter is not None:
      items['data'] = grain.checkpoint.CheckpointRestore(data_iter)
    _quiet_abandoned_reads()
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # orbax raises many types for a damaged or mismatched directory
      raise read_error(self.step_dir(step), e) from e
    return restored['state'], dict(restored['meta'] or {})

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def restore_newest(self, abstract_state, data_iter=None, log=print):
    """(step, state, meta) of the newest checkpoint, or (None, None, {}) if there is none.

    A damaged newest step stops the run with a message naming it (on_damaged='stop'),
    or is moved to <stage>/damaged_checkpoints/ (never deleted), reported through `log`,
    and the next newest is tried (on_damaged='fallback'). Only one process moves files,
    so with several the run stops instead.
    """
    start = data_iter.get_state() if hasattr(data_iter, 'get_state') else None
    moved = False
    while (step := self.latest_step()) is not None:
      try:
        return (step, *self.restore(step, abstract_state, data_iter))
      except DamagedCheckpointError as e:
        todo = (f'Move it aside (out of {self.directory}) and run again to resume from the '
                'step before')
        if self.on_damaged != 'fallback':
          raise CheckpointError(f'{e} {todo}, or set config.checkpoint.on_damaged=fallback '
                                'to have that done.') from e
        if jax.process_count() > 1:
          raise CheckpointError(f'{e} {todo} (on_damaged=fallback moves it only in a run of '
                                'one process).') from e
        log(f'{e} Moved it to {self.move_aside(step)}.')
        moved = True
    if moved:
      log(f'No older checkpoint in {self.directory}: starting from the beginning.')
    if start is not None:  # a failed restore may have moved the iterator
      data_iter.set_state(start)
    return None, None, {}

  def move_aside(self, step: int) -> str:
    """Renames DIR/<step> into <stage>/damaged_checkpoints/ (a new name, nothing is
    overwritten or deleted); returns its new path."""
    parent = os.path.join(os.path.dirname(self.directory), 'damaged_checkpoints')
    os.makedirs(parent, exist_ok=True)
    target, n = os.path.join(parent, str(step)), 1
    while os.path.exists(target):
      n += 1
      target = os.path.join(parent, f'{step}-{n}')
    os.rename(self.step_dir(step), target)
    self.manager.reload()
    return target

  def read_meta(self, step: int) -> dict:
    _quiet_abandoned_reads()
    try:
      restored = self.manager.restore(step,
                                      args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    except Exception as e:  # orbax raises many types for a damaged directory
      raise read_error(self.step_dir(step), e, 'the meta record') from e
    return dict(restored['meta'] or {})

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def restore_latest_params(directory: str, abstract_params, *, what: str,
                          key_path: tuple[str, ...] = ('params',)):
  """(params, meta, step) of the newest checkpoint under `directory`, e.g. the previous
  stage's: only the parameters, restored into the shardings `abstract_params` carries.
  `key_path` says where they sit in the saved state (see `restore_subtree`).

  A missing or incompatible checkpoint fails with a message saying what to run.
  """
  if not os.path.isdir(directory):
    raise CheckpointError(
        f'{what}: no checkpoint directory {directory}. Run that stage first, or point '
        'config.checkpoint.init_from at a checkpoints directory.')
  ckpt = Checkpointer(directory, async_save=False)
  step = ckpt.latest_step()
  try:
    if step is None:
      raise CheckpointError(f'{directory} holds no finished checkpoint.')
    meta = ckpt.read_meta(step)
    params = restore_subtree(directory, step, abstract_params, key_path)
  except DamagedCheckpointError as e:
    raise CheckpointError(f'{what}: {e} Run that stage again: it moves the damaged step aside '
                          'and redoes it from its newest good checkpoint.') from e
  except CheckpointError as e:
    raise CheckpointError(f'{what}: {e}') from e
  finally:
    ckpt.close()
  return params, meta, step


def restore_params(directory: str, step: int, abstract_params):
  """Only the parameters of checkpoint `directory/<step>` (no optimizer state, no data
  iterator), placed by the shardings of `abstract_params` (ShapeDtypeStructs carrying
  them, see `sharding.abstract_with_shardings`): what inference needs.
  """
  return restore_subtree(directory, step, abstract_params, ('params',))


def restore_subtree(directory: str, step: int, abstract_tree, key_path: tuple[str, ...]):
  """state[key_path[0]][key_path[1]]... of checkpoint `directory/<step>` and nothing else,
  placed by the shardings `abstract_tree` carries: ('params',) for the LM stages,
  ('policy', 'params') for the PPO policy, whose state also holds optimizer and value
  model, which inference and the report never read.
  """
  path = os.path.join(os.path.abspath(directory), str(step), 'state')
  target = abstract_tree
  for key in reversed(key_path):
    target = {key: target}
  what = ('the parameters' if tuple(key_path) == ('params',) else
          'state' + ''.join(f'[{k!r}]' for k in key_path))
  _quiet_abandoned_reads()
  try:
    with ocp.PyTreeCheckpointer() as reader:
      restored = reader.restore(path, args=ocp.args.PyTreeRestore(
          item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
          partial_restore=True))
  except Exception as e:  # orbax raises many types for a damaged or mismatched directory
    raise read_error(os.path.dirname(path), e, what) from e
  for key in key_path:
    restored = restored[key]
  return restored
