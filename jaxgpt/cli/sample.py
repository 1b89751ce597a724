r"""Completions from a trained stage:

  python -m jaxgpt.cli.sample --workdir DIR --stage sft --prompt "What is 2 + 3?"
  python -m jaxgpt.cli.sample --workdir DIR --stage pretrain --prompt "ROMEO:" --prompt "JULIET:"
  python -m jaxgpt.cli.sample --checkpoint CKPT_DIR --prompt "What is the capital of France?"

Prompts come from `--prompt` (repeatable) and `--prompts_file` (one per line). For the
pretrain stage a prompt starts a document (after `<|endoftext|>`, as the pretraining
run's own samples do); for sft/ppo, or with `--chat`, it is the user turn of a chat,
rendered in the model's chat format (an imported model: chat when it comes with its own
template). Prints each prompt and its completion.
Sampling: `--temperature` (0: greedy), `--top_k`, `--top_p`, `--seed`, `--max_new_tokens`.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging

from jaxgpt import errors
from jaxgpt.inference import sampling
from jaxgpt.inference import loading as inference

inference.define_flags()
flags.adopt_module_key_flags(inference)
_PROMPT = flags.DEFINE_multi_string('prompt', [], 'A prompt (repeat the flag for several).')
_PROMPTS_FILE = flags.DEFINE_string('prompts_file', None, 'A file with one prompt per line.')
_CHAT = flags.DEFINE_bool('chat', None, 'Render prompts as a user chat turn (default: on '
                          'for every stage but pretrain, and for an imported model with a '
                          'chat template of its own).')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 0, 'Prompts decoded at once (0: all).')

FLAGS = flags.FLAGS


def read_prompts(prompts, prompts_file) -> list[str]:
  out = list(prompts or [])
  if prompts_file:
    with open(prompts_file, 'rb') as f:
      for lineno, raw in enumerate(f, start=1):
        try:
          line = raw.decode('utf-8')
        except UnicodeDecodeError as e:
          raise ValueError(f'--prompts_file {prompts_file}:{lineno}: not UTF-8 text '
                           f'({e.reason} at byte {e.start}).') from None
        if line.strip():
          out.append(line.rstrip('\r\n'))
  return out


def prompt_ids(tok, prompt: str, as_chat: bool) -> list[int]:
  """The token ids a prompt is continued from."""
  if as_chat:
    return tok.chat.prompt([{'role': 'user', 'content': prompt}])
  # A raw prompt may spell control tokens (`<|im_start|>user...`): they are read as such.
  return [tok.eot_id] + tok.encode(prompt, allow_special=True)


def generate(loaded: inference.Loaded, prompts, *, as_chat: bool, max_new_tokens: int,
             temperature: float, top_k: int, top_p: float, seed: int,
             batch_size: int = 0) -> list[str]:
  """Completions (up to, not including, the stop token) of `prompts`."""
  graphdef, params, mcfg, tok = loaded[:4]
  ids = [prompt_ids(tok, p, as_chat) for p in prompts]
  longest = max(len(i) for i in ids)
  room = mcfg.max_seq_len - longest
  if room < 1:
    raise ValueError(f'a prompt has {longest} tokens, which leaves no room for an answer in '
                     f'config.model.max_seq_len={mcfg.max_seq_len}; shorten it.')
  n = min(max_new_tokens, room)
  if n < max_new_tokens:
    print(f'[sample] max_new_tokens {max_new_tokens} -> {n}: the longest prompt has '
          f'{longest} of the {mcfg.max_seq_len} positions.', file=sys.stderr, flush=True)
  return sampling.generate_text(graphdef, params, mcfg, tok, ids, max_new_tokens=n,
                                temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                                batch_size=batch_size or None)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}; prompts go in --prompt.')
  logging.set_verbosity(logging.WARNING)
  prompts = read_prompts(_PROMPT.value, _PROMPTS_FILE.value)
  if not prompts:
    raise app.UsageError('give at least one --prompt or a --prompts_file.')
  inference.check_source()
  loaded = inference.load_from_flags()
  as_chat = _CHAT.value if _CHAT.value is not None else (
      loaded.tokenizer.chat.name == 'model' if loaded.stage == 'import'
      else loaded.stage != 'pretrain')
  completions = generate(loaded, prompts, as_chat=as_chat,
                         max_new_tokens=FLAGS.max_new_tokens, temperature=FLAGS.temperature,
                         top_k=FLAGS.top_k, top_p=FLAGS.top_p, seed=FLAGS.seed,
                         batch_size=_BATCH_SIZE.value)
  for i, (prompt, completion) in enumerate(zip(prompts, completions), 1):
    print(f'=== [{i}] prompt ===\n{prompt}\n=== [{i}] completion ===\n{completion}\n',
          flush=True)
  return 0


if __name__ == '__main__':
  errors.run(main, 'sample')
