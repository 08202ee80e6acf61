"""Atomic single-file writes, standard library only (the launch tools import it without numpy)."""

from __future__ import annotations

import os
import tempfile
from typing import IO, Any, Callable


def write_file_atomic(path: str, write: Callable[[IO[Any]], None], *, binary: bool = False,
                      suffix: str = "") -> str:
  """Calls ``write(f)`` on a temporary file beside ``path``, gives it the usual file mode (mkstemp
  creates 0600) and renames it to ``path``; on any error the temporary file is removed and
  ``path`` is untouched. Every tool's single-file output goes through here."""
  d = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=d)
  try:
    with (os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8")) as f:
      write(f)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return path
