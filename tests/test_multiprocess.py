"""Two processes x 4 CPU devices (gloo collectives) run one mesh, as on a multi-host pod.

Each process reads its own shard of the corpus; metrics are written once; each
checkpoint holds one data-iterator state per process; a stopped run resumes and
matches an uninterrupted one. The reward stage's evaluation and score stats (scores of
global batches, host-side scoring) match a 1-process run.
"""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

import helpers
import xla_test_flags
from jaxgpt import run as run_lib
from jaxgpt.train import checkpoint as ckpt_lib

pytestmark = pytest.mark.slow


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def two_processes(workdir, args):
  """Runs `jaxgpt.main` on the smoke config with `args` as 2 processes; their outputs."""
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_CPU_COLLECTIVES_IMPLEMENTATION='gloo',
             XLA_FLAGS=xla_test_flags.flags(devices=4))
  procs = []
  for process_id in range(2):
    cmd = [sys.executable, '-m', 'jaxgpt.main',
           f'--config={helpers.ROOT}/experiments/tiny.py:smoke', f'--workdir={workdir}',
           *args, '--distributed', f'--coordinator_address=localhost:{port}',
           '--num_processes=2', f'--process_id={process_id}']
    procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, env=env, cwd=helpers.ROOT))
  outs = [p.communicate(timeout=300)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  return outs


def launch(workdir, tokenizer, steps):
  """Runs the smoke pretraining as 2 processes; returns their outputs."""
  return two_processes(workdir, [
      '--config.stage=pretrain', f'--config.tokenizer.path={tokenizer}',
      f'--config.train.steps={steps}', '--config.train.log_every=1',
      '--config.train.min_lr_ratio=1.0', '--config.train.sample_every=100',
      '--config.train.peak_flops=1e12'])


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


def _reward_result(workdir):
  """(eval.json, score_stats of the final checkpoint) of a reward stage run."""
  with open(os.path.join(workdir, 'reward', 'eval.json'), encoding='utf-8') as f:
    report = json.load(f)
  reader = ckpt_lib.Checkpointer(ckpt_lib.checkpoints_dir(workdir, 'reward'), async_save=False)
  try:
    return report, reader.read_meta(reader.latest_step())['score_stats']
  finally:
    reader.close()


def test_two_process_reward_evaluation_matches_one_process(smoke_run, tmp_path):
  """Held-out pair scores, their weights and the score stats are global, not per process."""
  workdir = smoke_run[0]
  overrides = {'stage': 'reward', 'reward.steps': 2, 'train.min_lr_ratio': 1.0,
               'tokenizer.path': os.path.join(workdir, 'tokenizer.model'),
               'reward.eval_per_task': 1, 'reward.best_of': (1,)}
  runs = {}
  for name in ('one', 'two'):  # the SFT model and its sampled comparisons, reused
    wd = tmp_path / name
    shutil.copytree(os.path.join(workdir, 'sft'), wd / 'sft')
    os.makedirs(wd / 'reward')
    for f in ('comparisons.jsonl', 'comparisons_heldout.jsonl', 'samples_heldout.jsonl'):
      shutil.copy(os.path.join(workdir, 'reward', f), wd / 'reward' / f)
    runs[name] = str(wd)
  run_lib.run(helpers.smoke_config(**overrides), runs['one'])  # 8 devices, one process
  two_processes(runs['two'], [f'--config.{k}={v}' for k, v in overrides.items()])
  (one, one_stats), (two, two_stats) = _reward_result(runs['one']), _reward_result(runs['two'])
  held = one['heldout_pairs']
  assert held['pairs'] > 0
  assert two['heldout_pairs']['pairs'] == held['pairs']
  assert two['heldout_pairs']['pairwise_accuracy'] == held['pairwise_accuracy']
  assert two['heldout_pairs']['per_task'] == held['per_task']
  with open(os.path.join(runs['one'], 'reward', 'samples_heldout.jsonl'),
            encoding='utf-8') as f:
    assert one_stats['n'] == two_stats['n'] == sum(1 for _ in f)
  assert two_stats['mean'] == pytest.approx(one_stats['mean'], rel=1e-4, abs=1e-5)
  assert two_stats['std'] == pytest.approx(one_stats['std'], rel=1e-4, abs=1e-5)
  assert two['sft_greedy']['accuracy'] == one['sft_greedy']['accuracy']
