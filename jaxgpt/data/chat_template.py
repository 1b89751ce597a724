"""A model's own chat template (jinja), rendered and tokenized as transformers does it.

transformers' `apply_chat_template(messages, tokenize=True)` renders the template in a
sandboxed jinja2 environment (`trim_blocks`, `lstrip_blocks`, loop controls) with the
tokenizer's special-token strings (`bos_token`, `eos_token`, ...), `add_generation_prompt`
and the helpers `raise_exception`, `strftime_now` and a `tojson` that does not escape
HTML, then encodes the text without adding special tokens (a BOS the template writes
comes from the text). `TemplateFormat` does the same here, so SFT rows, prompts and
rollouts are the ids the model was tuned on. A template's own default system prompt
(SmolLM2's, Qwen's) is kept: nothing is stripped from what the template renders.

The loss mask comes from rendering prefixes: for the i-th message, an assistant turn, the
ids of `messages[:i]` with the generation prompt are a prefix of the whole
conversation's ids; the turn's learned tokens run from there to its end-of-turn token,
inclusive. The end-of-turn token is read off the template itself: the first special
token it writes after an assistant's content (`<|im_end|>` in ChatML, `<|eot_id|>` in
Llama 3, `<end_of_turn>` in Gemma). A template that does not render prefixes as prefixes
cannot give an exact mask and is refused with the message saying so.
"""

from __future__ import annotations

import datetime
import functools
import json

from jaxgpt.data import chat as chat_lib

# Roles a model template may use beyond jaxgpt's three (tool results, for instance).
TEMPLATE_ROLES = chat_lib.ROLES + ('tool',)
# The tokenizer_config.json entries transformers passes to a template as strings.
_SPECIAL_TOKEN_NAMES = ('bos_token', 'eos_token', 'unk_token', 'sep_token', 'pad_token',
                        'cls_token', 'mask_token')
_PROBE = [{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Hello'}]


class TemplateError(ValueError):
  """A chat template cannot be used; the message names the template's problem."""


@functools.lru_cache(maxsize=16)
def compile_template(source: str):
  """The template compiled in transformers' environment (see the module docstring)."""
  import jinja2  # pylint: disable=import-outside-toplevel
  from jinja2 import ext, sandbox  # pylint: disable=import-outside-toplevel

  class GenerationBlock(ext.Extension):
    """`{% generation %}...{% endgeneration %}` (templates that mark assistant text for
    transformers' own mask) renders its body; the mask here comes from prefixes."""
    tags = {'generation'}

    def parse(self, parser):
      lineno = next(parser.stream).lineno
      body = parser.parse_statements(('name:endgeneration',), drop_needle=True)
      return jinja2.nodes.Scope(body).set_lineno(lineno)

  def raise_exception(message):
    raise TemplateError(f'the chat template refused the conversation: {message}')

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)

  env = sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, ext.loopcontrols])
  env.filters['tojson'] = tojson
  env.globals['raise_exception'] = raise_exception
  env.globals['strftime_now'] = lambda fmt: datetime.datetime.now().strftime(fmt)
  try:
    return env.from_string(source)
  except jinja2.TemplateSyntaxError as e:
    raise TemplateError(f'the chat template is not valid jinja (line {e.lineno}: {e}).') from e


def special_token_strings(tokenizer) -> dict[str, str]:
  """bos_token, eos_token, ... of the tokenizer's config as strings (what templates read)."""
  from jaxgpt.data.tokenizer.hf_tokenizer import token_text  # pylint: disable=import-outside-toplevel
  config = getattr(tokenizer, 'config', None) or {}
  out = {}
  for name in _SPECIAL_TOKEN_NAMES:
    text = token_text(config.get(name))
    if text is not None:
      out[name] = text
  return out


class TemplateFormat(chat_lib.ChatFormat):
  """A model's jinja chat template behind `chat.ChatFormat` (see the module docstring)."""

  name = 'model'

  def __init__(self, tokenizer, source: str):
    self.tokenizer = tokenizer
    self.source = source
    self._template = compile_template(source)
    self._specials = special_token_strings(tokenizer)
    self.end_of_turn_id = self._probe_end_of_turn()
    eos = [tokenizer.token_id(self._specials['eos_token'])] if 'eos_token' in self._specials else []
    self.stop_ids = tuple(dict.fromkeys(
        [self.end_of_turn_id, *getattr(tokenizer, 'generation_eos_ids', ()), *eos,
         tokenizer.eot_id]))

  def render_text(self, messages, *, add_generation_prompt=False) -> str:
    for i, m in enumerate(messages):
      chat_lib.check_message(i, m, TEMPLATE_ROLES)
    return self._template.render(messages=[dict(m) for m in messages], tools=None,
                                 documents=None, add_generation_prompt=add_generation_prompt,
                                 **self._specials)

  def _encode(self, text: str) -> list[int]:
    return self.tokenizer.encode(text, allow_special=True)

  def _probe_end_of_turn(self) -> int:
    """The first special token the template writes after an assistant's content."""
    prefix = self._encode(self.render_text(_PROBE[:1], add_generation_prompt=True))
    ids = self._encode(self.render_text(_PROBE))
    special = self.tokenizer.special_ids()
    after = [t for t in ids[len(prefix):] if t in special] if ids[:len(prefix)] == prefix else []
    if not after:
      raise TemplateError(
          'the chat template writes no special token after an assistant reply (or does not '
          'render a conversation\'s prefix as its prefix), so replies have no end-of-turn '
          "token to learn and stop at; use config.tokenizer.chat_template='jaxgpt'.")
    return after[0]

  def render(self, messages, *, add_generation_prompt=False):
    ids = self._encode(self.render_text(messages, add_generation_prompt=add_generation_prompt))
    mask = [0] * len(ids)
    for i, m in enumerate(messages):
      if m['role'] != 'assistant':
        continue
      prefix = self._encode(self.render_text(messages[:i], add_generation_prompt=True))
      if ids[:len(prefix)] != prefix:
        raise TemplateError(
            f'message {i}: the chat template renders the conversation before this assistant '
            'turn (with its generation prompt) differently inside the whole conversation, '
            "so its tokens cannot be masked exactly; use config.tokenizer.chat_template='jaxgpt'.")
      end = next((j for j in range(len(prefix), len(ids)) if ids[j] == self.end_of_turn_id),
                 None)
      if end is None:
        raise TemplateError(f'message {i}: the chat template wrote no end-of-turn token '
                            f'(id {self.end_of_turn_id}) after this assistant turn.')
      mask[len(prefix):end + 1] = [1] * (end + 1 - len(prefix))
    return ids, mask
