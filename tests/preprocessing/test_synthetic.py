"""data_prep.synthetic: the CLI's outputs, determinism, the chain's statistics, failure hygiene."""

import os
import subprocess
import sys

import numpy as np
import pytest

from lcm_jax import synthetic
from lcm_jax import normalizer as nl
from lcm_jax import schema

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "data_prep.synthetic", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=120)


def _read_all(out):
  manifest = schema.read_manifest(out)
  docs = [d for p in schema.shard_paths(out, manifest)
          for d in schema.read_shard(p, manifest["dim"])]
  return manifest, docs


def _shard_bytes(out):
  return {f: open(os.path.join(out, f), "rb").read() for f in sorted(os.listdir(out))
          if f.endswith(schema.SHARD_SUFFIX)}


def test_cli_writes_a_consistent_corpus(tmp_path):
  out = str(tmp_path / "corpus")
  r = _cli(f"--out={out}", "--num_docs=300", "--dim=16", "--seed=3", "--num_prototypes=12",
           "--num_shards=3", "--min_len=3", "--max_len=9", "--texts")
  assert r.returncode == 0, r.stderr
  assert "shard 3/3" in r.stdout and "branch points" in r.stdout and "done in" in r.stdout
  names = [schema.shard_name(k, 3) for k in range(3)]
  names += ["manifest.json", "normalizer.npz", "process.npz"]
  assert sorted(os.listdir(out)) == sorted(names)
  manifest, docs = _read_all(out)
  assert manifest["num_documents"] == len(docs) == 300
  assert manifest["num_concepts"] == sum(len(d.embeddings) for d in docs)
  assert [s["num_documents"] for s in manifest["shards"]] == [100, 100, 100]
  assert manifest["dim"] == 16 and manifest["dtype"] == "float16" and manifest["has_texts"]
  assert manifest["normalizer"] == "normalizer.npz"
  producer = manifest["producer"]
  assert producer["tool"] == "data_prep.synthetic" and producer["process"] == "process.npz"
  assert producer["args"]["seed"] == 3 and producer["args"]["num_prototypes"] == 12
  assert producer["args"]["max_len"] == 9 and producer["args"]["texts"] is True

  process = synthetic.load_process(out)
  assert process.prototypes.shape == (12, 16)
  eot16 = process.eot.astype(np.float16)
  noise_norm = process.noise_std * np.sqrt(16)
  for d in docs:
    assert d.embeddings.dtype == np.float16 and 3 <= len(d.embeddings) <= 9
    np.testing.assert_array_equal(d.embeddings[-1], eot16)  # ends with the exact end-of-text
    body = d.embeddings[:-1].astype(np.float32)
    states = process.nearest(body)
    assert (states < 12).all()  # no end-of-text inside a document
    assert (np.linalg.norm(body - process.prototypes[states], axis=1) < 3 * noise_norm).all()
    assert d.texts == [f"proto_{s}" for s in states] + ["End of text."]

  norm = nl.Normalizer.load(os.path.join(out, "normalizer.npz"))
  body = np.concatenate([d.embeddings[:-1] for d in docs])
  ref = nl.fit_robust_scaler(body)
  np.testing.assert_array_equal(norm.center, ref.center)
  np.testing.assert_array_equal(norm.scale, ref.scale)


def test_help():
  r = _cli("--help")
  assert r.returncode == 0 and "--num_prototypes" in r.stdout and "--noise" in r.stdout


def test_deterministic_in_the_seed(tmp_path):
  kw = dict(num_docs=60, dim=8, num_prototypes=10, num_shards=2)
  a = synthetic.generate(str(tmp_path / "a"), seed=7, **kw)
  b = synthetic.generate(str(tmp_path / "b"), seed=7, **kw)
  c = synthetic.generate(str(tmp_path / "c"), seed=8, **kw)
  assert a["shards"] == b["shards"]
  assert _shard_bytes(str(tmp_path / "a")) == _shard_bytes(str(tmp_path / "b"))
  assert _shard_bytes(str(tmp_path / "a")) != _shard_bytes(str(tmp_path / "c"))
  pa, pc = synthetic.load_process(str(tmp_path / "a")), synthetic.load_process(str(tmp_path / "c"))
  assert not np.array_equal(pa.prototypes, pc.prototypes)
  np.testing.assert_array_equal(pa.eot, pc.eot)  # end-of-text is fixed for a given dim
  na = nl.Normalizer.load(str(tmp_path / "a" / "normalizer.npz"))
  nb = nl.Normalizer.load(str(tmp_path / "b" / "normalizer.npz"))
  np.testing.assert_array_equal(na.scale, nb.scale)


def test_branch_points_and_successor_frequencies(tmp_path):
  out = str(tmp_path / "c")
  synthetic.generate(out, num_docs=2000, dim=32, seed=0)  # the defaults
  process = synthetic.load_process(out)
  p = process.num_prototypes
  ns = process.num_successors
  branch = process.branch_points
  assert len(branch) >= p // 2 and (ns == 3).sum() >= p // 8
  np.testing.assert_allclose(process.successor_probs.sum(1), 1.0)
  dist = np.linalg.norm(process.prototypes[:, None] - process.prototypes[None], axis=-1)
  typical = np.median(dist[np.triu_indices(p, 1)])
  for i in branch:
    idx, prob = process.successors_of(i)
    assert prob.min() >= 0.2 and i not in idx and len(set(idx)) == len(idx)
    assert dist[np.ix_(idx, idx)][np.triu_indices(len(idx), 1)].min() >= 0.8 * typical
    # An MSE model's best guess at a branch point is far from every true successor.
    assert process.best_prediction_l2(i) > 2 * process.noise_std * np.sqrt(process.dim)

  _, docs = _read_all(out)
  counts = np.zeros((p, p + 1), np.int64)
  firsts = np.zeros(p, np.int64)
  for d in docs:
    states = process.nearest(d.embeddings.astype(np.float32))
    assert states[-1] == p and (states[:-1] < p).all()
    firsts[states[0]] += 1
    np.add.at(counts, (states[:-2], states[1:-1]), 1)
  # Only listed successors ever follow a prototype.
  allowed = np.zeros((p, p + 1), bool)
  for i in range(p):
    allowed[i, process.successors_of(i)[0]] = True
  assert counts[~allowed].sum() == 0
  # Pearson chi-square per branch point against the table (p = 1e-4 critical values), and overall.
  critical = {2: 15.14, 3: 18.42}
  total_stat = total_df = 0.0
  for i in branch:
    idx, prob = process.successors_of(i)
    observed = counts[i, idx]
    assert observed.sum() >= 100, f"prototype {i} visited only {observed.sum()} times"
    expected = observed.sum() * prob
    stat = float(((observed - expected) ** 2 / expected).sum())
    assert stat < critical[len(idx)], (i, observed, expected)
    total_stat += stat
    total_df += len(idx) - 1
  assert abs(total_stat - total_df) < 5 * np.sqrt(2 * total_df)
  # Starts are uniform over the prototypes.
  assert float(((firsts - 2000 / p) ** 2 / (2000 / p)).sum()) < p - 1 + 5 * np.sqrt(2 * (p - 1))


@pytest.mark.parametrize("bad, message", [
    ("--dim=0", "--dim must be >= 1"),
    ("--num_docs=0", "--num_docs must be >= 1"),
    ("--num_prototypes=1", "--num_prototypes must be >= 2"),
    ("--max_len=2", "--max_len (2) must be >= --min_len (4)"),
    ("--noise=-1", "--noise must be finite and >= 0"),
    ("--dtype=int8", "invalid choice"),
])
def test_bad_arguments_exit_nonzero_and_write_nothing(tmp_path, bad, message):
  out = tmp_path / "nested" / "corpus"
  r = _cli(f"--out={out}", "--num_docs=10", "--num_shards=2", bad)
  assert r.returncode != 0
  assert message in r.stderr, r.stderr
  assert "Traceback" not in r.stderr
  assert os.listdir(tmp_path) == []


def test_failure_midway_leaves_nothing(tmp_path, monkeypatch):
  calls = []
  real = schema.write_shard

  def flaky(path, docs, dtype="float16"):
    calls.append(path)
    if len(calls) == 2:
      raise OSError("disk full (simulated)")
    return real(path, docs, dtype)

  monkeypatch.setattr(schema, "write_shard", flaky)
  with pytest.raises(OSError, match="simulated"):
    synthetic.generate(str(tmp_path / "corpus"), num_docs=20, dim=4, seed=0, num_shards=3)
  assert os.listdir(tmp_path) == []


def test_existing_output_and_overwrite(tmp_path):
  out = str(tmp_path / "corpus")
  synthetic.generate(out, num_docs=10, dim=4, seed=0, num_shards=1)
  r = _cli(f"--out={out}", "--num_docs=10", "--dim=4")
  assert r.returncode != 0 and "exists and is not empty" in r.stderr
  m = synthetic.generate(out, num_docs=12, dim=4, seed=1, num_shards=2, overwrite=True)
  assert schema.read_manifest(out)["num_documents"] == m["num_documents"] == 12
  assert sorted(os.listdir(tmp_path)) == ["corpus"]
  empty = tmp_path / "empty"
  empty.mkdir()
  synthetic.generate(str(empty), num_docs=5, dim=4, seed=0, num_shards=1)  # empty dir is fine
  assert schema.read_manifest(str(empty))["num_documents"] == 5


def test_ensure_corpus(tmp_path):
  out = str(tmp_path / "data" / "synthetic")
  m = synthetic.ensure_corpus(out, dim=8, num_docs=20, num_shards=2)
  assert m["dim"] == 8 and m["num_documents"] == 20
  stamp = os.path.getmtime(os.path.join(out, "manifest.json"))
  again = synthetic.ensure_corpus(out, dim=8, num_docs=999)  # present: not regenerated
  assert again["num_documents"] == 20
  assert os.path.getmtime(os.path.join(out, "manifest.json")) == stamp
  with pytest.raises(ValueError, match="corpus has dim 8, expected 16"):
    synthetic.ensure_corpus(out, dim=16)


def test_out_under_a_file_exits_2_with_one_line(tmp_path):
  """The old tool died with a traceback in os.makedirs; now one line naming --out, exit 2."""
  (tmp_path / "file").write_text("x")
  for out in (tmp_path / "file", tmp_path / "file" / "corpus"):
    r = _cli(f"--out={out}", "--num_docs=10", "--num_shards=2")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --out") and str(tmp_path / "file") in \
        lines[0], r.stderr
  assert os.listdir(tmp_path) == ["file"]
