"""PPO with the task checker as its reward: config.ppo with `reward='checker'`, in
WORKDIR/ppo_checker, so that the report sets PPO on a reward that can be checked beside PPO
on the reward model (which cannot see correctness) and GRPO on the same checker.

Everything else is stage 4's (`stages.ppo`): the same policy, value model, KL leash and
iterations; only the reward differs, and no reward model is loaded for it.
"""

from __future__ import annotations

from jaxgpt.rl import ppo as ppo_algo
from jaxgpt.stages import online_rl
from jaxgpt.train import loop

NAME = 'ppo_checker'


def stage_config(cfg):
  """The experiment's config with the checker as PPO's reward."""
  cfg = cfg.copy_and_resolve_references()
  cfg.ppo.reward = 'checker'
  return cfg


def run(cfg, workdir: str) -> loop.Result:
  cfg = stage_config(cfg)
  started = online_rl.run(cfg, workdir, NAME, ppo_algo.build,
                          online_rl.ppo_initial_params(cfg, NAME), section_name='ppo')
  online_rl.write_eval(cfg, workdir, NAME, started)
  return started.result
