"""Chat formats: conversations -> token ids and the SFT loss mask, generation prompts,
sampled replies -> text, stop ids. One interface, two formats, chosen per tokenizer.

Every stage and tool reaches the format through the tokenizer (`tok.chat`), so no call
site knows which one is in use:

    ids, mask = tok.chat.render(messages)      # SFT rows: mask 1 on what the model learns
    ids = tok.chat.prompt(messages)            # what a sampler continues
    text, finished = tok.chat.reply(sampled)   # a sampled reply, up to its stop id
    tok.chat.stop_ids                          # where sampling stops

* `JaxgptFormat`, jaxgpt's own template, the default for models trained here::

    [<|system|>{system}<|end|>] <|user|>{user}<|end|><|assistant|>{reply}<|end|> <|user|>...

  Every message is its role token, its content exactly as given, and `<|end|>`, with no
  separators added; the generation prompt is a bare `<|assistant|>`. Ids are built piece
  by piece (each content encoded on its own, `after_special=True`), which equals encoding
  the rendered string (special tokens are atomic), except that a special-token string
  typed inside a content stays plain text: a user writing `<|end|>` cannot end a turn.
* `TemplateFormat` (`jaxgpt.data.chat_template`): a model's own jinja template (ChatML,
  Llama 3, Gemma, ...), rendered the way transformers' `apply_chat_template` renders and
  tokenizes it.

`config.tokenizer.chat_template` picks: 'model' (the default) uses the model's template
when its tokenizer comes with one (`tokenizer_config.json`'s `chat_template`,
`chat_template.jinja`, a GGUF's `tokenizer.chat_template`) and jaxgpt's otherwise;
'jaxgpt' always uses jaxgpt's.

Loss mask (both formats): 1 on the content of every assistant turn and on the
end-of-turn token closing it (the model must learn to stop), 0 on everything else: role
markers and headers, system and user turns, the generation prompt, and whatever a
template puts after the end-of-turn token (ChatML's newline).
"""

from __future__ import annotations

import functools
from typing import Sequence

from jaxgpt.data.tokenizer.special import ROLES, SPECIAL_TOKENS

CHOICES = ('model', 'jaxgpt')


def check_message(i: int, m, roles=ROLES) -> tuple[str, str]:
  """(role, content) of message i, or a ValueError saying what is wrong with it."""
  if not isinstance(m, dict) or 'role' not in m or 'content' not in m:
    raise ValueError(f'message {i}: expected {{"role": ..., "content": ...}}, got {m!r}')
  role, content = m['role'], m['content']
  if role not in roles:
    raise ValueError(f'message {i}: unknown role {role!r}; roles are {roles}')
  if not isinstance(content, str):
    raise ValueError(f'message {i}: content must be a string, got {type(content).__name__}')
  return role, content


class ChatFormat:
  """What every format provides; a subclass defines `render`, `render_text`, `stop_ids`
  and `end_of_turn_id`."""

  name = ''
  tokenizer = None
  stop_ids: tuple[int, ...] = ()
  end_of_turn_id: int = -1

  def render(self, messages: Sequence[dict], *,
             add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    raise NotImplementedError

  def render_text(self, messages: Sequence[dict], *, add_generation_prompt: bool = False) -> str:
    raise NotImplementedError

  def prompt(self, messages: Sequence[dict]) -> list[int]:
    """Ids of the conversation so far plus the generation prompt: what a sampler continues."""
    if not messages:
      raise ValueError('a prompt needs at least one message.')
    return self.render(messages, add_generation_prompt=True)[0]

  def reply(self, ids: Sequence[int]) -> tuple[str, bool]:
    """A sampled reply decoded up to its first stop id; (text, finished), finished False
    when no stop id was sampled (the reply ran out of tokens)."""
    ids = [int(i) for i in ids]
    stops = set(self.stop_ids)
    for n, i in enumerate(ids):
      if i in stops:
        return self.tokenizer.decode(ids[:n]), True
    return self.tokenizer.decode(ids), False

  def split_reply(self, prompt_messages: Sequence[dict], reply: str, finished: bool = True
                  ) -> tuple[list[int], list[int], list[int]]:
    """(context, header, reply) ids of `prompt_messages` answered by `reply`: context +
    header is `prompt(prompt_messages)`, header its generation prompt (what opens the
    assistant's turn: `<|assistant|>`, ChatML's `<|im_start|>assistant\\n`), and reply what
    a policy samples after it: the content and, when `finished`, the end-of-turn token (a
    reply cut at the token limit has none)."""
    messages = list(prompt_messages) + [{'role': 'assistant', 'content': reply}]
    ids, mask = self.render(messages)
    end = max(i for i, m in enumerate(mask) if m) + 1  # after the last turn's end-of-turn
    start = end
    while start > 0 and mask[start - 1]:
      start -= 1
    before = self.render(prompt_messages)[0]
    header = start - len(before) if ids[:len(before)] == before else 0
    return ids[:start - header], ids[start - header:start], ids[start:end if finished else end - 1]


class JaxgptFormat(ChatFormat):
  """jaxgpt's template (see the module docstring); needs the tokenizer's chat tokens."""

  name = 'jaxgpt'

  def __init__(self, tokenizer):
    self.tokenizer = tokenizer
    self.end_of_turn_id = tokenizer.end_of_turn_id  # fails, saying how, without chat tokens
    self.stop_ids = tuple(dict.fromkeys((self.end_of_turn_id, tokenizer.eot_id)))

  def render_text(self, messages, *, add_generation_prompt=False) -> str:
    end = SPECIAL_TOKENS['end_of_turn']
    parts = []
    for i, m in enumerate(messages):
      role, content = check_message(i, m)
      parts.append(f'{SPECIAL_TOKENS[role]}{content}{end}')
    if add_generation_prompt:
      parts.append(SPECIAL_TOKENS['assistant'])
    return ''.join(parts)

  def render(self, messages, *, add_generation_prompt=False):
    tok = self.tokenizer
    ids: list[int] = []
    mask: list[int] = []
    for i, m in enumerate(messages):
      role, content = check_message(i, m)
      body = tok.encode(content, allow_special=False, after_special=True) if content else []
      learn = int(role == 'assistant')
      ids += [tok.role_id(role), *body, self.end_of_turn_id]
      mask += [0] + [learn] * (len(body) + 1)
    if add_generation_prompt:
      ids.append(tok.role_id('assistant'))
      mask.append(0)
    return ids, mask


def check_choice(choice: str) -> None:
  if choice not in CHOICES:
    raise ValueError(f'config.tokenizer.chat_template={choice!r} must be one of {CHOICES}.')


@functools.lru_cache(maxsize=None)
def _is_jaxgpt_template(template: str) -> bool:
  from jaxgpt.data.tokenizer.hf_tokenizer import CHAT_TEMPLATE  # pylint: disable=import-outside-toplevel
  return template.strip() == CHAT_TEMPLATE.strip()


def uses_model_template(tokenizer, choice: str = 'model') -> bool:
  """Whether `choice` renders with the tokenizer's own template (it has one that is not
  jaxgpt's own, written back by an export)."""
  check_choice(choice)
  template = getattr(tokenizer, 'chat_template', None)
  return choice == 'model' and bool(template) and not _is_jaxgpt_template(template)


def for_tokenizer(tokenizer, choice: str = 'model') -> ChatFormat:
  """The chat format `choice` ('model' | 'jaxgpt') gives this tokenizer."""
  if uses_model_template(tokenizer, choice):
    from jaxgpt.data.chat_template import TemplateFormat  # pylint: disable=import-outside-toplevel
    return TemplateFormat(tokenizer, tokenizer.chat_template)
  return JaxgptFormat(tokenizer)
