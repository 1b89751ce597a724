"""GRPO straight from the pretrained model (WORKDIR/pretrain, or config.checkpoint.base: a
published instruct model as shipped), skipping SFT: what RL alone makes of a model.

The same algorithm as `grpo`, with config.grpo's fields but those config.grpo_base sets
(`config.with_grpo_base`), in WORKDIR/grpo_base; its eval.json compares the policy with the
model it started from ('base').
"""

from __future__ import annotations

from jaxgpt import config as config_lib
from jaxgpt.rl import grpo as grpo_algo
from jaxgpt.stages import online_rl
from jaxgpt.train import loop

NAME = 'grpo_base'


def run(cfg, workdir: str) -> loop.Result:
  cfg = config_lib.with_grpo_base(cfg)
  started = online_rl.run(cfg, workdir, NAME, grpo_algo.build, online_rl.policy_only(cfg, NAME),
                          section_name='grpo', policy_from='pretrain')
  online_rl.write_eval(cfg, workdir, NAME, started)
  return started.result
