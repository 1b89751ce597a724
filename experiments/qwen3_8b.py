r"""Qwen3 8B, fine-tuned here: SFT, then GRPO, on a TPU slice.

The architecture is Qwen3's: width 4096, 36 layers, 32 query / 8 key-value heads of width
128 (set, not derived: in Qwen3's smaller models heads are wider than d / heads), an RMSNorm
on each head's q and k, MLP 12288, vocabulary 151,936 (untied head), RoPE base 1e6, context
40,960. Start from the published weights, a Hugging Face directory (config.json,
*.safetensors, tokenizer.json):

  python -m jaxgpt.main --config experiments/qwen3_8b.py --workdir /mnt/shared/qwen3 \
      --config.checkpoint.init_from=hf:/path/to/Qwen3-8B \
      --config.sft.data=/path/to/conversations.jsonl
  python -m jaxgpt.main --config experiments/qwen3_8b.py --workdir /mnt/shared/qwen3 \
      --config.stage=grpo                              # from the SFT model, task checker

`init_from=hf:DIR` takes the architecture and tokenizer from DIR (Qwen3 0.6B-32B, and
Qwen 2.5 with its q/k/v biases, the same way); the weights stream in one layer at a time,
each device receiving only its shard. Export back with
`python tools/convert_hf.py export --workdir /mnt/shared/qwen3 --stage grpo --out DIR`.

Fit first (compiles for the slice on any machine; figures in the README):

  python tools/aot.py --config experiments/qwen3_8b.py --topology v5p-8 --stage sft \
      --steps train --search=false
  python tools/aot.py --config experiments/qwen3_8b.py --topology v5p-8 --stage grpo \
      --steps update --search=false --prompt_len=1023   # 1023 + 1024 + 1 tokens a row
"""

from jaxgpt.config import base_config


def get_config(arg=None):
  del arg
  c = base_config()
  c.stage = 'sft'
  m = c.model
  m.family = 'qwen3'              # q/k norms
  m.vocab_size = 151936
  m.d_model = 4096
  m.n_layers = 36
  m.n_heads = 32
  m.n_kv_heads = 8
  m.head_dim = 128
  m.d_ff = 12288
  m.max_seq_len = 40960
  m.rope_theta = 1e6
  m.norm_eps = 1e-6
  m.dtype = 'bfloat16'            # compute; parameters and AdamW moments stay float32
  m.remat = 'full'
  m.vocab_multiple = 128
  c.tokenizer.vocab_size = 151936
  c.tokenizer.path = 'tokenizer.json'  # replaced by DIR's with init_from=hf:DIR
  c.data.seq_len = 4096
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
  t = c.train
  t.batch_size = 64               # rows of 4096 tokens per optimizer step
  t.micro_batches = 4
  t.loss_chunk = 512              # the (rows, 4096, 151936) float32 logits never exist whole
  t.b2 = 0.95
  t.weight_decay = 0.0
  t.log_every = 10
  t.eval_every = 200
  t.sample_every = 1000
  s = c.sft
  s.steps, s.lr, s.warmup_steps = 1000, 1e-5, 50
  g = c.grpo                      # 32 prompts x 8 samples an iteration, 4 minibatches
  g.steps, g.lr, g.warmup_steps = 200, 1e-6, 10
  g.rollout_batch, g.group_size, g.batch_size, g.micro_batches = 256, 8, 64, 4
  g.response_tokens = 1024
  g.frozen_dtype = 'bfloat16'     # the reference model
  c.checkpoint.every_steps = 200
  c.checkpoint.every_minutes = 30.0
  return c
