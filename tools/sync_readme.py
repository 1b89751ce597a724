"""Copies a run's report into the README and docs/results.md, so their figures never go stale:

    python tools/sync_readme.py runs/tiny           # rewrite the marked blocks from runs/tiny
    python tools/sync_readme.py runs/tiny --check   # exit 1 if a block differs; write nothing

A block is the text between `<!-- report:NAME -->` and `<!-- /report:NAME -->` in README.md
or any docs/**/*.md; it is replaced by what `jaxgpt.evals.report_markdown` renders from
WORKDIR/report.json for NAME (the same functions write report.md, so the README quotes the
report exactly). Names: summary, source, results, accuracy, policy, examples, documents,
claims, curve, win_rates.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))
sys.path.insert(0, ROOT)

from jaxgpt import errors  # noqa: E402  pylint: disable=wrong-import-position
from jaxgpt.evals import report_markdown as md  # noqa: E402  pylint: disable=wrong-import-position

BLOCK = re.compile(r'(<!-- report:(\w+) -->\n)(.*?)(<!-- /report:\2 -->)', re.S)
RENDER = {
    'summary': md.summary_lines,
    'source': md.source_line,
    'results': md.headline_table,
    'accuracy': lambda r: md._table(r, md.ACCURACY_COLUMNS),  # pylint: disable=protected-access
    'policy': lambda r: md._table(r, md.POLICY_COLUMNS),  # pylint: disable=protected-access
    'examples': md.examples_table,
    'documents': md.document_samples,
    'claims': lambda r: md.claim_lines(r)[4:],
    'curve': lambda r: md.curve_lines(r.get('best_of_n_curve'))[4:],
    'win_rates': lambda r: md.win_rate_lines(r.get('win_rates') or {})[4:],
}


def documents() -> list[str]:
  return [os.path.join(ROOT, 'README.md')] + sorted(
      glob.glob(os.path.join(ROOT, 'docs', '**', '*.md'), recursive=True))


def synced(text: str, report: dict, where: str) -> str:
  """`text` with every marked block rendered from `report`."""
  def block(match):
    name = match.group(2)
    if name not in RENDER:
      raise ValueError(f'{where}: unknown block <!-- report:{name} --> (known: '
                       f'{", ".join(RENDER)}).')
    body = '\n'.join(RENDER[name](report))
    return f'{match.group(1)}{body}\n{match.group(4)}'
  return BLOCK.sub(block, text)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('workdir', help='the run directory holding report.json (stage=all writes it)')
  p.add_argument('--check', action='store_true', help='exit 1 if a block differs; write nothing')
  p.add_argument('--verbose', action='store_true', help='show the traceback of every error')
  args = p.parse_args(argv)
  path = os.path.join(args.workdir, 'report.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} does not exist: run the recipe with --config.stage=all '
                            f'(it writes report.json), or name the run directory that holds it.')
  with open(path, encoding='utf-8') as f:
    report = json.load(f)
  stale = []
  for doc in documents():
    with open(doc, encoding='utf-8') as f:
      text = f.read()
    new = synced(text, report, os.path.relpath(doc, ROOT))
    if new != text:
      stale.append(os.path.relpath(doc, ROOT))
      if not args.check:
        with open(doc, 'w', encoding='utf-8') as f:
          f.write(new)
  if args.check and stale:
    print(f'differ from {path}: {", ".join(stale)}; run python tools/sync_readme.py '
          f'{args.workdir}', file=sys.stderr)
    return 1
  print(('updated ' + ', '.join(stale)) if stale else 'blocks match the report')
  return 0


if __name__ == '__main__':
  sys.exit(errors.guard(main, 'sync_readme', '--verbose' in sys.argv))
