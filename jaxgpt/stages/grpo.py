"""Critic-free online RL: GRPO, Dr. GRPO or RLOO (`config.grpo.advantage`) from the SFT model.

Each of rollout_batch / group_size prompts is sampled group_size times; each reply's
advantage is its reward against its group's (`rl.grpo`), with no value model. The reward
is `config.grpo.reward`, by default the task checker (`checker`: 1 when the task suite's
verifier accepts the reply, the "verifiable reward" of RLVR); the reward model (`model`),
a user's function or a weighted sum work too, and only a `model` term loads the reward
model. The KL to the SFT reference is GRPO's k3 loss term (or -beta * KL in the reward).
Resume, checkpoints and metrics are the online-RL loop's (`rl.loop`). Afterwards
WORKDIR/grpo/eval.json: held-out greedy gold accuracy per task, GRPO vs SFT.

Left out: DAPO's dynamic sampling (groups whose rewards are all equal still take part;
their share is logged as `equal_reward_groups`) and reward-model value-free variants
with a learned baseline (ReMax).
"""

from __future__ import annotations

from jaxgpt.rl import grpo as grpo_algo
from jaxgpt.stages import online_rl
from jaxgpt.train import loop

NAME = 'grpo'


def run(cfg, workdir: str) -> loop.Result:
  started = online_rl.run(cfg, workdir, NAME, grpo_algo.build, online_rl.policy_only(cfg, NAME))
  online_rl.write_eval(cfg, workdir, NAME, started)
  return started.result
