"""Tokenizers that come with published models, behind the interface of `tokenizer.Tokenizer`.

`load(path)` opens any of:

* a jaxgpt or LLaMA-layout SentencePiece `.model` file (`tokenizer.Tokenizer`);
* a Hugging Face tokenizer directory: `tokenizer.json` (GPT-2 BPE, LLaMA, LLaMA-3, ...),
  else `tokenizer.model`, else GPT-2 style `vocab.json` + `merges.txt`
  (`HFTokenizer`, on the `tokenizers` library: the same code `transformers` runs, so ids
  are the same as `AutoTokenizer`'s with `add_special_tokens=False`).

Text after a special token. jaxgpt builds chats piece by piece (`data/chat.py`): each
message's content is encoded on its own after its role token. A model tokenizer that
prepends a space to the start of a text (SentencePiece's dummy prefix, Metaspace
`prepend_scheme='first'`) does not do that after a special token inside a longer text, so
`encode(..., after_special=True)` leaves it out too: the pieces then equal the ids that
`transformers` gives the rendered chat (`apply_chat_template`).

Chat tokens. A model's tokenizer lacks `<|user|>`, `<|end|>`, `<|reward|>`...;
`with_chat_tokens` appends the missing ones as special tokens (new ids at the end) and
`save` writes the result, with a chat template that renders jaxgpt's chat format, as a
tokenizer directory `transformers` loads.
"""

from __future__ import annotations

import functools
import json
import os
import shutil

from sentencepiece import sentencepiece_model_pb2

from jaxgpt.data.tokenizer import sentencepiece_json
from jaxgpt.data.tokenizer.sentencepiece_tokenizer import Tokenizer
from jaxgpt.data.tokenizer.special import SPECIAL_TOKENS, TokenizerBase

# The tokens chat, reward model and PPO need; added to a model tokenizer that lacks them.
CHAT_TOKENS = ('system', 'user', 'assistant', 'end_of_turn', 'reward')
# jaxgpt's chat format (data/chat.py) as a Hugging Face chat template.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>' }}{%- endif -%}")
CONFIG_FILES = ('tokenizer_config.json', 'special_tokens_map.json')


class TokenizerFileError(ValueError):
  """A tokenizer file is missing or unreadable; the message names it."""


def load(path, *, chat_template: str = 'model'):
  """A tokenizer from a SentencePiece `.model` file, a `tokenizer.json` or a directory,
  with what its directory says about chatting (`attach_model_files`) and the chat format
  `chat_template` picks ('model' | 'jaxgpt', `jaxgpt.data.chat`)."""
  from jaxgpt.data import chat  # pylint: disable=import-outside-toplevel
  chat.check_choice(chat_template)
  path = os.fspath(path)
  tok = _load(path)
  attach_model_files(tok, path if os.path.isdir(path) else os.path.dirname(path) or '.')
  tok.chat_choice = chat_template
  return tok


def _load(path: str):
  if os.path.isdir(path):
    if os.path.exists(os.path.join(path, 'tokenizer.json')):
      return HFTokenizer.from_dir(path)
    if os.path.exists(os.path.join(path, 'tokenizer.model')):
      return Tokenizer.load(os.path.join(path, 'tokenizer.model'))
    if all(os.path.exists(os.path.join(path, f)) for f in ('vocab.json', 'merges.txt')):
      return HFTokenizer.from_bpe_files(path)
    raise TokenizerFileError(f'{path} has no tokenizer.json, tokenizer.model or vocab.json + '
                             'merges.txt.')
  if path.endswith('.json'):
    return HFTokenizer.from_dir(os.path.dirname(path) or '.', json_path=path)
  return Tokenizer.load(path)


def read_chat_template(directory: str) -> str | None:
  """The chat template a model directory ships: `chat_template.jinja`, else
  tokenizer_config.json's `chat_template` (a string, or a list of named templates of
  which transformers uses 'default')."""
  jinja_path = os.path.join(directory, 'chat_template.jinja')
  if os.path.exists(jinja_path):
    with open(jinja_path, encoding='utf-8') as f:
      return f.read()
  template = (_read_json(os.path.join(directory, 'tokenizer_config.json'), {}) or {}).get(
      'chat_template')
  if isinstance(template, list):
    named = {t.get('name'): t.get('template') for t in template if isinstance(t, dict)}
    template = named.get('default')
  return template if isinstance(template, str) and template else None


def read_eos_ids(directory: str) -> tuple[int, ...]:
  """eos_token_id (one id or a list) of the directory's generation_config.json, else of
  its config.json: the ids a model's generation stops at."""
  for name in ('generation_config.json', 'config.json'):
    eos = (_read_json(os.path.join(directory, name), {}) or {}).get('eos_token_id')
    if eos is not None:
      return tuple(int(i) for i in (eos if isinstance(eos, list) else [eos]))
  return ()


def attach_model_files(tok, directory: str) -> None:
  """Sets `tok.chat_template` and `tok.generation_eos_ids` from a model directory."""
  tok.chat_template = read_chat_template(directory)
  tok.generation_eos_ids = read_eos_ids(directory)


def _read_json(path, default=None):
  if not os.path.exists(path):
    return default
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except ValueError as e:
    raise TokenizerFileError(f'{path}: not valid JSON ({e}).') from e


def _no_first_prefix(node):
  """The tokenizer JSON with Metaspace's 'first' prepend scheme turned off (see the module
  docstring), wherever it sits (pre-tokenizer or inside a Sequence)."""
  if isinstance(node, dict):
    node = {k: _no_first_prefix(v) for k, v in node.items()}
    if node.get('type') == 'Metaspace' and node.get('prepend_scheme') == 'first':
      node['prepend_scheme'] = 'never'
    return node
  if isinstance(node, list):
    return [_no_first_prefix(v) for v in node]
  return node


def token_text(value) -> str | None:
  """A special token in tokenizer_config.json: a string or {'content': ...}."""
  if isinstance(value, dict):
    return value.get('content')
  return value if isinstance(value, str) else None


class HFTokenizer(TokenizerBase):
  """A Hugging Face `tokenizers` tokenizer with the special-token ids the stages need."""

  _MISSING_HINT = "config.tokenizer.chat_tokens='add' adds it on import."

  def __init__(self, tk_json: str, path: str, config: dict | None = None):
    import tokenizers  # pylint: disable=import-outside-toplevel
    self._tokenizers = tokenizers
    self.path = path
    self.config = dict(config or {})
    self._json = tk_json
    self._tk = tokenizers.Tokenizer.from_str(tk_json)
    self._variants = {(False, True): self._tk}

  @classmethod
  def from_dir(cls, directory: str, json_path: str | None = None) -> 'HFTokenizer':
    json_path = json_path or os.path.join(directory, 'tokenizer.json')
    if not os.path.exists(json_path):
      raise TokenizerFileError(f'tokenizer {json_path} does not exist.')
    with open(json_path, encoding='utf-8') as f:
      text = f.read()
    try:
      json.loads(text)
      tok = cls(text, os.path.abspath(directory),
                _read_json(os.path.join(directory, 'tokenizer_config.json'), {}))
    except Exception as e:  # tokenizers raises its own Exception type
      raise TokenizerFileError(f'{json_path}: not a Hugging Face tokenizer ({e}).') from e
    return tok

  @classmethod
  def from_bpe_files(cls, directory: str) -> 'HFTokenizer':
    """GPT-2's byte-level BPE from vocab.json + merges.txt (e.g. encoder.json + vocab.bpe)."""
    import tokenizers  # pylint: disable=import-outside-toplevel
    vocab, merges = (os.path.join(directory, f) for f in ('vocab.json', 'merges.txt'))
    tk = tokenizers.Tokenizer(tokenizers.models.BPE.from_file(vocab, merges))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = tokenizers.decoders.ByteLevel()
    if tk.token_to_id(SPECIAL_TOKENS['endoftext']) is not None:
      tk.add_special_tokens([tokenizers.AddedToken(SPECIAL_TOKENS['endoftext'], special=True,
                                                   normalized=False)])
    return cls(tk.to_str(), os.path.abspath(directory),
               _read_json(os.path.join(directory, 'tokenizer_config.json'), {}))

  def __getstate__(self):  # picklable for grain worker processes
    return {'tk_json': self._json, 'path': self.path, 'config': self.config,
            **self.model_files_state()}

  def __setstate__(self, state):
    self.__init__(state['tk_json'], state['path'], state['config'])
    self.set_model_files_state(state)

  def _variant(self, after_special: bool, allow_special: bool):
    """The tokenizer `encode` uses for these settings, built on first use."""
    key = (after_special, allow_special)
    if key not in self._variants:
      text = self._json
      if after_special and '"first"' in text:
        text = json.dumps(_no_first_prefix(json.loads(text)))
      tk = self._tokenizers.Tokenizer.from_str(text)
      tk.encode_special_tokens = not allow_special  # special strings as text, not control
      self._variants[key] = tk
    return self._variants[key]

  @property
  def vocab_size(self) -> int:
    return self._tk.get_vocab_size(with_added_tokens=True)

  def to_json(self) -> str:
    return self._tk.to_str()

  # -- special tokens -------------------------------------------------------

  def token_id(self, text: str | None) -> int | None:
    return None if text is None else self._tk.token_to_id(text)

  @functools.cached_property
  def _special_ids(self) -> frozenset:
    return frozenset(i for i, t in self._tk.get_added_tokens_decoder().items() if t.special)

  def special_ids(self) -> set[int]:
    return set(self._special_ids)

  def _config_id(self, name: str) -> int | None:
    return self.token_id(token_text(self.config.get(name)))

  def _special_id(self, name: str) -> int | None:
    return self.token_id(SPECIAL_TOKENS[name])

  @functools.cached_property
  def pad_id(self) -> int:
    for idx in (self.token_id(SPECIAL_TOKENS['pad']), self._config_id('pad_token'),
                self._config_id('unk_token'), self._config_id('eos_token')):
      if idx is not None:
        return idx
    return 0

  @functools.cached_property
  def eot_id(self) -> int:
    for idx in (self.token_id(SPECIAL_TOKENS['endoftext']), self._config_id('eos_token'),
                self.token_id('</s>')):
      if idx is not None:
        return idx
    raise ValueError(f'tokenizer {self.path} has neither <|endoftext|> nor an eos_token in '
                     'tokenizer_config.json; documents cannot be separated.')

  # -- encode / decode ------------------------------------------------------

  def encode(self, text: str, *, allow_special: bool = True,
             after_special: bool = False) -> list[int]:
    """Text -> ids, as `transformers` encodes it without adding BOS/EOS. With
    `allow_special=False` special-token strings are plain text; with `after_special` the
    text is encoded as it is inside a longer text right after a special token."""
    tk = self._variant(after_special, allow_special)
    return tk.encode(text, add_special_tokens=False).ids

  def _decode_run(self, ids: list[int]) -> str:
    return self._tk.decode(ids, skip_special_tokens=False)

  def id_to_piece(self, idx: int) -> str:
    return self._tk.id_to_token(idx)


# -- chat tokens ---------------------------------------------------------------------------


def needed_chat_tokens(tok) -> tuple[str, ...]:
  """The jaxgpt tokens (names in SPECIAL_TOKENS) `tok`'s chat format needs: with the
  model's own template only the reward model's readout `<|reward|>` (the one jaxgpt token
  such a model gets), with jaxgpt's template all of CHAT_TOKENS."""
  from jaxgpt.data import chat  # pylint: disable=import-outside-toplevel
  return ('reward',) if chat.uses_model_template(tok, tok.chat_choice) else CHAT_TOKENS


def missing_chat_tokens(tok) -> list[str]:
  """The token strings of `needed_chat_tokens` that `tok` does not have."""
  out = []
  for name in needed_chat_tokens(tok):
    try:
      tok._require(name)  # pylint: disable=protected-access
    except ValueError:
      out.append(SPECIAL_TOKENS[name])
  return out


def with_chat_tokens(tok):
  """(tokenizer, added token strings): `tok` with the missing chat tokens
  (`missing_chat_tokens`) appended as special tokens (ids vocab_size, vocab_size + 1, ...).
  This is where a published model's vocabulary grows (the importer gives the new rows
  the mean of the old ones)."""
  missing = missing_chat_tokens(tok)
  if not missing:
    return tok, []
  n = tok.vocab_size
  if isinstance(tok, HFTokenizer):
    import tokenizers  # pylint: disable=import-outside-toplevel
    tk = tokenizers.Tokenizer.from_str(tok.to_json())
    tk.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                           for t in missing])
    config = dict(tok.config)
    decoder = config.get('added_tokens_decoder')
    if isinstance(decoder, dict):
      config['added_tokens_decoder'] = dict(decoder, **{
          str(n + i): {'content': t, 'lstrip': False, 'normalized': False, 'rstrip': False,
                       'single_word': False, 'special': True} for i, t in enumerate(missing)})
    new = HFTokenizer(tk.to_str(), tok.path, config)
  else:
    proto = tok._proto  # pylint: disable=protected-access
    model = sentencepiece_model_pb2.ModelProto.FromString(proto)
    for t in missing:
      piece = model.pieces.add()
      piece.piece, piece.score = t, 0.0
      piece.type = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
    new = Tokenizer(model.SerializeToString(), tok.path)
  new.set_model_files_state(tok.model_files_state())
  got = [new.id_to_piece(i) for i in range(n, n + len(missing))]
  if got != missing or new.vocab_size != n + len(missing):
    raise TokenizerFileError(f'tokenizer {tok.path}: adding {missing} gave {got} at ids '
                             f'{n}..{n + len(missing) - 1}.')
  return new, missing


def save(tok, out_dir: str, *, source_dir: str | None = None) -> str:
  """Writes `tok` as a tokenizer directory that `transformers.AutoTokenizer` loads (and
  `load` reads back); returns out_dir. Files of `source_dir` (tokenizer_config.json,
  special_tokens_map.json) are carried over; the chat template written is the one `tok`
  renders with (the model's own, or jaxgpt's when it has the chat tokens), and the ids
  generation stops at go to generation_config.json."""
  os.makedirs(out_dir, exist_ok=True)
  source_dir = source_dir or (tok.path if os.path.isdir(tok.path) else
                              os.path.dirname(tok.path))
  config = dict(getattr(tok, 'config', None) or
                _read_json(os.path.join(source_dir, 'tokenizer_config.json'), {}))
  if isinstance(tok, HFTokenizer):
    _write_text(os.path.join(out_dir, 'tokenizer.json'), tok.to_json())
  else:
    proto = tok._proto  # pylint: disable=protected-access
    _write_bytes(os.path.join(out_dir, 'tokenizer.model'), proto)
    # tokenizer.json beside it: transformers reads it as is (no protobuf, no conversion of
    # its own), and the class that reads it adds no BOS of its own (LlamaTokenizer would
    # add '<s>', which a jaxgpt vocabulary does not have)
    _write_text(os.path.join(out_dir, 'tokenizer.json'),
                sentencepiece_json.to_tokenizer_json(proto))
    model = sentencepiece_model_pb2.ModelProto.FromString(proto)
    config.setdefault('tokenizer_class', 'PreTrainedTokenizerFast')
    config.setdefault('add_bos_token', False)
    config.setdefault('add_prefix_space', bool(model.normalizer_spec.add_dummy_prefix))
  special = _read_json(os.path.join(source_dir, 'special_tokens_map.json'))
  if special is not None and os.path.abspath(source_dir) != os.path.abspath(out_dir):
    shutil.copyfile(os.path.join(source_dir, 'special_tokens_map.json'),
                    os.path.join(out_dir, 'special_tokens_map.json'))
  from jaxgpt.data import chat  # pylint: disable=import-outside-toplevel
  if chat.uses_model_template(tok, tok.chat_choice):
    config['chat_template'] = tok.chat_template
  elif all(tok._special_id(n) is not None for n in CHAT_TOKENS):  # pylint: disable=protected-access
    config['chat_template'] = CHAT_TEMPLATE
  if tok.generation_eos_ids:
    _write_text(os.path.join(out_dir, 'generation_config.json'),
                json.dumps({'eos_token_id': list(tok.generation_eos_ids)}, indent=1))
  config.setdefault('eos_token', tok.id_to_piece(tok.eot_id))
  config.setdefault('pad_token', tok.id_to_piece(tok.pad_id))
  _write_text(os.path.join(out_dir, 'tokenizer_config.json'), json.dumps(config, indent=1))
  return out_dir


def _write_text(path, text):
  _write_bytes(path, text.encode('utf-8'))


def _write_bytes(path, data):
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'wb') as f:
    f.write(data)
  os.replace(tmp, path)  # atomic: processes writing the same file never leave half of it
