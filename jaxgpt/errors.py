"""The error boundary every command-line entry point runs inside.

A mistake the user can fix (a config field, a data or prompt file, a tokenizer, a
checkpoint, the file system) ends the program with a line or two that name the culprit
and say what to do, and exit status 1. Anything else is a bug and keeps its traceback;
`--verbose` shows the traceback of a user error too.

    if __name__ == '__main__':
      errors.run(main, 'sample')                                            # absl
      sys.exit(errors.guard(lambda: main(argv), 'train_tokenizer', verbose))  # argparse

Which errors are the user's: OSError (the file system) and a library's error that reports
a full, read-only or forbidden disk in its text (array_record and tensorstore write in C++),
FloatingPointError (a diverged run), absl usage and flag errors, and every ValueError or
RuntimeError that jaxgpt's own code raises (ConfigError, BadRowError, CheckpointError,
InferenceError, ...): jaxgpt raises those only after checking an input, with a message
that says what to change. The same types raised inside a library mean an input jaxgpt did
not check, or a bug, so they keep their traceback.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
import traceback
from typing import Callable

from absl import app, flags

from jaxgpt import config as config_lib

_VERBOSE = flags.DEFINE_bool('verbose', False,
                             'Show the traceback of every error, not only of bugs.')

# Code whose ValueError / RuntimeError is a checked input: the package and the tools.
_OWN_DIRS = tuple(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), d)
                  + os.sep for d in ('jaxgpt', 'tools'))

_OS_HINTS = {
    errno.ENOSPC: 'the disk is full; free some space or write elsewhere',
    errno.EDQUOT: 'the disk quota is used up; free some space or write elsewhere',
    errno.EROFS: 'the file system is read-only; write elsewhere',
    errno.EACCES: 'check its permissions, or write elsewhere',
    errno.EPERM: 'check its permissions, or write elsewhere',
    errno.ENOENT: 'check the path',
    errno.ENOTDIR: 'a part of the path is a file, not a directory',
    errno.EEXIST: 'it exists and is not a directory',
    errno.EISDIR: 'expected a file, found a directory',
}


def _disk_errno(e: BaseException) -> int | None:
  """The errno a library's error message reports, if it is one of a disk's."""
  text = str(e)
  return next((code for code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES)
               if os.strerror(code) in text), None)


def _raised_by_jaxgpt(e: BaseException) -> bool:
  tb = e.__traceback__
  if tb is None:
    return False
  while tb.tb_next is not None:
    tb = tb.tb_next
  return os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(_OWN_DIRS)


def is_user_error(e: BaseException) -> bool:
  if isinstance(e, (OSError, FloatingPointError, app.UsageError, flags.Error)):
    return True
  if isinstance(e, (ValueError, RuntimeError)) and _raised_by_jaxgpt(e):
    return True
  return isinstance(e, Exception) and _disk_errno(e) is not None


def message(e: BaseException) -> str:
  """What to print for a user error (without the program name)."""
  if isinstance(e, OSError) and e.strerror:
    hint = _OS_HINTS.get(e.errno)
    where = f'{e.filename}: ' if e.filename else ''
    return f'{where}{e.strerror}' + (f' ({hint}).' if hint else '.')
  code = None if _raised_by_jaxgpt(e) else _disk_errno(e)
  if code is not None:  # a library's message: its first line names the file
    return f'{str(e).strip().splitlines()[0][:400]} ({_OS_HINTS[code]}).'
  if isinstance(e, (app.UsageError, flags.Error)):
    return str(e).rstrip('.') + ' (--helpshort lists the flags).'
  return str(e) or type(e).__name__


def _exit_code(e: BaseException, prog: str, verbose: bool) -> int | None:
  """Prints the one-line report of a user error and returns the exit status; None for a
  bug (the caller re-raises it)."""
  if isinstance(e, KeyboardInterrupt):
    print(f'{prog}: interrupted.', file=sys.stderr, flush=True)
    return 130
  if not is_user_error(e):
    return None
  sys.stdout.flush()  # what the program printed before comes first
  if verbose:
    traceback.print_exception(e)
  else:
    # A library's failed call can leave sibling futures whose errors (the same failure)
    # asyncio logs with a traceback when they are collected, after our line.
    logging.getLogger('asyncio').setLevel(logging.CRITICAL)
  print(f'{prog}: {message(e)}', file=sys.stderr, flush=True)
  return 1


def guard(fn: Callable[[], int | None], prog: str, verbose: bool = False) -> int:
  """fn()'s exit status, or 1 after a one-line report of a user error."""
  try:
    return fn() or 0
  except (Exception, KeyboardInterrupt) as e:  # pylint: disable=broad-except
    code = _exit_code(e, prog, verbose)
    if code is None:
      raise
    return code


def _parse_flags(argv: list[str], prog: str) -> list[str]:
  """flags.FLAGS(argv), with config-override typos and flag errors as one line."""
  try:
    if 'config' in flags.FLAGS:
      config_lib.check_command_line(argv[1:])
    return flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except
    code = _exit_code(e, prog, verbose=any(a in ('--verbose', '--verbose=true') for a in argv))
    if code is None:
      raise
    sys.exit(code)


def run(main: Callable[[list[str]], int | None], prog: str) -> None:
  """absl's app.run(main) inside the boundary (flag parsing included); `prog` starts
  every message."""
  app.run(lambda argv: guard(lambda: main(argv), prog, _VERBOSE.value),
          flags_parser=lambda argv: _parse_flags(argv, prog))
