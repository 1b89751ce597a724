"""Published models in: a Hugging Face directory or a GGUF file -> jaxgpt parameters on a mesh.

Two ways in, one code path:

  python tools/convert_hf.py import --hf DIR --out CKPT_DIR    # a jaxgpt checkpoint, then
  ... --config.checkpoint.init_from=CKPT_DIR                    # any stage starts from it
  ... --config.checkpoint.init_from=hf:DIR                      # or straight from DIR
  ... --config.checkpoint.init_from=gguf:FILE                   # or from a GGUF file (or a
                                                                # name in hf/registry.py)

A `ModelSource` is either kind: config.json as a dict, a tokenizer directory and a
tensor reader under Hugging Face names (`SafetensorsReader`; for a GGUF, `jaxgpt.hf.gguf`
maps its metadata, rebuilds its tokenizer and de-quantises each tensor as it is read).
Either way the published model decides config.model's architecture (`ARCH_FIELDS`, from
its config) and the tokenizer (its own, with jaxgpt's chat tokens added when
config.tokenizer.chat_tokens='add'); `adopt_init_settings` sets them before the config is
validated, says what it changed, and records them in WORKDIR/hf_model.json so the later
stages of the run (reward, ppo: no init_from) build the same model. dtype, scan, remat,
mesh and the rest stay the run's.

Memory. `load_params` reads the weights one tensor at a time and places the
model on the mesh one layer at a time: each stacked (L, ...) parameter is created empty in
its sharding and layer i is written into it on device (donated, so no second copy). A host
holds one layer of host arrays at a time, and every device receives only its shard
(`jax.make_array_from_callback`); a file's memory map lives for one tensor's read.
"""

from __future__ import annotations

import functools
import json
import os
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxgpt import sharding
from jaxgpt import config as config_lib
from jaxgpt import model as model_lib
from jaxgpt.data.tokenizer import hf_tokenizer
from jaxgpt.hf import gguf as gguf_lib
from jaxgpt.hf import registry
from jaxgpt.hf import weights as hf
from jaxgpt.model import families
from jaxgpt.train import checkpoint as ckpt_lib

HF_PREFIX = 'hf:'
GGUF_PREFIX = 'gguf:'
IMPORT_RECORD = 'hf_import.json'   # in an imported checkpoint's directory
WORKDIR_RECORD = 'hf_model.json'   # in a run's workdir started from one
# config.model fields a published model decides (its family's switches made explicit);
# the rest (dtypes, scan, remat) are the run's.
ARCH_FIELDS = hf.ARCH_FIELDS
# What every record has; records written before the families were switches lack the rest,
# which then keep the defaults those models were built with.
_RECORD_FIELDS = ARCH_FIELDS[:ARCH_FIELDS.index('tie_embeddings') + 1]


def read_config_json(hf_dir: str) -> dict:
  path = os.path.join(hf_dir, 'config.json')
  if not os.path.isdir(hf_dir):
    raise config_lib.ConfigError(f'Hugging Face model directory {hf_dir} does not exist.')
  if not os.path.exists(path):
    raise config_lib.ConfigError(f'{hf_dir} has no config.json: not a Hugging Face model '
                                 'directory.')
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except ValueError as e:
    raise hf.ConversionError(f'{path}: not valid JSON ({e}).') from e


def is_published(spec: str) -> bool:
  """Whether config.checkpoint.init_from names a published model ('hf:DIR', 'gguf:...')."""
  return spec.startswith((HF_PREFIX, GGUF_PREFIX))


class ModelSource:
  """A published model, opened once: a Hugging Face directory (config.json, safetensors,
  tokenizer files) or a GGUF file (`jaxgpt.hf.gguf`)."""

  def __init__(self, path: str, *, gguf: bool = False):
    self.path = os.fspath(path)
    self.gguf = gguf_lib.GGUFModel(self.path) if gguf else None

  @classmethod
  def of(cls, source) -> 'ModelSource':
    """`source` itself, or a Hugging Face directory given as a path."""
    return source if isinstance(source, ModelSource) else cls(source)

  @classmethod
  def from_spec(cls, spec: str) -> 'ModelSource':
    """'hf:DIR', or 'gguf:FILE' / 'gguf:NAME' (a model of `registry.MODELS`, fetched on
    first use)."""
    if spec.startswith(GGUF_PREFIX):
      return cls(registry.resolve(spec[len(GGUF_PREFIX):]), gguf=True)
    if spec.startswith(HF_PREFIX):
      return cls(spec[len(HF_PREFIX):])
    raise ValueError(f'{spec!r} names no published model (hf:DIR or gguf:FILE).')

  def hf_config(self) -> dict:
    return self.gguf.hf_config if self.gguf else read_config_json(self.path)

  def model_fields(self) -> dict:
    """config.model's `ARCH_FIELDS`; refuses, naming the setting, what jaxgpt lacks."""
    try:
      return hf.model_config_from_hf(self.hf_config())
    except hf.ConversionError as e:
      if self.gguf:  # the setting came from the file's metadata: name the file
        raise hf.ConversionError(f'{self.path} (its GGUF metadata as config.json): {e}') from e
      raise

  def tokenizer_dir(self, out_dir: str) -> str:
    """The directory its tokenizer loads from: a GGUF's is rebuilt into `out_dir` first."""
    return self.gguf.write_tokenizer(out_dir) if self.gguf else self.path

  def weights(self):
    """An `hf.Read` of its tensors under Hugging Face names."""
    if self.gguf:
      return self.gguf.weights()
    from jaxgpt.hf import safetensors_io  # pylint: disable=import-outside-toplevel
    return safetensors_io.SafetensorsReader(self.path)


def prepare_tokenizer(hf_dir: str, out_dir: str, chat_tokens: str, chat_template: str = 'model'):
  """(tokenizer, added token strings): DIR's tokenizer, with the jaxgpt tokens its chat
  format needs (`hf_tokenizer.needed_chat_tokens`: with the model's own template only the
  reward model's `<|reward|>`) added when missing (chat_tokens='add') or required
  ('require'), written to `out_dir` with the model's chat template and stop ids."""
  if chat_tokens not in ('add', 'require'):
    raise config_lib.ConfigError(
        f"config.tokenizer.chat_tokens={chat_tokens!r} must be one of ('add', 'require').")
  tok = hf_tokenizer.load(hf_dir, chat_template=chat_template)
  added = []
  if chat_tokens == 'add':
    tok, added = hf_tokenizer.with_chat_tokens(tok)
  elif hf_tokenizer.missing_chat_tokens(tok):
    raise config_lib.ConfigError(
        f"the tokenizer of {hf_dir} lacks {hf_tokenizer.missing_chat_tokens(tok)}, which the "
        "chat and reward stages need; set config.tokenizer.chat_tokens='add'.")
  hf_tokenizer.save(tok, out_dir, source_dir=hf_dir)
  return hf_tokenizer.load(out_dir, chat_template=chat_template), added


def _grown_vocab(fields: dict, hf_dir: str, tokenizer_size: int, added: list[str]) -> dict:
  """ARCH_FIELDS of DIR's model with the vocabulary grown by the added tokens."""
  fields = dict(fields)
  rows = fields['vocab_size']
  if added:
    before = tokenizer_size - len(added)
    if before != rows:
      raise config_lib.ConfigError(
          f'{hf_dir}: the tokenizer has {before} tokens but the model {rows} embedding rows, '
          f'so the added chat tokens {added} would take rows the model trained for other '
          "ids; set config.tokenizer.chat_tokens='require' and use a tokenizer that has them.")
    fields['vocab_size'] = tokenizer_size
  elif tokenizer_size > rows:
    raise config_lib.ConfigError(f'{hf_dir}: the tokenizer has {tokenizer_size} tokens but the '
                                 f'model only {rows} embedding rows.')
  return fields


def _apply(cfg, fields: dict, tokenizer_path: str, tokenizer_size: int, source: str) -> None:
  # A switch the config left to its family is no change the user would want named.
  changed = [f'{k}={v!r}' for k, v in fields.items() if cfg.model[k] != v
             and not (k in families.BASE and cfg.model[k] in (None, ''))]
  for k, v in fields.items():
    cfg.model[k] = v
  cfg.tokenizer.path = tokenizer_path
  cfg.tokenizer.vocab_size = tokenizer_size
  cfg.data.seq_len = min(cfg.data.seq_len, cfg.model.max_seq_len)
  if changed:
    print(f'[hf] config.model from {source}: {", ".join(changed)}; tokenizer {tokenizer_path}',
          flush=True)


def adopt_hf_model(cfg, source, tokenizer_dir: str) -> list[str]:
  """Sets config.model's architecture and config.tokenizer from a published model (a
  `ModelSource`, or a Hugging Face directory), writing its tokenizer (chat tokens added per
  config) to `tokenizer_dir`; returns the added tokens."""
  source = ModelSource.of(source)
  fields = source.model_fields()  # refusals come first
  tok, added = prepare_tokenizer(source.tokenizer_dir(tokenizer_dir), tokenizer_dir,
                                 cfg.tokenizer.chat_tokens, cfg.tokenizer.chat_template)
  _apply(cfg, _grown_vocab(fields, source.path, tok.vocab_size, added), tok.path,
         tok.vocab_size, source.path)
  return added


def adopt_init_settings(cfg, workdir: str) -> None:
  """Before validation: with config.checkpoint.init_from 'hf:DIR', 'gguf:FILE' (or a known
  model's name) or a checkpoint written by `convert_hf.py import`, the model's architecture
  and tokenizer come from there. They are
  recorded in WORKDIR/hf_model.json, so the later stages of the same run (no init_from)
  build the same model."""
  src = cfg.checkpoint.init_from or cfg.checkpoint.base
  workdir_record = os.path.join(workdir, WORKDIR_RECORD)
  if is_published(src):
    adopt_hf_model(cfg, ModelSource.from_spec(src), os.path.join(workdir, 'hf_tokenizer'))
  elif src and os.path.exists(os.path.join(src, IMPORT_RECORD)):
    _apply_record(cfg, _read_record(os.path.join(src, IMPORT_RECORD)), src)
  elif not src and os.path.exists(workdir_record):
    _apply_record(cfg, _read_record(workdir_record), workdir_record)
    return
  else:
    return
  record = {'source': src, 'model': {k: cfg.model[k] for k in ARCH_FIELDS},
            'vocab_multiple': cfg.model.vocab_multiple, 'tokenizer': cfg.tokenizer.path,
            'tokenizer_vocab_size': cfg.tokenizer.vocab_size}
  os.makedirs(workdir, exist_ok=True)
  tmp = f'{workdir_record}.tmp{os.getpid()}'
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(record, f, indent=1)
  os.replace(tmp, workdir_record)  # atomic: every process writes the same record


def _read_record(path: str) -> dict:
  try:
    with open(path, encoding='utf-8') as f:
      record = json.load(f)
    record['model'] = {k: record['model'][k] for k in ARCH_FIELDS
                       if k in _RECORD_FIELDS or k in record['model']}
    return record
  except (ValueError, KeyError, TypeError) as e:
    raise config_lib.ConfigError(f'{path}: not a jaxgpt record of an imported model ({e}).') \
        from e


def _apply_record(cfg, record: dict, source: str) -> None:
  _apply(cfg, record['model'], record['tokenizer'], int(record['tokenizer_vocab_size']), source)
  cfg.model.vocab_multiple = int(record['vocab_multiple'])  # the checkpoint's row count


# -- parameters ------------------------------------------------------------------------------


def _paths(tree, prefix=()):
  if isinstance(tree, dict):
    for k, v in tree.items():
      yield from _paths(v, prefix + (k,))
  else:
    yield prefix, tree


def _at(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def _place(x: np.ndarray, sh: NamedSharding) -> jax.Array:
  """A host array onto the mesh: each device receives only its own shard."""
  return jax.make_array_from_callback(x.shape, sh, lambda index: x[index])


@functools.lru_cache(maxsize=64)
def _layer_writer(stack_sharding: NamedSharding):
  """Jitted (stack, layer, i) -> stack with layer i replaced, the stack donated."""
  return jax.jit(lambda stack, x, i: jax.lax.dynamic_update_index_in_dim(stack, x, i, 0),
                 donate_argnums=0, out_shardings=stack_sharding)


def _empty(leaf, sh: NamedSharding) -> jax.Array:
  return jax.jit(lambda: jnp.zeros(leaf.shape, leaf.dtype), out_shardings=sh)()


def load_params(source, mesh, mcfg, *, skip=()) -> dict:
  """jaxgpt parameters of `mcfg` (minus the top-level entries in `skip`, e.g. a new
  'scalar_head') from a published model (a `ModelSource`, or a Hugging Face directory), in
  their shardings on `mesh`. Fails naming the file and tensor on a missing, misshapen,
  truncated or corrupted tensor, and on a tensor the model has no place for."""
  source = ModelSource.of(source)
  reader, hf_dir = source.weights(), source.path
  _, abstract, logical = model_lib.abstract_model(mcfg)
  shardings = sharding.param_shardings(abstract, logical, mesh, mcfg.rules)
  if 'scalar_head' in abstract and 'scalar_head' not in skip:
    raise hf.ConversionError(f'{hf_dir}: a Hugging Face causal LM has no scalar head; start '
                             'it fresh.')
  dtype = np.dtype(mcfg.param_dtype)
  params: dict = {}
  for path, x in hf.globals_from_hf(reader, mcfg, has_key=reader.__contains__):
    hf.set_path(params, path, _place(x.astype(dtype, copy=False), _at(shardings, path)))
    del x  # before the next read
  if not mcfg.lm_head and 'lm_head.weight' in reader:
    reader.used.add('lm_head.weight')  # a reward model's trunk leaves the LM head out
  stacks = {path: _empty(leaf, _at(shardings['blocks'], path))
            for path, leaf in _paths(abstract['blocks'])}
  for i in range(mcfg.n_layers):
    layer = hf.layer_from_hf(reader, mcfg, i)  # the one layer of host arrays
    for path in list(layer):
      stack_sh = _at(shardings['blocks'], path)
      layer_sh = NamedSharding(mesh, P(*tuple(stack_sh.spec)[1:]))
      x = _place(layer.pop(path).astype(dtype, copy=False), layer_sh)
      stacks[path] = _layer_writer(stack_sh)(stacks[path], x, np.int32(i))
    del layer, x
  reader.check_all_used()
  for path, x in stacks.items():
    hf.set_path(params, ('blocks',) + path, x)
  return params


# -- a jaxgpt checkpoint ---------------------------------------------------------------------


def peak_rss_bytes() -> int:
  """Peak resident memory of this process so far (Linux reports KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_bytes() -> int:
  """Resident memory of this process now (0 where /proc is missing)."""
  try:
    with open('/proc/self/statm', encoding='ascii') as f:
      return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
  except OSError:
    return 0


def import_checkpoint(source, out_dir: str, *, mesh: dict[str, int] | None = None,
                      param_dtype: str = 'float32', vocab_multiple: int = 1,
                      chat_tokens: str = 'add', chat_template: str = 'model') -> dict:
  """Writes a published model (a `ModelSource`, or a Hugging Face directory) as a jaxgpt
  checkpoint (step 0, {'params'}) in `out_dir`, its tokenizer in out_dir/tokenizer and what
  a run needs to start from it in out_dir/hf_import.json; returns that record (with the
  time taken and the peak host memory)."""
  start = time.perf_counter()
  source = ModelSource.of(source)
  out_dir = os.path.abspath(out_dir)
  if os.path.isdir(out_dir) and os.listdir(out_dir):
    raise config_lib.ConfigError(f'--out {out_dir} exists and is not empty; give a new '
                                 'directory.')
  cfg = config_lib.base_config()
  cfg.tokenizer.chat_tokens = chat_tokens
  cfg.tokenizer.chat_template = chat_template
  added = adopt_hf_model(cfg, source, os.path.join(out_dir, 'tokenizer'))
  cfg.model.param_dtype = param_dtype
  cfg.model.vocab_multiple = vocab_multiple
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 1, -1, 1
  for axis, size in (mesh or {}).items():
    cfg.mesh[axis] = int(size)
  device_mesh = sharding.make_mesh(cfg)
  mcfg = model_lib.ModelConfig.from_config(cfg)
  rss_before, load_start = rss_bytes(), time.perf_counter()
  params = load_params(source, device_mesh, mcfg)
  jax.block_until_ready(params)
  load_seconds, peak_after_load = time.perf_counter() - load_start, peak_rss_bytes()
  n_params = model_lib.count_params(params)
  record = {
      'hf_source': os.path.abspath(source.path), 'format': 'gguf' if source.gguf else 'hf',
      'model': {k: cfg.model[k] for k in ARCH_FIELDS}, 'vocab_multiple': vocab_multiple,
      'param_dtype': param_dtype, 'tokenizer': cfg.tokenizer.path,
      'tokenizer_vocab_size': cfg.tokenizer.vocab_size, 'added_tokens': added,
      'n_params': n_params, 'mesh': dict(device_mesh.shape),
      'param_bytes': sum(x.nbytes for x in jax.tree.leaves(params)),
      # Host memory: before reading any weight, the peak while reading and placing them,
      # and the peak of the whole import (the checkpoint save included).
      'rss_before_load_bytes': rss_before, 'peak_rss_load_bytes': peak_after_load,
      'load_seconds': round(load_seconds, 2)}
  ckpt = ckpt_lib.Checkpointer(out_dir, async_save=False)
  try:
    ckpt.save(0, {'params': params},
              meta={'stage': 'import', 'step': 0, 'tokenizer': cfg.tokenizer.path,
                    'hf_source': record['hf_source'], 'config': cfg.to_json_best_effort()})
  finally:
    ckpt.close()
  record['seconds'] = round(time.perf_counter() - start, 2)
  record['peak_rss_bytes'] = peak_rss_bytes()
  if jax.process_index() == 0:
    with open(os.path.join(out_dir, IMPORT_RECORD), 'w', encoding='utf-8') as f:
      json.dump(record, f, indent=1)
  return record
