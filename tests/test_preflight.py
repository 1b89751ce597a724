"""Fit before you pay: a run that cannot hold its state, or names a missing tokenizer, stops
in one line before it allocates anything (`jaxgpt.aot.preflight`)."""

import math
import os
import subprocess
import sys
import time

import jax
import ml_collections
import pytest

import helpers
from jaxgpt import sharding
from jaxgpt import config as config_lib
from jaxgpt import model as model_lib
from jaxgpt.aot import preflight
from jaxgpt.aot import compile_fit as aot
from jaxgpt.aot import plans as aot_plans
from jaxgpt.train import optim, trainer

LLAMA = ('-m', 'jaxgpt.main', '--config=experiments/llama_7b.py')
# Runs the command as its child and prints the child's peak RSS (kB) last: the pytest
# process's own children (earlier tests) do not count.
_PEAK_RSS = ('import resource, subprocess, sys\n'
             'code = subprocess.run(sys.argv[1:]).returncode\n'
             'print(f"peak_rss_kb {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}")\n'
             'sys.exit(code)\n')


def _run_main(*args, devices=1):
  """(exit code, stderr lines, stdout, peak RSS in GiB, seconds) of jaxgpt.main."""
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
  start = time.time()
  proc = subprocess.run([sys.executable, '-c', _PEAK_RSS, sys.executable, *args],
                        cwd=helpers.ROOT, env=env, capture_output=True, text=True,
                        stdin=subprocess.DEVNULL, timeout=300, check=False)
  seconds = time.time() - start
  *out, last = proc.stdout.splitlines()
  assert last.startswith('peak_rss_kb '), proc.stdout
  lines = [x for x in proc.stderr.splitlines() if x.strip()]
  return proc.returncode, lines, '\n'.join(out), int(last.split()[1]) / 2 ** 20, seconds


def test_llama_7b_on_this_machine_stops_in_one_line_before_allocating(tmp_path):
  workdir = tmp_path / 'llama'
  code, lines, out, rss_gib, seconds = _run_main(*LLAMA, f'--workdir={workdir}')
  report = f'exit {code}, {seconds:.1f}s, {rss_gib:.2f} GiB\n' + '\n'.join(lines) + out
  assert code == 1 and len(lines) == 1, report
  line = lines[0]
  # 6.74B float32 parameters and two AdamW moments on one device: ~75 GiB, and what a
  # device has: this host's available RAM.
  assert line.startswith('jaxgpt: pretrain needs ') and 'GiB per device' in line, report
  need = float(line.split('needs ')[1].split(' GiB')[0])
  have = float(line.split('a device here has ')[1].split(' GiB')[0])
  assert 70 < need < 80 and 0 < have < need, report
  assert 'available host RAM' in line and 'tools/aot.py --config experiments/llama_7b.py' in line
  assert 'config.preflight=False' in line, report
  assert rss_gib < 2, report  # 7B float32 parameters alone would be 25 GiB
  assert seconds < 60, report
  assert not workdir.exists(), report  # stopped before making the workdir


def test_missing_tokenizer_is_one_line_naming_it_and_how_to_make_it(tmp_path):
  # preflight=False skips the memory check (this machine cannot hold 7B): the tokenizer
  # check still stops the run before anything is read or allocated.
  code, lines, out, rss_gib, _ = _run_main(*LLAMA, f'--workdir={tmp_path}/wd',
                                           '--config.preflight=False')
  report = f'exit {code}, {rss_gib:.2f} GiB\n' + '\n'.join(lines) + out
  assert code == 1 and len(lines) == 1, report
  assert "config.tokenizer.path='tokenizer.model' does not exist" in lines[0], report
  assert 'python tools/train_tokenizer.py --out tokenizer.model --vocab_size 32000' in lines[0]
  assert rss_gib < 2, report


def _per_device_bytes(tree) -> int:
  """Bytes that device 0 holds of every array in `tree`."""
  dev = jax.devices()[0]
  return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards
             if s.device == dev)


@pytest.mark.parametrize('mesh', [(8, 1, 1), (2, 2, 2), (1, 4, 2)])
def test_estimate_matches_a_created_train_state(mesh):
  cfg = helpers.tiny_config(mesh=mesh)
  cfg.model.d_model, cfg.model.d_ff = 128, 256  # big enough that the matrices dominate
  jax_mesh = sharding.make_mesh(cfg, helpers.devices_for(mesh))
  need = aot_plans.plan(cfg, 'pretrain', jax_mesh)
  mcfg = model_lib.ModelConfig.from_config(cfg)
  _, state, _ = trainer.create_train_state(mcfg, jax_mesh, optim.make_optimizer(cfg.train), 0)
  actual = _per_device_bytes(state)
  assert math.isclose(need.state_bytes, actual, rel_tol=0.1), (need, actual)
  assert math.isclose(need.params_bytes, _per_device_bytes(state['params']), rel_tol=0.1)
  assert need.n_params == model_lib.count_params(state['params'])


def test_a_state_larger_than_the_budget_is_refused_with_both_figures():
  cfg = helpers.smoke_config()
  mesh = sharding.make_mesh(cfg)
  small = preflight.Budget(1e5, 'a test budget')
  with pytest.raises(aot.DoesNotFit, match=r'pretrain needs 1\.\d MiB per device .* '
                     r'a device here has 97\.7 KiB \(a test budget\)'):
    preflight.check_memory(cfg, mesh, ('pretrain',), 'experiments/tiny.py', budget=small)
  # Every stage of `all` is checked before the first runs: PPO holds four models.
  needs = preflight.check_memory(cfg, mesh, ('pretrain', 'sft', 'reward', 'ppo'),
                                 budget=preflight.Budget(1e12, 'plenty'))
  assert needs[-1].stage == 'ppo' and needs[-1].state_bytes > needs[0].state_bytes


def test_cpu_budget_is_available_ram_split_over_the_devices():
  budget = preflight.device_budget()
  assert f'/ {jax.local_device_count()} CPU devices' in budget.what
  with open('/proc/meminfo', encoding='ascii') as f:
    total_kb = next(int(x.split()[1]) for x in f if x.startswith('MemTotal:'))
  assert 0 < budget.bytes * jax.local_device_count() <= total_kb * 1024


def test_preflight_switch_is_validated():
  # A type-safe ConfigDict (experiment files, --config.preflight=...) takes only a bool;
  # validate() says so for any other config too.
  cfg = ml_collections.ConfigDict(helpers.smoke_config().to_dict(), type_safe=False)
  cfg.preflight = 'no'
  with pytest.raises(config_lib.ConfigError, match="config.preflight='no' must be True or False"):
    config_lib.validate(cfg, jax.device_count())
