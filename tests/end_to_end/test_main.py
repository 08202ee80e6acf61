"""End to end through `python -m lcm_jax.main`: training, exact resume after SIGKILL, bad input.

Every run is a real subprocess on real ArrayRecord shards with Orbax checkpoints on disk.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from lcm_jax import schema
from tests.helpers import ROOT, checkpoint_steps, cli_env, main_cmd, make_corpus, run_cli

DIM = 32


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


_checkpoint_steps = checkpoint_steps


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return make_corpus(str(tmp_path_factory.mktemp("data") / "synthetic"), 1200, DIM, 3)


def _params(workdir, step=None):
  """Restores the saved params on CPU, without the training mesh (plain numpy arrays)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  steps = _checkpoint_steps(workdir)
  step = steps[-1] if step is None else step
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  with ocp.StandardCheckpointer() as ck:
    restored = ck.restore(path)
  return restored["params"], int(restored["step"])


def test_tiny_training_beats_previous_concept_baseline(corpus, tmp_path):
  """The tiny Base-LCM learns the branching corpus: eval MSE far below 'repeat the last concept'."""
  wd = str(tmp_path / "wd")
  r = run_cli(main_cmd(wd, corpus, "--config.train.num_steps=300",
                       "--config.train.eval_every=300", "--config.train.checkpoint_every=300",
                       "--config.train.log_every=100"))
  assert r.returncode == 0, r.stderr[-4000:]
  evals = [m for m in _metrics(wd) if "eval/loss" in m]
  assert evals, "no eval metrics written"
  last = evals[-1]
  print("eval:", last)
  # The previous-concept baseline is ~2x the distance between successive prototypes; a model that
  # learned the transitions is far below it. Margin: less than half of the baseline.
  assert last["eval/loss"] < 0.5 * last["eval/prev_concept_loss"], last
  assert "final eval:" in r.stdout
  assert _checkpoint_steps(wd) == [300]
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(wd, "tb")))
  train_logs = [m for m in _metrics(wd) if "train/loss" in m]
  assert {"train/grad_norm", "train/lr", "perf/step_time_s", "perf/concepts_per_s"} <= set(train_logs[0])


RESUME_STEPS = 400
RESUME_FLAGS = [f"--config.train.num_steps={RESUME_STEPS}", "--config.train.checkpoint_every=20",
                "--config.train.log_every=20", "--config.train.eval_every=0",
                "--config.train.log_batch_fingerprints=True", "--config.model.dropout=0.1",
                "--config.data.worker_count=1", "--config.train.keep_checkpoints=50"]


@pytest.fixture(scope="module")
def uninterrupted(corpus, tmp_path_factory):
  """The reference: RESUME_STEPS steps in one go (dropout on, one Grain prefetch worker)."""
  ref = str(tmp_path_factory.mktemp("ref") / "wd")
  r = run_cli(main_cmd(ref, corpus, *RESUME_FLAGS))
  assert r.returncode == 0, r.stderr[-4000:]
  return ref


def _interrupt(wd, corpus, sig, after_step=60):
  """Starts a run and sends ``sig`` once a checkpoint at >= ``after_step`` exists."""
  os.makedirs(wd, exist_ok=True)
  log = os.path.join(os.path.dirname(wd), os.path.basename(wd) + ".stderr")
  with open(log, "w") as err_file:
    # Own session: after a SIGKILL the orphaned Grain worker is reaped with the group below.
    proc = subprocess.Popen(main_cmd(wd, corpus, *RESUME_FLAGS), cwd=ROOT, env=cli_env(),
                            stdout=subprocess.DEVNULL, stderr=err_file, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
      if any(s >= after_step for s in _checkpoint_steps(wd)):
        break
      time.sleep(0.05)
    proc.send_signal(sig)
    proc.wait(timeout=120)
    try:
      os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
  with open(log) as f:
    return proc.returncode, f.read()


def _fingerprints(workdir):
  out = {}
  for m in _metrics(workdir):
    if "batch_fingerprint" in m:
      out[m["step"]] = m["batch_fingerprint"]  # a replayed step overwrites: the last one counts
  return out


def _assert_same_run(ref, wd):
  p_ref, s_ref = _params(ref)
  p_res, s_res = _params(wd)
  assert s_ref == s_res == RESUME_STEPS
  import jax  # pylint: disable=g-import-not-at-top
  for a, b in zip(jax.tree.leaves(p_ref), jax.tree.leaves(p_res)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  f_ref, f_res = _fingerprints(ref), _fingerprints(wd)
  assert sorted(f_ref) == sorted(f_res) == list(range(RESUME_STEPS))
  assert f_ref == f_res


def test_exact_resume_after_sigkill(corpus, uninterrupted, tmp_path):
  """N steps straight == k steps, SIGKILL (from outside, mid-run), restart: bitwise same params
  and the same sequence of data batches. Uses dropout and a multiprocess Grain prefetch worker."""
  wd = str(tmp_path / "killed")
  rc, _ = _interrupt(wd, corpus, signal.SIGKILL)
  assert rc == -signal.SIGKILL, "the run finished before it could be killed"
  assert max(_checkpoint_steps(wd)) < RESUME_STEPS
  r = run_cli(main_cmd(wd, corpus, *RESUME_FLAGS))
  assert r.returncode == 0, r.stderr[-4000:]
  assert "Restoring checkpoint" in r.stderr
  _assert_same_run(uninterrupted, wd)


def test_sigterm_checkpoints_and_resumes(corpus, uninterrupted, tmp_path):
  """SIGTERM: the run saves a checkpoint at the step it reached and exits 143; the restart
  continues from exactly there."""
  wd = str(tmp_path / "terminated")
  rc, err = _interrupt(wd, corpus, signal.SIGTERM)
  assert rc == 143, err[-3000:]
  steps = _checkpoint_steps(wd)
  last_logged = max(m["step"] for m in _metrics(wd) if "batch_fingerprint" in m) + 1
  assert steps[-1] == last_logged < RESUME_STEPS, (steps, last_logged)
  r = run_cli(main_cmd(wd, corpus, *RESUME_FLAGS))
  assert r.returncode == 0, r.stderr[-4000:]
  assert f"Restoring checkpoint {steps[-1]}" in r.stderr
  _assert_same_run(uninterrupted, wd)


def _write_dataset(path, docs, dim=DIM, manifest_dim=None, normalizer=True):
  os.makedirs(path, exist_ok=True)
  entry = schema.write_shard(os.path.join(path, schema.shard_name(0, 1)), docs)
  norm = None
  if normalizer:
    from lcm_jax.normalizer import Normalizer  # pylint: disable=g-import-not-at-top
    Normalizer(center=np.zeros(dim, np.float32), scale=np.ones(dim, np.float32)).save(
        os.path.join(path, "normalizer.npz"))
    norm = "normalizer.npz"
  schema.write_manifest(path, schema.make_manifest(dim=manifest_dim or dim, dtype="float16",
                                                   shards=[entry], producer={"tool": "test"},
                                                   normalizer=norm))


def _good_docs(n=64, dim=DIM, seed=0):
  rng = np.random.default_rng(seed)
  return [schema.Document(id=f"d{i}", embeddings=rng.normal(size=(int(rng.integers(3, 20)), dim)))
          for i in range(n)]


def _raw_record(doc_id, n, dim, payload):
  header = json.dumps({"id": doc_id, "n": n, "dim": dim, "dtype": "float16"}).encode()
  return schema._PREFIX.pack(schema.MAGIC, schema.VERSION, len(header)) + header + payload


def _write_raw_shard(path, records):
  from array_record.python.array_record_module import ArrayRecordWriter  # pylint: disable=g-import-not-at-top
  w = ArrayRecordWriter(path, schema.ARRAY_RECORD_OPTIONS)
  for r in records:
    w.write(r)
  w.close()


def _bad_dataset(kind, path):
  docs = _good_docs()
  if kind == "wrong_dim":
    docs[0] = schema.Document(id="bad", embeddings=np.zeros((5, DIM - 4)))
    _write_dataset(path, docs)
  elif kind in ("nan", "empty"):
    _write_dataset(path, docs)
    shard = os.path.join(path, schema.shard_name(0, 1))
    records = [schema.encode_document(d) for d in docs]
    if kind == "nan":
      emb = np.zeros((4, DIM), np.float16)
      emb[2, 3] = np.nan
      records[0] = _raw_record("bad", 4, DIM, emb.tobytes())
    else:
      records[0] = _raw_record("bad", 0, DIM, b"")
    os.remove(shard)
    _write_raw_shard(shard, records)
  elif kind == "corrupt":
    _write_dataset(path, docs)
    shard = os.path.join(path, schema.shard_name(0, 1))
    size = os.path.getsize(shard)
    with open(shard, "r+b") as f:
      f.truncate(size // 2)
  elif kind == "manifest_dim":
    _write_dataset(path, docs, manifest_dim=DIM + 8)
  elif kind == "missing":
    pass
  else:
    raise AssertionError(kind)


@pytest.mark.parametrize("kind,expected", [
    ("wrong_dim", ["shard-00000-of-00001.array_record", "record 0", "'embeddings'", "dim"]),
    ("nan", ["shard-00000-of-00001.array_record", "record 0", "'embeddings'", "non-finite"]),
    ("empty", ["shard-00000-of-00001.array_record", "record 0", "'embeddings'", "empty"]),
    ("corrupt", ["shard-00000-of-00001.array_record"]),
    ("manifest_dim", ["manifest.json", "'dim'"]),
    ("missing", ["does_not_exist"]),
])
def test_bad_data_fails_cleanly(kind, expected, tmp_path):
  data = str(tmp_path / ("does_not_exist" if kind == "missing" else "data"))
  _bad_dataset(kind, data)
  wd = str(tmp_path / "wd")
  r = run_cli(main_cmd(wd, data, "--config.train.num_steps=5", "--config.data.eval_fraction=0.1"))
  assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
  err = r.stderr.strip().splitlines()[-1]
  for e in expected:
    assert e in err, f"{e!r} not in {err!r}"
  assert _checkpoint_steps(wd) == []


@pytest.mark.parametrize("overrides,expected", [
    (["--config.mesh.data=3"], ["config.mesh", "3 != 8 available devices"]),
    (["--config.mesh.data=3", "--config.mesh.fsdp=-1"], ["config.mesh", "does not divide the 8"]),
    (["--config.data.global_batch_size=12"], ["global_batch_size=12", "data*fsdp = 8"]),
])
def test_bad_mesh_fails_cleanly(corpus, overrides, expected, tmp_path):
  wd = str(tmp_path / "wd")
  r = run_cli(main_cmd(wd, corpus, "--config.train.num_steps=5", *overrides))
  assert r.returncode == 2, r.stderr[-3000:]
  err = r.stderr.strip().splitlines()[-1]
  for e in expected:
    assert e in err, f"{e!r} not in {err!r}"
  assert _checkpoint_steps(wd) == []


def _reference_param_count(d, layers, ffn, sonar=1024):
  """Sum of the reference key shapes (Base-LCM), normalizer buffers excluded."""
  attn = 4 * (d * d + d)                 # q, k, v, output_proj with bias
  mlp = 2 * (ffn * d + ffn) + (d * ffn + d)  # gate, inner (d->ffn), output (ffn->d)
  norms = 2 * d
  return (sonar * d + d) + layers * (attn + mlp + norms) + d + (d * sonar + sonar)


def test_describe_reports_reference_param_count():
  r = run_cli([sys.executable, "-m", "lcm_jax.main", "--config=configs/mse_1b6.py",
               "--mode=describe"])
  assert r.returncode == 0, r.stderr
  expected = _reference_param_count(2048, 32, 5632)
  print(r.stdout, "expected", expected)
  assert f"parameters            {expected:,} " in r.stdout
  assert "5632" in r.stdout
