"""The errors a user can cause (bad data, bad config, bad flags) and how tools report them.

Every check of user input raises :class:`UserError` (or one of its subclasses, which the modules
that check define: ``ShardFormatError``, ``MeshError``, ``CheckpointError``, ``ExportError``, ...).
Tools print such an error as one ``error: ...`` line on stderr and exit with status 2. Anything
else, a ``ValueError`` from a library included, is a bug and keeps its traceback.

This module imports nothing from the project, so every module can import it.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Optional, Sequence

USAGE_EXIT = 2          # bad input: one line, no traceback
DIVERGED_EXIT = 3       # training stopped on a non-finite loss or gradient


class UserError(ValueError):
  """Bad input a user can fix; the message names the file, record and field (or flag)."""


class ConfigError(UserError):
  """A config file, variant, field or value is wrong."""


USER_ERRORS = (UserError,)


def report(e: BaseException) -> int:
  """Prints ``error: <e>`` on stderr; returns :data:`USAGE_EXIT`."""
  print(f"error: {e}", file=sys.stderr)
  return USAGE_EXIT


def absl_main(body: Callable[[Any], Optional[str]]) -> Callable[[Sequence[str]], int]:
  """An absl tool's ``main(argv) -> exit status`` around ``body(FLAGS) -> text to print``.

  Orbax logs every restore step at INFO, so absl logging drops to WARNING unless ``--verbosity``
  is given; stray positional arguments and user errors (:class:`UserError`) print one
  ``error: ...`` line on stderr and return 2.
  """
  def main(argv: Sequence[str]) -> int:
    from absl import flags  # pylint: disable=g-import-not-at-top  (absl stays optional here)
    from absl import logging  # pylint: disable=g-import-not-at-top
    if not flags.FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)
    if len(argv) > 1:
      return report(f"unexpected arguments {list(argv[1:])}")
    try:
      text = body(flags.FLAGS)
    except USER_ERRORS as e:
      return report(e)
    if text:
      print(text)
    return 0
  return main


HELP_FLAGS = frozenset({"help", "helpshort", "helpfull", "helpxml", "?", "h"})


def asks_for_help(argv: Sequence[str]) -> bool:
  return any(a.startswith("-") and a.lstrip("-").split("=")[0] in HELP_FLAGS for a in argv[1:])


def parse_absl_flags(argv: Sequence[str]) -> list[str]:
  """absl's flag parsing for ``app.run(..., flags_parser=)``: ``--help`` exits 0 (absl exits 1),
  an unknown flag or a bad value prints one ``error:`` line and exits 2 (absl: a usage dump, 1)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  try:
    return flags.FLAGS(list(argv))
  except flags.Error as e:
    sys.exit(report((str(e) or type(e).__name__).splitlines()[0]))
  except SystemExit:
    if asks_for_help(argv):
      sys.exit(0)
    raise


def run_absl_tool(define_flags: Callable[[], Any], main: Callable[[Sequence[str]], int]) -> None:
  """``python -m <tool>``: defines the tool's flags, parses them, exits with ``main``'s status.

  ``--help`` exits 0; an unknown flag or a bad flag value exits 2 (absl's own usage line).
  """
  from absl import app  # pylint: disable=g-import-not-at-top
  define_flags()
  app.run(lambda argv: sys.exit(main(argv)), flags_parser=parse_absl_flags)
