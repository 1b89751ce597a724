"""The README and docs/ against the code: generated pages current, every command, flag,
config field, file and link they show exists. Nothing is run; it reads the Markdown and
the sources (`tools/gen_reference.py` reads the flags without importing the entry points).

What is checked, in README.md and every docs/**/*.md:

* `python -m jaxgpt.X` modules exist and `python tools/X.py` scripts exist; every `--flag`
  on such a command line (backslash continuations joined) is one that entry point defines,
  and every `--config.a.b` is a config field;
* `config.a.b` and `--config.a.b` anywhere name config fields;
* repository paths (`jaxgpt/...`, `tools/...`, `tests/...`, `experiments/...`, `docs/...`
  and the top-level files) exist, `jaxgpt.x.y` modules import-resolve, `test_...` names are
  tests in tests/, and relative Markdown links resolve to files.
"""

import glob
import importlib.util
import os
import re

import pytest

import helpers
from jaxgpt import config as config_lib

gen_reference = helpers.load_tool('gen_reference')
ROOT = helpers.ROOT
README_LIMIT = 250
TOP_FILES = ('README.md', 'LICENSE', 'pyproject.toml', 'constraints.txt', '.ci/run')
REPO_DIRS = ('jaxgpt', 'tools', 'tests', 'experiments', 'docs')


def doc_files() -> list[str]:
  return ['README.md'] + sorted(os.path.relpath(p, ROOT) for p in
                                glob.glob(os.path.join(ROOT, 'docs', '**', '*.md'),
                                          recursive=True))


def read(path: str) -> str:
  with open(os.path.join(ROOT, path), encoding='utf-8') as f:
    return f.read()


def command_lines(text: str) -> list[str]:
  """Lines of code blocks and inline code spans, backslash continuations joined."""
  out = []
  for block in re.findall(r'```[^\n]*\n(.*?)```', text, flags=re.S):
    out += block.replace('\\\n', ' ').splitlines()
  prose = re.sub(r'```.*?```', '', text, flags=re.S)
  out += re.findall(r'`([^`\n]+)`', prose)
  return out


FIELDS = set(config_lib._flat_keys(config_lib.base_config()))  # pylint: disable=protected-access
SECTIONS = {f.split('.')[0] for f in FIELDS if '.' in f}


def config_field_problems(text: str) -> list[str]:
  bad = []
  for name in re.findall(r'(?<![\w/.])(?:--)?config\.([a-z_][\w]*(?:\.[a-z_]\w*)*)', text):
    if name.split('.')[0] not in SECTIONS and '.' in name:
      continue  # not a jaxgpt config (config.json, ...)
    if name in SECTIONS or name.split('.')[0] not in SECTIONS | FIELDS:
      continue
    if name not in FIELDS:
      bad.append(f'config.{name}')
  return bad


def command_problems(line: str) -> list[str]:
  bad = []
  entry = gen_reference.entry_points()
  for match in re.finditer(r'python -m (jaxgpt[\w.]*)|python (tools/\w+\.py)', line):
    module, tool = match.groups()
    if module and module.endswith('.'):
      continue  # a pattern: python -m jaxgpt.cli.<name>, python -m jaxgpt...
    if module:
      if importlib.util.find_spec(module) is None:
        bad.append(f'no module {module}')
        continue
      command = f'python -m {module}'
    else:
      if not os.path.exists(os.path.join(ROOT, tool)):
        bad.append(f'no script {tool}')
        continue
      command = f'python {tool}'
    if command not in entry:
      continue
    known = gen_reference.flags_of(command)
    rest = line[match.end():]
    nxt = re.search(r'python -m |python tools/|&&|;|\|', rest)
    for flag in re.findall(r'(?<![\w-])(--[a-z][\w.-]*)', rest[:nxt.start()] if nxt else rest):
      flag = flag.rstrip('.')
      if flag.startswith('--config.'):
        continue  # checked as a config field
      if flag.startswith('--no') and f'--{flag[4:]}' in known:
        continue  # absl's negated booleans
      if flag not in known:
        bad.append(f'{command}: no flag {flag}')
  return bad


def resolves(dotted: str) -> bool:
  """A module (found without importing it) or an attribute of one (e.g.
  jaxgpt.config.base_config)."""
  parts = dotted.split('.')
  for i in range(len(parts), 0, -1):
    try:
      spec = importlib.util.find_spec('.'.join(parts[:i]))
    except (ImportError, ValueError):
      spec = None
    if spec is None:
      continue
    obj = importlib.import_module('.'.join(parts[:i])) if i < len(parts) else None
    for attr in parts[i:]:
      if not hasattr(obj, attr):
        return False
      obj = getattr(obj, attr)
    return True
  return False


def path_problems(text: str, doc: str) -> list[str]:
  bad = []
  spans = re.findall(r'`([^`\n]+)`', re.sub(r'```.*?```', '', text, flags=re.S))
  spans += [w for block in re.findall(r'```[^\n]*\n(.*?)```', text, flags=re.S)
            for w in block.split()]
  for span in spans:
    if re.match(r'[\w.]+: ', span):
      continue  # a quoted message (`jaxgpt: --config: no experiment file ...`)
    for token in re.findall(r'[\w./*-]+', span):
      token = token.rstrip('.').split(':')[0]
      if token.startswith(tuple(d + '/' for d in REPO_DIRS)) or token in TOP_FILES:
        if '*' in token or '<' in token:
          if not glob.glob(os.path.join(ROOT, token)):
            bad.append(f'no file matches {token}')
        elif not os.path.exists(os.path.join(ROOT, token)):
          bad.append(f'no file {token}')
      elif re.fullmatch(r'jaxgpt(\.\w+)+', token):
        if not resolves(token):
          bad.append(f'no module or attribute {token}')
      elif re.fullmatch(r'test_\w+', token):
        if not any(f'def {token}(' in read(os.path.relpath(p, ROOT)) for p in
                   glob.glob(os.path.join(ROOT, 'tests', '*.py'))):
          bad.append(f'no test {token}')
  for target in re.findall(r'\]\(([^)\s]+)\)', text):
    if re.match(r'[a-z]+:', target) or target.startswith('#'):
      continue
    path = os.path.normpath(os.path.join(os.path.dirname(doc), target.split('#')[0]))
    if not os.path.exists(os.path.join(ROOT, path)):
      bad.append(f'broken link {target}')
  return bad


def test_readme_fits_a_front_page():
  n = len(read('README.md').splitlines())
  assert n <= README_LIMIT, f'README.md has {n} lines (at most {README_LIMIT}: move depth to docs/)'


@pytest.mark.parametrize('page', sorted(gen_reference.PAGES))
def test_reference_pages_are_generated_from_the_code(page):
  fresh = gen_reference.pages()[page]
  path = os.path.join('docs', 'reference', page)
  assert os.path.exists(os.path.join(ROOT, path)) and read(path) == fresh, (
      f'{path} is out of date with the code: run `python tools/gen_reference.py` and commit it')


@pytest.mark.parametrize('doc', doc_files())
def test_commands_paths_and_fields_in_the_docs_exist(doc):
  text = read(doc)
  problems = config_field_problems(text) + path_problems(text, doc)
  for line in command_lines(text):
    problems += command_problems(line)
  assert not problems, f'{doc}: ' + '; '.join(sorted(set(problems)))


def test_the_checks_catch_mistakes():
  """Each check fails on a made-up command, flag, field, file and link."""
  assert command_problems('python -m jaxgpt.main --config experiments/tiny.py --wrokdir x')
  assert command_problems('python -m jaxgpt.cli.nope --workdir x')
  assert command_problems('python tools/nope.py')
  assert not command_problems('python -m jaxgpt.cli.sample --workdir x --stage sft --prompt y')
  assert config_field_problems('`--config.train.stpes=5`')
  assert not config_field_problems('`--config.train.steps=5` and `config.json`')
  assert path_problems('`jaxgpt/nope.py` [x](nope.md)', 'docs/x.md') == [
      'no file jaxgpt/nope.py', 'broken link nope.md']
  assert path_problems('`test_no_such_test`', 'README.md')
