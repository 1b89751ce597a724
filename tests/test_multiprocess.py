"""Two processes x 4 CPU devices (gloo collectives) run one mesh, as on a multi-host pod.

Each process reads its own shard of the corpus; metrics are written once; each
checkpoint holds one data-iterator state per process; a stopped run resumes and
matches an uninterrupted one.
"""

import json
import os
import socket
import subprocess
import sys

import pytest

import helpers

pytestmark = pytest.mark.slow


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def launch(workdir, tokenizer, steps):
  """Runs the smoke pretraining as 2 processes; returns their outputs."""
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_CPU_COLLECTIVES_IMPLEMENTATION='gloo',
             XLA_FLAGS='--xla_force_host_platform_device_count=4 '
                       '--xla_backend_optimization_level=0')
  procs = []
  for process_id in range(2):
    cmd = [sys.executable, '-m', 'jaxgpt.main',
           f'--config={helpers.ROOT}/experiments/tiny.py:smoke', f'--workdir={workdir}',
           '--config.stage=pretrain', f'--config.tokenizer.path={tokenizer}',
           f'--config.train.steps={steps}', '--config.train.log_every=1',
           '--config.train.min_lr_ratio=1.0', '--config.train.sample_every=100',
           '--config.train.peak_flops=1e12',
           '--distributed', f'--coordinator_address=localhost:{port}', '--num_processes=2',
           f'--process_id={process_id}']
    procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, env=env, cwd=helpers.ROOT))
  outs = [p.communicate(timeout=300)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  return outs


def losses(workdir):
  with open(os.path.join(workdir, 'pretrain', 'metrics.jsonl'), encoding='utf-8') as f:
    return {r['step']: r['loss'] for r in map(json.loads, f) if 'loss' in r}


def test_two_processes_train_checkpoint_and_resume(smoke_run, tmp_path):
  tokenizer = os.path.join(smoke_run[0], 'tokenizer.model')
  split, straight = str(tmp_path / 'split'), str(tmp_path / 'straight')
  outs = launch(split, tokenizer, steps=3)
  assert "mesh {'data': 8, 'fsdp': 1, 'tensor': 1}" in outs[0]
  data_dir = os.path.join(split, 'pretrain', 'checkpoints', '3', 'data')
  assert {'process_0-of-2.json', 'process_1-of-2.json'} <= set(os.listdir(data_dir))
  outs = launch(split, tokenizer, steps=5)
  assert f'resumed from {split}/pretrain/checkpoints/3' in outs[0]
  launch(straight, tokenizer, steps=5)
  resumed, uninterrupted = losses(split), losses(straight)
  assert sorted(resumed) == sorted(uninterrupted) == [1, 2, 3, 4, 5]  # process 0 writes once
  for step in (4, 5):
    assert resumed[step] == uninterrupted[step], (step, resumed, uninterrupted)
