r"""Gemma 3 1B (pt or it; Gemma3ForCausalLM, text only), fine-tuned here: SFT, then GRPO.

The architecture is Gemma 3's: width 1152, 26 layers, 4 query heads and 1 key-value head
of width 256, (1 + w) RMSNorms before and after attention and the MLP, RMSNorm on each
head's q and k, embeddings times sqrt(1152), a GELU-tanh gated MLP of 6912, scores scaled
by query_pre_attn_scalar^-1/2 = 256^-1/2, vocabulary 262,144 (tied head); five
sliding-window layers (512 tokens, RoPE base 1e4) for every global one (RoPE base 1e6),
context 32,768. Start from the published weights, a Hugging Face directory:

  python -m jaxgpt.main --config experiments/gemma3_1b.py --workdir /mnt/shared/gemma3 \
      --config.checkpoint.init_from=hf:/path/to/gemma-3-1b-it \
      --config.sft.data=/path/to/conversations.jsonl

`init_from=hf:DIR` takes the architecture and tokenizer from DIR (Gemma 3 270M the same
way); the weights stream in one layer at a time. The 4B-27B checkpoints are multimodal
(model_type 'gemma3') and are refused. Export back with tools/convert_hf.py export.

  python tools/aot.py --config experiments/gemma3_1b.py --topology v5e-8 --stage sft \
      --steps train --search=false                      # 7.0 GiB of 15.8 per chip
  python tools/aot.py --config experiments/gemma3_1b.py --topology v5e-8 --stage grpo \
      --steps update --search=false --prompt_len=1023   # 7.5 GiB
"""

from jaxgpt.config import base_config


def get_config(arg=None):
  del arg
  c = base_config()
  c.stage = 'sft'
  m = c.model
  m.family = 'gemma3'
  m.vocab_size = 262144
  m.d_model = 1152
  m.n_layers = 26
  m.n_heads = 4
  m.n_kv_heads = 1
  m.head_dim = 256
  m.d_ff = 6912
  m.max_seq_len = 32768
  m.rope_theta = 1e6
  m.local_rope_theta = 1e4
  m.sliding_window = 512           # window_pattern: the family's 'SSSSSG'
  m.attn_scale_dim = 256.0
  m.norm_eps = 1e-6
  m.tie_embeddings = True
  m.dtype = 'bfloat16'            # compute; parameters and AdamW moments stay float32
  m.remat = 'full'
  c.tokenizer.vocab_size = 262144
  c.tokenizer.path = 'tokenizer.json'  # replaced by DIR's with init_from=hf:DIR
  c.data.seq_len = 4096
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1  # one key-value head: no tensor axis
  t = c.train
  t.batch_size = 64
  t.micro_batches = 4
  t.loss_chunk = 512              # the (rows, 4096, 262144) float32 logits never exist whole
  t.b2 = 0.95
  t.weight_decay = 0.0
  t.log_every = 10
  t.eval_every = 200
  t.sample_every = 1000
  s = c.sft
  s.steps, s.lr, s.warmup_steps = 1000, 1e-5, 50
  g = c.grpo
  g.steps, g.lr, g.warmup_steps = 200, 1e-6, 10
  g.rollout_batch, g.group_size, g.batch_size, g.micro_batches = 256, 8, 64, 4
  g.response_tokens = 1024
  g.frozen_dtype = 'bfloat16'
  c.checkpoint.every_steps = 200
  c.checkpoint.every_minutes = 30.0
  return c
