"""Held-out task accuracy (greedy) for a model asked in one of three ways.

- 'zero_shot': a base model given the bare question as a document, the way a user would
               type it: `<|endoftext|>` + question + newline. On the web (and in the Q/A
               pages of `config.data.qa_share`) the line after a question is its answer,
               bare or labelled ('A: ...', 'Answer: ...'), or whatever else the page goes
               on with: a base model completes documents, it does not answer by default;
- 'few_shot':  a base model given a document of solved same-task examples first, in the
               `Q: ...` / `A: ...` format (the prompt trick from the talk), then
               `Q: <question>` / `A:`;
- 'chat':      an assistant model given the question as a user turn of its chat
               format, answering until end of turn;
- 'chat_few_shot': the same after solved same-task examples given as earlier user /
               assistant turns of the conversation (how one prompts an instruct model by
               example).

Answers (`answer_text`): in the document modes, the first non-blank line of the
completion with a leading 'A:' or 'Answer:' label (optionally in bold) removed; in chat,
the whole reply. The stages after pretraining report these for base / SFT / RLHF models.
"""

from __future__ import annotations

import collections
import random
import re

from jaxgpt.data import tasks
from jaxgpt.inference import sampling

MODES = ('zero_shot', 'few_shot', 'chat', 'chat_few_shot')
CHAT_MODES = ('chat', 'chat_few_shot')


# A label a document may put before an answer: 'A:', 'Answer:', '**Answer:**'.
_ANSWER_LABEL = re.compile(r'^\s*(?:\*\*)?(?:A|Answer)\s*:(?:\*\*)?\s*', re.IGNORECASE)


def _document_prompt(tok, examples, question) -> list[int]:
  """Solved examples, then the question, in the `Q: ...` / `A: ...` format."""
  shots = ''.join(f'Q: {e.prompt}\nA: {e.answer}\n\n' for e in examples)
  return [tok.eot_id] + tok.encode(f'{shots}Q: {question}\nA:', allow_special=False)


def _bare_prompt(tok, question) -> list[int]:
  """The question alone, as the first line of a document."""
  return [tok.eot_id] + tok.encode(f'{question}\n', allow_special=False)


def prompts_for(mode: str, tok, eval_set, *, shots: int = 3, seed: int = 0) -> list[list[int]]:
  """Token ids of the question of every eval example, asked the `mode` way."""
  if mode not in MODES:
    raise ValueError(f'mode {mode!r} must be one of {MODES}')
  if mode == 'chat':
    return [tok.chat.prompt([{'role': 'user', 'content': e.prompt}]) for e in eval_set]
  if mode == 'zero_shot':
    return [_bare_prompt(tok, e.prompt) for e in eval_set]
  rng = random.Random(seed)
  pool = tasks.sample_examples('train', max(64, shots * 8), seed=seed)
  prompts = []
  for e in eval_set:
    same_task = [x for x in pool if x.task == e.task]
    shown = rng.sample(same_task, min(shots, len(same_task)))
    if mode == 'chat_few_shot':
      turns = [m for x in shown for m in x.messages()]
      prompts.append(tok.chat.prompt(turns + [{'role': 'user', 'content': e.prompt}]))
    else:
      prompts.append(_document_prompt(tok, shown, e.prompt))
  return prompts


def answer_text(mode: str, completion: str) -> str:
  """The answer part of a completion: in a document, its first non-blank line, less a
  leading 'A:' / 'Answer:' label; in a chat, the whole reply."""
  if mode in CHAT_MODES:
    return completion
  line = next((l for l in completion.split('\n') if l.strip()), '')
  return _ANSWER_LABEL.sub('', line, count=1)


def task_accuracy(graphdef, params, mcfg, tok, mode: str, eval_set, *, max_new_tokens: int = 16,
                  shots: int = 3, seed: int = 0) -> dict:
  """{'accuracy': float, 'per_task': {task: float}} over `eval_set` (greedy decoding)."""
  if mode not in MODES:
    raise ValueError(f'mode {mode!r} must be one of {MODES}')
  prompts = prompts_for(mode, tok, eval_set, shots=shots, seed=seed)
  completions = sampling.generate_text(graphdef, params, mcfg, tok, prompts,
                                       max_new_tokens=max_new_tokens)
  return accuracy_of(mode, eval_set, completions)


def accuracy_of(mode: str, eval_set, completions) -> dict:
  """{'accuracy', 'per_task'} of one completion per example of `eval_set`."""
  right, total = collections.Counter(), collections.Counter()
  for e, c in zip(eval_set, completions):
    total[e.task] += 1
    right[e.task] += int(tasks.check(e, e.prompt, answer_text(mode, c)))
  per_task = {k: right[k] / total[k] for k in sorted(total)}
  return {'accuracy': sum(right.values()) / max(1, sum(total.values())), 'per_task': per_task}
