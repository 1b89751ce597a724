r"""Reward-model scores of replies, to probe what the reward stage learned:

  python -m jaxgpt.cli.score --workdir DIR --prompt "What is 12 + 34?" --response 46 --response 47
  python -m jaxgpt.cli.score --workdir DIR --jsonl replies.jsonl

Each `--response` is scored as the assistant's reply to `--prompt` (one user turn). A
JSONL file holds one object per line: `{"prompt" | "messages", "response"}`, or a
comparison `{"prompt" | "messages", "chosen", "rejected"}` (both are scored and the row
says whether the model agrees). Scores are the raw scalar at the `<|reward|>` token; the
reward stage's mean and standard deviation on SFT samples are printed for scale.
"""

from __future__ import annotations

from absl import app, flags

from jaxgpt import errors
from jaxgpt.data import jsonl
from jaxgpt.inference import scoring
from jaxgpt.inference import loading as inference

# Shared with jaxgpt.cli.sample / jaxgpt.cli.chat when imported together (flags are defined once).
if 'workdir' not in flags.FLAGS:
  flags.DEFINE_string('workdir', None, 'Run directory written by jaxgpt.main.')
if 'mesh' not in flags.FLAGS:
  flags.DEFINE_string('mesh', '', 'Inference mesh overrides, e.g. "data=1,tensor=8".')
if 'checkpoint' not in flags.FLAGS:
  flags.DEFINE_string('checkpoint', None, 'A reward model\'s checkpoints directory instead of '
                      '--workdir (WORKDIR/reward/checkpoints).')
FLAGS = flags.FLAGS
_PROMPT = flags.DEFINE_string('prompt', None, 'The user turn the responses answer.')
_RESPONSE = flags.DEFINE_multi_string('response', [], 'A reply to score (repeatable).')
_JSONL = flags.DEFINE_string('jsonl', None, 'A JSONL file of replies or comparisons.')


def _row(obj, where: str) -> tuple[list[dict], list[str]]:
  """(prompt messages, replies) of one JSONL object; raises jsonl.BadRow."""
  del where  # jsonl.read_rows puts it in front of the message
  if not isinstance(obj, dict):
    raise jsonl.BadRow('bad_type', f'expected a JSON object, got {type(obj).__name__}')
  replies = ([obj.get('chosen'), obj.get('rejected')] if 'chosen' in obj
             else [obj.get('response')])
  if not all(isinstance(r, str) for r in replies):
    raise jsonl.BadRow('bad_type', 'need "response", or "chosen" and "rejected", as text')
  if 'messages' in obj:
    return list(obj['messages']), replies
  if isinstance(obj.get('prompt'), str):
    return [{'role': 'user', 'content': obj['prompt']}], replies
  raise jsonl.BadRow('missing_field', 'need "prompt" (text) or "messages"')


def read_jsonl(path: str) -> list[tuple[list[dict], list[str]]]:
  """[(prompt messages, replies)] of a file; a malformed line fails naming it."""
  return jsonl.read_rows([path], _row)[0]


def main(argv):
  inference.start_cli(argv)
  if _JSONL.value:
    rows = read_jsonl(_JSONL.value)
  elif _PROMPT.value is not None and _RESPONSE.value:
    rows = [([{'role': 'user', 'content': _PROMPT.value}], [r]) for r in _RESPONSE.value]
  else:
    raise app.UsageError('give --prompt with --response (repeatable), or --jsonl FILE.')
  loaded = inference.load(FLAGS.workdir, 'reward', checkpoint=FLAGS.checkpoint, mesh=FLAGS.mesh,
                          allowed=inference.SCORING_STAGES)
  meta = (inference.checkpoint_dir_meta(FLAGS.checkpoint) if FLAGS.checkpoint else
          inference.latest_checkpoint(FLAGS.workdir, 'reward', inference.SCORING_STAGES))[2]
  items = [(prompt, reply) for prompt, replies in rows for reply in replies]
  scores = scoring.score_replies(loaded.graphdef, loaded.params, loaded.mcfg,
                                 loaded.tokenizer, items)
  stats = meta.get('score_stats')
  if stats:
    print(f'# reward model scores on SFT samples: mean {stats["mean"]:+.3f}, '
          f'std {stats["std"]:.3f}')
  i = 0
  for prompt, replies in rows:
    question = prompt[-1]['content']
    row_scores = scores[i:i + len(replies)]
    i += len(replies)
    for reply, s in zip(replies, row_scores):
      print(f'{s:+8.3f}  {question!r} -> {reply!r}')
    if len(replies) == 2:  # a comparison: chosen first
      agrees = 'agrees' if row_scores[0] > row_scores[1] else 'DISAGREES'
      print(f'          chosen - rejected = {row_scores[0] - row_scores[1]:+.3f} ({agrees})')
  return 0


if __name__ == '__main__':
  errors.run(main, 'score')
