"""GGUF files (llama.cpp's format) in: one file -> what a Hugging Face directory gives.

    model = GGUFModel(path)               # parses the header once, checks every tensor
    model.hf_config                       # config.json as a dict (model_config_from_hf reads it)
    model.write_tokenizer(out_dir)        # tokenizer.json + tokenizer_config.json (gguf_tokenizer)
    read = model.weights()                # hf.Read: de-quantised float32 under HF names

The file is read with the `gguf` package (llama.cpp's own reader, numpy only: no PyTorch,
no transformers). Its tensors stay in the reader's memory map; `weights()(key, shape)`
de-quantises one tensor when it is asked for (`gguf.quants.dequantize`), so
`jaxgpt.hf.importer.load_params` streams a GGUF one layer at a time exactly as it streams
safetensors. What the map touched stays in the page cache, not in the process's own memory.

What llama.cpp changed on the way in, undone here (per architecture, `ARCHS`):
* names: `blk.{i}.attn_q.weight` -> `model.layers.{i}.self_attn.q_proj.weight`, ...;
* q / k rows (LLaMA): llama.cpp's RoPE rotates interleaved pairs (x0, x1), (x2, x3), ...
  while Hugging Face (and jaxgpt) rotate halves (x_j, x_{j+h/2}), so its converter
  reordered each head's rows from [half 0 | half 1] to pairs; `_unpermute` puts them back.
  Qwen 2/3 and Gemma 3 use the rotate-half ("NEOX") layout in llama.cpp too: no reorder.
* Gemma's RMSNorm scales by (1 + w) and llama.cpp stores 1 + w: subtract the 1.
* shapes: GGUF lists dimensions innermost first, so (ne0=in, ne1=out) is HF's (out, in).

A file that is not a GGUF, is truncated, names an architecture or a tensor type jaxgpt does
not handle, or lacks a metadata key is one `ConversionError` naming the file and the key
or tensor.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import numpy as np

import gguf  # the package (llama.cpp's gguf-py), not this module
from jaxgpt.hf import weights as hf
from jaxgpt.hf.weights import ConversionError

Q = gguf.GGMLQuantizationType
# Tensor types jaxgpt de-quantises (what `gguf.quants.dequantize` implements and the tests
# check against transformers); others are refused by name before anything is read.
HANDLED_TYPES = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1,
                 Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)

# GGUF tensor names -> Hugging Face names. Outside the layers:
GLOBAL_NAMES = {'token_embd': 'model.embed_tokens', 'output_norm': 'model.norm',
                'output': 'lm_head'}
# Inside layer i ('blk.{i}.<stem>.weight' -> 'model.layers.{i}.<name>.weight', biases alike):
LLAMA_LAYER = {
    'attn_norm': 'input_layernorm', 'attn_q': 'self_attn.q_proj', 'attn_k': 'self_attn.k_proj',
    'attn_v': 'self_attn.v_proj', 'attn_output': 'self_attn.o_proj',
    'attn_q_norm': 'self_attn.q_norm', 'attn_k_norm': 'self_attn.k_norm',
    'ffn_norm': 'post_attention_layernorm', 'ffn_gate': 'mlp.gate_proj',
    'ffn_up': 'mlp.up_proj', 'ffn_down': 'mlp.down_proj'}
# Gemma 3 norms around both sub-blocks: llama.cpp's ffn_norm is the pre-MLP norm there.
GEMMA3_LAYER = dict(LLAMA_LAYER, post_attention_norm='post_attention_layernorm',
                    ffn_norm='pre_feedforward_layernorm',
                    post_ffw_norm='post_feedforward_layernorm')


@dataclasses.dataclass(frozen=True)
class Arch:
  """How one llama.cpp `general.architecture` maps to a Hugging Face model.

  model_type: config.json's (what `hf.model_config_from_hf` reads). The architecture is
    refused as unsupported while jaxgpt's `hf.MODEL_TYPES` lacks it.
  hf_class: config.json's `architectures` entry (the transformers class).
  permuted_qk: llama.cpp reordered q/k rows for its interleaved RoPE (see module doc).
  norm_offset: subtracted from every '*norm.weight' (Gemma stores 1 + w).
  layer: GGUF stem -> HF name inside a layer.
  config: extra config.json entries (constants llama.cpp keeps in code, not metadata).
  """
  model_type: str
  hf_class: str
  permuted_qk: bool = False
  norm_offset: float = 0.0
  layer: Mapping[str, str] = dataclasses.field(default_factory=lambda: LLAMA_LAYER)
  config: Mapping[str, Any] = dataclasses.field(default_factory=lambda: {'hidden_act': 'silu'})


ARCHS = {
    'llama': Arch('llama', 'LlamaForCausalLM', permuted_qk=True),  # also Mistral, SmolLM
    'qwen2': Arch('qwen2', 'Qwen2ForCausalLM'),  # q/k/v biases: 'blk.{i}.attn_q.bias', ...
    'qwen3': Arch('qwen3', 'Qwen3ForCausalLM'),  # q/k RMSNorm: attn_q_norm / attn_k_norm
    # Gemma 3 (text): norms stored as 1 + w, q/k not reordered. Five sliding-window layers
    # (RoPE base 10000) to one global layer and the GELU-tanh MLP are constants in
    # llama.cpp's code, not metadata; the query scaling is set in _hf_config.
    'gemma3': Arch('gemma3_text', 'Gemma3ForCausalLM', norm_offset=1.0, layer=GEMMA3_LAYER,
                   config={'hidden_activation': 'gelu_pytorch_tanh', 'sliding_window_pattern': 6,
                           'rope_local_base_freq': 10000.0}),
}


def _shortest(x: float) -> float:
  """A float32 metadata value as the shortest decimal that rounds to it (1e-05, not
  9.99999974e-06): what the model's own config.json said before conversion."""
  return float(str(np.float32(x)))


class _CheckedReader(gguf.GGUFReader):
  """`gguf.GGUFReader` that names the tensor when one is of an unknown type or runs past
  the end of the file (the package's own errors name neither)."""

  def __init__(self, path: str):
    self.where = path
    super().__init__(path)

  def _build_tensors(self, start_offs, fields):
    size = len(self.data)
    for field in fields:
      if len(field.parts) != 6:  # not the layout this check knows: leave it to the package
        break
      _, name_bytes, _, dims, raw_type, offset = field.parts
      name = bytes(name_bytes).decode('utf-8', 'replace')
      try:
        qtype = Q(int(raw_type[0]))
      except ValueError:
        raise ConversionError(
            f"{self.where}: tensor '{name}' has ggml type {int(raw_type[0])}, which the gguf "
            f'package {_gguf_version()} does not know; convert the model with one of '
            f'{_type_names(HANDLED_TYPES)}.') from None
      block, type_bytes = gguf.GGML_QUANT_SIZES[qtype]
      n = int(np.prod(dims.astype(np.int64)))
      end = int(start_offs) + int(offset[0]) + n // block * type_bytes
      if n % block:
        raise ConversionError(f"{self.where}: tensor '{name}' ({qtype.name}) has {n} values, "
                              f'not a multiple of its block of {block}: the file is damaged.')
      if end > size:
        raise ConversionError(
            f"{self.where}: truncated: tensor '{name}' ends at byte {end:,} but the file has "
            f'{size:,} bytes; download or copy it again.')
    super()._build_tensors(start_offs, fields)


def _gguf_version() -> str:
  try:
    from importlib.metadata import version  # pylint: disable=import-outside-toplevel
    return version('gguf')
  except Exception:  # pylint: disable=broad-except
    return '(unknown version)'


def _type_names(types) -> str:
  return ', '.join(t.name for t in types)


def open_reader(path: str) -> gguf.GGUFReader:
  """The parsed header of a GGUF file; one line naming the file when it is not one."""
  path = os.path.abspath(path)
  if not os.path.isfile(path):
    raise ConversionError(f'GGUF file {path} does not exist.')
  with open(path, 'rb') as f:
    magic = f.read(4)
  if magic != b'GGUF':
    raise ConversionError(f'{path}: not a GGUF file (it does not begin with the bytes "GGUF").')
  try:
    return _CheckedReader(path)
  except ConversionError:
    raise
  except (ValueError, IndexError, KeyError, TypeError, OverflowError, UnicodeDecodeError) as e:
    raise ConversionError(f'{path}: not a readable GGUF file ({type(e).__name__}: {e}); it may '
                          'be truncated or damaged: copy it again.') from e


class GGUFModel:
  """One GGUF file: its metadata, its tensors (checked, not read) and the maps to
  Hugging Face names and config."""

  def __init__(self, path: str):
    self.path = os.path.abspath(path)
    self.reader = open_reader(self.path)
    self.arch_name = self.meta('general.architecture')
    if int(self.meta('split.count', 1)) > 1:
      raise ConversionError(
          f'{self.path}: split.count={self.meta("split.count")}: this is one part of a split '
          "GGUF; merge the parts first (llama.cpp's gguf-split --merge).")
    if self.arch_name not in ARCHS or ARCHS[self.arch_name].model_type not in hf.MODEL_TYPES:
      ready = [a for a, spec in ARCHS.items() if spec.model_type in hf.MODEL_TYPES]
      raise ConversionError(
          f"{self.path}: general.architecture='{self.arch_name}' is not supported; jaxgpt reads "
          f'GGUF models of architecture {", ".join(repr(a) for a in ready)}.')
    self.arch = ARCHS[self.arch_name]
    self.tensors = {t.name: t for t in self.reader.tensors}
    for t in self.reader.tensors:
      if t.tensor_type not in HANDLED_TYPES:
        raise ConversionError(
            f"{self.path}: tensor '{t.name}' is {t.tensor_type.name}, a type jaxgpt does not "
            f'de-quantise; re-quantise the model with one of {_type_names(HANDLED_TYPES)}.')
    if 'rope_freqs.weight' in self.tensors:
      raise ConversionError(
          f"{self.path}: tensor 'rope_freqs.weight' holds per-frequency RoPE factors (Llama "
          '3.1-style RoPE scaling), which jaxgpt does not implement.')
    self.hf_names = {self._hf_name(name): name for name in self.tensors}
    self.hf_config = self._hf_config()

  # -- metadata ----------------------------------------------------------------------------

  def meta(self, key: str, default: Any = KeyError) -> Any:
    """A metadata value (str, int, float, bool or a list of them); `default` if absent,
    one line naming the key if absent without a default."""
    field = self.reader.fields.get(key)
    if field is None:
      if default is KeyError:
        raise ConversionError(f"{self.path}: no metadata '{key}'; is it a complete llama.cpp "
                              'GGUF of a language model?')
      return default
    try:
      return field.contents()
    except (ValueError, IndexError, UnicodeDecodeError) as e:
      raise ConversionError(f"{self.path}: metadata '{key}' is unreadable ({e}).") from e

  def arch_meta(self, key: str, default: Any = KeyError) -> Any:
    return self.meta(f'{self.arch_name}.{key}', default)

  def _int(self, key: str, default: Any = KeyError) -> int:
    value = self.arch_meta(key, default)
    if isinstance(value, list):  # per-layer values (some files): fine when all equal
      if len(set(value)) != 1:
        raise ConversionError(f"{self.path}: metadata '{self.arch_name}.{key}' differs per "
                              f'layer ({value[:8]}...); jaxgpt needs one value for every layer.')
      value = value[0]
    try:
      return int(value)
    except (TypeError, ValueError) as e:
      raise ConversionError(f"{self.path}: metadata '{self.arch_name}.{key}'={value!r} is not "
                            'an integer.') from e

  def _hf_config(self) -> dict[str, Any]:
    """config.json of the model (the keys `hf.model_config_from_hf` and transformers read)."""
    d, n = self._int('embedding_length'), self._int('attention.head_count')
    head_dim = self._int('attention.key_length', d // n)
    rotary = self._int('rope.dimension_count', head_dim)
    if rotary != head_dim:
      raise ConversionError(
          f"{self.path}: metadata '{self.arch_name}.rope.dimension_count'={rotary} is not the "
          f'head size {head_dim} (partial rotary embeddings); jaxgpt rotates whole heads.')
    if 'token_embd.weight' not in self.tensors:
      raise ConversionError(f"{self.path}: no tensor 'token_embd.weight' (the token embedding).")
    config = {
        'model_type': self.arch.model_type, 'architectures': [self.arch.hf_class],
        'vocab_size': int(self.tensors['token_embd.weight'].shape[1]), 'hidden_size': d,
        'intermediate_size': self._int('feed_forward_length'),
        'num_hidden_layers': self._int('block_count'), 'num_attention_heads': n,
        'num_key_value_heads': self._int('attention.head_count_kv', n), 'head_dim': head_dim,
        'max_position_embeddings': self._int('context_length'),
        'rms_norm_eps': _shortest(self.arch_meta('attention.layer_norm_rms_epsilon')),
        'rope_theta': _shortest(self.arch_meta('rope.freq_base', 10000.0)),
        'tie_word_embeddings': 'output.weight' not in self.tensors, 'torch_dtype': 'float32'}
    scaling = self.arch_meta('rope.scaling.type', 'none')
    if scaling not in ('none', ''):  # model_config_from_hf decides whether jaxgpt has it
      config['rope_scaling'] = {
          'rope_type': scaling, 'factor': _shortest(self.arch_meta('rope.scaling.factor', 1.0)),
          'original_max_position_embeddings': self._int('rope.scaling.original_context_length',
                                                        config['max_position_embeddings'])}
    if self.arch.model_type == 'llama':
      config['attention_bias'] = 'blk.0.attn_q.bias' in self.tensors
      config['mlp_bias'] = 'blk.0.ffn_up.bias' in self.tensors
    window = self.arch_meta('attention.sliding_window', None)
    if window is not None:
      config['sliding_window'] = int(window)
    if self.arch.model_type == 'gemma3_text':  # llama.cpp scales queries by 1/sqrt(head_dim),
      # except Gemma 3 27B (62 layers): 1/sqrt(d / heads)
      config['query_pre_attn_scalar'] = d // n if config['num_hidden_layers'] == 62 else head_dim
    config.update(self.arch.config)
    for name, key in (('bos', 'bos_token_id'), ('eos', 'eos_token_id'),
                      ('padding', 'pad_token_id')):
      value = self.meta(f'tokenizer.ggml.{name}_token_id', None)
      if value is not None:
        config[key] = int(value)
    return config

  # -- tensors -----------------------------------------------------------------------------

  def _hf_name(self, name: str) -> str:
    """The Hugging Face name of a GGUF tensor; a name the table lacks stays as it is (and
    `check_all_used` then names it)."""
    parts = name.split('.')
    if len(parts) == 2 and parts[0] in GLOBAL_NAMES:
      return f'{GLOBAL_NAMES[parts[0]]}.{parts[1]}'
    if len(parts) == 4 and parts[0] == 'blk' and parts[2] in self.arch.layer:
      return f'model.layers.{parts[1]}.{self.arch.layer[parts[2]]}.{parts[3]}'
    return name

  def hf_shape(self, hf_name: str) -> tuple[int, ...]:
    return tuple(int(s) for s in reversed(self.tensors[self.hf_names[hf_name]].shape))

  def weights(self) -> 'GGUFWeights':
    return GGUFWeights(self)

  def write_tokenizer(self, out_dir: str) -> str:
    """Writes the file's tokenizer as a Hugging Face tokenizer directory; returns it."""
    from jaxgpt.hf import gguf_tokenizer  # pylint: disable=import-outside-toplevel
    return gguf_tokenizer.write(self, out_dir)


def _unpermute(x: np.ndarray, n_heads: int) -> np.ndarray:
  """llama.cpp's q/k row order (pairs per head) -> Hugging Face's (halves per head), for a
  weight (rows, in) or a bias (rows,)."""
  rows = x.shape[0]
  half = rows // n_heads // 2
  return x.reshape(n_heads, half, 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


class GGUFWeights:
  """`hf.Read` over a GGUF file: `read(hf_key, shape)` -> that tensor de-quantised to float32,
  in Hugging Face's layout; `used` / `check_all_used` as `SafetensorsReader`."""

  def __init__(self, model: GGUFModel):
    self.model = model
    self.used: set[str] = set()

  def keys(self):
    return self.model.hf_names.keys()

  def __contains__(self, key):
    return key in self.model.hf_names

  def __call__(self, key: str, shape) -> np.ndarray:
    m = self.model
    if key not in m.hf_names:
      raise ConversionError(f"{m.path}: no tensor for '{key}' (GGUF names: "
                            f"{sorted(m.tensors)[:6]}...); is it a {m.arch_name} model of the size "
                            'its metadata says?')
    name = m.hf_names[key]
    tensor = m.tensors[name]
    hf.check_shape(key, m.hf_shape(key), shape, f'{m.path} tensor {name} ->')
    try:
      x = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except (ValueError, NotImplementedError) as e:
      raise ConversionError(f"{m.path}: cannot de-quantise tensor '{name}' "
                            f'({tensor.tensor_type.name}): {e}') from e
    if np.may_share_memory(x, tensor.data):  # F32 comes back as a view of the memory map
      x = x.copy()
    x = x.reshape(m.hf_shape(key))
    if m.arch.permuted_qk and key.endswith(('self_attn.q_proj.weight', 'self_attn.q_proj.bias')):
      x = _unpermute(x, m.hf_config['num_attention_heads'])
    elif m.arch.permuted_qk and key.endswith(('self_attn.k_proj.weight',
                                              'self_attn.k_proj.bias')):
      x = _unpermute(x, m.hf_config['num_key_value_heads'])
    if m.arch.norm_offset and key.endswith('norm.weight'):
      x -= m.arch.norm_offset
    self.used.add(key)
    return x

  def check_all_used(self) -> None:
    hf.check_all_used(self.keys(), self.used, f'{self.model.path}: the jaxgpt model')
