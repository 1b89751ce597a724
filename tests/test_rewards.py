"""Host-side RL rewards: the spec parser, the checker, user functions and their failures."""

import itertools
import sys
import textwrap

import numpy as np
import pytest

from jaxgpt import config as config_lib
from jaxgpt import errors
from jaxgpt.data import tasks
from jaxgpt.rl import rewards

FIELD = 'config.grpo.reward'
_module_ids = itertools.count()


def wrong_answer(answer: str) -> str:
  """An answer the checker must reject, of the right form (not just garbage)."""
  if answer in ('Yes', 'No'):
    return 'No' if answer == 'Yes' else 'Yes'
  if answer.isdigit():
    return str(int(answer) + 1)
  return answer + 'q'


@pytest.fixture
def user_module(tmp_path, monkeypatch):
  """write(source) -> the name of a fresh importable module holding `source`."""
  monkeypatch.syspath_prepend(str(tmp_path))
  names = []

  def write(source: str) -> str:
    name = f'user_rewards_{next(_module_ids)}'
    (tmp_path / f'{name}.py').write_text(textwrap.dedent(source))
    names.append(name)
    return name

  yield write
  for name in names:
    sys.modules.pop(name, None)


# -- parsing ----------------------------------------------------------------------------------

@pytest.mark.parametrize('spec, terms', [
    ('checker', (('checker', 1.0),)),
    ('partial + 0.1*model', (('partial', 1.0), ('model', 0.1))),
    ('model', (('model', 1.0),)),
    ('checker + 0.1*model', (('checker', 1.0), ('model', 0.1))),
    ('mypkg.mymod:my_reward', (('mypkg.mymod:my_reward', 1.0),)),
    ('mymod:fn', (('mymod:fn', 1.0),)),
    ('0.5*checker+0.5*mypkg.mod:fn', (('checker', 0.5), ('mypkg.mod:fn', 0.5))),
    (' 2 * model +  -1e-1*checker ', (('model', 2.0), ('checker', -0.1))),
])
def test_parse_every_form(spec, terms):
  parsed = rewards.parse_reward_spec(spec, FIELD)
  assert parsed.terms == terms
  assert parsed.uses_model == ('model' in dict(terms))
  assert parsed.model_weight == dict(terms).get('model', 0.0)
  assert parsed.host_terms == tuple(t for t in terms if t[0] != 'model')


@pytest.mark.parametrize('spec, names', [
    ('', 'no terms'),
    ('   ', 'no terms'),
    ('checker +', 'empty term'),
    ('checker ++ model', 'empty term'),
    ('abc*checker', "bad weight 'abc' in term 'abc*checker'"),
    ('nan*checker', "bad weight 'nan'"),
    ('inf*model', "bad weight 'inf'"),
    ('*checker', "bad weight '' in term '*checker'"),
    ('0.1*', "no source in term '0.1*'"),
    ('0.1**model', "more than one '*' in term '0.1**model'"),
    ('checkr', "unknown source 'checkr' in term 'checkr' (did you mean 'checker'?)"),
    ('partal', "unknown source 'partal' in term 'partal' (did you mean 'partial'?)"),
    ('0.5*Model', "unknown source 'Model'"),
    ('mypkg.mod', "unknown source 'mypkg.mod'"),
    ('mypkg.mod:', "unknown source 'mypkg.mod:'"),
    ('mypkg.mod:fn:x', "unknown source 'mypkg.mod:fn:x'"),
    ('checker + 0.5*checker', "source 'checker' named twice (term '0.5*checker')"),
    ('model+a.b:c+model', "source 'model' named twice"),
])
def test_malformed_spec_names_the_field_the_term_and_the_forms(spec, names):
  with pytest.raises(config_lib.ConfigError) as info:
    rewards.parse_reward_spec(spec, FIELD)
  text = str(info.value)
  assert text.startswith(f'{FIELD}={spec!r}: '), text
  assert names in text
  assert "'package.module:function'" in text and "'checker + 0.1*model'" in text
  assert '\n' not in text


# -- the checker ------------------------------------------------------------------------------

def test_checker_rewards_right_answers_1_and_wrong_answers_0():
  examples = tasks.sample_examples('train', 64, seed=3)
  assert {e.task for e in examples} == set(tasks.TASKS)
  prompts = [e.prompt for e in examples] * 2
  completions = [e.answer for e in examples] + [wrong_answer(e.answer) for e in examples]
  host = rewards.HostRewards('checker', FIELD)
  for row_fields in ({}, {'task': [e.task for e in examples] * 2}):
    rewards_b, per_source, stats = host(prompts, completions, row_fields)
    expected = np.array([1.0] * 64 + [0.0] * 64, np.float32)
    assert rewards_b.dtype == np.float32 and rewards_b.shape == (128,)
    np.testing.assert_array_equal(rewards_b, expected)
    np.testing.assert_array_equal(per_source['checker'], expected)
    assert stats == {'checker_unknown_prompts': 0}
    np.testing.assert_array_equal(host.correct(prompts, completions, row_fields), expected > 0)


def test_partial_gives_graded_credit_and_the_checker_still_decides_gold():
  examples = tasks.sample_examples('train', 64, seed=3)
  prompts = [e.prompt for e in examples] * 2 + ['Tell me a joke.']
  completions = ([e.answer for e in examples] + [wrong_answer(e.answer) for e in examples]
                 + ['ha'])
  host = rewards.HostRewards('partial', FIELD)
  rewards_b, per_source, stats = host(prompts, completions, {})
  expected = [tasks.TASKS[e.task].score(p, c)
              for e, p, c in zip(examples * 2, prompts, completions)] + [0.0]
  np.testing.assert_allclose(rewards_b, expected, rtol=1e-6)
  np.testing.assert_array_equal(per_source['partial'], rewards_b)
  assert np.all(rewards_b[:64] == 1.0) and np.all(rewards_b[64:] < 1.0)
  assert np.any(rewards_b[64:128] > 0.0)  # some wrong answers earn credit
  assert stats == {'checker_unknown_prompts': 1}
  np.testing.assert_array_equal(host.correct(prompts, completions),
                                [True] * 64 + [False] * 65)


def test_checker_gives_unknown_prompts_0_and_counts_them():
  ex = tasks.sample_examples('train', 1, seed=0, tasks=['add'])[0]
  other = 'reverse'
  prompts = [ex.prompt, 'Tell me a joke.', ex.prompt, ex.prompt, ex.prompt]
  completions = [ex.answer] * 5
  # '' falls back to the prompt's own task; a task that is not the prompt's, or one the
  # suite does not have, leaves the row unknown.
  row_fields = {'task': ['add', '', other, 'gsm8k', '']}
  host = rewards.HostRewards('checker', FIELD)
  rewards_b, _, stats = host(prompts, completions, row_fields)
  np.testing.assert_array_equal(rewards_b, [1, 0, 0, 0, 1])
  assert stats == {'checker_unknown_prompts': 3}
  np.testing.assert_array_equal(host.correct(prompts, completions, row_fields),
                                [True, False, False, False, True])


def test_correct_works_when_the_checker_is_no_term():
  ex = tasks.sample_examples('heldout', 1, seed=1)[0]
  host = rewards.HostRewards('model', FIELD)
  rewards_b, per_source, stats = host([ex.prompt] * 2, [ex.answer, wrong_answer(ex.answer)], {})
  np.testing.assert_array_equal(rewards_b, [0, 0])
  assert per_source == {} and stats == {}
  np.testing.assert_array_equal(host.correct([ex.prompt] * 2,
                                             [ex.answer, wrong_answer(ex.answer)]), [True, False])


# -- user functions ---------------------------------------------------------------------------

RECORDING = '''
CALLS = []

def reward(*args, **kwargs):
  CALLS.append((args, kwargs))
  return [float(len(c)) for c in kwargs['completions']]
'''


def test_user_function_gets_prompts_completions_and_row_fields_as_keywords(user_module):
  name = user_module(RECORDING)
  host = rewards.HostRewards(f'{name}:reward', FIELD)
  prompts, completions = ['p0', 'p1', 'p2'], ['a', 'bb', 'cccc']
  row_fields = {'task': ['add', '', 'x'], 'level': [1, 2, 3]}
  rewards_b, per_source, stats = host(prompts, completions, row_fields)
  calls = sys.modules[name].CALLS
  assert calls == [((), {'prompts': prompts, 'completions': completions,
                         'task': ['add', '', 'x'], 'level': [1, 2, 3]})]
  np.testing.assert_array_equal(rewards_b, [1, 2, 4])
  assert rewards_b.dtype == np.float32
  assert per_source[f'{name}:reward'].dtype == np.float32
  assert stats == {}


def test_user_function_in_a_package_with_a_trl_style_signature(tmp_path, monkeypatch):
  pkg = tmp_path / 'rewards_test_pkg'
  (pkg / 'sub').mkdir(parents=True)
  (pkg / '__init__.py').write_text('')
  (pkg / 'sub' / '__init__.py').write_text('')
  (pkg / 'sub' / 'fns.py').write_text(textwrap.dedent('''
      import numpy as np

      def brevity(prompts, completions, **kwargs):
        return np.array([-len(c) for c in completions], np.int64)
      '''))
  monkeypatch.syspath_prepend(str(tmp_path))
  try:
    host = rewards.HostRewards('rewards_test_pkg.sub.fns:brevity', FIELD)
    rewards_b, _, _ = host(['q', 'q'], ['ab', 'abc'], {'task': ['', '']})
    np.testing.assert_array_equal(rewards_b, [-2, -3])
  finally:
    for key in [k for k in sys.modules if k.startswith('rewards_test_pkg')]:
      del sys.modules[key]


def test_weighted_sum_of_checker_and_user_functions(user_module):
  name = user_module('''
      def length(prompts, completions, **kwargs):
        return [len(c) for c in completions]

      def flag(prompts, completions, bonus, **kwargs):
        return [bool(b) for b in bonus]
      ''')
  ex = tasks.sample_examples('train', 1, seed=5, tasks=['reverse'])[0]
  prompts = [ex.prompt] * 3
  completions = [ex.answer, wrong_answer(ex.answer), 'zz']
  spec = f'0.5*checker + -0.25*{name}:length + 2*{name}:flag + 0.1*model'
  host = rewards.HostRewards(spec, FIELD)
  assert host.spec.model_weight == pytest.approx(0.1)
  rewards_b, per_source, stats = host(prompts, completions, {'bonus': [0, 1, 1]})
  right = np.array([1, 0, 0], np.float32)
  length = np.array([len(c) for c in completions], np.float32)
  flag = np.array([0, 1, 1], np.float32)
  np.testing.assert_allclose(rewards_b, 0.5 * right - 0.25 * length + 2 * flag, rtol=1e-6)
  assert sorted(per_source) == sorted(['checker', f'{name}:length', f'{name}:flag'])
  np.testing.assert_array_equal(per_source['checker'], right)
  np.testing.assert_array_equal(per_source[f'{name}:length'], length)
  np.testing.assert_array_equal(per_source[f'{name}:flag'], flag)
  assert stats == {'checker_unknown_prompts': 0}
  # A parsed spec serves as well as its text.
  same = rewards.HostRewards(rewards.parse_reward_spec(spec, FIELD), FIELD)
  np.testing.assert_array_equal(same(prompts, completions, {'bonus': [0, 1, 1]})[0], rewards_b)


BAD_FUNCTIONS = '''
import math
import numpy as np

def raises(prompts, completions, **kwargs):
  raise KeyError('answer_column')

def too_few(prompts, completions, **kwargs):
  return [1.0] * (len(completions) - 1)

def nan_at_2(prompts, completions, **kwargs):
  return [0.0, 1.0, math.nan, 0.5]

def inf_at_1(prompts, completions, **kwargs):
  return np.array([0.0, -np.inf, 1.0, 0.5])

def huge_at_3(prompts, completions, **kwargs):
  return [0.0, 1.0, 2.0, 10**400]

def string_at_1(prompts, completions, **kwargs):
  return [0.0, '1.0', 2.0, 3.0]

def none_at_0(prompts, completions, **kwargs):
  return [None, 1.0, 2.0, 3.0]

def a_number(prompts, completions, **kwargs):
  return 1.0

def a_dict(prompts, completions, **kwargs):
  return {'reward': [1.0] * len(completions)}

def a_matrix(prompts, completions, **kwargs):
  return np.zeros((len(completions), 1))
'''


@pytest.mark.parametrize('fn, says', [
    ('raises', "raised KeyError: 'answer_column' (on 4 completions; --verbose shows its "
               'traceback); a reward function returns one float per completion without '
               'raising.'),
    ('too_few', 'returned 3 values for 4 completions; a reward function returns one float per '
                'completion.'),
    ('nan_at_2', 'returned nan for row 2; a reward function returns one finite float per '
                 'completion (within float32 range).'),
    ('inf_at_1', 'returned -inf for row 1; a reward function returns one finite float'),
    ('huge_at_3', f"returned {'1' + '0' * 56}... for row 3; a reward function returns one "
                  'finite float per completion (within float32 range).'),
    ('string_at_1', "returned '1.0' (type str) for row 1; a reward function returns one float per "
                    'completion.'),
    ('none_at_0', 'returned None (type NoneType) for row 0; a reward function returns one float '
                  'per completion (TRL allows None for a row a function does not score; here '
                  'return 0.0).'),
    ('a_number', 'returned 1.0 (type float); a reward function returns a list of floats, one per '
                 'completion.'),
    ('a_dict', "returned {'reward': [1.0, 1.0, 1.0, 1.0]} (type dict); a reward function returns"),
    ('a_matrix', 'returned an array of shape (4, 1) for 4 completions; a reward function '
                 'returns one float per completion'),
])
def test_each_bad_reward_function_is_one_line_naming_it(user_module, fn, says):
  name = user_module(BAD_FUNCTIONS)
  host = rewards.HostRewards(f'checker + {name}:{fn}', FIELD)
  with pytest.raises(rewards.RewardFunctionError) as info:
    host(['p'] * 4, ['c'] * 4, {})
  text = str(info.value)
  assert text.startswith(f'{FIELD}: {name}:{fn} {says}'), text
  assert '\n' not in text


def test_a_row_field_named_like_an_argument_is_refused(user_module):
  name = user_module(RECORDING)
  host = rewards.HostRewards(f'{name}:reward', FIELD)
  with pytest.raises(rewards.RewardFunctionError,
                     match=f"^{FIELD}: {name}:reward cannot be given the row field 'prompts'"):
    host(['p'], ['c'], {'prompts': ['x']})


def test_unresolvable_functions_are_config_errors(user_module):
  name = user_module('''
      import numpy as np
      NOT_A_FUNCTION = 3

      def fine(prompts, completions, **kwargs):
        return [0.0] * len(completions)
      ''')
  broken = user_module('import no_such_dependency_xyz\n')
  crashing = user_module('raise RuntimeError("no config file")\n')
  cases = {
      'no_such_module_xyz.mod:fn':
          f"{FIELD}: no module 'no_such_module_xyz.mod' for no_such_module_xyz.mod:fn on the "
          'Python path; put the directory that holds it on PYTHONPATH, or install its package.',
      f'{name}.sub:fn':
          f"{FIELD}: no module '{name}.sub' for {name}.sub:fn on the Python path",
      f'{broken}:fn':
          f"{FIELD}: importing module '{broken}' for {broken}:fn failed: ModuleNotFoundError: "
          "No module named 'no_such_dependency_xyz'; install what it imports or fix the module.",
      f'{crashing}:fn':
          f"{FIELD}: importing module '{crashing}' for {crashing}:fn failed: RuntimeError: no "
          'config file; fix the module (--verbose shows the traceback).',
      f'{name}:missing':
          f"{FIELD}: module '{name}' (",
      f'{name}:NOT_A_FUNCTION':
          f'{FIELD}: {name}:NOT_A_FUNCTION is not a function (its type is int); {FIELD} '
          'names a function fn(prompts, completions, **row_fields) -> list[float].',
  }
  for spec, says in cases.items():
    with pytest.raises(config_lib.ConfigError) as info:
      rewards.HostRewards(f'0.5*checker + {spec}', FIELD)
    text = str(info.value)
    assert text.startswith(says), text
    assert '\n' not in text
  with pytest.raises(config_lib.ConfigError) as info:
    rewards.HostRewards(f'{name}:missing', FIELD)
  assert str(info.value).endswith(
      f".py) has no attribute 'missing'; define the function there or fix the name in {FIELD}.")
  rewards.HostRewards(f'{name}:fine', FIELD)  # the module itself is fine


# -- the error boundary -----------------------------------------------------------------------

def test_reward_errors_are_user_errors_of_one_line(user_module, capsys):
  name = user_module(BAD_FUNCTIONS)
  host = rewards.HostRewards(f'{name}:raises', FIELD)

  def score():
    host(['p'] * 4, ['c'] * 4, {})

  with pytest.raises(rewards.RewardFunctionError) as info:
    score()
  assert errors.is_user_error(info.value)
  assert errors.message(info.value) == str(info.value)
  assert errors.guard(score, 'grpo') == 1
  err = capsys.readouterr().err
  assert err == f'grpo: {info.value}\n'
  assert 'Traceback' not in err

  def resolve():
    rewards.HostRewards('no_such_module_xyz.mod:fn', FIELD)

  assert errors.guard(resolve, 'grpo') == 1
  err = capsys.readouterr().err
  assert err.startswith(f"grpo: {FIELD}: no module 'no_such_module_xyz.mod'")
  assert err.count('\n') == 1

  def parse():
    rewards.parse_reward_spec('checker + checker', FIELD)

  assert errors.guard(parse, 'grpo') == 1
  assert capsys.readouterr().err.count('\n') == 1
