r"""Runs an experiment: `python -m jaxgpt.main --config experiments/tiny.py --workdir DIR`.

Any config field can be overridden with `--config.a.b=value`; `config.stage` picks
the stage (pretrain, sft, ... or all). Kept short on purpose: everything else is
in `jaxgpt.run`; what a mistake prints is decided in `jaxgpt.errors`.
"""

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from jaxgpt import errors, run

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment file.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where the run writes everything.')
_DISTRIBUTED = flags.DEFINE_bool(
    'distributed', False,
    'Call jax.distributed.initialize() (one process per host). On TPU pods, SLURM and Open '
    'MPI JAX finds its peers itself; elsewhere give the three flags below.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'host:port of process 0.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process, 0..num_processes-1.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}; config fields are set with '
                         '--config.a.b=value.')
  logging.set_verbosity(logging.WARNING)  # orbax and grain log every file at INFO
  if _DISTRIBUTED.value:
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  run.run(_CONFIG.value, _WORKDIR.value, config_flags.get_config_filename(flags.FLAGS['config']))
  return 0


if __name__ == '__main__':
  errors.run(main, 'jaxgpt')
