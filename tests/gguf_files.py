"""Small GGUF files for tests, written with the `gguf` package's writer (llama.cpp's own).

`write_llama(path, model, ...)` stores a transformers LLaMA (or Qwen 2 / 3, Gemma 3) the way
llama.cpp's converter does: llama.cpp tensor names, q/k rows reordered for its interleaved
RoPE (LLaMA), Gemma's norms as 1 + w, norms and biases in F32,
every other tensor in the type `quant` picks. The `gguf` package quantises F16, BF16, Q8_0
and Q4/Q5_0/1 in Python but not the K-quants, so a K-quant (or IQ4_NL) tensor is written as random
blocks of its layout (`random_blocks`) with small f16 scales; both readers de-quantise
those the same way. Vocabularies: `byte_level_vocab` (a 300-token GPT-2 style BPE trained
here) and `sentencepiece_vocab` (a small SentencePiece BPE model with byte fallback). `RandomLlama`
stands in for the transformers model where PyTorch is not wanted.
"""

from __future__ import annotations

import io
import struct
import types

import gguf
import numpy as np

Q = gguf.GGMLQuantizationType
CHAT_TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
                 "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}"
                 "{{ '<|im_start|>assistant\\n' }}{% endif %}")
TEXT = ('The quick brown fox jumps over the lazy dog. What is the capital of France? Paris is '
        'the capital of France, and 2 + 3 = 5. Hello there! The king said to be or not to be. '
        "Don't stop; it's 12:30 and we'll eat. ") * 8
# Byte offsets of the f16 scale fields in one block of each K-quant (llama.cpp's layouts).
_F16_FIELDS = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,),
               Q.IQ4_NL: (0,)}


def byte_level_vocab(size=300) -> dict:
  """A GPT-2 style vocabulary: specials (control), 256 bytes and merges, plus `<think>`
  marked user-defined (the last id)."""
  import tokenizers  # pylint: disable=import-outside-toplevel
  tk = tokenizers.Tokenizer(tokenizers.models.BPE())
  tk.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=size - 1, special_tokens=['<|endoftext|>', '<|im_start|>', '<|im_end|>'],
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tk.train_from_iterator([TEXT], trainer)
  vocab = tk.get_vocab()
  tokens = sorted(vocab, key=vocab.get) + ['<think>']
  types = [3 if t.startswith('<|') else 1 for t in tokens[:-1]] + [4]
  import json  # pylint: disable=import-outside-toplevel
  merges = [m if isinstance(m, str) else ' '.join(m)
            for m in json.loads(tk.to_str())['model']['merges']]
  return {'model': 'gpt2', 'pre': 'default', 'tokens': tokens, 'types': types,
          'merges': merges, 'bos': 1, 'eos': 2, 'unk': 0, 'pad': 2, 'add_bos': False}


def sentencepiece_vocab(size=320) -> dict:
  """A LLaMA-layout SentencePiece BPE vocabulary (<unk> <s> </s>, 256 byte pieces, merges)
  with `<|im_start|>` / `<|im_end|>` control pieces; the trained model rides along."""
  import sentencepiece as spm  # pylint: disable=import-outside-toplevel
  proto = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(TEXT.split('. ')), model_writer=proto, model_type='bpe',
      vocab_size=size, byte_fallback=True, character_coverage=1.0,
      control_symbols=['<|im_start|>', '<|im_end|>'], minloglevel=2)
  sp = spm.SentencePieceProcessor(model_proto=proto.getvalue())
  tokens, scores, types = [], [], []
  for i in range(sp.get_piece_size()):
    tokens.append(sp.id_to_piece(i))
    scores.append(sp.get_score(i))
    types.append(2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i)
                 else 5 if sp.is_unused(i) else 1)
  return {'model': 'llama', 'tokens': tokens, 'scores': scores, 'types': types,
          'bos': sp.bos_id(), 'eos': sp.eos_id(), 'unk': sp.unk_id(), 'add_bos': True,
          'processor': sp}


def random_blocks(rng, qtype, rows: int, cols: int) -> np.ndarray:
  """(rows, bytes) of random `qtype` blocks whose f16 scales are small and finite."""
  block, size = gguf.GGML_QUANT_SIZES[qtype]
  blocks = rng.integers(0, 256, (rows * cols // block, size), dtype=np.uint8)
  for at in _F16_FIELDS[qtype]:
    scale = rng.uniform(2e-4, 1e-3, len(blocks)).astype(np.float16)
    blocks[:, at:at + 2] = scale.view(np.uint8).reshape(-1, 2)
  return blocks.reshape(rows, -1)


def _permute(w, n_heads):
  """Hugging Face q/k rows (halves per head) -> llama.cpp's (pairs per head)."""
  return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
      w.shape)


_LAYER_NAMES = {'input_layernorm': 'attn_norm', 'self_attn.q_proj': 'attn_q',
                'self_attn.k_proj': 'attn_k', 'self_attn.v_proj': 'attn_v',
                'self_attn.o_proj': 'attn_output', 'post_attention_layernorm': 'ffn_norm',
                'mlp.gate_proj': 'ffn_gate', 'mlp.up_proj': 'ffn_up', 'mlp.down_proj': 'ffn_down',
                'self_attn.q_norm': 'attn_q_norm', 'self_attn.k_norm': 'attn_k_norm'}


# Gemma 3 norms around both sub-blocks (llama.cpp's ffn_norm is the pre-MLP norm there).
_GEMMA3_NAMES = dict(_LAYER_NAMES, post_attention_layernorm='post_attention_norm',
                     pre_feedforward_layernorm='ffn_norm',
                     post_feedforward_layernorm='post_ffw_norm')


def gguf_name(hf_name: str, arch: str = 'llama') -> str:
  if hf_name.startswith('model.layers.'):
    _, _, i, rest = hf_name.split('.', 3)
    stem, kind = rest.rsplit('.', 1)
    return f'blk.{i}.{(_GEMMA3_NAMES if arch == "gemma3" else _LAYER_NAMES)[stem]}.{kind}'
  return {'model.embed_tokens.weight': 'token_embd.weight', 'model.norm.weight':
          'output_norm.weight', 'lm_head.weight': 'output.weight'}[hf_name]


def tensor_types(quant: str, name: str):
  """The ggml type `write_llama` stores a tensor in, per `quant`: one type for every
  matrix, 'Q4_K' (K-quant ffn_down rows, Q8_0 elsewhere) or 'mixed'."""
  if name.endswith(('norm.weight', '.bias')):
    return Q.F32
  if quant == 'Q4_K':
    return {'blk.0.ffn_down.weight': Q.Q4_K, 'blk.1.ffn_down.weight': Q.Q6_K}.get(name, Q.Q8_0)
  if quant == 'mixed':
    if name.startswith('blk.') and '.attn_' in name:
      return Q.BF16
    return {'blk.0.ffn_down.weight': Q.Q5_K, 'blk.1.ffn_down.weight': Q.Q3_K,
            'blk.2.ffn_down.weight': Q.Q2_K, 'token_embd.weight': Q.Q8_0}.get(
                name, Q.Q5_0 if 'gate' in name else Q.Q5_1)
  return Q[quant]


class RandomLlama:
  """A stand-in for a tied transformers LLaMA (its config and a state dict of random numpy
  arrays), for tests that need a valid GGUF without PyTorch."""

  def __init__(self, vocab_size: int, seed: int = 0):
    self.config = types.SimpleNamespace(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=4, head_dim=8, max_position_embeddings=128,
        rope_parameters={'rope_theta': 1e4}, rms_norm_eps=1e-6, tie_word_embeddings=True)
    self.seed = seed

  def state_dict(self) -> dict[str, np.ndarray]:
    c, rng = self.config, np.random.default_rng(self.seed)
    d, f, qd, kd = c.hidden_size, c.intermediate_size, 8 * c.head_dim, 4 * c.head_dim
    shapes = {'model.embed_tokens.weight': (c.vocab_size, d), 'model.norm.weight': (d,)}
    for i in range(c.num_hidden_layers):
      p = f'model.layers.{i}.'
      shapes.update({p + 'input_layernorm.weight': (d,), p + 'self_attn.q_proj.weight': (qd, d),
                     p + 'self_attn.k_proj.weight': (kd, d), p + 'self_attn.v_proj.weight': (kd, d),
                     p + 'self_attn.o_proj.weight': (d, qd), p + 'post_attention_layernorm.weight':
                     (d,), p + 'mlp.gate_proj.weight': (f, d), p + 'mlp.up_proj.weight': (f, d),
                     p + 'mlp.down_proj.weight': (d, f)})
    return {k: rng.normal(0, 0.05, s).astype(np.float32) for k, s in shapes.items()}


def write_llama(path, model, vocab: dict, quant: str = 'F32', *, arch: str = 'llama',
                seed: int = 0, extra=None) -> str:
  """Writes transformers LLaMA `model` with tokenizer `vocab` as a GGUF; returns `path`.
  `extra(writer)` may add metadata."""
  c = model.config
  rng = np.random.default_rng(seed)
  w = gguf.GGUFWriter(str(path), arch)
  w.add_name('tiny test llama')
  w.add_block_count(c.num_hidden_layers)
  w.add_context_length(c.max_position_embeddings)
  w.add_embedding_length(c.hidden_size)
  w.add_feed_forward_length(c.intermediate_size)
  w.add_head_count(c.num_attention_heads)
  w.add_head_count_kv(c.num_key_value_heads)
  w.add_rope_dimension_count(c.head_dim)
  w.add_key_length(c.head_dim)
  w.add_value_length(c.head_dim)
  rope = c.rope_parameters
  w.add_rope_freq_base(rope.get('rope_theta') or rope['full_attention']['rope_theta'])
  if getattr(c, 'sliding_window', None):
    w.add_sliding_window(c.sliding_window)
  w.add_layer_norm_rms_eps(c.rms_norm_eps)
  w.add_vocab_size(c.vocab_size)
  w.add_tokenizer_model(vocab['model'])
  if 'pre' in vocab:
    w.add_tokenizer_pre(vocab['pre'])
  w.add_token_list(vocab['tokens'])
  w.add_token_types(vocab['types'])
  if 'merges' in vocab:
    w.add_token_merges(vocab['merges'])
  if 'scores' in vocab:
    w.add_token_scores(vocab['scores'])
  w.add_bos_token_id(vocab['bos'])
  w.add_eos_token_id(vocab['eos'])
  w.add_unk_token_id(vocab['unk'])
  if 'pad' in vocab:
    w.add_pad_token_id(vocab['pad'])
  w.add_add_bos_token(vocab['add_bos'])
  w.add_chat_template(CHAT_TEMPLATE)
  if extra is not None:
    extra(w)
  for hf_name, tensor in model.state_dict().items():
    if hf_name == 'lm_head.weight' and c.tie_word_embeddings:
      continue
    x = tensor.detach().float().numpy() if hasattr(tensor, 'detach') else np.asarray(tensor)
    if arch == 'gemma3' and hf_name.endswith('norm.weight'):
      x = x + 1  # llama.cpp stores Gemma's (1 + w)
    if arch != 'llama':  # llama.cpp reorders q/k rows for LLaMA only
      pass
    elif hf_name.endswith('q_proj.weight'):
      x = _permute(x, c.num_attention_heads)
    elif hf_name.endswith('k_proj.weight'):
      x = _permute(x, c.num_key_value_heads)
    name = gguf_name(hf_name, arch)
    qtype = tensor_types(quant, name)
    if qtype == Q.F32:
      w.add_tensor(name, np.ascontiguousarray(x, np.float32))
    elif qtype in _F16_FIELDS:
      w.add_tensor(name, random_blocks(rng, qtype, *x.shape), raw_dtype=qtype)
    else:
      w.add_tensor(name, gguf.quants.quantize(x, qtype), raw_dtype=qtype)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return str(path)


def set_tensor_type(path, tensor: str, type_id: int) -> None:
  """Overwrites the ggml type id of `tensor` in the file's tensor infos (name, n_dims, dims,
  type, offset)."""
  data = bytearray(open(path, 'rb').read())
  name = tensor.encode()
  at = data.index(struct.pack('<Q', len(name)) + name) + 8 + len(name)
  n_dims = struct.unpack_from('<I', data, at)[0]
  struct.pack_into('<I', data, at + 4 + 8 * n_dims, type_id)
  open(path, 'wb').write(bytes(data))
