"""The errors a user can cause (bad data, bad config): reported as one clear line, exit code 2."""

import sys
from typing import Any, Callable, Optional, Sequence

from lcm_jax.checkpoint import CheckpointError
from lcm_jax.schema import ShardFormatError
from lcm_jax.sharding import MeshError

USER_ERRORS = (ShardFormatError, MeshError, CheckpointError, FileNotFoundError, ValueError)


def absl_main(body: Callable[[Any], Optional[str]]) -> Callable[[Sequence[str]], int]:
  """An absl tool's ``main(argv) -> exit status`` around ``body(FLAGS) -> text to print``.

  Orbax logs every restore step at INFO, so absl logging drops to WARNING unless ``--verbosity``
  is given; stray positional arguments and user errors (:data:`USER_ERRORS`) print one
  ``error: ...`` line on stderr and return 2.
  """
  def main(argv: Sequence[str]) -> int:
    from absl import flags  # pylint: disable=g-import-not-at-top
    from absl import logging  # pylint: disable=g-import-not-at-top
    if not flags.FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)
    if len(argv) > 1:
      print(f"error: unexpected arguments {list(argv[1:])}", file=sys.stderr)
      return 2
    try:
      text = body(flags.FLAGS)
    except USER_ERRORS as e:
      print(f"error: {e}", file=sys.stderr)
      return 2
    if text:
      print(text)
    return 0
  return main


def run_absl_tool(define_flags: Callable[[], Any], main: Callable[[Sequence[str]], int]) -> None:
  """``python -m <tool>``: defines the tool's flags, parses them, exits with ``main``'s status."""
  from absl import app  # pylint: disable=g-import-not-at-top
  define_flags()
  app.run(lambda argv: sys.exit(main(argv)))
