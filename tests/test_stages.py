"""End to end: the pretraining and SFT stages on the real embedded data, tiny sizes.

Runs the same code as `python -m jaxgpt.main --config experiments/tiny.py:smoke`,
in-process, on the 8-device CPU mesh.
"""

import glob
import json
import os

import jax
import numpy as np
import pytest

import helpers
import xla_test_flags

from jaxgpt import run as run_lib
from jaxgpt.config import ConfigError
from jaxgpt.train import checkpoint as ckpt_lib

smoke_config = helpers.smoke_config


def read_jsonl(path):
  with open(path, encoding='utf-8') as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope='module')
def pretrained(smoke_run):
  workdir, results = smoke_run
  return workdir, results['pretrain']


def test_pretrain_writes_metrics_checkpoints_and_samples(pretrained):
  workdir, result = pretrained
  stage_dir = os.path.join(workdir, 'pretrain')
  rows = read_jsonl(os.path.join(stage_dir, 'metrics.jsonl'))
  train_rows = [r for r in rows if 'loss' in r]
  assert [r['step'] for r in train_rows] == [2, 4, 6]
  for key in ('loss', 'tokens_per_sec', 'mfu', 'lr', 'grad_norm'):
    assert all(key in r for r in train_rows[1:]), key
  val_rows = [r for r in rows if 'val_loss' in r]
  assert [r['step'] for r in val_rows] == [3, 6]
  assert np.isfinite(val_rows[-1]['val_loss'])
  assert glob.glob(os.path.join(stage_dir, 'events.out.tfevents.*'))
  assert sorted(os.listdir(os.path.join(stage_dir, 'checkpoints'))) == ['3', '6']
  samples = read_jsonl(os.path.join(stage_dir, 'samples.jsonl'))
  assert {s['prompt'] for s in samples} == set(smoke_config().train.sample_prompts)
  assert int(result.state['step']) == 6


def test_rerun_of_finished_run_changes_nothing(pretrained):
  workdir, result = pretrained
  again = run_lib.run(smoke_config(stage='pretrain'), workdir)['pretrain']
  for a, b in zip(jax.tree.leaves(result.state['params']), jax.tree.leaves(again.state['params'])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_resume_equals_uninterrupted_run(pretrained, tmp_path):
  """Run 4 steps, stop, re-run to 8 == an uninterrupted 8-step run (same data order)."""
  tokenizer = os.path.join(pretrained[0], 'tokenizer.model')
  # A constant learning rate after warm-up, so the schedule does not depend on train.steps.
  common = {'tokenizer.path': tokenizer, 'train.min_lr_ratio': 1.0, 'train.eval_every': 100,
            'train.sample_every': 100, 'checkpoint.every_steps': 100}
  common['stage'] = 'pretrain'
  split = str(tmp_path / 'split')
  run_lib.run(smoke_config(**common, **{'train.steps': 4}), split)
  resumed = run_lib.run(smoke_config(**common, **{'train.steps': 8}), split)['pretrain']
  straight = run_lib.run(smoke_config(**common, **{'train.steps': 8}),
                         str(tmp_path / 'straight'))['pretrain']
  assert int(resumed.state['step']) == int(straight.state['step']) == 8
  for a, b in zip(jax.tree.leaves(resumed.state['params']),
                  jax.tree.leaves(straight.state['params'])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sft_stage_from_pretrained_writes_eval(smoke_run):
  workdir, results = smoke_run
  assert int(results['sft'].state['step']) == 4
  with open(os.path.join(workdir, 'sft', 'eval.json'), encoding='utf-8') as f:
    report = json.load(f)
  for key in ('base_zero_shot', 'base_few_shot', 'sft'):
    assert 0.0 <= report[key]['accuracy'] <= 1.0
    assert len(report[key]['per_task']) == 8
  rows = read_jsonl(os.path.join(workdir, 'sft', 'metrics.jsonl'))
  assert any('val_loss' in r for r in rows)


def test_sft_without_pretrained_checkpoint_says_what_to_run(tmp_path):
  with pytest.raises(ckpt_lib.CheckpointError, match='Run that stage first'):
    run_lib.run(smoke_config(stage='sft'), str(tmp_path))


def test_damaged_checkpoint_fails_naming_it(pretrained, tmp_path):
  """With config.checkpoint.on_damaged=stop, a damaged newest checkpoint is reported with
  its path; nothing is moved or overwritten (the default, fallback: test_user_errors.py)."""
  import shutil
  workdir = str(tmp_path / 'copy')
  shutil.copytree(pretrained[0], workdir)
  step_dir = os.path.join(workdir, 'pretrain', 'checkpoints', '6', 'state')
  for path in glob.glob(os.path.join(step_dir, '**', '*'), recursive=True):
    if os.path.isfile(path) and 'manifest' in path:
      with open(path, 'wb') as f:
        f.write(b'garbage')
  cfg = smoke_config(**{'train.steps': 8, 'stage': 'pretrain', 'checkpoint.on_damaged': 'stop'})
  with pytest.raises(ckpt_lib.CheckpointError, match=r'checkpoints/6 is damaged.*Move it aside'):
    run_lib.run(cfg, workdir)
  assert sorted(os.listdir(os.path.join(workdir, 'pretrain', 'checkpoints'))) == ['3', '6']


def test_unknown_stage_is_a_config_error(tmp_path):
  with pytest.raises(ConfigError, match='config.stage'):
    run_lib.run(smoke_config(stage='rlhf'), str(tmp_path))


def test_diverged_run_stops_without_saving(pretrained, tmp_path):
  """A non-finite loss stops the run before any checkpoint of the diverged state."""
  tokenizer = os.path.join(pretrained[0], 'tokenizer.model')
  cfg = smoke_config(**{'stage': 'pretrain', 'tokenizer.path': tokenizer, 'train.lr': 1e30,
                        'train.warmup_steps': 0, 'train.clip_norm': 0.0,
                        'train.log_every': 100, 'checkpoint.every_steps': 2})
  with pytest.raises(FloatingPointError, match=r'stopping without saving'):
    run_lib.run(cfg, str(tmp_path))
  assert os.listdir(tmp_path / 'pretrain' / 'checkpoints') == []


def test_sigterm_saves_and_the_rerun_resumes(pretrained, tmp_path):
  """Pre-emption: SIGTERM mid-run saves the current step; the same command resumes."""
  import re
  import signal
  import subprocess
  import sys
  tokenizer = os.path.join(pretrained[0], 'tokenizer.model')
  cmd = [sys.executable, '-m', 'jaxgpt.main', f'--config={helpers.ROOT}/experiments/tiny.py:smoke',
         f'--workdir={tmp_path}', '--config.stage=pretrain', f'--config.tokenizer.path={tokenizer}',
         '--config.train.log_every=1', '--config.train.eval_every=100000',
         '--config.train.sample_every=100000', '--config.checkpoint.every_steps=100000',
         '--config.train.peak_flops=1e12']
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=xla_test_flags.flags())
  proc = subprocess.Popen(cmd + ['--config.train.steps=100000'], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, env=env, cwd=helpers.ROOT)
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if re.search(r'\[pretrain\]\s+3/100000', line):
      proc.send_signal(signal.SIGTERM)
      break
  out = ''.join(lines) + proc.communicate(timeout=120)[0]
  assert proc.returncode == 0, out
  saved = int(re.search(r'SIGTERM: saved step (\d+)', out).group(1))
  assert saved >= 3
  assert os.listdir(tmp_path / 'pretrain' / 'checkpoints') == [str(saved)]
  again = subprocess.run(cmd + [f'--config.train.steps={saved + 2}'], capture_output=True,
                         text=True, env=env, cwd=helpers.ROOT, timeout=300)
  assert again.returncode == 0, again.stdout + again.stderr
  assert f'resumed from {tmp_path}/pretrain/checkpoints/{saved}' in again.stdout
  assert f'steps {saved} -> {saved + 2}' in again.stdout


# -- the reward stage --------------------------------------------------------------------------


def test_reward_stage_writes_comparisons_eval_and_score_stats(smoke_run):
  workdir, results = smoke_run
  out = os.path.join(workdir, 'reward')
  assert int(results['reward'].state['step']) == smoke_config().reward.steps
  assert 'lm_head' not in results['reward'].state['params']
  pairs = read_jsonl(os.path.join(out, 'comparisons.jsonl'))
  heldout = read_jsonl(os.path.join(out, 'comparisons_heldout.jsonl'))
  assert pairs and heldout
  assert {'prompt', 'chosen', 'rejected', 'group', 'task'} <= set(pairs[0])
  from jaxgpt.data import tasks
  assert all(tasks.TASKS[r['task']].split_of(tasks.TASKS[r['task']].parse(r['prompt'])) ==
             'heldout' for r in heldout)
  with open(os.path.join(out, 'eval.json'), encoding='utf-8') as f:
    report = json.load(f)
  assert 0.0 <= report['heldout_pairs']['pairwise_accuracy'] <= 1.0
  assert set(report['best_of']) == {str(n) for n in smoke_config().reward.best_of}
  assert {'sft_greedy', 'sample_accuracy', 'auc_accepted'} <= set(report)
  reader = ckpt_lib.Checkpointer(ckpt_lib.checkpoints_dir(workdir, 'reward'), async_save=False)
  try:
    stats = reader.read_meta(reader.latest_step())['score_stats']
  finally:
    reader.close()
  # Over the distinct held-out samples (every held-out prompt's), not the sides of pairs.
  samples = read_jsonl(os.path.join(out, 'samples_heldout.jsonl'))
  assert len({(r['prompt'], r['response'], r['finished']) for r in samples}) == len(samples)
  assert {(r['prompt'], r[side], r.get(f'{side}_finished', True)) for r in heldout
          for side in ('chosen', 'rejected')} <= {
              (r['prompt'], r['response'], r['finished']) for r in samples}
  assert stats['std'] > 0 and stats['n'] == len(samples)


def test_reward_resume_equals_uninterrupted_run(smoke_run, tmp_path):
  import shutil
  workdir = smoke_run[0]
  common = {'stage': 'reward', 'train.min_lr_ratio': 1.0, 'checkpoint.every_steps': 100,
            'tokenizer.path': os.path.join(workdir, 'tokenizer.model'),
            'reward.eval_per_task': 1, 'reward.best_of': (1,)}
  runs = {}
  for name in ('split', 'straight'):
    wd = tmp_path / name
    shutil.copytree(os.path.join(workdir, 'sft'), wd / 'sft')
    os.makedirs(wd / 'reward')
    for f in ('comparisons.jsonl', 'comparisons_heldout.jsonl',  # sampled once, reused
              'samples_heldout.jsonl'):
      shutil.copy(os.path.join(workdir, 'reward', f), wd / 'reward' / f)
    runs[name] = str(wd)
  run_lib.run(smoke_config(**common, **{'reward.steps': 2}), runs['split'])
  resumed = run_lib.run(smoke_config(**common, **{'reward.steps': 5}), runs['split'])['reward']
  straight = run_lib.run(smoke_config(**common, **{'reward.steps': 5}),
                         runs['straight'])['reward']
  assert resumed.steps_run == 3 and straight.steps_run == 5
  for a, b in zip(jax.tree.leaves(resumed.state), jax.tree.leaves(straight.state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
