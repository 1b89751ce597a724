r"""The benchmarks' real-model shape: SmolLM2-135M's architecture (LLaMA-style, d=576, 30
layers, 9 query / 3 key-value heads, FFN 1536, vocabulary 49,152, tied embeddings;
134.5M parameters) with random weights, float32:

  python tools/bench_train.py --config experiments/bench_135m.py --also= --lora_rank=16
  python tools/bench_decode.py --config experiments/bench_135m.py --batch=1,32 \
      --prompt_len=128 --new_tokens=64 --norecompute
  python tools/bench_rlhf.py --config experiments/bench_135m.py --parts=grpo,trl

`:bf16` computes in bfloat16 (float32 weights and sums), as experiments/smollm2_135m.py
trains. Training rows are 8 x 256 tokens with the loss on the last quarter of each row
(a reply after its prompt, config.train.loss_positions); layers are unrolled
(`scan_layers=False`: on XLA:CPU a scanned layer stack copies its saved activations at
every layer, see docs/results.md, "Benchmarks").
"""

from jaxgpt.config import base_config


def get_config(arg=None):
  c = base_config()
  m = c.model
  m.family = 'llama'
  m.vocab_size = c.tokenizer.vocab_size = 49152
  m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.d_ff = 576, 30, 9, 3, 1536
  m.rope_theta, m.tie_embeddings = 1e5, True
  m.max_seq_len = 512          # 128-token prompts + 64 new tokens fit; training rows of 256
  m.scan_layers, m.remat = False, 'none'
  m.dtype = 'bfloat16' if arg == 'bf16' else 'float32'
  c.data.seq_len = 256
  c.train.batch_size = 8
  c.train.loss_positions = 64  # the loss on 64 of each row's 256 positions
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = -1, 1, 1
  g = c.grpo                   # tools/bench_rlhf.py: 8 prompts x 8 samples, 64 new tokens,
  g.rollout_batch, g.group_size, g.batch_size, g.epochs = 64, 8, 32, 1  # 2 minibatches
  g.response_tokens = 64
  return c
