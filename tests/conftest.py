"""Test set-up: a CPU mesh of 8 emulated devices, set before JAX is imported."""

import os

import xla_test_flags

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' +
                           xla_test_flags.flags(devices=8)).strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

# One persistent compilation cache for the whole session: both xdist workers and every
# command line a test launches inherit these variables, so a program compiled once (the
# smoke run's, which each worker and many subprocesses repeat) is read back afterwards.
# Only compile time changes: a cached program is the same HLO compiled the same way. The
# size limit turns on jax's file lock, so two processes never read a half-written entry.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  import atexit  # noqa: E402
  import shutil  # noqa: E402
  import tempfile  # noqa: E402
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='jaxgpt-tests-jit-')
  os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  os.environ['JAX_COMPILATION_CACHE_MAX_SIZE'] = str(8 << 30)
  # Removed by the process that made it (the xdist controller exits after its workers).
  atexit.register(shutil.rmtree, os.environ['JAX_COMPILATION_CACHE_DIR'], True)

import jax  # noqa: E402

jax.config.update('jax_threefry_partitionable', True)


import pytest  # noqa: E402


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups (--dist loadgroup)
def pytest_collection_modifyitems(items):
  """Every test that needs `smoke_run` joins one xdist group, so one worker computes the
  run and the other spends that time on the rest, rather than both computing it."""
  for item in items:
    if 'smoke_run' in getattr(item, 'fixturenames', ()):
      item.add_marker(pytest.mark.xdist_group('smoke_run'))


@pytest.fixture(scope='session')
def smoke_run(tmp_path_factory):
  """`stage=all` of experiments/tiny.py:smoke, shared by the tests that need a finished
  run: every stage at a tiny size (6 pretraining steps with a tokenizer trained from the
  embedded corpus, 4 SFT steps, then reward, dpo, ppo, ppo_checker and grpo for a few
  steps each) and the report. (workdir, {stage: loop.Result})."""
  import helpers  # pylint: disable=import-outside-toplevel
  from jaxgpt import run as run_lib  # pylint: disable=import-outside-toplevel
  workdir = str(tmp_path_factory.mktemp('smoke_run'))
  return workdir, run_lib.run(helpers.smoke_config(), workdir)
