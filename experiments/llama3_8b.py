r"""Llama 3.1 8B (Instruct or base), fine-tuned here: SFT, then GRPO, on a TPU slice.

The architecture is Llama 3.1's: width 4096, 32 layers, 32 query / 8 key-value heads, MLP
14336, vocabulary 128,256 (untied head), RoPE base 5e5 with 'llama3' scaling (factor 8 of
an 8192-token pretraining context, to 131,072). Start from the published weights, a
Hugging Face directory (config.json, *.safetensors, tokenizer.json):

  python -m jaxgpt.main --config experiments/llama3_8b.py --workdir /mnt/shared/llama3 \
      --config.checkpoint.init_from=hf:/path/to/Llama-3.1-8B-Instruct \
      --config.sft.data=/path/to/conversations.jsonl
  python -m jaxgpt.main --config experiments/llama3_8b.py --workdir /mnt/shared/llama3 \
      --config.stage=grpo                              # from the SFT model, task checker

`init_from=hf:DIR` takes the architecture and tokenizer from DIR (a Llama 3.2 1B / 3B
directory works the same way: those tie their head); the weights stream in one layer at a
time, each device receiving only its shard. Export back with
`python tools/convert_hf.py export --workdir /mnt/shared/llama3 --stage grpo --out DIR`.

Fit first (compiles for the slice on any machine; figures in the README):

  python tools/aot.py --config experiments/llama3_8b.py --topology v5p-8 --stage sft \
      --steps train --search=false
  python tools/aot.py --config experiments/llama3_8b.py --topology v5p-8 --stage grpo \
      --steps update --search=false --prompt_len=1023   # 1023 + 1024 + 1 tokens a row
"""

from jaxgpt.config import base_config


def get_config(arg=None):
  del arg
  c = base_config()
  c.stage = 'sft'
  m = c.model
  m.family = 'llama'
  m.vocab_size = 128256
  m.d_model = 4096
  m.n_layers = 32
  m.n_heads = 32
  m.n_kv_heads = 8
  m.d_ff = 14336
  m.max_seq_len = 131072
  m.rope_theta = 500000.0
  m.rope_scaling, m.rope_factor = 'llama3', 8.0
  m.rope_low_freq_factor, m.rope_high_freq_factor, m.rope_original_max_len = 1.0, 4.0, 8192
  m.norm_eps = 1e-5
  m.dtype = 'bfloat16'            # compute; parameters and AdamW moments stay float32
  m.remat = 'full'
  m.vocab_multiple = 128
  c.tokenizer.vocab_size = 128256
  c.tokenizer.path = 'tokenizer.json'  # replaced by DIR's with init_from=hf:DIR
  c.data.seq_len = 4096
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
  t = c.train
  t.batch_size = 64               # rows of 4096 tokens per optimizer step
  t.micro_batches = 4
  t.loss_chunk = 512              # the (rows, 4096, 128256) float32 logits never exist whole
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
