"""SentencePiece tokenizer: byte-fallback BPE, lossless, with atomic special tokens.

A tokenizer trained by `train_tokenizer` is lossless: `decode(encode(s)) == s` for
every Python string `s` (whitespace, newlines, tabs and the U+2581 character
included). That takes three things:

* trainer options: identity normalisation, no dummy prefix, no whitespace
  folding, byte fallback (any character outside the vocabulary becomes its UTF-8
  bytes);
* SentencePiece writes spaces as U+2581 ('▁') inside pieces, so a literal U+2581
  in the text would come back as a space. `encode` therefore emits each literal
  U+2581 as its three byte tokens <0xE2><0x96><0x81>, which decode to U+2581;
* special tokens are user-defined symbols, so they are single, atomic ids even
  when glued to text.

Special tokens in text. `encode(text)` maps special-token strings (e.g.
'<|endoftext|>') to their ids: that is how prompts and chat templates are built.
`encode(text, allow_special=False)` treats them as plain characters (emitted as
byte tokens, so they still decode to the same string). Corpora are tokenized that
way: a document that literally contains '<|endoftext|>' cannot forge a document
boundary.

Any SentencePiece model loads, including a LLaMA-layout one (`<unk>`=0, `<s>`=1,
`</s>`=2, no special tokens). Then end-of-text falls back to '</s>', pad to
'<pad>' or '<unk>', and asking for a chat or reward token raises an error.
Losslessness for such a model is only as good as its normaliser.
"""

from __future__ import annotations

import functools
import io
import os
import re
from collections.abc import Iterable

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from jaxgpt.data.tokenizer.special import SPECIAL_TOKENS, TokenizerBase


_SPACE = '\u2581'  # SentencePiece's whitespace marker
_USER_DEFINED = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
# 256 byte pieces + <unk> + the special tokens: the smallest possible vocabulary.
MIN_VOCAB_SIZE = 256 + 1 + len(SPECIAL_TOKENS)


class Tokenizer(TokenizerBase):
  """A SentencePiece model plus the special-token ids the stages need."""

  _MISSING_HINT = ('train a jaxgpt tokenizer (tools/train_tokenizer.py) or set '
                   'config.tokenizer.path to one.')

  def __init__(self, model_proto: bytes, path: str = ''):
    self.path = path
    self._proto = model_proto
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    model = sentencepiece_model_pb2.ModelProto.FromString(model_proto)
    # Text after a literal U+2581 or an escaped special token is encoded on its
    # own; it must not get a dummy-prefix space of its own.
    self._sp_cont = self._sp
    if model.normalizer_spec.add_dummy_prefix:
      model.normalizer_spec.add_dummy_prefix = False
      self._sp_cont = spm.SentencePieceProcessor(model_proto=model.SerializeToString())
    self._user_defined = tuple(p.piece for p in model.pieces if p.type == _USER_DEFINED)
    self._byte_ids = self._find_byte_ids()
    self._protected = {allow: self._protected_re(allow) for allow in (True, False)}

  @classmethod
  def load(cls, path) -> 'Tokenizer':
    """Loads any SentencePiece `.model` file."""
    path = os.fspath(path)
    if not os.path.exists(path):
      raise FileNotFoundError(
          f'tokenizer model {path!r} does not exist; check config.tokenizer.path or '
          'train one with tools/train_tokenizer.py.')
    with open(path, 'rb') as f:
      return cls(f.read(), path)

  def __getstate__(self):  # picklable for grain worker processes
    return {'model_proto': self._proto, 'path': self.path, **self.model_files_state()}

  def __setstate__(self, state):
    self.__init__(state['model_proto'], state['path'])
    self.set_model_files_state(state)

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  # -- special tokens -------------------------------------------------------

  def _special_id(self, name: str) -> int | None:
    return self.token_id(SPECIAL_TOKENS[name])

  def token_id(self, text: str | None) -> int | None:
    idx = None if text is None else self._sp.piece_to_id(text)
    return None if idx is None or self._sp.is_unknown(idx) else idx

  @functools.cached_property
  def _special_ids(self) -> frozenset:
    return frozenset({self._sp.piece_to_id(p) for p in self._user_defined} | {
        i for i in range(self.vocab_size) if self._sp.is_control(i)})

  def special_ids(self) -> set[int]:
    return set(self._special_ids)

  @functools.cached_property
  def pad_id(self) -> int:
    for idx in (self._special_id('pad'), self._sp.pad_id(), self._sp.unk_id()):
      if idx is not None and idx >= 0:
        return idx
    return 0

  @functools.cached_property
  def eot_id(self) -> int:
    idx = self._special_id('endoftext')
    if idx is None:
      idx = self._sp.eos_id()
    if idx is None or idx < 0:
      raise ValueError(
          f'tokenizer {self.path or "<in memory>"} has neither <|endoftext|> nor an '
          'end-of-sequence piece (</s>); documents cannot be separated.')
    return idx

  # -- encode / decode ------------------------------------------------------

  def _find_byte_ids(self) -> list[int] | None:
    ids = [self._sp.piece_to_id(f'<0x{b:02X}>') for b in range(256)]
    return ids if all(self._sp.is_byte(i) for i in ids) else None

  def _protected_re(self, allow_special: bool) -> re.Pattern | None:
    """Matches the substrings `encode` must emit as raw bytes."""
    literals = [] if allow_special else list(self._user_defined)
    if self._byte_ids is not None:
      literals.append(_SPACE)
    if not literals:
      return None
    literals.sort(key=len, reverse=True)  # longest match first
    return re.compile('|'.join(re.escape(s) for s in literals))

  def encode(self, text: str, *, allow_special: bool = True,
             after_special: bool = False) -> list[int]:
    """Text -> ids. See the module docstring for how special strings are treated.
    `after_special`: the text follows a special token (a chat message's content), so a
    model with a dummy prefix (LLaMA layout) gives it none, as inside a longer text."""
    pattern = self._protected[allow_special]
    if pattern is None or not pattern.search(text):
      return (self._sp_cont if after_special else self._sp).encode(text)
    ids, pos = [], 0
    for match in pattern.finditer(text):
      ids += self._encode_piece(text[pos:match.start()], first=pos == 0 and not after_special)
      ids += self._encode_bytes(match.group())
      pos = match.end()
    return ids + self._encode_piece(text[pos:], first=pos == 0 and not after_special)

  def _encode_piece(self, text: str, first: bool) -> list[int]:
    if not text:
      return []
    return (self._sp if first else self._sp_cont).encode(text)

  def _encode_bytes(self, text: str) -> list[int]:
    if self._byte_ids is None:  # no byte pieces: best effort, may not be atomic-safe
      return self._sp_cont.encode(text)
    return [self._byte_ids[b] for b in text.encode('utf-8')]

  def _decode_run(self, ids: list[int]) -> str:
    return self._sp.decode(ids)

  def id_to_piece(self, idx: int) -> str:
    return self._sp.id_to_piece(idx)


def _training_lines(texts: Iterable[str], max_chars: int | None) -> Iterable[str]:
  """Non-empty lines of the documents, up to max_chars characters in all.

  SentencePiece trains on lines; newlines are covered by byte fallback. Literal
  U+2581 is dropped: `encode` always emits it as bytes, so no piece needs it.
  """
  total = 0
  for text in texts:
    for line in text.split('\n'):
      line = line.replace(_SPACE, '')
      if not line.strip():
        continue
      yield line
      total += len(line)
      if max_chars is not None and total >= max_chars:
        return


def train_tokenizer(texts: Iterable[str], out_path: str, vocab_size: int,
                    *, max_chars: int | None = None) -> Tokenizer:
  """Trains a lossless byte-fallback BPE tokenizer and writes it to `out_path`.

  `texts` are documents; at most `max_chars` characters of them are used.
  The special tokens take ids 0..6 (pad = 0), `<unk>` is 7, then 256 byte pieces.
  """
  if vocab_size < MIN_VOCAB_SIZE:
    raise ValueError(
        f'vocab_size={vocab_size} is too small: the special tokens, <unk> and 256 byte '
        f'pieces alone need {MIN_VOCAB_SIZE}.')
  lines = list(_training_lines(texts, max_chars))
  if not lines:
    raise ValueError('train_tokenizer: no non-empty text to train on.')
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(lines),
      model_writer=model,
      model_type='bpe',
      vocab_size=vocab_size,
      byte_fallback=True,
      character_coverage=0.9995,
      normalization_rule_name='identity',
      add_dummy_prefix=False,
      remove_extra_whitespaces=False,
      allow_whitespace_only_pieces=True,
      split_digits=True,
      max_sentence_length=1 << 16,
      user_defined_symbols=list(SPECIAL_TOKENS.values()),
      unk_id=len(SPECIAL_TOKENS),
      bos_id=-1,
      eos_id=-1,
      pad_id=-1,
      hard_vocab_limit=False,  # a tiny corpus may not fill the vocabulary
      num_threads=os.cpu_count() or 1,
      minloglevel=2,
  )
  out_dir = os.path.dirname(os.path.abspath(out_path))
  os.makedirs(out_dir, exist_ok=True)
  tmp = f'{out_path}.tmp{os.getpid()}'
  try:
    with open(tmp, 'wb') as f:
      f.write(model.getvalue())
    os.replace(tmp, out_path)  # atomic: a reader never sees a half-written model
  except OSError as e:  # e.g. a full disk: name the file, leave no half-written one
    if os.path.exists(tmp):
      os.remove(tmp)
    raise OSError(e.errno, e.strerror, out_path) from None
  return Tokenizer(model.getvalue(), os.fspath(out_path))


def check_vocab(tokenizer: Tokenizer, model_vocab_size: int) -> None:
  """Fails early when token ids could index past the model's embedding table."""
  if tokenizer.vocab_size > model_vocab_size:
    raise ValueError(
        f'tokenizer {tokenizer.path or "<in memory>"} (config.tokenizer.path) has '
        f'{tokenizer.vocab_size} tokens but config.model.vocab_size={model_vocab_size}; '
        f'set config.model.vocab_size >= {tokenizer.vocab_size} or use a smaller tokenizer.')

