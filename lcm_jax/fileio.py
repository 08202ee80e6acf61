"""Atomic single-file writes, standard library only (the launch tools import it without numpy)."""

from __future__ import annotations

import os
import tempfile
from typing import IO, Any, Callable

from lcm_jax.errors import UserError


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


def check_output_path(path: str, what: str, *, directory: bool = False,
                      create_parents: bool = True, overwrite: bool = True) -> str:
  """Checks, before any work is done and creating nothing, that a tool can write ``path``.

  ``path`` is a file (``directory=False``: it must not be a directory, nor exist when
  ``overwrite`` is False) or a directory (it must not be a file). Missing parents are fine when
  ``create_parents`` (the tool creates them), as long as the nearest existing ancestor is a
  directory in which a file can be created; otherwise the parent must exist. Remote paths
  (``gs://...``) pass as they are. Returns ``path``; raises :class:`UserError` naming ``what``
  (the flag) and the path.
  """
  if not path:
    raise UserError(f"{what}: empty path")
  if "://" in path:
    return path
  full = os.path.abspath(path)
  if directory and os.path.exists(full) and not os.path.isdir(full):
    raise UserError(f"{what}: {path} is a file, not a directory")
  if not directory:
    if os.path.isdir(full):
      raise UserError(f"{what}: {path} is a directory; give a file path")
    if os.path.exists(full) and not overwrite:
      raise UserError(f"{what}: {path} already exists")
  nearest = full if directory else os.path.dirname(full)
  if not create_parents and not os.path.exists(nearest):
    raise UserError(f"{what}: directory {nearest} does not exist")
  while not os.path.exists(nearest):
    nearest = os.path.dirname(nearest)
  if not os.path.isdir(nearest):
    raise UserError(f"{what}: {path}: {nearest} is a file, not a directory")
  try:  # a probe file: os.access says yes to root on a read-only mount
    fd, probe = tempfile.mkstemp(prefix=".probe-", dir=nearest)
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    raise UserError(f"{what}: cannot write in {nearest} ({e.strerror})") from None
  return path


def check_output_file(path: str, what: str, *, overwrite: bool = True) -> str:
  """:func:`check_output_path` for a file whose directory must already exist."""
  return check_output_path(path, what, create_parents=False, overwrite=overwrite)


def check_output_dir(path: str, what: str) -> str:
  """:func:`check_output_path` for a directory the tool creates (with its parents) if missing."""
  return check_output_path(path, what, directory=True)
