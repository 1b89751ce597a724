"""The recipe's stages, one module each (`jaxgpt.stages.<name>`, with `run(cfg, workdir)`).

`PIPELINE` is the one list of them, in recipe order: `config.stage` accepts these names
(and `all`), `stage=all` runs the stages of `config.recipe` (default `RECIPE`) one after
the other in one workdir, and the report reads what each left in WORKDIR/<name>/.
`grpo_base` is GRPO started from the pretrained (or published, config.checkpoint.base)
model instead of SFT: RL straight on a model that was never fine-tuned here.
"""

PIPELINE = ('pretrain', 'sft', 'reward', 'dpo', 'ppo', 'ppo_checker', 'grpo', 'grpo_base')
RECIPE = PIPELINE[:-1]
RL_STAGES = ('ppo', 'ppo_checker', 'grpo', 'grpo_base')  # online RL: a policy, per-iteration rows
