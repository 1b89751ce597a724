"""A SentencePiece model as a Hugging Face `tokenizer.json`, built with the `tokenizers` library.

An exported model carries its tokenizer as `tokenizer.model` *and* `tokenizer.json`, so
`transformers.AutoTokenizer` reads the JSON as it is: without it, transformers converts the
`.model` file itself, which needs `protobuf` (and, missing that, fails with a misleading
message about `tiktoken`).

How the SentencePiece pieces map onto `tokenizers`:

* BPE models become a `BPE` model with byte fallback. SentencePiece merges, at each step,
  the adjacent pair whose concatenation is the piece of highest score; `tokenizers` merges
  the pair of lowest rank. So every split of a piece into two pieces of the vocabulary is a
  merge, ranked by the merged piece's score (then its id). Unigram models keep their scores.
* Spaces are written as U+2581 by a `Replace` normaliser (with `Metaspace`'s 'first'
  prepend scheme when the model adds a dummy prefix, as LLaMA's does: a space before the
  text, none after a special token); a model's own normalisation (`precompiled_charsmap`,
  the whitespace clean-up of `remove_extra_whitespaces`) goes in front.
* User-defined and control pieces become added tokens matched before the model, as
  SentencePiece matches user-defined pieces; jaxgpt's special tokens and the control
  pieces (`<s>`, `</s>`) are `special`, so `decode(..., skip_special_tokens=True)` drops
  them.

One known difference: jaxgpt's `encode` emits a literal U+2581 in the text as its three
byte pieces (so it decodes to itself); the JSON tokenizer reads it as a space.
"""

from __future__ import annotations

from sentencepiece import sentencepiece_model_pb2

from jaxgpt.data.tokenizer.special import SPECIAL_TOKENS

_Piece = sentencepiece_model_pb2.ModelProto.SentencePiece
_SPACE = '\u2581'
_BPE, _UNIGRAM = 2, 1  # TrainerSpec.ModelType


def _merges(pieces) -> list[tuple[str, str]]:
  """Every (left, right) split of a normal piece into two pieces of the vocabulary, the
  splits of higher-scoring pieces first (ties: the lower id, then the lower ids of the
  halves)."""
  ids = {p.piece: i for i, p in enumerate(pieces)}
  ranked = []
  for i, p in enumerate(pieces):
    if p.type != _Piece.NORMAL:
      continue
    text = p.piece
    for cut in range(1, len(text)):
      left, right = text[:cut], text[cut:]
      if left in ids and right in ids:
        ranked.append((-p.score, i, ids[left], ids[right], left, right))
  return [(left, right) for *_, left, right in sorted(ranked)]


def to_tokenizer_json(model_proto: bytes) -> str:
  """The `tokenizer.json` text of a serialized SentencePiece model (BPE or unigram)."""
  import tokenizers  # pylint: disable=import-outside-toplevel
  from tokenizers import decoders, models, normalizers, pre_tokenizers
  model = sentencepiece_model_pb2.ModelProto.FromString(model_proto)
  pieces = list(model.pieces)
  unk = next((i for i, p in enumerate(pieces) if p.type == _Piece.UNKNOWN), None)
  byte_fallback = any(p.type == _Piece.BYTE for p in pieces)
  kind = model.trainer_spec.model_type
  if kind == _BPE:
    vocab = {p.piece: i for i, p in enumerate(pieces)}
    core = models.BPE(vocab, _merges(pieces), unk_token=None if unk is None else pieces[unk].piece,
                      fuse_unk=True, byte_fallback=byte_fallback)
  elif kind == _UNIGRAM:
    core = models.Unigram([(p.piece, p.score) for p in pieces], unk_id=unk,
                          byte_fallback=byte_fallback)
  else:
    raise ValueError(f'SentencePiece model type {kind} (only BPE and unigram models convert '
                     'to tokenizer.json).')
  tk = tokenizers.Tokenizer(core)

  spec = model.normalizer_spec
  steps = []
  if spec.precompiled_charsmap:
    steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
  if spec.remove_extra_whitespaces:  # leading, trailing and repeated spaces go
    steps += [normalizers.Strip(left=True, right=True),
              normalizers.Replace(tokenizers.Regex(' {2,}'), ' ')]
  if spec.add_dummy_prefix:
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement=_SPACE, prepend_scheme='first',
                                                split=False)
  else:
    steps.append(normalizers.Replace(' ', _SPACE))
  if steps:
    tk.normalizer = normalizers.Sequence(steps)
  tk.decoder = decoders.Sequence(
      [decoders.Replace(_SPACE, ' '), decoders.ByteFallback(), decoders.Fuse()]
      + ([decoders.Strip(' ', 1, 0)] if spec.add_dummy_prefix else []))

  special = set(SPECIAL_TOKENS.values())
  added = []
  for p in pieces:
    if p.type in (_Piece.CONTROL, _Piece.UNKNOWN, _Piece.USER_DEFINED):
      marked = p.type != _Piece.USER_DEFINED or p.piece in special
      added.append(tokenizers.AddedToken(p.piece, special=marked, normalized=False))
  tk.add_special_tokens([t for t in added if t.special])
  tk.add_tokens([t for t in added if not t.special])
  return tk.to_str()
