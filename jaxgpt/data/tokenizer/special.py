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
