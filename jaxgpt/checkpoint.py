"""Checkpoints: orbax CheckpointManager holding the train state, the data iterator and
a small JSON record, restorable into any mesh.

Layout: DIR/<stage>/checkpoints/<step>/{state, data, meta}. orbax writes each step
into a temporary directory and renames it when complete, so a crash or an error
during a save never replaces a good checkpoint; `max_to_keep` old steps are kept.
"""

from __future__ import annotations

import os
import time

import grain
import orbax.checkpoint as ocp


def stage_dir(workdir: str, stage: str) -> str:
  """WORKDIR/<stage>/checkpoints: where a stage's run keeps its checkpoints."""
  return os.path.join(workdir, stage, 'checkpoints')


class CheckpointError(RuntimeError):
  """A checkpoint cannot be read; the message names it and what to do."""


class Checkpointer:
  """Periodic (steps and/or minutes) and final saves of one stage's run."""

  def __init__(self, directory: str, *, every_steps: int = 0, every_minutes: float = 0.0,
               max_to_keep: int = 2, async_save: bool = True):
    self.directory = os.path.abspath(directory)
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
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # orbax raises many types for a damaged directory
      others = [s for s in self.all_steps() if s != step]
      raise CheckpointError(
          f'cannot restore checkpoint {self.directory}/{step}: {type(e).__name__}: {e}. '
          f'If it is damaged, move it aside (other steps here: {others or "none"}) and '
          'run again to resume from the previous one.') from e
    return restored['state'], dict(restored['meta'] or {})

  def read_meta(self, step: int) -> dict:
    restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
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
  try:
    step = ckpt.latest_step()
    if step is None:
      raise CheckpointError(f'{what}: {directory} holds no finished checkpoint.')
    meta = ckpt.read_meta(step)
  finally:
    ckpt.close()
  try:
    params = restore_subtree(directory, step, abstract_params, key_path)
  except CheckpointError as e:
    raise CheckpointError(f'{what}: {e}') from e
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
  try:
    with ocp.PyTreeCheckpointer() as reader:
      restored = reader.restore(path, args=ocp.args.PyTreeRestore(
          item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
          partial_restore=True))
  except Exception as e:  # orbax raises many types for a damaged or mismatched directory
    raise CheckpointError(
        f'cannot read {what} of checkpoint {path}: {type(e).__name__}: {e}. '
        'config.model.* must match the run that wrote it.') from e
  for key in key_path:
    restored = restored[key]
  return restored
