r"""GPT-2 small (124M): 12 layers, width 768, 12 heads, context 1024.

Trains on a TFDS dataset prepared once (see README, "Your own corpus"):

  python -m jaxgpt.main --config experiments/gpt2_124m.py --workdir runs/gpt2 \
      --config.data.tfds_name=my_corpus --config.data.tfds_dir=/data/tfds

The tokenizer (50,257 pieces, sentencepiece BPE) is trained from the corpus on first
use unless `--config.tokenizer.path` names one.

`experiments/gpt2_124m.py:colab` fits one 16 GiB chip (Colab's v5e-1): the same 512-row
step in 32 micro-batches of 16 rows. Check a chip first with
`python tools/aot.py --config experiments/gpt2_124m.py:colab --topology v5e-1`.
"""

from jaxgpt.config import base_config


def get_config(arg=None):
  c = base_config()
  m = c.model
  m.family = 'gpt2'
  m.vocab_size = 50304          # 50,257 rounded up so the tensor axis divides it
  m.d_model = 768
  m.n_layers = 12
  m.n_heads = 12
  m.n_kv_heads = 12
  m.d_ff = 3072
  m.max_seq_len = 1024
  m.dtype = 'bfloat16'
  m.remat = 'dots_saveable'
  c.tokenizer.vocab_size = 50257
  c.data.source = 'tfds'
  c.data.tfds_name = 'my_corpus'
  c.data.seq_len = 1024
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = -1, 1, 1
  t = c.train
  t.batch_size = 512            # 0.5M tokens per step, as in GPT-3 small
  t.micro_batches = 8
  t.loss_chunk = 512            # the (rows, 1024, 50304) float32 logits never exist whole
  t.steps = 20000
  t.lr = 6e-4
  t.min_lr_ratio = 0.1
  t.warmup_steps = 700
  t.b2 = 0.95
  t.weight_decay = 0.1
  t.log_every = 50
  t.eval_every = 1000
  t.sample_every = 2000
  c.checkpoint.every_steps = 1000
  if arg == 'colab':
    t.micro_batches = 32        # 16 rows at a time: 60% of a v5e chip's 15.75 GiB
  return c
