"""Grain worker processes (``config.data.worker_count > 0``) end with their trainer, even a
SIGKILLed one: a real ``python -m lcm_jax.main`` with 2 workers, its process tree read from /proc.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from lcm_jax import synthetic
from tests import helpers

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc (Linux)")

# Bounded waits, not timings: the workers exit within milliseconds of their parent.
START_TIMEOUT_S = 300
EXIT_TIMEOUT_S = 60


def _stat(pid: int) -> tuple[str, int, int] | None:
  """(state, parent pid, start time) of ``pid`` from /proc/PID/stat; None if there is none."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      text = f.read()
  except (FileNotFoundError, ProcessLookupError):
    return None
  fields = text.rpartition(")")[2].split()  # after "pid (comm)"; comm may hold spaces
  return fields[0], int(fields[1]), int(fields[19])


def _cmdline(pid: int) -> str:
  try:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
      return f.read().replace(b"\0", b" ").decode(errors="replace")
  except (FileNotFoundError, ProcessLookupError):
    return ""


def _descendants(root: int) -> dict[int, int]:
  """``{pid: start time}`` of every living descendant of ``root``."""
  parent_of = {}
  for name in os.listdir("/proc"):
    if name.isdigit() and (st := _stat(int(name))) is not None:
      parent_of[int(name)] = (st[1], st[2])
  out, frontier = {}, [root]
  while frontier:
    p = frontier.pop()
    for pid, (ppid, start) in parent_of.items():
      if ppid == p and pid not in out:
        out[pid] = start
        frontier.append(pid)
  return out


def _running(pid: int, start: int) -> bool:
  """Whether process ``pid`` (the one started at ``start``, not a reuse of its pid) still runs;
  a zombie (exited, not yet reaped by whoever adopted it) does not."""
  st = _stat(pid)
  return st is not None and st[2] == start and st[0] not in ("Z", "X")


def test_workers_exit_when_the_trainer_is_sigkilled(tmp_path):
  corpus = str(tmp_path / "corpus")
  synthetic.ensure_corpus(corpus, dim=32, seed=0, num_docs=300)
  wd = str(tmp_path / "wd")
  cmd = helpers.main_cmd(wd, corpus, "--config.data.worker_count=2",
                         "--config.train.num_steps=100000", "--config.train.checkpoint_every=2",
                         "--config.train.eval_every=0", "--config.train.log_every=1000",
                         "--config.train.async_checkpoint=False")
  with open(tmp_path / "train.log", "w") as log:
    # Own session, so that the cleanup below can reach workers that outlive the trainer.
    proc = subprocess.Popen(cmd, cwd=helpers.ROOT, env=helpers.cli_env(), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
  try:
    # Training has run (a checkpoint exists), so both workers are up and producing batches.
    deadline = time.time() + START_TIMEOUT_S
    ckpts = os.path.join(wd, "checkpoints")
    while time.time() < deadline and proc.poll() is None:
      if os.path.isdir(ckpts) and any(x.isdigit() for x in os.listdir(ckpts)):
        break
      time.sleep(0.2)
    assert proc.poll() is None, (tmp_path / "train.log").read_text()[-3000:]
    assert os.path.isdir(ckpts) and os.listdir(ckpts), f"no checkpoint in {START_TIMEOUT_S} s"
    family = _descendants(proc.pid)
    workers = [pid for pid in family
               if "spawn_main" in _cmdline(pid) and "resource_tracker" not in _cmdline(pid)]
    assert len(workers) == 2, {pid: _cmdline(pid) for pid in family}

    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    deadline = time.time() + EXIT_TIMEOUT_S
    while time.time() < deadline and any(_running(p, s) for p, s in family.items()):
      time.sleep(0.1)
    left = {p: _cmdline(p) for p, s in family.items() if _running(p, s)}
    assert not left, f"still running {EXIT_TIMEOUT_S} s after the trainer was SIGKILLed: {left}"
  finally:
    try:
      os.killpg(proc.pid, signal.SIGKILL)  # the trainer's session: orphans of a failed run
    except ProcessLookupError:
      pass
    proc.wait()
