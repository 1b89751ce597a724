"""The special tokens every jaxgpt tokenizer knows, and what both tokenizer classes share."""

from __future__ import annotations

SPECIAL_TOKENS = {
    'pad': '<|pad|>',
    'endoftext': '<|endoftext|>',
    'system': '<|system|>',
    'user': '<|user|>',
    'assistant': '<|assistant|>',
    'end_of_turn': '<|end|>',
    'reward': '<|reward|>',
}
ROLES = ('system', 'user', 'assistant')


class TokenizerBase:
  """What both tokenizer classes share: the chat and reward ids, and decoding ids of a
  padded model vocabulary. A subclass defines `_special_id(name)` (the id of
  SPECIAL_TOKENS[name], or None), `_MISSING_HINT` (what to do when one is absent),
  `vocab_size` and `_decode_run(ids)` (ids all inside the vocabulary -> text)."""

  path: str
  _MISSING_HINT = ''

  vocab_size: int
  # What the model's files say about chatting (`attach_model_files`): its own chat template
  # (jinja) and the end-of-sequence ids of its generation_config.json; and which format
  # config.tokenizer.chat_template picked ('model' | 'jaxgpt', see `jaxgpt.data.chat`).
  chat_template: str | None = None
  generation_eos_ids: tuple[int, ...] = ()
  chat_choice: str = 'model'

  @property
  def chat(self):
    """The chat format every stage renders conversations with (`jaxgpt.data.chat`)."""
    key = (self.chat_choice, self.chat_template)
    cached = self.__dict__.get('_chat')
    if cached is None or cached[0] != key:
      from jaxgpt.data import chat  # pylint: disable=import-outside-toplevel
      cached = (key, chat.for_tokenizer(self, self.chat_choice))
      self.__dict__['_chat'] = cached
    return cached[1]

  def model_files_state(self) -> dict:
    """The chat settings, for a subclass's __getstate__ (grain workers pickle tokenizers)."""
    return {'chat_template': self.chat_template,
            'generation_eos_ids': tuple(self.generation_eos_ids),
            'chat_choice': self.chat_choice}

  def set_model_files_state(self, state: dict) -> None:
    self.chat_template = state.get('chat_template')
    self.generation_eos_ids = tuple(state.get('generation_eos_ids', ()))
    self.chat_choice = state.get('chat_choice', 'model')

  def special_ids(self) -> set[int]:
    """Ids of the control tokens (special added tokens, user-defined pieces)."""
    raise NotImplementedError

  def token_id(self, text: str | None) -> int | None:
    raise NotImplementedError

  def _special_id(self, name: str) -> int | None:
    raise NotImplementedError

  def _decode_run(self, ids: list[int]) -> str:
    raise NotImplementedError

  def _require(self, name: str) -> int:
    idx = self._special_id(name)
    if idx is None:
      raise ValueError(f'tokenizer {self.path or "<in memory>"} has no '
                       f'{SPECIAL_TOKENS[name]!r} token, which the chat / reward stages need; '
                       f'{self._MISSING_HINT}')
    return idx

  @property
  def end_of_turn_id(self) -> int:
    return self._require('end_of_turn')

  @property
  def reward_id(self) -> int:
    return self._require('reward')

  def role_id(self, role: str) -> int:
    if role not in ROLES:
      raise ValueError(f'unknown role {role!r}; expected one of {ROLES}.')
    return self._require(role)

  def decode(self, ids) -> str:
    """Ids -> text. Ids outside the vocabulary (a padded model vocab) become U+FFFD."""
    n = self.vocab_size
    out, run = [], []
    for i in (int(x) for x in ids):
      if 0 <= i < n:
        run.append(i)
      else:
        out.append(self._decode_run(run) + '\ufffd')
        run = []
    return ''.join(out) + self._decode_run(run)
