"""lcm_jax.normalizer against scikit-learn's RobustScaler (the reference's own fit call)."""

import os

import numpy as np
import pytest

from lcm_jax import normalizer as nl
from lcm_jax import schema

preprocessing = pytest.importorskip("sklearn.preprocessing")


def _reference(x):
  """The reference's call: RobustScaler(unit_variance=True, quantile_range=(0.25, 0.75))."""
  return preprocessing.RobustScaler(unit_variance=True, quantile_range=(0.25, 0.75)).fit(x)


def _awkward_data(n=5000, seed=0):
  """Gaussian dims of varied scale, a heavy tail, a skewed dim, few levels and a constant dim."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, 8)) * np.array([1.0, 0.01, 3.0, 0.2, 1.0, 1.0, 1.0, 1.0]) + 0.5
  x[:, 4] = rng.standard_t(2, size=n)
  x[:, 5] = rng.exponential(size=n)
  x[:, 6] = rng.integers(0, 3, size=n)  # few levels: zero spread in the lower tail
  x[:, 7] = 0.125                       # constant: zero spread everywhere
  return x


def test_matches_sklearn_float64():
  x = _awkward_data()
  ref = _reference(x)
  norm = nl.fit_robust_scaler(x)
  np.testing.assert_allclose(norm.center, ref.center_, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(norm.scale, ref.scale_, rtol=1e-6, atol=1e-6)
  # Zero spread: sklearn sets the spread to 1 BEFORE the unit-variance adjustment.
  assert norm.scale[7] == pytest.approx(1 / nl.unit_variance_adjust(), rel=1e-6)
  assert norm.scale[6] == pytest.approx(ref.scale_[6], rel=1e-6)
  assert norm.num_samples == len(x) and norm.clip_min is None


def test_matches_sklearn_float32_like_the_reference():
  """The reference hands sklearn float32 data; compute_dtype=float32 reproduces that call."""
  x = (np.random.default_rng(1).normal(size=(3001, 16)) * 0.05 - 0.01).astype(np.float32)
  ref = _reference(x)
  assert ref.center_.dtype == np.float32
  norm = nl.fit_robust_scaler(x, compute_dtype=np.float32)
  np.testing.assert_array_equal(norm.center, ref.center_)
  np.testing.assert_allclose(norm.scale, ref.scale_.astype(np.float32), rtol=1e-6)
  # The float64 default differs from the float32 call only by float32 rounding.
  np.testing.assert_allclose(nl.fit_robust_scaler(x).scale, ref.scale_, rtol=1e-5)


def test_percent_trap():
  """(0.25, 0.75) are PERCENTILES: for uniform data the scale is tiny, not IQR / 1.349."""
  x = np.random.default_rng(2).uniform(0, 1, size=(1_000_000, 2))
  norm = nl.fit_robust_scaler(x)
  expected = 0.005 / nl.unit_variance_adjust()  # (0.0075 - 0.0025) * width / 0.3747
  np.testing.assert_allclose(norm.scale, expected, rtol=0.1)
  assert norm.scale.max() < 0.1 < 0.5 / 1.349
  # For a Gaussian both readings agree: unit variance.
  g = np.random.default_rng(3).normal(scale=2.0, size=(400_000, 2))
  np.testing.assert_allclose(nl.fit_robust_scaler(g).scale, 2.0, rtol=0.03)


def test_clip_quantiles_follow_the_reference():
  x = _awkward_data(seed=4)[:, :6]
  ref = _reference(x)
  z = ref.transform(x)
  norm = nl.fit_robust_scaler(x, clip_quantiles=True)
  assert norm.clip_quantiles == nl.DEFAULT_CLIP_QUANTILES
  np.testing.assert_allclose(norm.clip_min, np.quantile(z, 1e-4, axis=0), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(norm.clip_max, np.quantile(z, 1 - 1e-4, axis=0), rtol=1e-5, atol=1e-5)
  # Clamping happens in normalized space, on both ways.
  far = np.full((1, 6), 1e6)
  np.testing.assert_allclose(norm.normalize(far)[0], norm.clip_max, rtol=1e-6)
  np.testing.assert_allclose(norm.denormalize(norm.normalize(far))[0],
                             norm.clip_max * norm.scale + norm.center, rtol=1e-5)


def test_normalize_denormalize_round_trip():
  x = _awkward_data(seed=5).astype(np.float32)
  norm = nl.fit_robust_scaler(x)
  y = norm.normalize(x)
  assert y.dtype == np.float32 and y.shape == x.shape
  np.testing.assert_allclose(y, (x - norm.center) / norm.scale, rtol=1e-6)
  np.testing.assert_allclose(norm.denormalize(y), x, rtol=1e-5, atol=1e-5)
  # float16 storage dtype in, float32 out; a wrong last dim is refused.
  assert norm.normalize(x.astype(np.float16)).dtype == np.float32
  with pytest.raises(ValueError, match="last dimension 8"):
    norm.normalize(x[:, :4])


def test_save_load_round_trip(tmp_path):
  x = _awkward_data(seed=6)
  for clip in (None, (0.01, 0.99)):
    norm = nl.fit_robust_scaler(x, clip_quantiles=clip)
    path = str(tmp_path / f"n{clip is not None}.npz")
    norm.save(path)
    back = nl.Normalizer.load(path)
    for field in ("center", "scale", "clip_min", "clip_max"):
      a, b = getattr(norm, field), getattr(back, field)
      if a is None:
        assert b is None
      else:
        assert b.dtype == np.float32
        np.testing.assert_array_equal(a, b)
    assert back.clip_quantiles == clip and back.num_samples == len(x)
    assert back.quantile_range == (0.25, 0.75)
  assert sorted(os.listdir(tmp_path)) == ["nFalse.npz", "nTrue.npz"]  # no temporary leftovers
  with np.load(str(tmp_path / "nTrue.npz")) as z:
    assert {"center", "scale", "clip_min", "clip_max", "format_version", "method"} <= set(z.files)


def test_load_rejects_bad_files(tmp_path):
  good = dict(center=np.zeros(4, np.float32), scale=np.ones(4, np.float32))

  def write(name, **arrays):
    path = str(tmp_path / name)
    with open(path, "wb") as f:
      np.savez(f, **arrays)
    return path

  garbage = tmp_path / "garbage.npz"
  garbage.write_bytes(b"this is not a zip file at all")
  with pytest.raises(ValueError, match=r"garbage\.npz: not a readable normalizer"):
    nl.Normalizer.load(str(garbage))
  truncated = tmp_path / "truncated.npz"
  truncated.write_bytes(open(write("full.npz", **good), "rb").read()[:100])
  with pytest.raises(ValueError, match=r"truncated\.npz"):
    nl.Normalizer.load(str(truncated))
  with pytest.raises(ValueError, match=r"missing\.npz: no such"):
    nl.Normalizer.load(str(tmp_path / "missing.npz"))
  with pytest.raises(ValueError, match=r"noscale\.npz: field 'scale': missing"):
    nl.Normalizer.load(write("noscale.npz", center=good["center"]))
  with pytest.raises(ValueError, match=r"shape\.npz: field 'scale': expected shape \(4,\)"):
    nl.Normalizer.load(write("shape.npz", center=good["center"], scale=np.ones(5, np.float32)))
  with pytest.raises(ValueError, match=r"2d\.npz: field 'center'"):
    nl.Normalizer.load(write("2d.npz", center=np.zeros((2, 4)), scale=good["scale"]))
  with pytest.raises(ValueError, match=r"nan\.npz: field 'center': non-finite value at index 2"):
    nl.Normalizer.load(write("nan.npz", center=np.array([0, 0, np.nan, 0]), scale=good["scale"]))
  with pytest.raises(ValueError, match=r"zero\.npz: field 'scale': non-positive"):
    nl.Normalizer.load(write("zero.npz", center=good["center"], scale=np.zeros(4)))
  with pytest.raises(ValueError, match=r"half\.npz: field 'clip_max': missing"):
    nl.Normalizer.load(write("half.npz", clip_min=np.zeros(4), **good))
  with pytest.raises(ValueError, match=r"ints\.npz: field 'center': expected a float array"):
    nl.Normalizer.load(write("ints.npz", center=np.zeros(4, np.int32), scale=good["scale"]))


def test_fit_rejects_bad_input():
  with pytest.raises(ValueError, match="non-finite value at sample 1, dim 2"):
    nl.fit_robust_scaler(np.array([[0.0, 0, 0], [0, 0, np.inf]]))
  with pytest.raises(ValueError, match="expected a non-empty"):
    nl.fit_robust_scaler(np.zeros((0, 3)))
  with pytest.raises(ValueError, match="quantile_range"):
    nl.fit_robust_scaler(np.zeros((3, 3)), quantile_range=(75, 25))


def _write_dataset(path, marker, num_shards, docs_per_shard, rng, dim=4):
  """A dataset whose every concept has dim 0 == marker, dim 1 == a unique id, last row == -9."""
  os.makedirs(path)
  shards, uid = [], 0
  for k in range(num_shards):
    docs = []
    for d in range(docs_per_shard):
      n = int(rng.integers(2, 9))
      emb = np.zeros((n, dim), np.float32)
      emb[:, 0] = marker
      emb[:, 1] = np.arange(uid, uid + n)
      emb[-1, 2] = -9.0
      uid += n
      docs.append(schema.Document(id=f"{marker}-{k}-{d}", embeddings=emb))
    shards.append(schema.write_shard(os.path.join(path, schema.shard_name(k, num_shards)), docs,
                                     dtype="float32"))
  schema.write_manifest(path, schema.make_manifest(dim=dim, dtype="float32", shards=shards,
                                                   producer={"tool": "test"}))
  return uid


def test_sample_embeddings_weights_and_max(tmp_path):
  rng = np.random.default_rng(0)
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  n_a = _write_dataset(a, 1.0, 3, 40, rng)
  n_b = _write_dataset(b, 2.0, 2, 40, rng)
  assert min(n_a, n_b) > 300
  x = nl.sample_embeddings([(a, 3.0), (b, 1.0)], max_samples=400, seed=0)
  assert x.shape == (400, 4) and x.dtype == np.float32
  assert (x[:, 0] == 1.0).sum() == 300 and (x[:, 0] == 2.0).sum() == 100
  # Without replacement; deterministic in the seed; the config's list-of-dicts form works.
  for marker in (1.0, 2.0):
    ids = x[x[:, 0] == marker, 1]
    assert len(np.unique(ids)) == len(ids)
  y = nl.sample_embeddings([{"path": a, "weight": 3.0}, {"path": b, "weight": 1.0}], 400, seed=0)
  np.testing.assert_array_equal(x, y)
  assert not np.array_equal(x, nl.sample_embeddings({a: 3.0, b: 1.0}, 400, seed=1))
  # Not enough data in b for its 1/4 share: every share shrinks, the 3:1 ratio holds.
  x = nl.sample_embeddings([(a, 1.0), (b, 3.0)], max_samples=10 * (n_a + n_b), seed=0)
  got_b = (x[:, 0] == 2.0).sum()
  assert got_b == n_b and abs((x[:, 0] == 1.0).sum() - n_b / 3) <= 1
  # Everything: every concept exactly once.
  x = nl.sample_embeddings([(a, 1.0)], max_samples=10**6, seed=0)
  np.testing.assert_array_equal(np.sort(x[:, 1]), np.arange(n_a))
  # exclude_last drops the end-of-document rows (120 documents in a).
  x = nl.sample_embeddings([(a, 1.0)], max_samples=10**6, seed=0, exclude_last=True)
  assert len(x) == n_a - 120 and (x[:, 2] == 0).all()


def test_sample_embeddings_errors(tmp_path):
  rng = np.random.default_rng(1)
  a, c = str(tmp_path / "a"), str(tmp_path / "c")
  _write_dataset(a, 1.0, 1, 5, rng)
  _write_dataset(c, 1.0, 1, 5, rng, dim=6)
  with pytest.raises(ValueError, match="disagree on dim"):
    nl.sample_embeddings([(a, 1.0), (c, 1.0)], 10, seed=0)
  with pytest.raises(ValueError, match="weight must be finite and >= 0"):
    nl.sample_embeddings([(a, -1.0)], 10, seed=0)
  with pytest.raises(ValueError, match="max_samples"):
    nl.sample_embeddings([(a, 1.0)], 0, seed=0)
  with pytest.raises(schema.ShardFormatError, match="missing manifest"):
    nl.sample_embeddings([(str(tmp_path), 1.0)], 10, seed=0)
