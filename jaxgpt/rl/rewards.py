"""The host-side reward sources of the online-RL stages, and the reward spec that mixes them.

A reward spec (a config field such as `config.grpo.reward`) is a '+'-separated weighted
sum of terms `[WEIGHT*]SOURCE`, each source at most once:

    'checker'                        the task suite's verifier: 1.0 right, 0.0 wrong
    'partial'                        graded: 1.0 right, a wrong answer up to 0.5 by its
                                     closeness to the right one (tasks.Task.score)
    'model'                          the trained reward model
    'checker + 0.1*model'
    '0.5*checker + 0.5*mypkg.mod:fn' a user's function, `package.module:function`

The reward model runs on device, inside the caller's jitted scoring; this module only
reports its weight (`RewardSpec.model_weight`). Everything else runs here, on the host,
on decoded text: `HostRewards` gives the weighted sum of the host terms, which the caller
adds to `model_weight` times the model's score.

A user function has the signature of TRL's `reward_funcs`, so the same function serves
both: `fn(prompts: list[str], completions: list[str], **row_fields) -> list[float]`,
called with keyword arguments only; `row_fields` are the prompt data's other columns, one
list entry per row (TRL passes dataset columns the same way), so a function should take
`**kwargs` for the columns it does not use. It returns one finite float per completion;
anything else stops the run with one line naming the function (RewardFunctionError).
Returning None for a row, which TRL allows, is refused: return 0.0 instead.

Multi-process: each process calls `HostRewards` on its own rows only (the completions it
decoded); nothing here talks to other processes, so a user function sees a process's local
share of the batch and must not assume it sees all of it. Stats are local counts too; the
caller sums them across processes if it logs a global figure.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import math
import numbers
import re
from typing import Callable

import numpy as np

from jaxgpt import config as config_lib
from jaxgpt.data import tasks

MODEL = 'model'
CHECKER = 'checker'
PARTIAL = 'partial'
_TASK_SOURCES = (CHECKER, PARTIAL)  # computed here from the task suite
_FUNCTION = re.compile(r'[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*:[A-Za-z_]\w*')
_FORMS = ("a reward is a '+'-separated sum of [WEIGHT*]SOURCE terms, SOURCE one of 'model', "
          "'checker', 'partial' or 'package.module:function', each at most once, e.g. "
          "'checker + 0.1*model'")
_RESERVED_FIELDS = ('prompts', 'completions')


class RewardFunctionError(ValueError):
  """A user's reward function failed or returned something other than one finite float per
  completion; the message names the function, the row and what is expected. A ValueError
  raised by jaxgpt, so the error boundary (jaxgpt.errors) reports it in one line."""


@dataclasses.dataclass(frozen=True)
class RewardSpec:
  """A parsed reward spec: (source, weight) in the order written."""
  terms: tuple[tuple[str, float], ...]

  @property
  def model_weight(self) -> float:
    """The reward model's weight, 0.0 when it is not a term."""
    return dict(self.terms).get(MODEL, 0.0)

  @property
  def uses_model(self) -> bool:
    return MODEL in dict(self.terms)

  @property
  def host_terms(self) -> tuple[tuple[str, float], ...]:
    """The terms computed on the host from decoded text (all but the reward model)."""
    return tuple((source, w) for source, w in self.terms if source != MODEL)


def _spec_error(field: str, spec: str, problem: str) -> config_lib.ConfigError:
  return config_lib.ConfigError(f'{field}={spec!r}: {problem}; {_FORMS}.')


def _parse_weight(field: str, spec: str, term: str, text: str) -> float:
  try:
    weight = float(text)
  except ValueError:
    weight = math.nan
  if not math.isfinite(weight):
    raise _spec_error(field, spec, f'bad weight {text!r} in term {term!r} (a weight is a '
                      'finite number)')
  return weight


def _check_source(field: str, spec: str, term: str, source: str) -> None:
  if source in (MODEL, CHECKER, PARTIAL) or _FUNCTION.fullmatch(source):
    return
  if not source:
    raise _spec_error(field, spec, f'no source in term {term!r}')
  close = difflib.get_close_matches(source, (MODEL, CHECKER, PARTIAL), n=1)
  hint = f" (did you mean '{close[0]}'?)" if close else ''
  raise _spec_error(field, spec, f'unknown source {source!r} in term {term!r}{hint}')


def parse_reward_spec(spec: str, field: str) -> RewardSpec:
  """The terms of `spec`; ConfigError naming `field` and the bad term when it is malformed."""
  if not isinstance(spec, str) or not spec.strip():
    raise _spec_error(field, spec, 'no terms')
  terms: list[tuple[str, float]] = []
  for raw in spec.split('+'):
    term = raw.strip()
    if not term:
      raise _spec_error(field, spec, "an empty term (two '+' in a row, or one at an end)")
    parts = [p.strip() for p in term.split('*')]
    if len(parts) > 2:
      raise _spec_error(field, spec, f"more than one '*' in term {term!r}")
    weight = _parse_weight(field, spec, term, parts[0]) if len(parts) == 2 else 1.0
    source = parts[-1]
    _check_source(field, spec, term, source)
    if source in dict(terms):
      raise _spec_error(field, spec, f'source {source!r} named twice (term {term!r}); give '
                        'it one term with the summed weight')
    terms.append((source, weight))
  return RewardSpec(tuple(terms))


def _first_line(e: BaseException) -> str:
  text = str(e).strip()
  text = text.splitlines()[0] if text else ''
  return type(e).__name__ + (f': {text[:200]}' if text else '')


def _short_repr(value) -> str:
  text = repr(value)
  return text if len(text) <= 60 else text[:57] + '...'


def _resolve_function(name: str, field: str) -> Callable:
  """The callable `package.module:function` names; ConfigError saying what to do if none."""
  module_name, attr = name.split(':')
  try:
    module = importlib.import_module(module_name)
  except ModuleNotFoundError as e:
    if e.name is not None and (module_name == e.name or module_name.startswith(e.name + '.')):
      raise config_lib.ConfigError(
          f'{field}: no module {module_name!r} for {name} on the Python path; put the '
          'directory that holds it on PYTHONPATH, or install its package.') from e
    raise config_lib.ConfigError(
        f'{field}: importing module {module_name!r} for {name} failed: {_first_line(e)}; '
        'install what it imports or fix the module.') from e
  except Exception as e:  # pylint: disable=broad-except  # the user's module code failed
    raise config_lib.ConfigError(
        f'{field}: importing module {module_name!r} for {name} failed: {_first_line(e)}; '
        'fix the module (--verbose shows the traceback).') from e
  where = getattr(module, '__file__', None) or module_name
  if not hasattr(module, attr):
    raise config_lib.ConfigError(
        f'{field}: module {module_name!r} ({where}) has no attribute {attr!r}; define the '
        f'function there or fix the name in {field}.')
  fn = getattr(module, attr)
  if not callable(fn):
    raise config_lib.ConfigError(
        f'{field}: {name} is not a function (its type is {type(fn).__name__}); {field} names a '
        'function fn(prompts, completions, **row_fields) -> list[float].')
  return fn


def _check_batch(prompts, completions, row_fields: dict) -> int:
  """The batch size; a mismatch is the caller's bug (AssertionError keeps its traceback)."""
  b = len(completions)
  if len(prompts) != b:
    raise AssertionError(f'{len(prompts)} prompts for {b} completions')
  for key, column in row_fields.items():
    if len(column) != b:
      raise AssertionError(f'row field {key!r} has {len(column)} entries for {b} completions')
  return b


def _is_number(value) -> bool:
  return (isinstance(value, (numbers.Real, np.bool_))
          and not isinstance(value, (str, bytes)))


def _fits_float32(value) -> bool:
  """Finite, and finite as float32 (a reward beyond 3.4e38 would be inf there)."""
  try:
    value = float(value)
  except OverflowError:  # an int past float64's range
    return False
  return math.isfinite(value) and abs(value) <= float(np.finfo(np.float32).max)


class HostRewards:
  """The host terms of a reward spec on decoded text, one batch of local rows at a time."""

  def __init__(self, spec: str | RewardSpec, field: str):
    self.field = field
    self.spec = spec if isinstance(spec, RewardSpec) else parse_reward_spec(spec, field)
    self._functions = {source: _resolve_function(source, field)
                       for source, _ in self.spec.host_terms if source not in _TASK_SOURCES}

  def correct(self, prompts: list[str], completions: list[str],
              row_fields: dict[str, list] | None = None) -> np.ndarray:
    """The checker's verdict per row (bool, False for a prompt the suite does not know), for
    gold-accuracy metrics whether or not the checker is a reward term."""
    return self._check(prompts, completions, row_fields or {})[0].astype(bool)

  def _check(self, prompts, completions, row_fields,
             graded: bool = False) -> tuple[np.ndarray, int]:
    """(values_b, unknown): the checker's 1/0 per row (`graded`: tasks.Task.score). A row's
    task is row_fields['task'] when given and not empty, else the one the prompt's text
    belongs to; a row whose prompt is not one of that task's (or of any task's) is unknown
    and scores 0."""
    b = _check_batch(prompts, completions, row_fields)
    names = row_fields['task'] if 'task' in row_fields else [None] * b
    values_b = np.zeros(b, np.float32)
    unknown = 0
    for i, (prompt, completion, name) in enumerate(zip(prompts, completions, names)):
      name = name or tasks.task_of(prompt)
      task = tasks.TASKS.get(name) if isinstance(name, str) else None
      if task is None or task.parse(prompt) is None:
        unknown += 1
        continue
      values_b[i] = (task.score if graded else task.check)(prompt, completion)
    return values_b, unknown

  def _call_function(self, name: str, prompts, completions, row_fields) -> np.ndarray:
    b = len(completions)
    where = f'{self.field}: {name}'
    for key in _RESERVED_FIELDS:
      if key in row_fields:
        raise RewardFunctionError(
            f"{where} cannot be given the row field {key!r}: it is the name of the "
            "function's own argument; rename that field of the prompt data.")
    try:
      out = self._functions[name](prompts=list(prompts), completions=list(completions),
                                  **row_fields)
    except Exception as e:  # pylint: disable=broad-except  # the user's code failed
      raise RewardFunctionError(
          f'{where} raised {_first_line(e)} (on {b} completions; --verbose shows its '
          'traceback); a reward function returns one float per completion without '
          'raising.') from e
    if hasattr(out, '__array__') and not isinstance(out, (list, tuple)):
      out = np.asarray(out)
      if out.ndim != 1:
        raise RewardFunctionError(
            f'{where} returned an array of shape {out.shape} for {b} completions; a reward '
            'function returns one float per completion (a list, or an array of shape (n,)).')
      out = out.tolist()
    if not isinstance(out, (list, tuple)):
      raise RewardFunctionError(
          f'{where} returned {_short_repr(out)} (type {type(out).__name__}); a reward function '
          'returns a list of floats, one per completion.')
    if len(out) != b:
      raise RewardFunctionError(
          f'{where} returned {len(out)} values for {b} completions; a reward function returns '
          'one float per completion.')
    values_b = np.zeros(b, np.float32)
    for i, value in enumerate(out):
      if not _is_number(value):
        hint = (' (TRL allows None for a row a function does not score; here return 0.0)'
                if value is None else '')
        raise RewardFunctionError(
            f'{where} returned {_short_repr(value)} (type {type(value).__name__}) for row {i}; '
            f'a reward function returns one float per completion{hint}.')
      if not _fits_float32(value):
        raise RewardFunctionError(
            f'{where} returned {_short_repr(value)} for row {i}; a reward function returns '
            'one finite float per completion (within float32 range).')
      values_b[i] = value
    return values_b

  def __call__(self, prompts: list[str], completions: list[str],
               row_fields: dict[str, list] | None = None
               ) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, int]]:
    """(rewards_b, per_source, stats) for this process's rows.

    rewards_b: float32 (b,), the weighted sum of the host terms (the reward model's term is
    the caller's); per_source: source -> its unweighted float32 (b,) values; stats:
    'checker_unknown_prompts' (rows the checker could not verify, rewarded 0) when the
    checker or the graded score is a term.
    """
    row_fields = row_fields or {}
    b = _check_batch(prompts, completions, row_fields)
    rewards_b = np.zeros(b, np.float32)
    per_source: dict[str, np.ndarray] = {}
    stats: dict[str, int] = {}
    for source, weight in self.spec.host_terms:
      if source in _TASK_SOURCES:
        values_b, unknown = self._check(prompts, completions, row_fields,
                                        graded=source == PARTIAL)
        stats['checker_unknown_prompts'] = unknown
      else:
        values_b = self._call_function(source, prompts, completions, row_fields)
      per_source[source] = values_b
      rewards_b += np.float32(weight) * values_b
    return rewards_b, per_source, stats
