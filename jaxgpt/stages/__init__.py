"""The recipe's stages, one module each (`jaxgpt.stages.<name>`, with `run(cfg, workdir)`).

`PIPELINE` is the one list of them, in recipe order: `config.stage` accepts these names
(and `all`), `stage=all` runs them one after the other in one workdir, and the report
reads what each left in WORKDIR/<name>/.
"""

PIPELINE = ('pretrain', 'sft', 'reward', 'dpo', 'ppo', 'ppo_checker', 'grpo')
