r"""Interactive chat with a trained stage, streamed token by token:

  python -m jaxgpt.cli.chat --workdir DIR --stage sft [--system "You are terse."] [--temperature 0.7]
  python -m jaxgpt.cli.chat --checkpoint CKPT_DIR   # e.g. a model tools/convert_hf.py imported

The whole conversation is kept and rendered with the chat template every turn; when it
would not leave room for a reply in the model's context (config.model.max_seq_len), the
oldest turns are dropped (the system message is kept). Commands: /reset (forget the
conversation), /help, /quit; Ctrl-D (end of input) also ends, Ctrl-C stops a reply.
"""

from __future__ import annotations

import sys
from typing import Iterable, Iterator, TextIO

from absl import flags

from jaxgpt import errors
from jaxgpt.inference import sampling
from jaxgpt.inference import loading as inference

inference.define_flags()
flags.adopt_module_key_flags(inference)
_SYSTEM = flags.DEFINE_string('system', '', 'System message opening the conversation.')

FLAGS = flags.FLAGS
USER_PROMPT = 'you> '
ASSISTANT_PREFIX = 'assistant> '
HELP = '/reset forgets the conversation, /quit (or Ctrl-D) ends, Ctrl-C stops a reply.'


class ContextFull(ValueError):
  """The newest message alone (with the system message) leaves no room for a reply."""


class Session:
  """One conversation: history, context-window truncation and streamed replies."""

  def __init__(self, loaded: inference.Loaded, *, system: str = '', max_new_tokens: int = 128,
               temperature: float = 0.8, top_k: int = 40, top_p: float = 1.0, seed: int = 0):
    self.graphdef, self.params, self.mcfg, self.tok = loaded[:4]
    self.system = system
    self.max_new_tokens = max_new_tokens
    self.settings = sampling.SamplingConfig(
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        stop_ids=sampling.default_stop_ids(self.tok), pad_id=self.tok.pad_id)
    self.seed = seed
    self.turns: list[dict] = []  # user / assistant messages, oldest first
    self.n_replies = 0
    self.dropped = 0  # turns dropped by the last `prompt_ids` call
    self.last_finished = True  # the last reply ended with a stop token
    self.last_length = 0  # tokens in the last reply (stop token excluded)

  def reset(self) -> None:
    self.turns = []

  def _messages(self, turns) -> list[dict]:
    head = [{'role': 'system', 'content': self.system}] if self.system else []
    return head + turns

  def prompt_ids(self, user_text: str) -> list[int]:
    """The rendered conversation + the new user turn, oldest turns dropped to leave room
    for a reply (up to max_new_tokens, but at least half the context)."""
    reserve = min(self.max_new_tokens, self.mcfg.max_seq_len // 2)
    budget = self.mcfg.max_seq_len - reserve
    turns = self.turns + [{'role': 'user', 'content': user_text}]
    self.dropped = 0
    while True:
      ids = self.tok.chat.prompt(self._messages(turns))
      if len(ids) <= budget:
        return ids
      if len(turns) == 1:
        raise ContextFull(
            f'that message needs {len(ids)} tokens with the template'
            + (' and the system message' if self.system else '')
            + f'; the model reads {self.mcfg.max_seq_len} in all and {reserve} are kept '
            'for the reply. Shorten it.')
      # Drop the oldest turn (a user message and, usually, its reply).
      cut = 2 if len(turns) > 2 and turns[1]['role'] == 'assistant' else 1
      turns = turns[cut:]
      self.dropped += cut

  def reply(self, user_text: str) -> Iterator[str]:
    """Streams the reply to `user_text` as text pieces (see `decode_stream`: a character
    spread over several byte-fallback tokens comes out whole); records both turns when
    the reply is complete (not when it is interrupted)."""
    ids = self.prompt_ids(user_text)
    if self.dropped:
      self.turns = self.turns[self.dropped:]
    stops = set(self.settings.stop_ids)
    gen = sampling.stream(self.graphdef, self.params, self.mcfg, ids, settings=self.settings,
                          seed=self.seed + self.n_replies)
    self.n_replies += 1
    self.last_finished = False
    tokens: list[int] = []

    def until_stop():
      for token in gen:
        if token in stops:
          self.last_finished = True
          return
        tokens.append(token)
        yield token

    try:
      yield from decode_stream(self.tok, until_stop())
    finally:
      gen.close()
      self.last_length = len(tokens)
    self.turns += [{'role': 'user', 'content': user_text},
                   {'role': 'assistant', 'content': self.tok.decode(tokens)}]


def decode_stream(tok, ids: Iterable[int]) -> Iterator[str]:
  """Text pieces of a stream of ids whose concatenation is `tok.decode(all ids)` (for a
  tokenizer whose decoding of a prefix is a prefix of the decoding, as jaxgpt's is).

  The ids so far are decoded as a whole each time and the new suffix is emitted; a
  trailing U+FFFD (a character whose UTF-8 bytes have not all arrived) is held back
  until it completes or the stream ends.
  """
  seen: list[int] = []
  shown = ''
  for i in ids:
    seen.append(int(i))
    text = tok.decode(seen).rstrip('\ufffd')
    if len(text) > len(shown) and text.startswith(shown):
      yield text[len(shown):]
      shown = text
  text = tok.decode(seen)
  if not text.startswith(shown):  # not prefix-stable: print the whole reply again
    yield '\n' + text
  elif len(text) > len(shown):
    yield text[len(shown):]


def _read_line(stdin: TextIO, stdout: TextIO, interactive: bool) -> str | None:
  """The next user line without its newline; None at end of input."""
  if interactive:  # input() gives line editing and history (readline)
    try:
      return input(USER_PROMPT)
    except EOFError:
      return None
  stdout.write(USER_PROMPT)
  stdout.flush()
  line = stdin.readline()
  if not line:
    return None
  text = line.rstrip('\r\n')
  stdout.write(text + '\n')  # echo piped input so the transcript reads as a dialogue
  return text


def repl(session: Session, stdin: TextIO, stdout: TextIO, *, interactive: bool = False) -> int:
  """Reads user lines until /quit or end of input; streams each reply. Returns 0."""
  def say(text: str) -> None:
    stdout.write(text)
    stdout.flush()

  while True:
    try:
      text = _read_line(stdin, stdout, interactive)
    except KeyboardInterrupt:
      text = None
    if text is None:  # end of input (Ctrl-D) or Ctrl-C at the prompt
      say('\n')
      return 0
    command = text.strip()
    if not command:
      continue
    if command in ('/quit', '/exit'):
      return 0
    if command == '/reset':
      session.reset()
      say('[conversation cleared]\n')
      continue
    if command == '/help':
      say(HELP + '\n')
      continue
    try:
      session.prompt_ids(text)  # fits the context? (the reply renders it again)
    except ContextFull as e:
      say(f'[{e}]\n')
      continue
    if session.dropped:
      say(f'[context full: forgot the {session.dropped} oldest message(s)]\n')
    say(ASSISTANT_PREFIX)
    try:
      for piece in session.reply(text):
        say(piece)
      if not session.last_finished:
        limit = (f'--max_new_tokens={session.max_new_tokens}'
                 if session.last_length >= session.max_new_tokens else 'the context end')
        say(f' [cut: reached {limit}]')
    except KeyboardInterrupt:
      say(' [stopped]')
    say('\n')


def main(argv):
  inference.start_cli(argv)
  loaded = inference.load_from_flags()
  session = Session(loaded, system=_SYSTEM.value, max_new_tokens=FLAGS.max_new_tokens,
                    temperature=FLAGS.temperature, top_k=FLAGS.top_k, top_p=FLAGS.top_p,
                    seed=FLAGS.seed)
  interactive = sys.stdin.isatty()
  if interactive:
    try:
      import readline  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    except ImportError:
      pass
    source = FLAGS.checkpoint or FLAGS.workdir
    print(f'[chat] {loaded.stage} model from {source} ({loaded.tokenizer.chat.name} chat '
          f'format). {HELP}', flush=True)
  return repl(session, sys.stdin, sys.stdout, interactive=interactive)


if __name__ == '__main__':
  errors.run(main, 'chat')
