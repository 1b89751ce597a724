"""The special tokens every jaxgpt tokenizer knows, and the ids the stages read from them."""

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


class SpecialIds:
  """Chat and reward ids for a tokenizer class that defines `_special_id(name)` (the id of
  SPECIAL_TOKENS[name], or None) and `_MISSING_HINT` (what to do when one is absent)."""

  path: str
  _MISSING_HINT = ''

  def _special_id(self, name: str) -> int | None:
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
