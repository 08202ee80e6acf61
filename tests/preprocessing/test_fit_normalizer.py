"""data_prep.fit_normalizer: the CLI's normalizer equals scikit-learn's RobustScaler on the same
sample, weights set the per-dataset shares, clipping bounds are quantiles of the normalized sample,
and bad input exits 2 with one error line and no output."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from sklearn.preprocessing import RobustScaler

from lcm_jax import synthetic
from lcm_jax import schema
from lcm_jax.normalizer import Normalizer
from lcm_jax.normalizer import sample_embeddings

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
  """Two dim-16 datasets of different sizes and one of dim 24."""
  root = tmp_path_factory.mktemp("fit_normalizer")
  dirs = {}
  for name, num_docs, dim, seed, shards in (("a", 300, 16, 0, 2), ("b", 120, 16, 1, 3),
                                            ("c", 40, 24, 2, 1)):
    dirs[name] = str(root / name)
    synthetic.generate(dirs[name], num_docs=num_docs, dim=dim, seed=seed, num_shards=shards)
  return dirs


def _run(*args):
  env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "data_prep.fit_normalizer", *args], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=120)


def _counts(stdout):
  """Per-dataset sample counts from the summary, in --data order."""
  return [int(n) for n in re.findall(r"\), (\d+) samples of \d+", stdout)]


def _sklearn(x):
  return RobustScaler(unit_variance=True, quantile_range=(0.25, 0.75)).fit(x)


@pytest.mark.parametrize("compute_dtype", ["float64", "float32"])
def test_matches_sklearn_on_the_same_sample(datasets, tmp_path, compute_dtype):
  out = str(tmp_path / "norm.npz")
  r = _run(f"--data={datasets['a']}:3", f"--data={datasets['b']}", "--max_samples=2000",
           "--seed=5", f"--out={out}", f"--compute_dtype={compute_dtype}")
  assert r.returncode == 0, r.stderr
  x = sample_embeddings([(datasets["a"], 3.0), (datasets["b"], 1.0)], 2000, seed=5)
  assert x.shape == (2000, 16)
  sk = _sklearn(x.astype(compute_dtype))
  norm = Normalizer.load(out)
  np.testing.assert_allclose(norm.center, sk.center_, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(norm.scale, sk.scale_, rtol=1e-6, atol=1e-7)
  assert norm.num_samples == 2000 and not norm.has_clipping
  assert _counts(r.stdout) == [1500, 500]
  assert r.stderr == ""


def test_weights_set_the_shares(datasets, tmp_path):
  out = str(tmp_path / "n.npz")
  for weights, expected in (((1, 1), [600, 600]), ((1, 3), [300, 900]), ((0.5, 0.25), [800, 400])):
    r = _run(f"--data={datasets['a']}:{weights[0]}", f"--data={datasets['b']}:{weights[1]}",
             "--max_samples=1200", f"--out={out}")
    assert r.returncode == 0, r.stderr
    assert _counts(r.stdout) == expected
  # More than the datasets hold: every share shrinks by the same factor, proportions kept.
  m_b = schema.read_manifest(datasets["b"])
  r = _run(f"--data={datasets['a']}:1", f"--data={datasets['b']}:1", "--max_samples=100000",
           f"--out={out}", "--exclude_last")
  assert r.returncode == 0, r.stderr
  eligible_b = m_b["num_concepts"] - m_b["num_documents"]
  assert _counts(r.stdout) == [eligible_b, eligible_b]
  assert "< --max_samples 100000" in r.stdout
  x = sample_embeddings([(datasets["a"], 1), (datasets["b"], 1)], 100000, exclude_last=True)
  assert len(x) == 2 * eligible_b == Normalizer.load(out).num_samples
  sk = _sklearn(x.astype(np.float64))
  np.testing.assert_allclose(Normalizer.load(out).scale, sk.scale_, rtol=1e-6)


def test_clip_quantiles_are_quantiles_of_the_normalized_sample(datasets, tmp_path):
  out = str(tmp_path / "clip.npz")
  r = _run(f"--data={datasets['a']}", "--max_samples=3000", "--seed=1",
           "--clip_quantiles=0.01,0.995", f"--out={out}")
  assert r.returncode == 0, r.stderr
  x = sample_embeddings([(datasets["a"], 1.0)], 3000, seed=1).astype(np.float64)
  sk = _sklearn(x)
  z = (x - sk.center_) / sk.scale_
  lo, hi = np.quantile(z, [0.01, 0.995], axis=0)
  norm = Normalizer.load(out)
  assert norm.clip_quantiles == (0.01, 0.995)
  np.testing.assert_allclose(norm.clip_min, lo, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(norm.clip_max, hi, rtol=1e-5, atol=1e-6)
  r = _run(f"--data={datasets['a']}", "--max_samples=3000", "--clip", f"--out={out}")
  assert r.returncode == 0, r.stderr
  assert Normalizer.load(out).clip_quantiles == (1e-4, 1 - 1e-4)


def test_set_manifest(datasets, tmp_path):
  out = os.path.join(datasets["b"], "mix.npz")
  try:
    r = _run(f"--data={datasets['a']}", f"--data={datasets['b']}", "--max_samples=500",
             f"--out={out}", "--set_manifest")
    assert r.returncode == 0, r.stderr
    with open(os.path.join(datasets["b"], "manifest.json")) as f:
      assert json.load(f)["normalizer"] == "mix.npz"
    with open(os.path.join(datasets["a"], "manifest.json")) as f:
      assert json.load(f)["normalizer"] == "normalizer.npz"  # not in that dir: untouched
    assert "manifest not changed for " + datasets["a"] in r.stdout
    schema.read_manifest(datasets["b"])
  finally:
    manifest = schema.read_manifest(datasets["b"])
    manifest["normalizer"] = "normalizer.npz"
    schema.write_manifest(datasets["b"], manifest)
    if os.path.exists(out):
      os.remove(out)
  # --out outside every dataset directory: refused before anything is written.
  out = str(tmp_path / "elsewhere.npz")
  r = _run(f"--data={datasets['a']}", f"--out={out}", "--set_manifest")
  assert r.returncode == 2 and "--set_manifest" in r.stderr and not os.path.exists(out)


def test_bad_input_exits_2_with_one_line_and_no_output(datasets, tmp_path):
  out = str(tmp_path / "sub" / "never.npz")
  missing = str(tmp_path / "no_such_dataset")
  cases = [
      ([f"--data={missing}"], missing),
      ([f"--data={datasets['a']}:abc"], datasets["a"]),
      ([f"--data={datasets['a']}:-1"], datasets["a"]),
      ([f"--data={datasets['a']}:0"], datasets["a"]),
      ([f"--data={datasets['a']}", f"--data={datasets['c']}"], datasets["c"]),
      ([f"--data={datasets['a']}", f"--data={datasets['a']}:2"], datasets["a"]),
      ([f"--data={str(tmp_path)}"], os.path.join(str(tmp_path), "manifest.json")),
      ([f"--data={datasets['a']}", "--clip_quantiles=0.9,0.1"], "--clip_quantiles"),
      ([f"--data={datasets['a']}", "--max_samples=0"], "--max_samples"),
      ([f"--data={datasets['a']}", "--max_samples=many"], "--max_samples"),
      ([f"--data={datasets['a']}", "--clip", "--clip_quantiles=0.1,0.9"], "--clip"),
  ]
  for args, named in cases:
    r = _run(*args, f"--out={out}")
    assert r.returncode == 2, (args, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), (args, r.stderr)
    assert named in lines[0], (args, lines[0])
    assert not os.path.exists(os.path.dirname(out)), args
  assert "dim 16" in _run(f"--data={datasets['a']}", f"--data={datasets['c']}",
                          f"--out={out}").stderr


def test_help():
  r = _run("--help")
  assert r.returncode == 0, r.stderr
  assert "--data DIR[:WEIGHT]" in r.stdout and "(default: 1000000)" in r.stdout


def _vectors_dataset(path, x):
  """A dataset whose documents are the rows of ``x`` (two concepts a document where possible):
  exact vectors, so the sample is known."""
  os.makedirs(path)
  x = np.asarray(x, np.float32)
  docs = [schema.Document(id=f"d{i}", embeddings=x[i:i + 2]) for i in range(0, len(x), 2)]
  entry = schema.write_shard(os.path.join(path, schema.shard_name(0, 1)), docs, dtype="float32")
  schema.write_manifest(path, schema.make_manifest(dim=x.shape[1], dtype="float32",
                                                   shards=[entry], producer={"test": True}))
  return str(path)


def _one_error_line(r):
  assert r.returncode == 2, (r.stdout, r.stderr)
  assert "Traceback" not in r.stderr, r.stderr
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
  return lines[0]


def test_degenerate_fits_exit_2_and_write_nothing(datasets, tmp_path):
  rng = np.random.default_rng(0)
  one = _vectors_dataset(tmp_path / "one", rng.normal(size=(1, 8)))
  same = _vectors_dataset(tmp_path / "same", np.tile(rng.normal(size=(1, 8)), (600, 1)))
  out = tmp_path / "sub" / "n.npz"
  # A single vector: the old tool wrote scale 2.669 in every dim.
  err = _one_error_line(_run(f"--data={one}", f"--out={out}"))
  assert one in err and "(1 concepts)" in err and "1 vectors" in err and "--min_samples 401" in err
  # Too few for the quantiles because of --max_samples, on a large dataset.
  err = _one_error_line(_run(f"--data={datasets['a']}", "--max_samples=100", f"--out={out}"))
  assert datasets["a"] in err and "100 vectors" in err and "--max_samples 100" in err
  # Enough vectors, but all the same one: zero spread in every dim.
  err = _one_error_line(_run(f"--data={same}", f"--out={out}"))
  assert same in err and "8 of 8 dims have zero spread" in err and "600 sampled" in err
  assert not os.path.exists(tmp_path / "sub")
  # --min_samples lowers the floor (a demo corpus): two distinct vectors fit, as sklearn does.
  two = _vectors_dataset(tmp_path / "two", rng.normal(size=(2, 8)))
  r = _run(f"--data={two}", "--min_samples=2", f"--out={out}")
  assert r.returncode == 0, r.stderr
  np.testing.assert_allclose(Normalizer.load(str(out)).scale,
                             _sklearn(sample_embeddings([(two, 1.0)], 10).astype(np.float64)).scale_,
                             rtol=1e-6)
  assert _one_error_line(_run(f"--data={two}", "--min_samples=1", f"--out={out}")).startswith(
      "error: --min_samples")


def test_some_zero_spread_dims_warn_and_match_sklearn(tmp_path):
  x = np.random.default_rng(1).normal(size=(500, 6))
  x[:, 2] = 0.5                  # constant
  x[:10, 4] = x[:, 4].min() - 1  # 2% of the sample tied at the low end: pins the quantiles
  data = _vectors_dataset(tmp_path / "d", x)
  out = str(tmp_path / "n.npz")
  r = _run(f"--data={data}", f"--out={out}")
  assert r.returncode == 0 and r.stderr == "", r.stderr
  [warning] = [line for line in r.stdout.splitlines() if "warning:" in line]
  assert "2 of 6 dims have zero spread" in warning and "(dims 2, 4)" in warning
  assert "--exclude_last" in warning
  sk = _sklearn(x.astype(np.float32).astype(np.float64))
  np.testing.assert_allclose(Normalizer.load(out).scale, sk.scale_, rtol=1e-6)
  np.testing.assert_allclose(sk.scale_[[2, 4]], 1 / 0.3747, rtol=1e-3)  # sklearn's fallback


def test_bad_out_is_refused_before_any_work(datasets, tmp_path):
  (tmp_path / "file").write_text("not a directory")
  for out, named in ((tmp_path / "file" / "n.npz", str(tmp_path / "file")),
                     (tmp_path / "file" / "deeper" / "n.npz", str(tmp_path / "file"))):
    err = _one_error_line(_run(f"--data={datasets['a']}", f"--out={out}"))
    assert "--out" in err and named in err, err
  assert sorted(os.listdir(tmp_path)) == ["file"]


def test_a_bug_is_not_reported_as_bad_input(datasets, tmp_path, monkeypatch):
  """A ValueError that is not a UserError (a bug inside the sampler, here planted) propagates
  with its traceback instead of becoming one 'error:' line and exit status 2."""
  from data_prep import fit_normalizer  # pylint: disable=g-import-not-at-top
  from lcm_jax import normalizer as normalizer_lib  # pylint: disable=g-import-not-at-top

  def broken(*args, **kwargs):
    raise ValueError("planted bug: operands could not be broadcast together")
  monkeypatch.setattr(normalizer_lib, "sample_embeddings", broken)
  out = tmp_path / "n.npz"
  with pytest.raises(ValueError, match="planted bug"):
    fit_normalizer.main([f"--data={datasets['a']}", f"--out={out}"])
  assert not out.exists()
