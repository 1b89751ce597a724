"""Hugging Face models out: jaxgpt parameters -> a directory `transformers` loads as is.

  python tools/convert_hf.py export --workdir DIR --stage sft --out HF_DIR

writes safetensors (one file, or shards of at most `max_shard_bytes` with their index),
config.json, generation_config.json and the tokenizer files, so that
`AutoModelForCausalLM.from_pretrained(HF_DIR)` and `AutoTokenizer.from_pretrained(HF_DIR)`
need nothing else. A language model (pretrain, sft, PPO's policy) becomes its family's
`*ForCausalLM` (`LlamaForCausalLM`, `Qwen3ForCausalLM`, `Gemma3ForCausalLM`, ...,
`GPT2LMHeadModel`); the reward model becomes the `*ForSequenceClassification` with one
label, whose score at the last non-pad token (end the input with `<|reward|>`) is the
jaxgpt score.

Tensors leave the devices one layer at a time and are written a file at a time, so a host
holds at most one output file's worth. With the chat tokens in the tokenizer, the tokenizer
gets jaxgpt's chat template and generation stops at `<|end|>` (or `<|endoftext|>`), so
`apply_chat_template(..., add_generation_prompt=True)` + `generate` chats as the
jaxgpt model does.
"""

from __future__ import annotations

import json
import os

import jax
import ml_dtypes
import numpy as np

from jaxgpt.data.tokenizer import hf_tokenizer
from jaxgpt.hf import weights as hf
from jaxgpt.hf.safetensors_io import ShardWriter
from jaxgpt.inference import sampling

DTYPES = {'float32': np.dtype(np.float32), 'bfloat16': np.dtype(ml_dtypes.bfloat16)}


def _at(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def _bos_id(tok) -> int | None:
  config = getattr(tok, 'config', None) or {}
  text = hf_tokenizer.token_text(config.get('bos_token'))
  if text is not None:
    return tok.token_id(text)
  return None


def special_ids(tok) -> dict:
  """bos / eos / pad ids for config.json and generation_config.json."""
  eos = tok.eot_id
  stops = list(sampling.default_stop_ids(tok))
  return {'bos_token_id': _bos_id(tok) if hasattr(tok, 'token_id') else None,
          'eos_token_id': eos, 'pad_token_id': tok.pad_id, 'stop_ids': stops}


def _fold_score_bias(tensors: dict, params, mcfg) -> float:
  """The scalar head's bias, which `*ForSequenceClassification`'s bias-free `score` cannot
  hold: GPT-2 takes it into the final LayerNorm's bias (w . (beta + b w / |w|^2) =
  w . beta + b; that model has no LM head the change could disturb). Returns what is left
  over (an RMSNorm has no bias: the exported scores are ours minus it)."""
  b = float(np.asarray(jax.device_get(params['scalar_head']['bias'])))
  if b == 0.0:
    return 0.0
  if mcfg.norm == 'layernorm':
    w = tensors['score.weight'][0].astype(np.float64)
    key = 'transformer.ln_f.bias'
    tensors[key] = (tensors[key].astype(np.float64) + b * w / (w @ w)).astype(tensors[key].dtype)
    return 0.0
  return b


def export(params, mcfg, tok, out_dir: str, *, head: str = 'lm', dtype: str | None = None,
           max_shard_bytes: int = 2 << 30) -> dict:
  """Writes the Hugging Face directory; returns what it wrote (files, bytes, score bias
  left over)."""
  if jax.process_count() > 1:
    raise ValueError('export runs in one process (it gathers each tensor to this host); run '
                     'tools/convert_hf.py export without --distributed.')
  dtype = dtype or np.dtype(mcfg.param_dtype).name
  if dtype not in DTYPES:
    raise ValueError(f'export dtype {dtype!r} must be one of {tuple(DTYPES)}.')
  out_type = DTYPES[dtype]
  if head == 'score' and 'scalar_head' not in params:
    raise ValueError('export as a sequence classifier needs the reward model (its scalar head).')

  def host(x):
    return np.asarray(jax.device_get(x)).astype(out_type)

  writer = ShardWriter(out_dir, max_shard_bytes)
  tensors = hf.globals_to_hf(lambda path: host(_at(params, path)), mcfg, head=head,
                             tied_copies=False)
  score_bias = _fold_score_bias(tensors, params, mcfg) if head == 'score' else 0.0
  for key, x in tensors.items():
    writer.add(key, x)
  del tensors
  for i in range(mcfg.n_layers):
    layer = hf.layer_to_hf(lambda path: host(_at(params['blocks'], path)[i]), mcfg, i)
    for key, x in layer.items():
      writer.add(key, x)
  files = writer.close()

  ids = special_ids(tok)
  config = hf.hf_config_from_model(
      mcfg, head=head, dtype=dtype,
      special_ids={k: ids[k] for k in ('bos_token_id', 'eos_token_id', 'pad_token_id')})
  if score_bias:
    config['jaxgpt_score_bias'] = score_bias
    print(f'[export] the reward head\'s bias {score_bias:+.6f} has no place in '
          f'{config["architectures"][0]} (its score has no bias): exported scores are jaxgpt '
          'scores minus it (recorded as jaxgpt_score_bias in config.json).', flush=True)
  _write_json(os.path.join(out_dir, 'config.json'), config)
  hf_tokenizer.save(tok, out_dir)  # before generation_config.json, which holds every stop id
  generation = {'bos_token_id': ids['bos_token_id'], 'pad_token_id': ids['pad_token_id'],
                'eos_token_id': ids['stop_ids'] if len(ids['stop_ids']) > 1 else ids['stop_ids'][0]}
  _write_json(os.path.join(out_dir, 'generation_config.json'),
              {k: v for k, v in generation.items() if v is not None})
  return {'files': files, 'bytes': writer.total_bytes, 'score_bias': score_bias,
          'architecture': config['architectures'][0]}


def load_for_export(*, workdir: str | None = None, stage: str | None = None,
                    checkpoint: str | None = None, mesh: dict[str, int] | None = None):
  """(params, mcfg, tokenizer, head) of WORKDIR/<stage>'s newest checkpoint, or of a
  checkpoints directory (`checkpoint`, e.g. one `convert_hf.py import` wrote). The mesh puts
  every device on 'fsdp' (each holds a slice) unless `mesh` overrides axes."""
  from jaxgpt.inference import loading as inference  # pylint: disable=import-outside-toplevel
  overrides = dict({'data': 1, 'fsdp': -1}, **(mesh or {}))
  allowed = inference.GENERATIVE_STAGES + inference.SCORING_STAGES
  loaded = inference.load(workdir, stage, checkpoint=checkpoint, mesh=overrides, allowed=allowed)
  return loaded.params, loaded.mcfg, loaded.tokenizer, 'score' if loaded.stage == 'reward' else 'lm'


def _write_json(path, obj):
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(obj, f, indent=1)
