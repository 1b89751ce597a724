"""The package layout the README's architecture section describes: entry and foundation
modules at the top, everything else in its package, and no import cycle."""

import ast
import os

import jaxgpt

ROOT = os.path.dirname(jaxgpt.__file__)
TOP_LEVEL = {'__init__', 'main', 'run', 'config', 'sharding', 'losses', 'errors'}
PACKAGES = {'model', 'data', 'train', 'rl', 'stages', 'inference', 'evals', 'hf', 'aot', 'cli'}


def _modules() -> dict[str, str]:
  """dotted name -> path of every module in the package."""
  out = {}
  for dirpath, _, files in os.walk(ROOT):
    for f in files:
      if f.endswith('.py'):
        rel = os.path.relpath(os.path.join(dirpath, f), os.path.dirname(ROOT))[:-3]
        name = rel.replace(os.sep, '.').removesuffix('.__init__')
        out[name] = os.path.join(dirpath, f)
  return out


def _imports(path: str, modules) -> set[str]:
  """jaxgpt modules imported at module level (imports inside functions run later and
  cannot make an import cycle)."""
  tree = ast.parse(open(path, encoding='utf-8').read())
  out = set()
  for node in tree.body:
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith('jaxgpt'):
      for alias in node.names:
        sub = f'{node.module}.{alias.name}'
        out.add(sub if sub in modules else node.module)
    elif isinstance(node, ast.Import):
      out.update(a.name for a in node.names if a.name.startswith('jaxgpt'))
  return out


def test_only_entry_and_foundations_at_the_top():
  entries = {os.path.splitext(f)[0] for f in os.listdir(ROOT) if not f.startswith(('_', '.'))
             or f == '__init__.py'}
  entries.discard('__pycache__')
  assert entries - TOP_LEVEL == PACKAGES


def test_no_import_cycle():
  modules = _modules()
  graph = {m: _imports(p, modules) for m, p in modules.items()}
  done, path = set(), []

  def visit(m):
    if m in path:
      raise AssertionError('import cycle: ' + ' -> '.join(path[path.index(m):] + [m]))
    if m in done or m not in graph:
      return
    path.append(m)
    for dep in sorted(graph[m]):
      visit(dep)
    path.pop()
    done.add(m)

  for m in sorted(graph):
    visit(m)


def test_no_stage_imports_another_stage():
  modules = _modules()
  stages = {m for m in modules if m.startswith('jaxgpt.stages.')}
  for m in stages:
    others = {d for d in _imports(modules[m], modules) if d in stages and d != m}
    others -= {'jaxgpt.stages.common', 'jaxgpt.stages.online_rl',
               'jaxgpt.stages.preference_data'}
    assert not others, f'{m} imports {others}'
