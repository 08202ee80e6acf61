"""Multi-process training for real: 2 processes x 4 CPU devices vs 1 process x 8 devices.

The processes find each other through JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
JAX_PROCESS_ID on localhost (CPU collectives over gloo), train the tiny config, are SIGKILLed after
their first checkpoint, restart and finish. Both runs use ``config.data.data_shards=2``, so the
global batches are identical (checked directly below) and the final params must agree up to the
summation order of the cross-process all-reduce.

Also: the environment checks of :mod:`lcm_jax.distributed` and the start-up errors (inconsistent
process counts, an unreachable coordinator) as a user sees them: one ``error:`` line, exit 2.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time

import jax
import numpy as np
import pytest

from configs import mse_1b6
from data_prep import synthetic
from lcm_jax import checkpoint as ckpt_lib
from lcm_jax import data as data_lib
from lcm_jax import distributed
from lcm_jax import train
from tests import helpers

STEPS = 30
CKPT_EVERY = 10
# Relative to each leaf's largest magnitude. Measured 9e-6 after 40 steps (gloo all-reduce vs
# in-process reduction order); a different data order gives ~1e-1.
PARAM_RTOL = 1e-4


# ----------------------------------------------------------------------------------------------
# The environment


def _env(**kv):
  return {f"JAX_{k}": str(v) for k, v in kv.items()}


def test_resolve_explicit_and_single():
  spec = distributed.resolve("auto", _env(COORDINATOR_ADDRESS="host0:1234", NUM_PROCESSES=4,
                                          PROCESS_ID=3, LOCAL_DEVICE_IDS="0,1"))
  assert spec == distributed.Spec("explicit", "host0:1234", 4, 3, (0, 1))
  assert distributed.resolve("auto", {}).kind == "single"
  assert distributed.resolve("off", _env(COORDINATOR_ADDRESS="h:1", NUM_PROCESSES=2,
                                         PROCESS_ID=0)).kind == "single"
  assert distributed.resolve("on", {}).kind == "detected"


@pytest.mark.parametrize("env, message", [
    (_env(COORDINATOR_ADDRESS="h:1234"), "JAX_NUM_PROCESSES, JAX_PROCESS_ID not"),
    (_env(NUM_PROCESSES=2, PROCESS_ID=0), "JAX_COORDINATOR_ADDRESS not"),
    (_env(COORDINATOR_ADDRESS="h:1234", NUM_PROCESSES=2, PROCESS_ID=2), "JAX_PROCESS_ID=2 is out"),
    (_env(COORDINATOR_ADDRESS="h:1234", NUM_PROCESSES=0, PROCESS_ID=0), "JAX_NUM_PROCESSES=0"),
    (_env(COORDINATOR_ADDRESS="h:1234", NUM_PROCESSES="two", PROCESS_ID=0), "not an integer"),
    (_env(COORDINATOR_ADDRESS="h", NUM_PROCESSES=2, PROCESS_ID=0), "expected host:port"),
    (_env(COORDINATOR_ADDRESS="h:1", NUM_PROCESSES=2, PROCESS_ID=0, LOCAL_DEVICE_IDS="a"),
     "JAX_LOCAL_DEVICE_IDS"),
])
def test_resolve_rejects_inconsistent_env(env, message):
  with pytest.raises(distributed.DistributedError, match=message):
    distributed.resolve("auto", env)


# ----------------------------------------------------------------------------------------------
# Data: the global batch depends on config.data.data_shards, not on the process count


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("data") / "synthetic")
  synthetic.ensure_corpus(out, dim=32, seed=0, num_docs=1200)
  return out


def _data_config(corpus, shards):
  c = mse_1b6.get_config("tiny")
  c.data.train = corpus
  c.data.generate_synthetic_if_missing = False
  c.data.data_shards = shards
  return c


def _take(it, n):
  return [next(it) for _ in range(n)]


def test_global_batch_independent_of_process_count(corpus):
  c = _data_config(corpus, 2)
  one = _take(data_lib.make_train_iterator(c, process_index=0, process_count=1), 4)
  two = [_take(data_lib.make_train_iterator(c, process_index=p, process_count=2), 4)
         for p in range(2)]
  for step, batch in enumerate(one):
    for k in batch:
      np.testing.assert_array_equal(batch[k], np.concatenate([two[0][step][k], two[1][step][k]]))
  # The default (one data shard per process) really is another data order: the check can fail.
  default = _take(data_lib.make_train_iterator(_data_config(corpus, 0), process_index=0,
                                               process_count=1), 1)
  assert not np.array_equal(default[0]["embeddings"], one[0]["embeddings"])


def test_two_data_shards_resume_exactly(corpus):
  c = _data_config(corpus, 2)
  it = data_lib.make_train_iterator(c, process_index=0, process_count=1)
  _take(it, 3)
  state = json.loads(json.dumps(it.get_state()))
  expected = _take(it, 2)
  resumed = data_lib.make_train_iterator(c, process_index=0, process_count=1)
  resumed.set_state(state)
  for a, b in zip(expected, _take(resumed, 2)):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.parametrize("shards, processes, message", [
    (3, 2, "data_shards=3 is not divisible by the process count"),
    (3, 1, r"global_batch_size \(16\) is not divisible by config.data.data_shards \(3\)"),
])
def test_data_shards_errors(corpus, shards, processes, message):
  with pytest.raises(ValueError, match=message):
    data_lib.make_train_iterator(_data_config(corpus, shards), process_index=0,
                                 process_count=processes)


# ----------------------------------------------------------------------------------------------
# Real processes


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _train_cmd(workdir, corpus, *extra):
  return helpers.main_cmd(workdir, corpus, "--config.data.data_shards=2",
                          f"--config.train.num_steps={STEPS}",
                          f"--config.train.checkpoint_every={CKPT_EVERY}",
                          "--config.train.eval_every=0", "--config.train.log_every=5",
                          "--config.train.async_checkpoint=False", *extra)


def _start(cmd, num_processes, port, devices_per_process, log_prefix, **env_extra):
  procs = []
  for pid in range(num_processes):
    env = helpers.cli_env()
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices_per_process}"
    if num_processes > 1:
      env.update(_env(COORDINATOR_ADDRESS=f"localhost:{port}", NUM_PROCESSES=num_processes,
                      PROCESS_ID=pid))
    env.update(env_extra.get(f"env{pid}", {}))
    log = open(f"{log_prefix}.p{pid}.log", "w")  # pylint: disable=consider-using-with
    procs.append((subprocess.Popen(cmd, cwd=helpers.ROOT, env=env, stdout=log,
                                   stderr=subprocess.STDOUT), log))
  return procs


def _wait(procs, timeout):
  codes = []
  for p, log in procs:
    try:
      codes.append(p.wait(timeout=timeout))
    finally:
      if p.poll() is None:
        p.kill()
      log.close()
  return codes


def _read(path):
  with open(path) as f:
    return f.read()


def _params(workdir):
  s = train.setup(mse_1b6.get_config("tiny"))
  ck = ckpt_lib.Checkpointer(workdir, create=False, async_save=False)
  try:
    state, _ = ck.restore(None, s.abstract_state)
  finally:
    ck.close()
  return int(state["step"]), jax.device_get(state["params"])


@pytest.mark.slow
def test_two_processes_killed_and_restarted_match_one_process(corpus, tmp_path):
  multi, single = str(tmp_path / "multi"), str(tmp_path / "single")
  logs = str(tmp_path / "log")

  # 2 processes x 4 devices, SIGKILLed once the first checkpoint is complete.
  procs = _start(_train_cmd(multi, corpus), 2, _free_port(), 4, logs + "-a")
  first = os.path.join(multi, "checkpoints", str(CKPT_EVERY))
  deadline = time.time() + 300
  while not os.path.isdir(first) and time.time() < deadline:
    assert all(p.poll() is None for p, _ in procs), _read(logs + "-a.p0.log")[-3000:]
    time.sleep(0.2)
  assert os.path.isdir(first), "no checkpoint within 300 s"
  for p, _ in procs:
    p.send_signal(signal.SIGKILL)
  assert _wait(procs, 60) == [-signal.SIGKILL] * 2
  killed_at = ckpt_lib.Checkpointer(multi, create=False, async_save=False).latest_step()
  assert killed_at is not None and killed_at < STEPS

  # Restart (new coordinator port) and finish.
  codes = _wait(_start(_train_cmd(multi, corpus), 2, _free_port(), 4, logs + "-b"), 600)
  assert codes == [0, 0], _read(logs + "-b.p0.log")[-3000:] + _read(logs + "-b.p1.log")[-3000:]
  restart_log0, restart_log1 = _read(logs + "-b.p0.log"), _read(logs + "-b.p1.log")
  assert f"Restoring checkpoint {killed_at}" in restart_log0
  assert "process 0/2: 4 local, 8 global cpu devices" in restart_log0
  # Progress lines and metrics come from process 0 only.
  assert f"step {STEPS}/{STEPS}" in restart_log0 and "/30 (" not in restart_log1
  with open(os.path.join(multi, "metrics.jsonl")) as f:
    steps = [json.loads(line)["step"] for line in f if "train/loss" in line]
  assert steps == sorted(set(steps)) and steps[-1] == STEPS  # each step logged once

  # 1 process x 8 devices, same config, uninterrupted.
  codes = _wait(_start(_train_cmd(single, corpus), 1, None, 8, logs + "-c"), 600)
  assert codes == [0], _read(logs + "-c.p0.log")[-3000:]

  # The data-iterator state of 2 processes does not resume in 1: a clear error, exit 2.
  r = helpers.run_cli(_train_cmd(multi, corpus) + [f"--config.train.num_steps={STEPS + 5}"])
  assert r.returncode == 2, r.stderr[-2000:]
  assert ("the data-iterator state was saved by 2 process(es), this run has 1"
          in r.stderr.strip().splitlines()[-1])

  step_m, multi_params = _params(multi)
  step_s, single_params = _params(single)
  assert step_m == step_s == STEPS
  leaves_m = jax.tree_util.tree_flatten_with_path(multi_params)[0]
  leaves_s = dict(jax.tree_util.tree_flatten_with_path(single_params)[0])
  for path, a in leaves_m:
    b = leaves_s[path]
    err = float(np.max(np.abs(a - b)) / np.max(np.abs(b)))
    assert err < PARAM_RTOL, (jax.tree_util.keystr(path), err)


def _main_alone(workdir, corpus, timeout_s, **env):
  e = helpers.cli_env()
  e["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
  e.update(env)
  return subprocess.run(_train_cmd(workdir, corpus, f"--distributed_timeout={timeout_s}"),
                        cwd=helpers.ROOT, env=e, capture_output=True, text=True, timeout=120)


def test_unreachable_coordinator_is_a_clear_error(corpus, tmp_path):
  port = _free_port()
  t = time.time()
  r = _main_alone(str(tmp_path / "w"), corpus, 3,
                  **_env(COORDINATOR_ADDRESS=f"localhost:{port}", NUM_PROCESSES=2, PROCESS_ID=1))
  assert r.returncode == 2, r.stderr[-2000:]
  assert time.time() - t < 60
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and f"coordinator localhost:{port} cannot be reached" in last
  assert "--distributed_timeout=3s" in last
  assert not os.path.exists(tmp_path / "w")


def test_bad_process_id_is_a_clear_error(corpus, tmp_path):
  r = _main_alone(str(tmp_path / "w"), corpus, 3,
                  **_env(COORDINATOR_ADDRESS="localhost:1", NUM_PROCESSES=2, PROCESS_ID=2))
  assert r.returncode == 2
  assert r.stderr.strip().splitlines()[-1] == (
      "error: JAX_PROCESS_ID=2 is out of range for JAX_NUM_PROCESSES=2 (ids are 0..1)")


def test_inconsistent_process_counts_are_a_clear_error(corpus, tmp_path):
  """Process 1 believes in 3 processes, the coordinator (process 0) in 2."""
  port = _free_port()
  procs = _start(_train_cmd(str(tmp_path / "w"), corpus, "--distributed_timeout=20"), 2, port, 4,
                 str(tmp_path / "log"), env1=_env(NUM_PROCESSES=3))
  codes = _wait(procs, 120)
  log1 = _read(str(tmp_path / "log.p1.log"))
  assert codes[1] == 2, log1[-2000:]
  assert ("error: JAX_NUM_PROCESSES=3 but the coordinator formed a job of 2 processes"
          in log1), log1[-2000:]
  log0 = _read(str(tmp_path / "log.p0.log"))
  assert codes[0] == 2 and ("error: process 1 has JAX_NUM_PROCESSES=3, process 0 has "
                            "JAX_NUM_PROCESSES=2" in log0), log0[-2000:]


def test_processes_with_different_configs_are_a_clear_error(corpus, tmp_path):
  port = _free_port()
  cmd = _train_cmd(str(tmp_path / "w"), corpus, "--distributed_timeout=30")
  procs = _start(cmd, 1, port, 4, str(tmp_path / "log0"),
                 env0=_env(COORDINATOR_ADDRESS=f"localhost:{port}", NUM_PROCESSES=2, PROCESS_ID=0))
  procs += _start(cmd + ["--config.optimizer.lr=0.1"], 1, port, 4, str(tmp_path / "log1"),
                  env0=_env(COORDINATOR_ADDRESS=f"localhost:{port}", NUM_PROCESSES=2,
                            PROCESS_ID=1))
  assert _wait(procs, 120) == [2, 2]
  for pid in range(2):
    last = _read(str(tmp_path / f"log{pid}.p0.log")).strip().splitlines()[-1]
    assert last.startswith(f"error: process {1 - pid} has config+workdir fingerprint="), last
