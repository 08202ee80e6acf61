"""Multi-process training for real: 2 processes x 4 CPU devices vs 1 process x 8 devices.

The processes find each other through JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
JAX_PROCESS_ID on localhost (CPU collectives over gloo), train the tiny config, are SIGKILLed after
their first checkpoint, restart and finish. Both runs use ``config.data.data_shards=2``, so the
global batches are identical (checked directly below) and the final params must agree up to the
summation order of the cross-process all-reduce. The data-iterator state is saved per data shard,
so checkpoints also resume on another process count: 2 processes -> 1 and 1 -> 2, with the same
batches (fingerprints) and params as the uninterrupted run.

Also: the environment checks of :mod:`lcm_jax.distributed` and the start-up errors (inconsistent
process counts, an unreachable coordinator) as a user sees them: one ``error:`` line, exit 2.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time

from absl import flags
import grain
import jax
import numpy as np
import pytest

from configs import mse_1b6
from lcm_jax import synthetic
from lcm_jax import checkpoint as ckpt_lib
from lcm_jax import data as data_lib
from lcm_jax import distributed
from lcm_jax import train
from lcm_jax.errors import UserError
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
  c.data.synthetic_corpus = ""
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
  with pytest.raises(UserError, match=message):
    data_lib.make_train_iterator(_data_config(corpus, shards), process_index=0,
                                 process_count=processes)


# ----------------------------------------------------------------------------------------------
# The data-iterator state on disk: one file per data shard (in one process; real runs below)


def _tiny_state():
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return ({"x": jax.device_put(np.arange(3, dtype=np.float32), device)},
          {"x": jax.ShapeDtypeStruct((3,), np.float32, sharding=device)})


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def _json_files(directory):
  return sorted(f for f in os.listdir(directory) if f.endswith(".json"))


def _half(batches, p):
  return [{k: np.split(v, 2)[p] for k, v in b.items()} for b in batches]


@pytest.mark.parametrize("workers", [0, 1])
def test_data_state_per_shard_resumes_on_any_process_count(corpus, tmp_path, workers):
  """Saved by 1 process running data shards 0 and 1; restored by "process 1 of 2" (shard 1 only)
  and, without Grain workers, also by process 0 of 2 and by 1 process again. A run with another
  number of data shards is refused. With a worker, each data shard has its own Grain worker."""
  if workers:
    flags.FLAGS.mark_as_parsed()
  c = _data_config(corpus, 2)
  c.data.worker_count = workers
  it = data_lib.make_train_iterator(c, process_index=0, process_count=1)
  _take(it, 3)
  state, abstract = _tiny_state()
  ck = ckpt_lib.Checkpointer(str(tmp_path), async_save=False)
  ck.save(3, state, it, {"note": "test"}, force=True)
  ck.close()
  expected = _take(it, 2)
  it.close()
  data_dir = tmp_path / "checkpoints" / "3" / "data"
  assert _json_files(data_dir) == ["data_shard_0-of-2.json", "data_shard_1-of-2.json"]

  for pi, pc in ((1, 2),) if workers else ((1, 2), (0, 2), (0, 1)):
    resumed = data_lib.make_train_iterator(c, process_index=pi, process_count=pc)
    ck = ckpt_lib.Checkpointer(str(tmp_path), create=False, async_save=False)
    restored, meta = ck.restore(3, abstract, resumed)
    ck.close()
    assert meta == {"note": "test"} and np.array_equal(restored["x"], state["x"])
    _assert_batches_equal(_take(resumed, 2), expected if pc == 1 else _half(expected, pi))
    resumed.close()

  # data_shards=0 on 1 process = 1 data shard; the checkpoint has 2.
  other = data_lib.make_train_iterator(_data_config(corpus, 0), process_index=0, process_count=1)
  with pytest.raises(ckpt_lib.CheckpointError,
                     match=r"saved by 2 data shard\(s\) .*this run has 1 .*"
                           r"resume with --config.data.data_shards=2 on a process count that "
                           r"divides 2"):
    ckpt_lib.Checkpointer(str(tmp_path), create=False).restore(3, abstract, other)
  # A shard's file lost (copied by hand, say): named, not a crash.
  os.remove(data_dir / "data_shard_1-of-2.json")
  with pytest.raises(ckpt_lib.CheckpointError,
                     match=r"incomplete data-iterator state: no data_shard_1-of-2\.json"):
    ckpt_lib.Checkpointer(str(tmp_path), create=False).restore(
        3, abstract, data_lib.make_train_iterator(c, process_index=1, process_count=2))


def _legacy_iterator(c, process_index, process_count):
  """The train iterator of earlier versions: a Grain zip of this process's data shards."""
  k = data_lib.data_shards(c, process_count)
  infos = data_lib._train_infos(c)  # pylint: disable=protected-access
  rows = c.data.global_batch_size // k
  mine = range(process_index * k // process_count, (process_index + 1) * k // process_count)
  streams = [data_lib._train_stream(c, infos, s, k, rows) for s in mine]  # pylint: disable=protected-access
  ds = streams[0] if len(streams) == 1 else grain.experimental.ZipIterDataset(streams).map(
      data_lib._concat_batches)  # pylint: disable=protected-access
  return iter(ds)


@pytest.mark.parametrize("shards", [1, 2])
def test_per_process_data_state_of_earlier_versions(corpus, tmp_path, shards):
  """A checkpoint in the earlier layout (Grain's handler: process_0-of-1.json) resumes with the
  same process count; with another one it is refused."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  c = _data_config(corpus, shards)
  legacy = _legacy_iterator(c, 0, 1)
  _take(legacy, 3)
  state, abstract = _tiny_state()
  with ocp.CheckpointManager(
      str(tmp_path / "checkpoints"),
      item_handlers={"state": ocp.StandardCheckpointHandler(),
                     "data": grain.checkpoint.CheckpointHandler(),
                     "meta": ocp.JsonCheckpointHandler()}) as mgr:
    mgr.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                        data=grain.checkpoint.CheckpointSave(legacy),
                                        meta=ocp.args.JsonSave({})))
    mgr.wait_until_finished()
  expected = _take(legacy, 2)
  data_dir = tmp_path / "checkpoints" / "3" / "data"
  assert _json_files(data_dir) == ["process_0-of-1.json"]

  resumed = data_lib.make_train_iterator(c, process_index=0, process_count=1)
  ck = ckpt_lib.Checkpointer(str(tmp_path), create=False, async_save=False)
  ck.restore(3, abstract, resumed)
  ck.close()
  _assert_batches_equal(_take(resumed, 2), expected)

  os.rename(data_dir / "process_0-of-1.json", data_dir / "process_0-of-2.json")
  with pytest.raises(ckpt_lib.CheckpointError,
                     match=r"saved by 2 process\(es\) \(one file per process, an earlier "
                           r"lcm_jax\), this run has 1; resume with 2 processes"):
    ckpt_lib.Checkpointer(str(tmp_path), create=False).restore(
        3, abstract, data_lib.make_train_iterator(c, process_index=0, process_count=1))


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
    env["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={devices_per_process} "
                        "--xla_cpu_collective_call_terminate_timeout_seconds=600")
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


def _metrics(workdir, key):
  """``{step: value}`` of metric ``key`` in ``metrics.jsonl``; a replayed step: the last counts."""
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      m = json.loads(line)
      if key in m:
        out[m["step"]] = m[key]
  return out


def _copy_run(src, dst, keep_step):
  """A copy of workdir ``src`` holding only checkpoint ``keep_step`` and no metrics: restarting
  it resumes from ``keep_step`` and logs only what the restart computes."""
  shutil.copytree(src, dst)
  ckpts = os.path.join(dst, "checkpoints")
  for name in os.listdir(ckpts):
    if name.isdigit() and int(name) != keep_step:
      shutil.rmtree(os.path.join(ckpts, name))
  os.remove(os.path.join(dst, "metrics.jsonl"))


def _assert_params_close(workdir, reference):
  step_a, params_a = _params(workdir)
  step_b, params_b = _params(reference)
  assert step_a == step_b == STEPS
  leaves_b = dict(jax.tree_util.tree_flatten_with_path(params_b)[0])
  for path, a in jax.tree_util.tree_flatten_with_path(params_a)[0]:
    b = leaves_b[path]
    err = float(np.max(np.abs(a - b)) / np.max(np.abs(b)))
    assert err < PARAM_RTOL, (jax.tree_util.keystr(path), err)


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):
  """All the real runs, shared by the tests below (config.data.data_shards=2 throughout):

  * ``multi``: 2 processes x 4 devices, SIGKILLed after their first checkpoint, restarted on 2;
  * ``single``: 1 process x 8 devices, uninterrupted (the reference);
  * ``multi_to_single``: a copy of ``multi`` as it was killed, restarted on 1 process x 8 devices;
  * ``single_to_multi``: a copy of ``single`` cut back to its first checkpoint, restarted on 2
    processes x 4 devices.
  """
  base = tmp_path_factory.mktemp("runs")
  dirs = {k: str(base / k) for k in ("multi", "single", "multi_to_single", "single_to_multi")}
  logs = str(base / "log")
  fp = "--config.train.log_batch_fingerprints=True"
  multi = dirs["multi"]

  # 2 processes x 4 devices, SIGKILLed once the first checkpoint is complete.
  procs = _start(_train_cmd(multi, corpus, fp), 2, _free_port(), 4, logs + "-a")
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
  _copy_run(multi, dirs["multi_to_single"], killed_at)

  # Restart on 2 processes (new coordinator port) and finish.
  codes = _wait(_start(_train_cmd(multi, corpus, fp), 2, _free_port(), 4, logs + "-b"), 600)
  assert codes == [0, 0], _read(logs + "-b.p0.log")[-3000:] + _read(logs + "-b.p1.log")[-3000:]

  # 1 process x 8 devices, uninterrupted.
  codes = _wait(_start(_train_cmd(dirs["single"], corpus, fp), 1, None, 8, logs + "-c"), 600)
  assert codes == [0], _read(logs + "-c.p0.log")[-3000:]

  # The state saved by 2 processes resumes on 1, and the state saved by 1 resumes on 2.
  codes = _wait(_start(_train_cmd(dirs["multi_to_single"], corpus, fp), 1, None, 8,
                       logs + "-d"), 600)
  assert codes == [0], _read(logs + "-d.p0.log")[-3000:]
  _copy_run(dirs["single"], dirs["single_to_multi"], CKPT_EVERY)
  codes = _wait(_start(_train_cmd(dirs["single_to_multi"], corpus, fp), 2, _free_port(), 4,
                       logs + "-e"), 600)
  assert codes == [0, 0], _read(logs + "-e.p0.log")[-3000:] + _read(logs + "-e.p1.log")[-3000:]
  return dict(dirs, logs=logs, killed_at=killed_at)


@pytest.mark.slow
def test_two_processes_killed_and_restarted_match_one_process(runs):
  logs, killed_at = runs["logs"], runs["killed_at"]
  restart_log0, restart_log1 = _read(logs + "-b.p0.log"), _read(logs + "-b.p1.log")
  assert f"Restoring checkpoint {killed_at}" in restart_log0
  assert "process 0/2: 4 local, 8 global cpu devices" in restart_log0
  # Progress lines and metrics come from process 0 only.
  assert f"step {STEPS}/{STEPS}" in restart_log0 and "/30 (" not in restart_log1
  with open(os.path.join(runs["multi"], "metrics.jsonl")) as f:
    steps = [json.loads(line)["step"] for line in f if "train/loss" in line]
  assert steps == sorted(set(steps)) and steps[-1] == STEPS  # each step logged once
  # One data-iterator file per data shard, each written by the process that runs it.
  assert _json_files(os.path.join(runs["multi"], "checkpoints", str(STEPS), "data")) == [
      "data_shard_0-of-2.json", "data_shard_1-of-2.json"]
  _assert_params_close(runs["multi"], runs["single"])


@pytest.mark.slow
def test_two_process_checkpoint_resumes_on_one_process(runs):
  """2 processes -> 1: the same batches (fingerprints of the whole batch) and the same params."""
  killed_at, wd = runs["killed_at"], runs["multi_to_single"]
  assert f"Restoring checkpoint {killed_at}" in _read(runs["logs"] + "-d.p0.log")
  resumed = _metrics(wd, "batch_fingerprint")
  assert sorted(resumed) == list(range(killed_at, STEPS))
  reference = _metrics(runs["single"], "batch_fingerprint")
  assert resumed == {s: reference[s] for s in resumed}
  _assert_params_close(wd, runs["single"])


@pytest.mark.slow
def test_one_process_checkpoint_resumes_on_two_processes(runs):
  """1 process -> 2: the same batches (fingerprints of process 0's half, as in the 2-process run)
  and the same params."""
  wd = runs["single_to_multi"]
  assert f"Restoring checkpoint {CKPT_EVERY}" in _read(runs["logs"] + "-e.p0.log")
  resumed = _metrics(wd, "batch_fingerprint")
  assert sorted(resumed) == list(range(CKPT_EVERY, STEPS))
  reference = _metrics(runs["multi"], "batch_fingerprint")
  assert resumed == {s: reference[s] for s in resumed}
  _assert_params_close(wd, runs["single"])


@pytest.mark.slow
def test_one_data_shard_per_process_refuses_another_process_count(runs, corpus, tmp_path):
  """config.data.data_shards=0 (one per process) on 1 process is 1 data shard, not the 2 the
  checkpoint has: a clear error naming the fix, exit 2, nothing written."""
  wd = str(tmp_path / "wd")
  _copy_run(runs["multi"], wd, STEPS)
  r = helpers.run_cli(_train_cmd(wd, corpus, "--config.data.data_shards=0",
                                 f"--config.train.num_steps={STEPS + 5}"))
  assert r.returncode == 2, r.stderr[-2000:]
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and "the data-iterator state was saved by 2 data shard(s)" in last
  assert "this run has 1 (1 process(es)); resume with --config.data.data_shards=2" in last
  assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == [str(STEPS)]


def _main_alone(workdir, corpus, timeout_s, **env):
  e = helpers.cli_env()
  e["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=4 "
                    "--xla_cpu_collective_call_terminate_timeout_seconds=600")
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
