"""lcm_jax.quantizer and data_prep.fit_quantizer: the residual k-means against a float64 NumPy
oracle, recovery of known codebooks, coarse to fine, the codes against a brute-force encoder, the
artifact and its load errors, and the CLI end to end on real shards (bad input: exit 2, one line,
no output)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from lcm_jax import normalizer as normalizer_lib
from lcm_jax import quantizer
from lcm_jax import schema
from lcm_jax import synthetic
from lcm_jax.quantizer import QuantizerError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ---------------------------------------------------------------------------------------------
# The float64 NumPy oracle

def _assign(r, cents):
  d = ((r[:, None, :] - cents[None, :, :]) ** 2).sum(-1)
  a = d.argmin(axis=1)
  return a, d[np.arange(len(r)), a]


def _oracle_rvq(x, num_codebooks, codebook_size, iters, seed):
  """Residual k-means in float64 with ``init="random"``'s init and the documented re-seeding:
  the e-th empty cluster takes the point with the e-th largest distance (stable on ties)."""
  r = np.asarray(x, np.float64).copy()
  k = codebook_size
  books, codes, reseeded = [], [], []
  for level in range(num_codebooks):
    cents = r[quantizer.random_init_indices(len(r), k, seed, level)].copy()
    n_reseeded = 0
    for _ in range(iters):
      a, dist = _assign(r, cents)
      counts = np.bincount(a, minlength=k)
      sums = np.zeros_like(cents)
      np.add.at(sums, a, r)
      new = sums / np.maximum(counts, 1)[:, None]
      empty = np.flatnonzero(counts == 0)
      if len(empty):
        far = np.argsort(-dist, kind="stable")
        new[empty] = r[far[:len(empty)]]
        n_reseeded += len(empty)
      cents = new
    a, _ = _assign(r, cents)
    r -= cents[a]
    books.append(cents)
    codes.append(a)
    reseeded.append(n_reseeded)
  return np.stack(books), np.stack(codes, axis=1), reseeded


def _brute_encode(x, codebooks):
  """Greedy codes in float64, every distance computed directly."""
  r = np.asarray(x, np.float64).copy()
  codes = []
  for cb in np.asarray(codebooks, np.float64):
    a, _ = _assign(r, cb)
    r -= cb[a]
    codes.append(a)
  return np.stack(codes, axis=1)


def _rel(a, b):
  return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


@pytest.mark.parametrize("duplicates", [False, True])
def test_matches_the_numpy_oracle(duplicates):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(600, 8)) * np.linspace(0.5, 2.0, 8)
  levels = 3
  if duplicates:  # copies of 3 vectors: random inits repeat, clusters go empty, get re-seeded
    x[:240] = np.repeat(rng.normal(size=(3, 8)) * 3.0, 80, axis=0)
    x = x[rng.permutation(len(x))]
    # One level: after it the copies' residuals are exactly 0 in float64 but float32 rounding
    # noise here (the mean of 80 equal float32s), so the two would tie-break differently.
    levels = 1
  x = x.astype(np.float32)
  stats = []
  # chunk=96: 7 chunks, the last one padded; the padding must not count anywhere.
  cb = quantizer.fit_rvq(x, levels, 16, iters=6, seed=4, init="random", chunk=96,
                         progress=stats.append)
  ref, ref_codes, ref_reseeded = _oracle_rvq(x, levels, 16, 6, 4)
  assert cb.shape == (levels, 16, 8) and cb.dtype == np.float32
  for level in range(levels):
    assert _rel(cb[level], ref[level]) < 1e-5, level
  np.testing.assert_array_equal(quantizer.encode(x, cb), ref_codes)
  assert [s.reseeded for s in stats] == ref_reseeded
  assert (sum(ref_reseeded) > 0) == duplicates
  # The reported inertia is the residual energy after each level.
  r = x.astype(np.float64)
  for level, s in enumerate(stats):
    r = r - ref[level][ref_codes[:, level]]
    assert s.inertia == pytest.approx(float((r ** 2).sum()), rel=1e-4)
    assert len(s.inertia_history) == 7 and s.passes == 7 and s.samples == 600
    assert s.inertia_history[-1] == pytest.approx(s.inertia, rel=1e-4)
    assert np.all(np.diff(s.inertia_history) <= 1e-4 * s.inertia_history[0])  # Lloyd descends


def test_deterministic_and_chunk_independent():
  x = np.random.default_rng(1).normal(size=(500, 12)).astype(np.float32)
  a = quantizer.fit_rvq(x, 2, 8, iters=4, seed=7)
  b = quantizer.fit_rvq(x, 2, 8, iters=4, seed=7)
  np.testing.assert_array_equal(a, b)
  c = quantizer.fit_rvq(x, 2, 8, iters=4, seed=7, chunk=64)  # other per-chunk sum order
  assert _rel(c, a) < 1e-5
  assert _rel(quantizer.fit_rvq(x, 2, 8, iters=4, seed=8), a) > 1e-2  # the seed matters


def test_kmeanspp_init_draws_distinct_rows():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(300, 6)).astype(np.float32)
  idx = quantizer.kmeanspp_init_indices(x, 40, seed=3, level=0)
  assert idx.shape == (40,) and len(set(idx.tolist())) == 40 and idx.max() < 300
  np.testing.assert_array_equal(idx, quantizer.kmeanspp_init_indices(x, 40, seed=3, level=0))
  assert not np.array_equal(idx, quantizer.kmeanspp_init_indices(x, 40, seed=3, level=1))
  # Fewer distinct vectors than centroids: still distinct rows (uniform once all are covered).
  few = np.repeat(x[:5], 20, axis=0)
  idx = quantizer.kmeanspp_init_indices(few, 12, seed=0, level=0)
  assert len(set(idx.tolist())) == 12
  assert len({tuple(v) for v in few[idx]}) == 5
  # A subsample of 50 rows: the chosen rows come from it, and are reported as rows of x.
  idx = quantizer.kmeanspp_init_indices(x, 10, seed=0, level=0, init_sample=50)
  assert len(set(idx.tolist())) == 10 and idx.max() < 300


def _match(fitted, truth):
  """Distance of each true vector to its nearest fitted one, and whether that is a bijection."""
  d = np.linalg.norm(truth[:, None, :] - fitted[None, :, :], axis=-1)
  nearest = d.argmin(axis=1)
  return d.min(axis=1), len(set(nearest.tolist())) == len(truth)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recovers_well_separated_centroids(seed):
  rng = np.random.default_rng(10 + seed)
  truth = rng.normal(size=(8, 16)) * 2.0
  x = np.repeat(truth, 60, axis=0) + 0.01 * rng.normal(size=(480, 16))
  x = x[rng.permutation(len(x))].astype(np.float32)
  cb = quantizer.fit_rvq(x, 1, 8, iters=8, seed=seed)
  dist, bijective = _match(cb[0], truth)
  assert bijective and dist.max() < 0.01, dist


def test_two_levels_recover_a_sum_of_two_codebooks():
  rng = np.random.default_rng(5)
  big = rng.normal(size=(4, 16)) * 3.0
  small = rng.normal(size=(4, 16)) * 0.3
  i, j = np.meshgrid(np.arange(4), np.arange(4), indexing="ij")
  pairs = np.repeat(np.stack([i.ravel(), j.ravel()], axis=1), 25, axis=0)  # balanced
  x = big[pairs[:, 0]] + small[pairs[:, 1]] + 1e-3 * rng.normal(size=(400, 16))
  x = x.astype(np.float32)
  cb = quantizer.fit_rvq(x, 2, 4, iters=8, seed=0)
  # Level 1 finds big + mean(small), level 2 small - mean(small): every sum is recovered.
  dist, bijective = _match(cb[0], big + small.mean(0))
  assert bijective and dist.max() < 2e-3, dist
  dist, bijective = _match(cb[1], small - small.mean(0))
  assert bijective and dist.max() < 2e-3, dist
  sums = (cb[0][:, None, :] + cb[1][None, :, :]).reshape(16, 16)
  dist, bijective = _match(sums, (big[:, None, :] + small[None, :, :]).reshape(16, 16))
  assert bijective and dist.max() < 2e-3, dist
  x_hat = quantizer.decode(quantizer.encode(x, cb), cb)
  assert np.linalg.norm(x - x_hat, axis=1).max() < 0.01


def test_coarse_to_fine():
  rng = np.random.default_rng(6)
  x = rng.normal(size=(1000, 16)).astype(np.float32)
  cb = quantizer.fit_rvq(x, 6, 16, iters=5, seed=0)
  table = quantizer.reconstruction_table(x, cb, counts=range(1, 7))
  assert [r["count"] for r in table] == [1, 2, 3, 4, 5, 6]
  rel = [r["rel_l2"] for r in table]
  cos = [r["cosine"] for r in table]
  mse = [r["mse"] for r in table]
  assert all(a > b for a, b in zip(rel, rel[1:])), rel
  assert all(a < b for a, b in zip(cos, cos[1:])), cos
  assert all(a > b for a, b in zip(mse, mse[1:])), mse
  assert 0 < rel[-1] < rel[0] < 1 and 0 < cos[0] < cos[-1] < 1
  # The table's figures are those of the decoded prefix codes, computed here in float64.
  codes = quantizer.encode(x, cb)
  xd = x.astype(np.float64)
  for row in table:
    x_hat = quantizer.decode(codes[:, :row["count"]], cb).astype(np.float64)
    err = np.linalg.norm(xd - x_hat, axis=1)
    norm = np.linalg.norm(xd, axis=1)
    assert row["rel_l2"] == pytest.approx(np.mean(err / norm), rel=1e-5)
    cos_ref = np.mean((xd * x_hat).sum(1) / (norm * np.linalg.norm(x_hat, axis=1)))
    assert row["cosine"] == pytest.approx(cos_ref, rel=1e-5)
    assert row["mse"] == pytest.approx(np.mean((xd - x_hat) ** 2), rel=1e-4)
  assert [r["count"] for r in quantizer.reconstruction_table(x, cb)] == [1, 2, 4, 6]
  text = quantizer.format_table(table)
  assert len(text.splitlines()) == 7 and "rel_L2" in text and "cosine" in text


def test_encode_decode_against_brute_force():
  rng = np.random.default_rng(7)
  cb = quantizer.fit_rvq(rng.normal(size=(800, 10)).astype(np.float32), 3, 32, iters=4, seed=1)
  x = rng.normal(size=(333, 10)).astype(np.float32)  # not a multiple of the chunk
  codes = quantizer.encode(x, cb, chunk=100)
  assert codes.shape == (333, 3) and codes.dtype == np.int32
  np.testing.assert_array_equal(codes, _brute_encode(x, cb))
  np.testing.assert_array_equal(quantizer.encode(x, cb), codes)
  np.testing.assert_array_equal(quantizer.encode(x, cb, num_codebooks=2), codes[:, :2])
  x_hat = quantizer.decode(codes, cb)
  ref = sum(cb[c].astype(np.float64)[codes[:, c]] for c in range(3))
  assert x_hat.dtype == np.float32 and np.abs(x_hat - ref).max() < 1e-5
  np.testing.assert_allclose(quantizer.decode(codes[:, :1], cb), cb[0][codes[:, 0]])
  with pytest.raises(ValueError, match="outside"):
    quantizer.decode(codes + 32, cb)
  with pytest.raises(QuantizerError, match="dim 9"):
    quantizer.encode(x[:, :9], cb)
  with pytest.raises(QuantizerError, match="non-finite value at sample 3, dim 2"):
    bad = x.copy()
    bad[3, 2] = np.nan
    quantizer.encode(bad, cb)
  with pytest.raises(QuantizerError, match="codebook_size 64 > 50 samples"):
    quantizer.fit_rvq(x[:50], 1, 64, iters=1, seed=0)


# ---------------------------------------------------------------------------------------------
# The artifact

def _artifact(path, cb, **overrides):
  arrays = {"codebooks": cb, "format_version": np.int64(1),
            "settings": np.str_(json.dumps(dict(zip(("num_codebooks", "codebook_size", "dim"),
                                                    cb.shape)))),
            "stats": np.str_("{}")}
  arrays.update(overrides)
  np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
  return str(path)


def test_artifact_round_trip(tmp_path):
  cb = np.random.default_rng(8).normal(size=(4, 8, 6)).astype(np.float32)
  path = str(tmp_path / "q.npz")
  settings = {"iters": 3, "seed": 1, "data": [{"path": "d", "weight": 2.0}]}
  stats = {"inertia": [3.0, 2.0, 1.0, 0.5]}
  assert quantizer.save_quantizer(path, cb, settings, stats) == path
  assert [n for n in os.listdir(tmp_path)] == ["q.npz"]  # no temporary file left
  q = quantizer.load_quantizer(path)
  np.testing.assert_array_equal(q.codebooks, cb)
  assert q.settings == dict(settings, num_codebooks=4, codebook_size=8, dim=6)
  assert q.stats == stats and q.path == path
  assert (q.num_codebooks, q.codebook_size, q.dim) == (4, 8, 6)
  q2 = quantizer.load_quantizer(path, num_codebooks=2)
  np.testing.assert_array_equal(q2.codebooks, cb[:2])
  x = np.random.default_rng(9).normal(size=(20, 6)).astype(np.float32)
  np.testing.assert_array_equal(q2.encode(x), q.encode(x, num_codebooks=2))
  np.testing.assert_array_equal(q.decode(q2.encode(x)), quantizer.decode(q2.encode(x), cb))
  quantizer.check_dim(q, 6, "model sonar_embed_dim")
  with pytest.raises(QuantizerError) as e:
    quantizer.check_dim(q, 1024, "--data shards")
  assert str(e.value) == (f"--data shards: dim 1024 does not match {path} (codebooks of dim 6)")


def test_load_errors_name_the_file(tmp_path):
  cb = np.random.default_rng(10).normal(size=(2, 4, 3)).astype(np.float32)
  nan = cb.copy()
  nan[1, 2, 0] = np.nan
  text = tmp_path / "text.npz"
  text.write_text("not a zip")
  cases = {
      "missing": (str(tmp_path / "nope.npz"), "no such quantizer file"),
      "not_npz": (str(text), "not a readable quantizer .npz"),
      "directory": (str(tmp_path), "is a directory"),
      "no_codebooks": (_artifact(tmp_path / "a.npz", cb, codebooks=None),
                       "field 'codebooks': missing"),
      "no_settings": (_artifact(tmp_path / "b.npz", cb, settings=None),
                      "field 'settings': missing"),
      "no_stats": (_artifact(tmp_path / "c.npz", cb, stats=None), "field 'stats': missing"),
      "no_version": (_artifact(tmp_path / "d.npz", cb, format_version=None),
                     "field 'format_version': missing"),
      "float64": (_artifact(tmp_path / "e.npz", cb.astype(np.float64)),
                  "field 'codebooks': expected float32, got dtype float64"),
      "int": (_artifact(tmp_path / "f.npz", cb.astype(np.int32)), "expected float32"),
      "2d": (_artifact(tmp_path / "g.npz", cb[0]), "expected shape (num_codebooks"),
      "empty": (_artifact(tmp_path / "h.npz", cb[:0]), "got (0, 4, 3)"),
      "nan": (_artifact(tmp_path / "i.npz", nan),
              "non-finite value at codebook 1, centroid 2, dim 0"),
      "bad_json": (_artifact(tmp_path / "j.npz", cb, settings=np.str_("{oops")),
                   "field 'settings': not valid JSON"),
      "json_list": (_artifact(tmp_path / "k.npz", cb, stats=np.str_("[1]")),
                    "field 'stats': expected a JSON object"),
      "settings_shape": (_artifact(tmp_path / "l.npz", cb, settings=np.str_(
          '{"num_codebooks": 2, "codebook_size": 4, "dim": 5}')), "'dim' is 5"),
      "settings_key": (_artifact(tmp_path / "m.npz", cb, settings=np.str_('{"dim": 3}')),
                       "missing 'num_codebooks'"),
      "newer": (_artifact(tmp_path / "n.npz", cb, format_version=np.int64(9)),
                "'format_version': 9 is newer"),
  }
  for name, (path, message) in cases.items():
    with pytest.raises(QuantizerError) as e:
      quantizer.load_quantizer(path)
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value), (name, str(e.value))
  good = _artifact(tmp_path / "good.npz", cb)
  assert quantizer.load_quantizer(good, num_codebooks=2).num_codebooks == 2
  for n, message in ((3, "num_codebooks 3 asked for, the file holds 2 codebooks"),
                     (0, "num_codebooks 0 asked for")):
    with pytest.raises(QuantizerError) as e:
      quantizer.load_quantizer(good, num_codebooks=n)
    assert str(e.value).startswith(f"{good}: ") and message in str(e.value)
  assert issubclass(QuantizerError, quantizer.UserError)


# ---------------------------------------------------------------------------------------------
# The CLI

@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
  """Two dim-16 synthetic datasets (with their normalizers), one of dim 24, one with a NaN."""
  root = tmp_path_factory.mktemp("fit_quantizer")
  dirs = {}
  for name, num_docs, dim, seed, shards in (("a", 100, 16, 0, 2), ("b", 60, 16, 1, 1),
                                            ("c", 20, 24, 2, 1)):
    dirs[name] = str(root / name)
    synthetic.generate(dirs[name], num_docs=num_docs, dim=dim, seed=seed, num_shards=shards)
  dirs["nan"], dirs["nan_shard"] = _dataset_with_a_nan(str(root / "nan"))
  return dirs


def _dataset_with_a_nan(path, dim=16):
  """A one-shard dataset whose document 7 holds a NaN at concept 2 (written below the schema's
  own checks, which refuse to write one)."""
  from array_record.python.array_record_module import ArrayRecordWriter  # pylint: disable=g-import-not-at-top
  os.makedirs(path)
  rng = np.random.default_rng(0)
  sentinel = np.float32(12345.0).tobytes()
  shard = os.path.join(path, schema.shard_name(0, 1))
  writer = ArrayRecordWriter(shard, schema.ARRAY_RECORD_OPTIONS)
  for i in range(40):
    emb = rng.normal(size=(5, dim)).astype(np.float32)
    if i == 7:
      emb[2, 3] = 12345.0
    raw = schema.encode_document(schema.Document(id=f"d{i}", embeddings=emb), dtype="float32")
    if i == 7:
      assert raw.count(sentinel) == 1
      raw = raw.replace(sentinel, np.float32(np.nan).tobytes())
    writer.write(raw)
  writer.close()
  entry = {"file": os.path.basename(shard), "num_documents": 40, "num_concepts": 200}
  schema.write_manifest(path, schema.make_manifest(dim=dim, dtype="float32", shards=[entry],
                                                   producer={"test": True}))
  return path, shard


def _run(*args):
  env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, "-m", "data_prep.fit_quantizer", *args], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=300)


def _one_error_line(r):
  assert r.returncode == 2, (r.stdout, r.stderr)
  assert "Traceback" not in r.stderr, r.stderr
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
  return lines[0]


def _table(stdout):
  """``{count: (rel_l2, cosine)}`` from the printed table."""
  rows = re.findall(r"^\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+\S+$", stdout, flags=re.M)
  return {int(c): (float(r), float(s)) for c, r, s in rows}


def test_cli_end_to_end(datasets, tmp_path):
  out = str(tmp_path / "sub" / "q.npz")
  r = _run(f"--data={datasets['a']}", f"--out={out}", "--num_codebooks=4", "--codebook_size=16",
           "--max_samples=1500", "--iters=4", "--seed=3")
  assert r.returncode == 0, r.stderr
  assert len(re.findall(r"level \d/4: inertia", r.stdout)) == 4, r.stdout
  assert "vectors/s" in r.stdout and "empty clusters re-seeded" in r.stdout
  table = _table(r.stdout)
  assert sorted(table) == [1, 2, 4]
  assert table[1][0] > table[2][0] > table[4][0] and table[1][1] < table[4][1]
  q = quantizer.load_quantizer(out)
  assert q.codebooks.shape == (4, 16, 16)
  s = q.settings
  assert (s["samples"], s["iters"], s["seed"], s["space"], s["init"]) == (1500, 4, 3, "raw",
                                                                          "kmeans++")
  assert s["data"] == [{"path": datasets["a"], "weight": 1.0}] and s["normalizer"] is None
  assert [row["count"] for row in q.stats["reconstruction"]] == [1, 2, 4]
  for row in q.stats["reconstruction"]:
    assert table[row["count"]] == (round(row["rel_l2"], 4), round(row["cosine"], 4))
  assert len(q.stats["inertia"]) == 4 and q.stats["inertia"] == sorted(q.stats["inertia"])[::-1]
  # The same sample and seed in this process: the same codebooks.
  x = normalizer_lib.sample_embeddings([(datasets["a"], 1.0)], 1500, seed=3)
  np.testing.assert_allclose(quantizer.fit_rvq(x, 4, 16, iters=4, seed=3), q.codebooks,
                             rtol=1e-5, atol=1e-6)
  # Normalized space, a weighted mix, --init=random, --exclude_last, replacing the file.
  norm_path = os.path.join(datasets["a"], "normalizer.npz")
  r = _run(f"--data={datasets['a']}:2,{datasets['b']}:1", f"--out={out}", "--overwrite",
           f"--normalizer={norm_path}", "--num_codebooks=2", "--codebook_size=8",
           "--max_samples=900", "--iters=3", "--init=random", "--exclude_last")
  assert r.returncode == 0, r.stderr
  q = quantizer.load_quantizer(out)
  s = q.settings
  assert q.codebooks.shape == (2, 8, 16) and s["space"] == "normalized"
  assert s["normalizer"] == norm_path and s["exclude_last"] and s["init"] == "random"
  norm = normalizer_lib.Normalizer.load(norm_path)
  assert s["normalizer_fingerprint"] == quantizer.normalizer_fingerprint(norm)
  x = normalizer_lib.sample_embeddings([(datasets["a"], 2.0), (datasets["b"], 1.0)], 900,
                                       exclude_last=True)
  np.testing.assert_allclose(
      quantizer.fit_rvq(norm.normalize(x), 2, 8, iters=3, seed=0, init="random"), q.codebooks,
      rtol=1e-5, atol=1e-6)


def test_cli_bad_input_exits_2_with_one_line_and_no_output(datasets, tmp_path):
  out = str(tmp_path / "sub" / "q.npz")
  a = datasets["a"]
  (tmp_path / "file").write_text("not a directory")
  readonly = "/proc/self/fdinfo" if os.geteuid() == 0 else str(tmp_path / "ro")
  if os.geteuid() != 0:
    os.mkdir(readonly, 0o500)
  small = ["--num_codebooks=2", "--codebook_size=8", "--max_samples=500"]
  cases = [
      ([f"--data={datasets['nan']}", *small],
       f"{datasets['nan_shard']}: record 7 (document 'd7'): field 'embeddings': non-finite"),
      ([f"--data={a}", "--codebook_size=2000", "--max_samples=1000"],
       "--codebook_size 2000 > the 1000 vectors"),
      ([f"--data={datasets['b']}", "--codebook_size=100000"], datasets["b"]),
      ([f"--data={a}", *small, f"--out={tmp_path / 'file' / 'q.npz'}"], str(tmp_path / "file")),
      ([f"--data={a}", *small, f"--out={readonly}/q.npz"], "cannot write in"),
      ([f"--data={a}", *small, f"--out={tmp_path}"], "is a directory"),
      ([f"--data={a},{datasets['c']}", *small], "different dims"),
      ([f"--data={datasets['c']}", *small, f"--normalizer={a}/normalizer.npz"],
       "--normalizer"),
      ([f"--data={a}:-1", *small], "weight must be finite and > 0"),
      ([f"--data={tmp_path / 'none'}", *small], str(tmp_path / "none")),
      ([f"--data={a},{a}:2", *small], "the same dataset"),
      ([*small], "--data is required"),
      ([f"--data={a}", "--num_codebooks=0"], "--num_codebooks must be >= 1"),
      ([f"--data={a}", "--init=fancy"], "--init"),
      ([f"--data={a}", "--iters=many"], "--iters"),
  ]
  for args, named in cases:
    if not any(x.startswith("--out=") for x in args):
      args = [*args, f"--out={out}"]
    err = _one_error_line(_run(*args))
    assert named in err, (args, err)
  assert sorted(os.listdir(tmp_path)) == sorted(["file"] + ([] if os.geteuid() == 0 else ["ro"]))
  # An existing output is kept unless --overwrite.
  existing = tmp_path / "q.npz"
  existing.write_bytes(b"keep me")
  err = _one_error_line(_run(f"--data={a}", *small, f"--out={existing}"))
  assert "already exists (pass --overwrite" in err and existing.read_bytes() == b"keep me"


def test_cli_help():
  r = _run("--help")
  assert r.returncode == 0, r.stderr
  for flag in ("--data", "--out", "--num_codebooks", "--codebook_size", "--max_samples",
               "--iters", "--seed", "--normalizer", "--init", "--overwrite"):
    assert flag in r.stdout, flag


def test_benchmark_smoke_run(tmp_path):
  out = tmp_path / "bench.json"
  env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "quantizer.py"), "--dim=16",
                      "--samples=200,400", "--codebook_sizes=8", "--codebooks=1,2", "--iters=2",
                      "--rounds=1", "--encode_rows=100", f"--json={out}"],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr
  result = json.loads(out.read_text())
  assert len(result["grid"]) == 4 and result["encode"]["rows"] == 100
  assert {x["factor"] for x in result["ratios"]} == {"N", "C"}
  assert all(x["ns_per_unit"] > 0 for x in result["grid"])
  assert "ns per sample x codebook x centroid x pass" in r.stdout and "k-means++ init" in r.stdout
