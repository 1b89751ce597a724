r"""The speed benchmark's model: LLaMA-style, d=512, 8 layers, 8 heads, FFN 1344,
vocabulary 8000, float32 (33.1M parameters), as measured in the README's "Speed" section:

  python tools/bench_decode.py --config experiments/bench_33m.py
  python tools/bench_train.py --config experiments/bench_33m.py

Random weights only (no data, no tokenizer): the tools build the model from this config.
"""

from jaxgpt.config import base_config


def get_config(arg=None):
  del arg
  c = base_config()
  m = c.model
  m.family = 'llama'
  m.vocab_size = c.tokenizer.vocab_size = 8000
  m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.d_ff = 512, 8, 8, 8, 1344
  m.max_seq_len = 512          # 32-token prompts + 256 new tokens fit; training rows of 256
  c.data.seq_len = 256
  c.train.batch_size = 8
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = -1, 1, 1
  return c
