"""A Hugging Face tokenizer directory from a GGUF file's tokenizer metadata.

llama.cpp keeps no tokenizer.json: it stores the vocabulary and how to use it under
`tokenizer.ggml.*`. `write(model, out_dir)` rebuilds the tokenizer with the `tokenizers`
library (what `HFTokenizer` and transformers run), by the kind `tokenizer.ggml.model` names:

* 'gpt2': byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM). Vocabulary and merges as stored
  (tokens are spelled in GPT-2's byte alphabet; a normal token that is not is respelled
  from its UTF-8 bytes). Before BPE, text is split the way the vocabulary's own tokenizer
  splits it, by `tokenizer.ggml.pre` (`PRE_SPLITS`: GPT-2's pattern, SmolLM's single
  digits, Llama 3's and Qwen 2's patterns; an unknown name falls back to GPT-2's, with a
  note).
* 'llama': SentencePiece BPE (LLaMA 1/2, Mistral, Gemma). Pieces with scores, spaces as
  '▁', a '▁' in front of the text unless `tokenizer.ggml.add_space_prefix` is false, a
  character the pieces lack as its `<0xNN>` byte pieces. The file has no merges; they follow
  from the scores, as in SentencePiece: (a, b) merges when a + b is a piece, the higher that
  piece's score the earlier.

Token types (`tokenizer.ggml.token_type`): CONTROL and UNKNOWN pieces become special added
tokens (matched whole in text, e.g. `<|im_start|>`), USER_DEFINED ones plain added tokens
(matched whole too), the rest are the model's. Written beside tokenizer.json:
tokenizer_config.json (bos / eos / unk / pad tokens, add_bos_token / add_eos_token, the
chat template `tokenizer.chat_template` as stored, added_tokens_decoder) and
generation_config.json (bos, eos -- with the end-of-turn id when the file names one -- and
pad ids).
"""

from __future__ import annotations

import json
import os

import gguf  # the package
from jaxgpt.data.tokenizer import hf_tokenizer
from jaxgpt.hf.weights import ConversionError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED = (int(gguf.TokenType.NORMAL), int(gguf.TokenType.UNKNOWN),
                                          int(gguf.TokenType.CONTROL),
                                          int(gguf.TokenType.USER_DEFINED))

_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre -> how text is split before byte-level BPE: None (GPT-2's pattern),
# 'digits' (every digit alone, then GPT-2's pattern) or a regex (then no GPT-2 pattern).
PRE_SPLITS = {'default': None, 'gpt2': None, 'smollm': 'digits', 'llama-bpe': _LLAMA3_SPLIT,
              'llama3': _LLAMA3_SPLIT, 'llama-v3': _LLAMA3_SPLIT, 'qwen2': _QWEN2_SPLIT}
# Vocabularies whose own tokenizer.json uses a whole word found in the vocabulary as is.
_IGNORE_MERGES = ('llama-bpe', 'llama3', 'llama-v3')


def byte_alphabet() -> list[str]:
  """GPT-2's spelling of each byte 0..255: printable Latin-1 bytes stand for themselves,
  the others take the code points from 256 up, in byte order."""
  printable = {*range(0x21, 0x7f), *range(0xa1, 0xad), *range(0xae, 0x100)}
  spelled, extra = [], 0
  for b in range(256):
    if b in printable:
      spelled.append(chr(b))
    else:
      spelled.append(chr(256 + extra))
      extra += 1
  return spelled


def sentencepiece_merges(pieces: list[str], scores: list[float]) -> list[tuple[str, str]]:
  """BPE merges that reproduce SentencePiece's choice: every split (a, b) of a piece into
  two pieces, ordered by the piece's score (highest first); ties: longer a, longer b, then
  the piece's id."""
  ids = {p: i for i, p in enumerate(pieces)}
  ranked = []
  for i, piece in enumerate(pieces):
    for cut in range(1, len(piece)):
      a, b = piece[:cut], piece[cut:]
      if a in ids and b in ids:
        ranked.append((-scores[i], -len(a), -len(b), i, a, b))
  ranked.sort()
  return [(a, b) for *_, a, b in ranked]


def _unique(tokens: list[str]) -> list[str]:
  """A vocabulary can repeat a string (unused slots); a tokenizer maps each string to one
  id, so a repeat gets a placeholder name (text never encodes to it)."""
  seen, out = set(), []
  for i, t in enumerate(tokens):
    if t in seen:
      t = f'<gguf_duplicate_{i}>'
    seen.add(t)
    out.append(t)
  return out


def _byte_level(model, tokens, types, pre: str):
  import tokenizers  # pylint: disable=import-outside-toplevel
  from tokenizers import pre_tokenizers  # pylint: disable=import-outside-toplevel
  alphabet = byte_alphabet()
  letters = set(alphabet)
  tokens = [''.join(alphabet[b] for b in t.encode('utf-8'))
            if ty == NORMAL and not set(t) <= letters else t for t, ty in zip(tokens, types)]
  tokens = _unique(tokens)
  merges = []
  for k, m in enumerate(model.meta('tokenizer.ggml.merges')):
    pair = m.split(' ', 1)
    if len(pair) != 2:
      raise ConversionError(f"{model.path}: metadata 'tokenizer.ggml.merges'[{k}]={m!r} is "
                            "not two tokens joined by ' '.")
    merges.append(tuple(pair))
  if pre not in PRE_SPLITS:
    print(f"[gguf] {model.path}: tokenizer.ggml.pre='{pre}' is not one jaxgpt knows "
          f'({", ".join(PRE_SPLITS)}); text is split as GPT-2 splits it.', flush=True)
  split = PRE_SPLITS.get(pre)
  bpe = tokenizers.models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                              fuse_unk=False, byte_fallback=False,
                              ignore_merges=pre in _IGNORE_MERGES)
  tk = tokenizers.Tokenizer(bpe)
  if split is None:
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  elif split == 'digits':
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False)])
  else:
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(split), behavior='isolated'),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tk.decoder = tokenizers.decoders.ByteLevel()
  return tk, tokens


def _sentencepiece(model, tokens, types, add_prefix: bool):
  import tokenizers  # pylint: disable=import-outside-toplevel
  from tokenizers import decoders  # pylint: disable=import-outside-toplevel
  scores = [float(s) for s in model.meta('tokenizer.ggml.scores')]
  if len(scores) != len(tokens):
    raise ConversionError(f"{model.path}: metadata 'tokenizer.ggml.scores' has {len(scores)} "
                          f'entries for {len(tokens)} tokens.')
  # A normal piece spelled with real spaces is the '▁' piece SentencePiece would look up.
  tokens = _unique([t.replace(' ', '▁') if ty == NORMAL else t for t, ty in zip(tokens, types)])
  bpe = tokenizers.models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                              merges=sentencepiece_merges(tokens, scores),
                              unk_token=_token(model, tokens, 'unknown_token_id')[1],
                              fuse_unk=True, byte_fallback=True)
  tk = tokenizers.Tokenizer(bpe)
  tk.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace(
      replacement='▁', prepend_scheme='first' if add_prefix else 'never', split=False)
  steps = [decoders.Replace('▁', ' '), decoders.ByteFallback(), decoders.Fuse()]
  tk.decoder = decoders.Sequence(steps + ([decoders.Strip(' ', 1, 0)] if add_prefix else []))
  return tk, tokens


def _token(model, tokens, key: str) -> tuple[int | None, str | None]:
  idx = model.meta(f'tokenizer.ggml.{key}', None)
  if idx is None:
    return None, None
  if not 0 <= int(idx) < len(tokens):
    raise ConversionError(f"{model.path}: metadata 'tokenizer.ggml.{key}'={idx} is not a token "
                          f'id (the vocabulary has {len(tokens)}).')
  return int(idx), tokens[int(idx)]


def write(model, out_dir: str) -> str:
  """Writes `model`'s (a `jaxgpt.hf.gguf.GGUFModel`) tokenizer to `out_dir` as a Hugging
  Face tokenizer directory (`HFTokenizer.from_dir` and transformers' AutoTokenizer read it);
  returns out_dir."""
  import tokenizers  # pylint: disable=import-outside-toplevel
  kind = model.meta('tokenizer.ggml.model')
  tokens = model.meta('tokenizer.ggml.tokens')
  types = [int(t) for t in model.meta('tokenizer.ggml.token_type', [NORMAL] * len(tokens))]
  if len(types) != len(tokens):
    raise ConversionError(f"{model.path}: metadata 'tokenizer.ggml.token_type' has {len(types)} "
                          f'entries for {len(tokens)} tokens.')
  try:
    if kind == 'gpt2':
      tk, tokens = _byte_level(model, tokens, types, model.meta('tokenizer.ggml.pre', 'default'))
    elif kind == 'llama':
      tk, tokens = _sentencepiece(model, tokens, types,
                                  bool(model.meta('tokenizer.ggml.add_space_prefix', True)))
    else:
      raise ConversionError(
          f"{model.path}: metadata tokenizer.ggml.model='{kind}': jaxgpt rebuilds 'gpt2' "
          "(byte-level BPE) and 'llama' (SentencePiece) tokenizers.")
  except ConversionError:
    raise
  except Exception as e:  # tokenizers raises its own Exception type on a bad vocabulary
    raise ConversionError(f"{model.path}: the tokenizer in its metadata (tokenizer.ggml.*) does "
                          f'not build: {e}') from e
  special = [i for i, ty in enumerate(types) if ty in (CONTROL, UNKNOWN)]
  user = [i for i, ty in enumerate(types) if ty == USER_DEFINED]
  tk.add_special_tokens([tokenizers.AddedToken(tokens[i], special=True, normalized=False)
                         for i in special])
  tk.add_tokens([tokenizers.AddedToken(tokens[i], special=False, normalized=False) for i in user])
  moved = [tokens[i] for i in special + user if tk.token_to_id(tokens[i]) != i]
  if moved or tk.get_vocab_size(with_added_tokens=True) != len(tokens):
    raise ConversionError(f'{model.path}: the rebuilt tokenizer has '
                          f'{tk.get_vocab_size(with_added_tokens=True)} ids for {len(tokens)} '
                          f'tokens (moved: {moved[:4]}).')

  ids = {name: _token(model, tokens, key) for name, key in (
      ('bos', 'bos_token_id'), ('eos', 'eos_token_id'), ('unk', 'unknown_token_id'),
      ('pad', 'padding_token_id'), ('eot', 'eot_token_id'), ('eom', 'eom_token_id'))}
  add_bos = bool(model.meta('tokenizer.ggml.add_bos_token', kind == 'llama'))
  add_eos = bool(model.meta('tokenizer.ggml.add_eos_token', False))
  bos_id, bos = ids['bos']
  eos_id, eos = ids['eos']
  single = ([bos] if add_bos and bos else []) + ['$A'] + ([eos] if add_eos and eos else [])
  if len(single) > 1:
    tk.post_processor = tokenizers.processors.TemplateProcessing(
        single=single, pair=single + [s if s != '$A' else '$B' for s in single],
        special_tokens=[(t, i) for t, i in ((bos, bos_id), (eos, eos_id)) if t in single])

  config = {'tokenizer_class': 'PreTrainedTokenizerFast', 'clean_up_tokenization_spaces': False,
            'add_bos_token': add_bos, 'add_eos_token': add_eos,
            'model_max_length': model.hf_config['max_position_embeddings']}
  for name in ('bos', 'eos', 'unk', 'pad'):
    if ids[name][1] is not None:
      config[f'{name}_token'] = ids[name][1]
  template = model.meta('tokenizer.chat_template', None)
  if template is not None:
    config['chat_template'] = template
  config['added_tokens_decoder'] = {
      str(i): {'content': tokens[i], 'lstrip': False, 'normalized': False, 'rstrip': False,
               'single_word': False, 'special': types[i] != USER_DEFINED}
      for i in sorted(special + user)}
  stops = list(dict.fromkeys(i for i in (eos_id, ids['eot'][0], ids['eom'][0]) if i is not None))
  generation = {'bos_token_id': bos_id, 'eos_token_id': stops[0] if len(stops) == 1 else stops,
                'pad_token_id': ids['pad'][0]} if stops else {'bos_token_id': bos_id}

  os.makedirs(out_dir, exist_ok=True)
  # pylint: disable=protected-access
  hf_tokenizer._write_text(os.path.join(out_dir, 'tokenizer.json'), tk.to_str())
  hf_tokenizer._write_text(os.path.join(out_dir, 'tokenizer_config.json'),
                           json.dumps(config, indent=1, ensure_ascii=False))
  hf_tokenizer._write_text(os.path.join(out_dir, 'generation_config.json'), json.dumps(
      {k: v for k, v in generation.items() if v is not None}, indent=1))
  return out_dir
