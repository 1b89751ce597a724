"""The chat template: conversations -> token ids and the SFT loss mask.

Layout, with no separators, spaces or newlines added between the pieces::

    [<|system|>{system}<|end|>] <|user|>{user}<|end|><|assistant|>{reply}<|end|> <|user|>...

Every message is its role token, its content exactly as given, and `<|end|>`
(`end_of_turn`). `add_generation_prompt=True` appends a bare `<|assistant|>`: the prompt a
sampler continues, stopping when it emits `<|end|>`.

The ids are built piece by piece: each role and end token is its single special id and
each content is `tokenizer.encode(content, allow_special=False, after_special=True)`
(no dummy-prefix space, as inside a longer text). Special tokens are atomic symbols of
the tokenizer, so nothing merges across a boundary and this equals
`tokenizer.encode(render_text(messages))`
(tests check it); building by pieces is what lets the loss mask be exact. A
special-token string typed inside a content stays plain text (byte tokens): a user
writing `<|end|>` cannot end their own turn. (For such a content only, the piecewise ids
differ from encoding the rendered string, which would read it as the control token.)

Loss mask: 1 on the content tokens of assistant turns and on the `<|end|>` closing each
of them (the model must learn to stop), 0 on every role token (the `<|assistant|>` itself
included: it is given, not predicted), on system and user turns, and on the generation
prompt.
"""

from __future__ import annotations

from typing import Sequence

from jaxgpt.data.tokenizer import ROLES, SPECIAL_TOKENS

__all__ = ['ROLES', 'render', 'render_text', 'render_prompt', 'completion_text']


def _check_message(i: int, m) -> tuple[str, str]:
  if not isinstance(m, dict) or 'role' not in m or 'content' not in m:
    raise ValueError(f'message {i}: expected {{"role": ..., "content": ...}}, got {m!r}')
  role, content = m['role'], m['content']
  if role not in ROLES:
    raise ValueError(f'message {i}: unknown role {role!r}; roles are {ROLES}')
  if not isinstance(content, str):
    raise ValueError(f'message {i}: content must be a string, got {type(content).__name__}')
  return role, content


def render_text(messages: Sequence[dict], *, add_generation_prompt: bool = False) -> str:
  """The conversation as one string in the template (for reading and for tests)."""
  end = SPECIAL_TOKENS['end_of_turn']
  parts = []
  for i, m in enumerate(messages):
    role, content = _check_message(i, m)
    parts.append(f'{SPECIAL_TOKENS[role]}{content}{end}')
  if add_generation_prompt:
    parts.append(SPECIAL_TOKENS['assistant'])
  return ''.join(parts)


def render(messages: Sequence[dict], tokenizer, *,
           add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
  """(ids, loss_mask) of a conversation; mask is 1 on assistant content and its <|end|>."""
  ids: list[int] = []
  mask: list[int] = []
  end = tokenizer.end_of_turn_id
  for i, m in enumerate(messages):
    role, content = _check_message(i, m)
    body = tokenizer.encode(content, allow_special=False, after_special=True) if content else []
    learn = int(role == 'assistant')
    ids += [tokenizer.role_id(role), *body, end]
    mask += [0] + [learn] * (len(body) + 1)
  if add_generation_prompt:
    ids.append(tokenizer.role_id('assistant'))
    mask.append(0)
  return ids, mask


def render_prompt(messages: Sequence[dict], tokenizer) -> list[int]:
  """Ids of the conversation so far, ending with `<|assistant|>`: what a sampler continues."""
  if not messages:
    raise ValueError('render_prompt: no messages.')
  return render(messages, tokenizer, add_generation_prompt=True)[0]


def completion_text(ids: Sequence[int], tokenizer) -> tuple[str, bool]:
  """Decode sampled ids up to the first `<|end|>` (or `<|endoftext|>`).

  Returns (text, finished): finished is False when no stop token was produced.
  """
  stops = (tokenizer.end_of_turn_id, tokenizer.eot_id)
  ids = [int(i) for i in ids]
  for n, i in enumerate(ids):
    if i in stops:
      return tokenizer.decode(ids[:n]), True
  return tokenizer.decode(ids), False
