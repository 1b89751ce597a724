"""Stage 4, RLHF with PPO: the SFT model, steered by its reward, against a KL leash.

Models by role, all on one mesh (`rl.ppo`): the **policy** (from WORKDIR/sft, or
config.checkpoint.init_from) and the **value** model (from WORKDIR/reward, as InstructGPT
does, its head put on the standardised reward's scale; `config.ppo.value_from='policy'`
puts a value head on the policy's trunk instead) are trained; the **reference** (SFT) and
the **reward** model are frozen. The reward is `config.ppo.reward`: the reward model
(`model`, the talk's recipe), the task checker (`checker`), a user's function, or a
weighted sum.

Iterations run in the online-RL loop (`rl.loop`): prompts -> rollouts -> rewards -> GAE
advantages -> `epochs` passes of minibatch updates -> the adaptive KL controller. The
state and the prompt iterator's position are checkpointed, so a stopped run resumes
exactly. With `config.ppo.ptx_coef` > 0 every policy update also takes one pretraining
batch (PPO-ptx, InstructGPT); that iterator's position is kept in the checkpoint's meta.
Afterwards WORKDIR/ppo/eval.json: held-out greedy gold accuracy (and RM score), PPO vs SFT.
"""

from __future__ import annotations

from jaxgpt.rl import ppo as ppo_algo
from jaxgpt.stages import online_rl
from jaxgpt.train import loop

NAME = 'ppo'


def run(cfg, workdir: str) -> loop.Result:
  started = online_rl.run(cfg, workdir, NAME, ppo_algo.build,
                          online_rl.ppo_initial_params(cfg, NAME))
  online_rl.write_eval(cfg, workdir, NAME, started)
  return started.result
