"""The frozen SONAR normalizer every LCM owns, in numpy.

``normalize(x) = (x - center) / scale`` and ``denormalize`` its inverse, with an optional per-dim
clamp to ``[clip_min, clip_max]`` in NORMALIZED space (after normalizing, before denormalizing), as
the reference's ``SonarNormalizer`` does.

The fit reproduces ``sklearn.preprocessing.RobustScaler(unit_variance=True,
quantile_range=(0.25, 0.75))`` exactly, without scikit-learn:

* ``center = nanmedian(x, axis=0)``;
* ``iqr = nanpercentile(x, 0.75) - nanpercentile(x, 0.25)`` per dim (linear interpolation). The
  trap: sklearn's ``quantile_range`` is in PERCENT, so this is the 0.25th..0.75th PERCENTILE spread
  (the far lower tail), not the textbook 25%..75% inter-quartile range;
* near-constant dims (``iqr < 10 * eps(dtype)``) get ``iqr = 1`` (sklearn's
  ``_handle_zeros_in_scale``), BEFORE the unit-variance adjustment;
* ``scale = iqr / (Phi^-1(0.0075) - Phi^-1(0.0025))`` so that a Gaussian dim gets unit variance
  (Phi^-1 = the standard normal quantile; here ``statistics.NormalDist``, equal to scipy's
  ``norm.ppf`` to ~1e-16 relative).

The fit runs in float64 by default (``compute_dtype``); pass ``np.float32`` to reproduce the
reference's own call bit for bit (it feeds sklearn ``embeddings.float().numpy()``, and sklearn keeps
float32 input in float32). Stored buffers are float32 either way.

File format (``normalizer.npz``, written atomically by :meth:`Normalizer.save`):

=================  ===========  ====================================================================
key                shape/dtype  meaning
=================  ===========  ====================================================================
``center``         (dim,) f32   per-dim median
``scale``          (dim,) f32   per-dim robust scale (> 0)
``clip_min``       (dim,) f32   optional, lower clamp in normalized space (with ``clip_max``)
``clip_max``       (dim,) f32   optional, upper clamp in normalized space (with ``clip_min``)
``format_version`` () int64     :data:`FORMAT_VERSION`
``method``         () str       ``"gaussian_robust"`` (the reference's name for this fit)
``quantile_range`` (2,) f64     in PERCENT, as passed to sklearn, e.g. ``[0.25, 0.75]``
``clip_quantiles`` (2,) f64     optional, the quantiles ``clip_min``/``clip_max`` were taken at
``num_samples``    () int64     how many vectors the fit saw (-1 if unknown)
=================  ===========  ====================================================================
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import zipfile
from typing import Any, Mapping, Sequence

import numpy as np

from lcm_jax import schema
from lcm_jax.errors import UserError

FORMAT_VERSION = 1
METHOD = "gaussian_robust"
DEFAULT_QUANTILE_RANGE = (0.25, 0.75)   # PERCENT, as in the reference's sklearn call
DEFAULT_CLIP_QUANTILES = (1e-4, 1.0 - 1e-4)  # fractions (torch.quantile), as in the reference
NORMALIZER_NAME = "normalizer.npz"
_BUFFERS = ("center", "scale", "clip_min", "clip_max")


class NormalizerError(UserError):
  """A normalizer file, or the data a normalizer is fitted on, is bad; names the file and field.

  Argument checks of the functions here (a bad ``quantile_range``, ``compute_dtype``, ...) stay
  plain ``ValueError``: the tools validate their flags first, so those are bugs of the caller.
  """


@dataclasses.dataclass
class Normalizer:
  """Per-dimension affine normalizer with optional clamping in normalized space.

  Attributes:
    center: (dim,) float32, subtracted first.
    scale: (dim,) float32, divides after centering; strictly positive.
    clip_min: optional (dim,) float32 lower clamp, applied in normalized space.
    clip_max: optional (dim,) float32 upper clamp, applied in normalized space.
    quantile_range: the sklearn ``quantile_range`` (PERCENT) the scale was fitted with.
    clip_quantiles: the quantiles ``clip_min``/``clip_max`` were taken at, if any.
    num_samples: number of vectors the fit saw (-1 if unknown).
  """

  center: np.ndarray
  scale: np.ndarray
  clip_min: np.ndarray | None = None
  clip_max: np.ndarray | None = None
  quantile_range: tuple[float, float] = DEFAULT_QUANTILE_RANGE
  clip_quantiles: tuple[float, float] | None = None
  num_samples: int = -1

  def __post_init__(self) -> None:
    self.center = np.asarray(self.center, dtype=np.float32)
    self.scale = np.asarray(self.scale, dtype=np.float32)
    if self.clip_min is not None:
      self.clip_min = np.asarray(self.clip_min, dtype=np.float32)
    if self.clip_max is not None:
      self.clip_max = np.asarray(self.clip_max, dtype=np.float32)
    problem = _validate_buffers(self.center, self.scale, self.clip_min, self.clip_max)
    if problem is not None:
      field, msg = problem
      raise ValueError(f"Normalizer: field '{field}': {msg}")

  @property
  def dim(self) -> int:
    """The embedding dimension."""
    return int(self.center.shape[0])

  @property
  def has_clipping(self) -> bool:
    """Whether normalize/denormalize clamp to ``[clip_min, clip_max]``."""
    return self.clip_min is not None

  def _check_dim(self, x: np.ndarray) -> None:
    if x.shape[-1:] != (self.dim,):
      raise ValueError(f"Normalizer: expected last dimension {self.dim}, got shape {x.shape}")

  def normalize(self, x: np.ndarray) -> np.ndarray:
    """``(x - center) / scale``, then clamped if clipping is on. Float32 (float64 stays float64)."""
    x = np.asarray(x)
    self._check_dim(x)
    dtype = np.result_type(x.dtype, np.float32)
    y = (x.astype(dtype, copy=False) - self.center.astype(dtype)) / self.scale.astype(dtype)
    if self.has_clipping:
      y = np.clip(y, self.clip_min.astype(dtype), self.clip_max.astype(dtype))
    return y

  def denormalize(self, y: np.ndarray) -> np.ndarray:
    """Clamped if clipping is on, then ``y * scale + center``: the inverse of :meth:`normalize`."""
    y = np.asarray(y)
    self._check_dim(y)
    dtype = np.result_type(y.dtype, np.float32)
    y = y.astype(dtype, copy=False)
    if self.has_clipping:
      y = np.clip(y, self.clip_min.astype(dtype), self.clip_max.astype(dtype))
    return y * self.scale.astype(dtype) + self.center.astype(dtype)

  def save(self, path: str) -> str:
    """Writes the ``.npz`` atomically (temporary name in the same directory, then rename)."""
    arrays: dict[str, Any] = {
        "center": self.center,
        "scale": self.scale,
        "format_version": np.int64(FORMAT_VERSION),
        "method": np.str_(METHOD),
        "quantile_range": np.asarray(self.quantile_range, dtype=np.float64),
        "num_samples": np.int64(self.num_samples),
    }
    if self.has_clipping:
      arrays["clip_min"] = self.clip_min
      arrays["clip_max"] = self.clip_max
      if self.clip_quantiles is not None:
        arrays["clip_quantiles"] = np.asarray(self.clip_quantiles, dtype=np.float64)
    return write_npz_atomic(path, arrays)

  @classmethod
  def load(cls, path: str) -> "Normalizer":
    """Reads and validates a file written by :meth:`save`.

    Raises:
      NormalizerError: naming the file and the field, if the file is missing, not an ``.npz``,
        lacks a buffer, or has buffers of the wrong shape, non-finite values or a non-positive
        scale.
    """
    if not os.path.exists(path):
      raise NormalizerError(f"{path}: no such normalizer file")
    try:
      with np.load(path, allow_pickle=False) as z:
        data = {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
      raise NormalizerError(
          f"{path}: not a readable normalizer .npz ({type(e).__name__}: {e})") from None
    for key in ("center", "scale"):
      if key not in data:
        raise NormalizerError(f"{path}: field '{key}': missing (keys present: {sorted(data)})")
    if ("clip_min" in data) != ("clip_max" in data):
      missing = "clip_max" if "clip_min" in data else "clip_min"
      raise NormalizerError(
          f"{path}: field '{missing}': missing (clip_min and clip_max go together)")
    version = int(data.get("format_version", FORMAT_VERSION))
    if version > FORMAT_VERSION:
      raise NormalizerError(f"{path}: field 'format_version': {version} is newer than supported "
                       f"{FORMAT_VERSION}")
    bufs = {}
    for key in _BUFFERS:
      if key in data:
        arr = data[key]
        if not np.issubdtype(arr.dtype, np.floating):
          raise NormalizerError(
              f"{path}: field '{key}': expected a float array, got dtype {arr.dtype}")
        bufs[key] = arr.astype(np.float32)
      else:
        bufs[key] = None
    problem = _validate_buffers(bufs["center"], bufs["scale"], bufs["clip_min"], bufs["clip_max"])
    if problem is not None:
      field, msg = problem
      raise NormalizerError(f"{path}: field '{field}': {msg}")
    qr = tuple(float(q) for q in data.get("quantile_range", DEFAULT_QUANTILE_RANGE))
    cq = data.get("clip_quantiles")
    return cls(center=bufs["center"], scale=bufs["scale"], clip_min=bufs["clip_min"],
               clip_max=bufs["clip_max"], quantile_range=qr,  # type: ignore[arg-type]
               clip_quantiles=None if cq is None else (float(cq[0]), float(cq[1])),
               num_samples=int(data.get("num_samples", -1)))


def write_npz_atomic(path: str, arrays: Mapping[str, Any]) -> str:
  """Writes ``arrays`` to the ``.npz`` ``path`` atomically and returns ``path``.

  A temporary name in the same directory, given the usual file mode
  (:func:`lcm_jax.schema.write_file_atomic`), then renamed; removed again if anything fails.
  """
  return schema.write_file_atomic(path, lambda f: np.savez(f, **arrays), binary=True,
                                   suffix=".npz")


def apply_umask_permissions(path: str) -> None:
  """Gives ``path`` (and a directory's direct children) the modes a plain ``open`` would.

  ``tempfile.mkstemp``/``mkdtemp`` create 0600/0700 entries; a dataset on a shared file system
  must stay readable by the other users and jobs that read it.
  """
  umask = os.umask(0)
  os.umask(umask)
  paths = [path]
  if os.path.isdir(path):
    paths += [os.path.join(path, n) for n in os.listdir(path)]
  for p in paths:
    os.chmod(p, (0o777 if os.path.isdir(p) else 0o666) & ~umask)


def _validate_buffers(center: np.ndarray, scale: np.ndarray, clip_min: np.ndarray | None,
                      clip_max: np.ndarray | None) -> tuple[str, str] | None:
  """Returns ``(field, message)`` for the first problem found, else None."""
  if center.ndim != 1 or center.shape[0] == 0:
    return "center", f"expected shape (dim,) with dim >= 1, got {center.shape}"
  dim = center.shape[0]
  for name, arr in (("center", center), ("scale", scale), ("clip_min", clip_min),
                    ("clip_max", clip_max)):
    if arr is None:
      continue
    if arr.shape != (dim,):
      return name, f"expected shape ({dim},) like 'center', got {arr.shape}"
    if not np.isfinite(arr).all():
      return name, f"non-finite value at index {int(np.argwhere(~np.isfinite(arr))[0][0])}"
  if (scale <= 0).any():
    return "scale", f"non-positive value at index {int(np.argwhere(scale <= 0)[0][0])}"
  if (clip_min is None) != (clip_max is None):
    return ("clip_max" if clip_max is None else "clip_min"), "clip_min and clip_max go together"
  if clip_min is not None and (clip_min > clip_max).any():
    bad = int(np.argwhere(clip_min > clip_max)[0][0])
    return "clip_min", f"greater than clip_max at index {bad}"
  return None


def _norm_ppf(p: float) -> float:
  """Standard normal quantile (scipy's ``norm.ppf``) from the standard library."""
  return statistics.NormalDist().inv_cdf(p)


def unit_variance_adjust(quantile_range: Sequence[float] = DEFAULT_QUANTILE_RANGE) -> float:
  """sklearn's ``norm.ppf(q_max / 100) - norm.ppf(q_min / 100)`` (0.3747 for (0.25, 0.75))."""
  q_min, q_max = quantile_range
  return _norm_ppf(q_max / 100.0) - _norm_ppf(q_min / 100.0)


def fit_robust_scaler(x: np.ndarray, *, clip_quantiles: tuple[float, float] | bool | None = None,
                      quantile_range: tuple[float, float] = DEFAULT_QUANTILE_RANGE,
                      compute_dtype: Any = np.float64,
                      zero_spread: list[int] | None = None) -> Normalizer:
  """Fits the reference normalizer: sklearn ``RobustScaler(unit_variance=True, quantile_range)``.

  Args:
    x: (num_samples, dim) embeddings, finite.
    clip_quantiles: None for no clipping; True for :data:`DEFAULT_CLIP_QUANTILES` (1e-4, 1-1e-4);
      or ``(lo, hi)`` FRACTIONS in [0, 1]. ``clip_min``/``clip_max`` are those per-dim quantiles of
      the NORMALIZED data (the reference takes ``torch.quantile`` of ``fit_transform``'s output).
    quantile_range: sklearn's ``quantile_range``, in PERCENT (the reference passes (0.25, 0.75)).
    compute_dtype: float64 (default, most accurate) or float32 (bit-compatible with the reference,
      which hands sklearn float32 data).
    zero_spread: if a list, the dims whose quantile spread is below ``10 * eps`` are appended to it
      (sklearn gives them ``iqr = 1``, so ``scale = 1 / 0.3747 = 2.669``: a scale that measures
      nothing); :mod:`data_prep.fit_normalizer` refuses such a fit unless told otherwise.

  Returns:
    A :class:`Normalizer` with float32 buffers.
  """
  x = np.asarray(x)
  if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
    raise NormalizerError(f"fit_robust_scaler: expected a non-empty (num_samples, dim) array, got "
                          f"shape {x.shape}")
  q_min, q_max = (float(q) for q in quantile_range)
  if not 0.0 <= q_min <= q_max <= 100.0:
    raise ValueError(f"fit_robust_scaler: invalid quantile_range {quantile_range} (PERCENT, "
                     "0 <= q_min <= q_max <= 100)")
  if clip_quantiles is True:
    clip_quantiles = DEFAULT_CLIP_QUANTILES
  elif clip_quantiles is False:
    clip_quantiles = None
  if clip_quantiles is not None:
    lo, hi = (float(q) for q in clip_quantiles)
    if not 0.0 <= lo <= hi <= 1.0:
      raise ValueError(f"fit_robust_scaler: invalid clip_quantiles {clip_quantiles} (fractions, "
                       "0 <= lo <= hi <= 1)")
    clip_quantiles = (lo, hi)
  compute_dtype = np.dtype(compute_dtype)
  if compute_dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
    raise ValueError(
        f"fit_robust_scaler: compute_dtype must be float32 or float64, got {compute_dtype}")

  n, dim = x.shape
  center = np.empty(dim, compute_dtype)
  iqr = np.empty(dim, compute_dtype)
  clip_min = np.empty(dim, compute_dtype) if clip_quantiles else None
  clip_max = np.empty(dim, compute_dtype) if clip_quantiles else None
  adjust = unit_variance_adjust((q_min, q_max))
  eps = np.finfo(compute_dtype).eps
  # Column blocks of ~256 MiB bound the working memory (1M x 1024 float64 would be 8 GiB); every
  # statistic is per column, so blocking changes nothing in the result.
  block = max(1, (256 << 20) // (n * compute_dtype.itemsize))
  for start in range(0, dim, block):
    cols = slice(start, min(dim, start + block))
    xb = np.array(x[:, cols], dtype=compute_dtype)  # A copy: the quantile calls may partition it.
    if not np.isfinite(xb).all():
      r, c = np.argwhere(~np.isfinite(xb))[0]
      raise NormalizerError(
          f"fit_robust_scaler: non-finite value at sample {int(r)}, dim {start + int(c)}")
    center[cols] = np.nanmedian(xb, axis=0)
    qs = np.nanpercentile(xb, [q_min, q_max], axis=0)
    s = qs[1] - qs[0]
    flat = s < 10 * eps
    if zero_spread is not None:
      zero_spread.extend(start + int(i) for i in np.flatnonzero(flat))
    s[flat] = 1.0  # sklearn's _handle_zeros_in_scale, before the unit-variance adjust.
    iqr[cols] = s
    if clip_quantiles is not None:
      # As the reference: quantiles of what the fitted scaler itself outputs for this data.
      z = ((xb - center[cols]) / (s.astype(np.float64) / adjust)).astype(compute_dtype)
      clip_min[cols], clip_max[cols] = np.quantile(z, clip_quantiles, axis=0)
  # sklearn divides by a numpy float64 scalar, which promotes even float32 spreads to float64.
  scale = iqr.astype(np.float64) / adjust
  return Normalizer(center=center, scale=scale, clip_min=clip_min, clip_max=clip_max,
                    quantile_range=(q_min, q_max), clip_quantiles=clip_quantiles, num_samples=n)


def _as_dir_weights(data_dirs_with_weights: Any) -> list[tuple[str, float]]:
  """Accepts ``[(dir, w), ...]``, ``[{"path": dir, "weight": w}, ...]`` or ``{dir: w}``."""
  if isinstance(data_dirs_with_weights, Mapping):
    items = list(data_dirs_with_weights.items())
  else:
    items = []
    for entry in data_dirs_with_weights:
      if isinstance(entry, Mapping):
        items.append((entry["path"], entry.get("weight", 1.0)))
      else:
        path, weight = entry
        items.append((path, weight))
  out = [(str(p), float(w)) for p, w in items]
  if not out:
    raise NormalizerError("sample_embeddings: no datasets given")
  for p, w in out:
    if not np.isfinite(w) or w < 0:
      raise NormalizerError(
          f"sample_embeddings: dataset {p}: weight must be finite and >= 0, got {w}")
  if sum(w for _, w in out) <= 0:
    raise NormalizerError("sample_embeddings: all weights are zero")
  return out


def _allocate(total: int, weights: np.ndarray) -> np.ndarray:
  """Splits ``total`` into integers proportional to ``weights`` (largest remainder)."""
  exact = total * weights / weights.sum()
  counts = np.floor(exact).astype(np.int64)
  rest = total - int(counts.sum())
  if rest > 0:
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[:rest]] += 1
  return counts


def sample_embeddings(data_dirs_with_weights: Any, max_samples: int, seed: int = 0, *,
                      exclude_last: bool = False) -> np.ndarray:
  """Samples concept vectors from several lcm_jax datasets in proportion to their weights.

  Each dataset contributes ``max_samples * w_i / sum(w)`` concepts drawn uniformly without
  replacement over all its concepts (every position of every document, end-of-text included). When
  a dataset has fewer concepts than its share, every share shrinks by the same factor so that the
  proportions still hold (the result then has fewer than ``max_samples`` rows). Only shards that
  hold a sampled concept are read.

  Args:
    data_dirs_with_weights: ``[(dir, weight), ...]``, ``[{"path": dir, "weight": w}, ...]`` (the
      config's ``data.train`` form) or ``{dir: weight}``; each dir holds ``manifest.json`` + shards.
    max_samples: upper bound on the number of rows returned.
    seed: makes the sample deterministic.
    exclude_last: skip each document's last concept (the end-of-text marker, when the data carries
      it): thousands of copies of one identical vector can pin the robust tail quantiles of a dim.

  Returns:
    float32 array (num_samples, dim), datasets in the given order, concepts in storage order.
  """
  if max_samples < 1:
    raise NormalizerError(f"sample_embeddings: max_samples must be >= 1, got {max_samples}")
  entries = _as_dir_weights(data_dirs_with_weights)
  manifests = [schema.read_manifest(p) for p, _ in entries]
  dims = {int(m["dim"]) for m in manifests}
  if len(dims) != 1:
    detail = ", ".join(f"{p}: {m['dim']}" for (p, _), m in zip(entries, manifests))
    raise NormalizerError(f"sample_embeddings: datasets disagree on dim ({detail})")
  dim = dims.pop()
  weights = np.array([w for _, w in entries], dtype=np.float64)
  sizes = np.array([_num_eligible(m, exclude_last) for m in manifests], dtype=np.int64)
  active = weights > 0
  for (path, _), size, on in zip(entries, sizes, active):
    if on and size == 0:
      raise NormalizerError(f"sample_embeddings: dataset {path} has no concepts to sample "
                       f"(exclude_last={exclude_last})")
  total = int(max_samples)
  # Largest total whose proportional shares fit every dataset.
  for i in np.flatnonzero(active):
    total = min(total, int(np.floor(sizes[i] * weights.sum() / weights[i] + 1e-9)))
  counts = _allocate(total, weights)
  counts = np.minimum(counts, sizes)
  rng = np.random.default_rng(seed)
  parts = []
  for (path, _), manifest, count in zip(entries, manifests, counts):
    if count == 0:
      continue
    picks = np.sort(rng.choice(_num_eligible(manifest, exclude_last), size=int(count),
                               replace=False))
    parts.append(_gather_concepts(path, manifest, picks, dim, exclude_last))
  if not parts:
    return np.zeros((0, dim), np.float32)
  return np.concatenate(parts, axis=0)


def _num_eligible(entry: dict[str, Any], exclude_last: bool) -> int:
  """Concepts of a manifest (or one shard entry) that may be sampled."""
  return int(entry["num_concepts"]) - (int(entry["num_documents"]) if exclude_last else 0)


def _gather_concepts(data_dir: str, manifest: dict[str, Any], picks: np.ndarray, dim: int,
                     exclude_last: bool) -> np.ndarray:
  """Returns the concepts at sorted global indices ``picks`` (over eligible concepts)."""
  out = np.empty((len(picks), dim), np.float32)
  sizes = [_num_eligible(s, exclude_last) for s in manifest["shards"]]
  shard_ends = np.cumsum(sizes)
  shard_of = np.searchsorted(shard_ends, picks, side="right")
  row = 0
  for k in np.unique(shard_of):
    entry = manifest["shards"][int(k)]
    path = os.path.join(data_dir, entry["file"])
    local = picks[shard_of == k] - (shard_ends[k] - sizes[k])
    docs = schema.read_shard(path, expected_dim=dim)
    n_concepts = sum(d.embeddings.shape[0] for d in docs)
    if n_concepts != int(entry["num_concepts"]) or len(docs) != int(entry["num_documents"]):
      raise schema.ShardFormatError(
          f"{path}: field 'num_concepts': shard holds {len(docs)} documents / {n_concepts} "
          f"concepts, manifest says {entry['num_documents']} / {entry['num_concepts']}")
    flat = np.concatenate([d.embeddings[:-1] if exclude_last else d.embeddings for d in docs],
                          axis=0)
    out[row:row + len(local)] = flat[local]
    row += len(local)
  return out
