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

from data_prep import synthetic
from lcm_jax import schema
from lcm_jax.normalizer import Normalizer
from lcm_jax.normalizer import sample_embeddings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
