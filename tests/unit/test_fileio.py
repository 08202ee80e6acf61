"""lcm_jax.fileio.write_file_atomic: all or nothing, the usual file mode, no numpy needed."""

import os
import subprocess
import sys

import pytest

from lcm_jax import fileio
from tests.helpers import ROOT


def test_replaces_whole_file_with_umask_mode(tmp_path):
  path = tmp_path / "out.json"
  path.write_text("old")
  old = os.umask(0o027)
  try:
    fileio.write_file_atomic(str(path), lambda f: f.write("new\n"), suffix=".json")
  finally:
    os.umask(old)
  assert path.read_text() == "new\n"
  assert oct(path.stat().st_mode & 0o777) == oct(0o640)
  assert sorted(os.listdir(tmp_path)) == ["out.json"]


def test_error_while_writing_leaves_the_old_file_and_no_temporary(tmp_path):
  path = tmp_path / "out.yaml"
  path.write_text("old")

  def write(f):
    f.write("half")
    raise RuntimeError("disk full")

  with pytest.raises(RuntimeError, match="disk full"):
    fileio.write_file_atomic(str(path), write)
  assert path.read_text() == "old"
  assert sorted(os.listdir(tmp_path)) == ["out.yaml"]


def test_imports_only_the_standard_library():
  code = ("import sys; import lcm_jax.fileio; "
          "print(sorted({m.split('.')[0] for m in sys.modules} & {'numpy', 'jax', 'yaml'}))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       cwd=ROOT).stdout
  assert out.strip() == "[]"
