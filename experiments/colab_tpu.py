r"""The whole recipe on one Colab TPU runtime: a 31M-parameter LLaMA-style model.

experiments/tiny.py scaled up for a TPU (v5e-1, or the 8 cores of a v2-8 / v3-8): 8
layers of width 512, a 8,192-piece tokenizer, 256-token rows and 64 of them a step,
bfloat16 compute, data-parallel over every device. experiments/colab_tpu.ipynb runs it:

  python -m jaxgpt.main --config experiments/colab_tpu.py --workdir runs/colab

`get_config('smoke')` is tiny.py's seconds-long smoke variant (the notebook's CPU test).
"""

import importlib.util
import os


def _tiny():
  """experiments/tiny.py (experiments are files, not a package)."""
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'tiny.py')
  spec = importlib.util.spec_from_file_location('experiment_tiny', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg=None):
  c = _tiny().get_config(arg)
  if arg == 'smoke':
    return c
  m = c.model
  m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.d_ff = 512, 8, 8, 4, 1376
  m.vocab_size = c.tokenizer.vocab_size = 8192
  m.max_seq_len = 512
  m.dtype = 'bfloat16'  # compute; parameters and optimizer state stay float32
  c.data.seq_len = 256
  t = c.train
  t.steps, t.batch_size, t.lr, t.warmup_steps = 2000, 64, 1e-3, 100
  t.log_every, t.eval_every, t.sample_every = 50, 500, 1000
  c.checkpoint.every_steps = 500
  c.sft.steps, c.sft.lr = 1000, 3e-4
  c.reward.steps, c.reward.lr, c.reward.batch_size = 600, 3e-4, 32
  c.ppo.rollout_batch, c.ppo.batch_size = 64, 16
  return c
