r"""LLaMA-7B with the paper's pre-training hyper-parameters, on an FSDP mesh.

Width 4096, 32 layers, 32 heads, MLP 11008, vocabulary 32000, context 2048; AdamW
(beta2 0.95, weight decay 0.1), peak lr 3e-4 with 2000 warm-up steps and cosine decay
to 10%, global-norm clip 1.0, 4M tokens per step. Launch on every host of a pod:

  python -m jaxgpt.main --config experiments/llama_7b.py --workdir /mnt/shared/llama7b \
      --config.tokenizer.path=/path/to/tokenizer.model --config.data.tfds_name=my_corpus

`get_config('v5p-64')`-style arguments are not needed: the mesh puts every device on
'fsdp' unless --config.mesh.* says otherwise.
"""

from jaxgpt.config import base_config


def get_config(arg=None):
  c = base_config()
  m = c.model
  m.family = 'llama'
  m.vocab_size = 32000
  m.d_model = 4096
  m.n_layers = 32
  m.n_heads = 32
  m.n_kv_heads = 32             # LLaMA-1 7B uses full multi-head attention
  m.d_ff = 11008
  m.max_seq_len = 2048
  m.rope_theta = 10000.0
  m.norm_eps = 1e-6
  m.dtype = 'bfloat16'
  m.remat = 'full'
  c.tokenizer.vocab_size = 32000
  c.tokenizer.path = 'tokenizer.model'   # a LLaMA-layout sentencepiece model
  c.data.source = 'tfds'
  c.data.tfds_name = 'my_corpus'
  c.data.seq_len = 2048
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
  t = c.train
  t.batch_size = 2048           # 2048 x 2048 = 4M tokens per step
  t.micro_batches = 1
  t.steps = 250_000             # ~1T tokens
  t.lr = 3e-4
  t.min_lr_ratio = 0.1
  t.warmup_steps = 2000
  t.b1, t.b2, t.eps = 0.9, 0.95, 1e-8
  t.weight_decay = 0.1
  t.clip_norm = 1.0
  t.log_every = 10
  t.eval_every = 1000
  t.sample_every = 5000
  c.checkpoint.every_steps = 1000
  c.checkpoint.every_minutes = 30.0
  return c
