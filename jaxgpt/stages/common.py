"""Set-up every stage shares: mesh, model settings, tokenizer, sample printing."""

from __future__ import annotations


import jax
from jax.experimental import multihost_utils

from jaxgpt import model as model_lib
from jaxgpt import sharding
from jaxgpt.data import tokenizer as tokenizer_lib
from jaxgpt.data.pretrain import load_or_train_tokenizer


def mesh_and_model(cfg, *, scalar_head=False):
  mesh = sharding.make_mesh(cfg)
  return mesh, model_lib.ModelConfig.from_config(cfg, scalar_head=scalar_head)


def tokenizer_for(cfg, workdir: str) -> tokenizer_lib.Tokenizer:
  """The run's tokenizer: config.tokenizer.path, or WORKDIR/tokenizer.model
  (trained from the pretraining corpus the first time, by process 0 alone)."""
  if jax.process_count() > 1:
    if jax.process_index() == 0:
      load_or_train_tokenizer(cfg, workdir)
    multihost_utils.sync_global_devices('jaxgpt: tokenizer ready')
  tok = load_or_train_tokenizer(cfg, workdir)
  tokenizer_lib.check_vocab(tok, cfg.model.vocab_size)
  return tok


def process_info() -> dict[str, int]:
  return {'process_index': jax.process_index(), 'process_count': jax.process_count()}


def format_stats(stats: dict) -> str:
  return ', '.join(f'{k} {v:,}' for k, v in stats.items() if isinstance(v, (int, float)))
