"""The verifiable task suite: answers check, wrong answers fail, held-out never leaks."""

import random
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxgpt.data import tasks

NAMES = sorted(tasks.TASKS)


def test_every_generated_answer_checks_and_prompt_is_unambiguous():
  for split in tasks.SPLITS:
    for ex in tasks.sample_examples(split, 800, seed=1):
      assert tasks.check(ex, ex.prompt, ex.answer), ex
      assert tasks.check(ex.task, ex.prompt, ex.answer), ex
      assert tasks.check(None, ex.prompt, ex.answer), ex
      matches = [n for n in NAMES if tasks.TASKS[n].parse(ex.prompt) is not None]
      assert matches == [ex.task], (ex, matches)


def test_sampling_is_deterministic_and_covers_every_task():
  a = tasks.sample_examples('train', 300, seed=7)
  assert a == tasks.sample_examples('train', 300, seed=7)
  assert a != tasks.sample_examples('train', 300, seed=8)
  assert {ex.task for ex in a} == set(NAMES)


@pytest.mark.parametrize('name', NAMES)
def test_split_is_a_function_of_the_instance_in_the_prompt(name):
  task = tasks.TASKS[name]
  rng = random.Random(0)
  for split in tasks.SPLITS:
    for _ in range(300):
      prompt, _ = task.make(rng, split)
      assert task.split_of(task.parse(prompt)) == split


@pytest.mark.parametrize('name', NAMES)
def test_heldout_prompts_never_appear_in_training(name):
  train = {ex.prompt for ex in tasks.sample_examples('train', 6000, seed=0, tasks=[name])}
  train |= {ex.prompt for ex in tasks.sample_examples('train', 6000, seed=1, tasks=[name])}
  heldout = [ex.prompt for ex in tasks.heldout_eval_set(200, seed=0) if ex.task == name]
  assert len(set(heldout)) == 200
  assert not train & set(heldout)
  # Not only the same prompt: no train prompt shares a held-out instance (any template,
  # and for unordered pairs either order).
  task = tasks.TASKS[name]
  train_keys = {task.key(task.parse(p)) for p in train}
  heldout_keys = {task.key(task.parse(p)) for p in heldout}
  assert not train_keys & heldout_keys


def test_heldout_fraction_is_about_ten_percent():
  task = tasks.TASKS['reverse']
  words = tasks.vocabulary()
  frac = sum(task.split_of({'w': w}) == 'heldout' for w in words) / len(words)
  assert 0.07 < frac < 0.13


def test_unordered_pairs_share_a_split():
  for name in ('add', 'larger'):
    task = tasks.TASKS[name]
    for a in range(10, 100, 7):
      for b in range(11, 100, 5):
        swapped = {'a': str(b), 'b': str(a)}
        assert task.split_of({'a': str(a), 'b': str(b)}) == task.split_of(swapped)


def test_heldout_eval_set_is_deterministic_and_balanced():
  s = tasks.heldout_eval_set(5, seed=3)
  assert s == tasks.heldout_eval_set(5, seed=3)
  assert [ex.task for ex in s] == [n for n in NAMES for _ in range(5)]


@pytest.mark.parametrize('prompt,good,bad', [
    ("Is 'racecar' a palindrome?", ['Yes', 'yes.', ' Yes, it is! ', 'YES'],
     ['No', 'Yes or no', '', 'Maybe']),
    ("Is 'lemon' a palindrome?", ['No', 'no.', 'No, it is not.'], ['Yes', 'Not sure', 'no yes']),
    ("Reverse the word 'lemon'.", ['nomel', ' "nomel". ', 'Nomel'], ['lemon', 'nome l', 'nomels']),
    ("Sort the letters of 'lemon' alphabetically.", ['elmno', 'ELMNO'], ['lemon', 'elmon']),
    ('What is 23 + 45?', ['68', '68.', ' 68 '], ['67', 'sixty', '6 8', '']),
    ("How many times does the letter 'a' appear in 'banana'?", ['3', 'three', 'Three.'],
     ['2', 'a']),
    ("Count the letter 'z' in 'banana'.", ['0', 'zero'], ['1', 'none of them']),
    ("Write 'lemon' in capital letters.", ['LEMON', 'LEMON.'], ['lemon', 'Lemon', 'LEMONS']),
    ("How many letters are in 'lemon'?", ['5', 'five'], ['4', '55']),
    ('Which is larger, 37 or 52?', ['52', '52!'], ['37', '89', 'the second']),
])
def test_checker_examples(prompt, good, bad):
  name = tasks.task_of(prompt)
  assert name is not None
  for r in good:
    assert tasks.check(name, prompt, r), r
  for r in bad:
    assert not tasks.check(name, prompt, r), r


def test_check_rejects_unknown_prompts():
  assert not tasks.check(None, 'Tell me a joke.', 'Yes')
  with pytest.raises(ValueError):
    tasks.check('add', 'Tell me a joke.', '3')
  with pytest.raises(KeyError):
    tasks.check('no_such_task', 'What is 1 + 2?', '3')


words = st.text(alphabet='abcdefghijklmnopqrstuvwxyz', min_size=1, max_size=10)


@settings(max_examples=200, deadline=None)
@given(w=words, junk=st.text(alphabet=string.ascii_letters + string.digits + ' .!?\'"',
                             max_size=6))
def test_word_checkers_accept_exactly_the_right_word(w, junk):
  cases = {
      'reverse': f"Reverse the word '{w}'.",
      'sort_letters': f"Sort the letters of '{w}' alphabetically.",
      'uppercase': f"Convert '{w}' to uppercase.",
      'palindrome': f"Is '{w}' a palindrome?",
      'length': f"How long is the word '{w}'?",
  }
  for name, prompt in cases.items():
    answer = tasks.TASKS[name].answer(prompt)
    assert tasks.check(name, prompt, answer)
    assert tasks.check(name, prompt, f'  {answer}.\n')
    wrong = answer + junk
    if junk.strip(' \t\r\n\'"`.,!?;:') and name != 'palindrome':
      assert not tasks.check(name, prompt, wrong), (prompt, wrong)
  assert tasks.check('palindrome', cases['palindrome'], 'Yes' if w == w[::-1] else 'No')
  assert not tasks.check('palindrome', cases['palindrome'], 'No' if w == w[::-1] else 'Yes')


@settings(max_examples=200, deadline=None)
@given(a=st.integers(10, 99), b=st.integers(10, 99), delta=st.integers(-50, 50))
def test_number_checkers(a, b, delta):
  prompt = f'What is the sum of {a} and {b}?'
  assert tasks.check('add', prompt, str(a + b))
  assert tasks.check('add', prompt, str(a + b + delta)) == (delta == 0)
  if a != b:
    prompt = f'Which number is greater, {a} or {b}?'
    assert tasks.check('larger', prompt, str(max(a, b)))
    assert not tasks.check('larger', prompt, str(min(a, b)))


@settings(max_examples=200, deadline=None)
@given(c=st.sampled_from('abcdefghijklmnopqrstuvwxyz'), w=words)
def test_count_checker(c, w):
  prompt = f"How many '{c}'s are in the word '{w}'?"
  assert tasks.check('count_letter', prompt, str(w.count(c)))
  assert not tasks.check('count_letter', prompt, str(w.count(c) + 1))


# -- graded credit (the RL reward source 'partial') -------------------------------------------

@pytest.mark.parametrize('prompt, response, credit', [
    ("Reverse the word 'banana'.", 'Ananab.', 1.0),           # right: full credit
    ("Reverse the word 'banana'.", 'ananb', 0.5 * 10 / 11),   # 5 of 6 letters in order
    ("Reverse the word 'banana'.", 'The answer is ananab', 0.5 * 12 / 26),
    ("Sort the letters of 'kapo' alphabetically.", 'akpo', 0.5 * 0.75),
    ("Write 'kapo' in capital letters.", 'KAPo', 0.5 * 0.75),  # case counts here
    ("How many letters are in 'banana'?", '5', 0.5 * 5 / 6),
    ("How many letters are in 'banana'?", 'five', 0.5 * 5 / 6),
    ("How many letters are in 'banana'?", '13', 0.0),          # twice as far: nothing
    ("How many letters are in 'banana'?", 'six letters', 0.0),  # not a number
    ('What is 40 + 55?', '85', 0.5 * (1 - 10 / 95)),
    ("Count the letter 'z' in 'banana'.", '1', 0.0),           # right is 0: off by one is 0
    ('Which is larger, 40 or 55?', '40', 0.0),                  # a two-way choice: none
    ("Is 'abba' a palindrome?", 'No', 0.0),
])
def test_graded_credit(prompt, response, credit):
  task = tasks.TASKS[tasks.task_of(prompt)]
  assert task.score(prompt, response) == pytest.approx(credit)


def test_graded_credit_is_full_exactly_when_the_checker_accepts():
  for ex in tasks.sample_examples('train', 400, seed=5):
    task = tasks.TASKS[ex.task]
    assert task.score(ex.prompt, ex.answer) == 1.0
    wrong = ex.answer[:-1] or 'x'
    score = task.score(ex.prompt, wrong)
    assert (score == 1.0) == task.check(ex.prompt, wrong)
    assert 0.0 <= score <= 1.0 and (score == 1.0 or score <= tasks.PARTIAL_MAX)
  with pytest.raises(ValueError, match='not a'):
    tasks.TASKS['add'].score('Tell me a joke.', '3')
