"""Residual vector quantization (RVQ) of SONAR space, in JAX: the fit, the codes, the artifact.

The quantized LCM of the paper (arXiv 2412.08821, section 2.3) replaces each concept vector by
``num_codebooks`` (C) indices into codebooks of ``codebook_size`` (K) centroids of dim D (paper:
C = 64, K = 8192, fitted with FAISS's residual k-means on ~15M sentences). Codebook ``c`` is a
k-means fit on the residuals that the codebooks before it leave, so every prefix sum of chosen
centroids approximates the vector, coarse to fine.

The fit (:func:`fit_rvq`), level by level:

* init (``init="kmeans++"``, the default): greedy k-means++ on a seeded random subsample of
  ``M = min(N, max(4 K, 4096))`` rows of the current residual (``init_sample``): the first
  centroid a uniform row; each next one the best (lowest resulting inertia of the subsample) of
  ``2 + floor(ln K)`` candidates drawn with probability proportional to their squared distance to
  the nearest centroid so far (scikit-learn's greedy k-means++; :func:`kmeanspp_init_indices`).
  The subsample comes from ``np.random.default_rng((seed, level))``, the draws from
  ``jax.random.key(seed)`` folded with the level. A chosen row is at distance 0, so the K rows
  are distinct (when every row is at distance 0, i.e. fewer distinct vectors than K, the first
  rows not chosen yet fill up). Cost per level: K sequential steps, each one (M x D) x (D x
  candidates) matmul, independent of N. ``init="random"`` is FAISS's init: K rows at distinct
  indices, ``np.random.default_rng((seed, level)).choice(N, K, replace=False)``
  (:func:`random_init_indices`); cheaper, but it often puts two centroids in one true cluster and
  none in another, which Lloyd iterations do not repair;
* ``iters`` Lloyd iterations, each an assignment pass (nearest centroid by
  ``|x|^2 - 2 x.c + |c|^2``, the ``x.c`` term a matmul; ties go to the lowest index) followed by
  the update (each centroid the mean of its points);
* empty clusters (no point after an assignment pass) are re-seeded deterministically in the
  update: the e-th empty cluster (in index order) becomes the point with the e-th LARGEST
  squared distance to its assigned centroid in that pass (ties: lower row index first), so the
  worst-fitted points get centroids of their own;
* a final assignment pass with the final centroids gives each point its code, the level's
  inertia (sum of squared distances) and the next residual ``r -= c[code]``. These codes are the
  greedy codes :func:`encode` gives.

The assignment passes run over fixed-size chunks of rows (``lax.scan``), so the working memory
beyond the data is one (chunk x K) distance block plus the (K x D) centroid sums, whatever N is;
each level is one jitted call (compiled once: every level has the same shapes). Cost per level:
``(iters + 1) * 2 * N * K * D`` FLOPs (the matmuls), linear in samples, codebooks, codebook size
and iterations. Distances are float32 matmuls at ``precision="highest"`` (no TF32 on GPUs: a
nearest-centroid decision should not depend on the chip).

Artifact (``quantizer.npz``, written atomically by :func:`save_quantizer`):

==================  =============  ================================================================
key                 shape/dtype    meaning
==================  =============  ================================================================
``codebooks``       (C, K, D) f32  codebook ``c`` quantizes the residual left by codebooks ``< c``
``format_version``  () int64       :data:`FORMAT_VERSION`
``settings``        () str (JSON)  the fit; ``num_codebooks``, ``codebook_size`` and ``dim``
                                   always (equal to the shape); from data_prep.fit_quantizer also
                                   ``iters``, ``seed``, ``samples``, ``max_samples``, ``init``,
                                   ``init_sample``, ``data`` (the ``[{"path", "weight"}]`` spec),
                                   ``exclude_last``, ``space`` (``"raw"`` SONAR or
                                   ``"normalized"``), ``normalizer`` (path or null),
                                   ``normalizer_fingerprint`` (:func:`normalizer_fingerprint`) and
                                   ``tool``
``stats``           () str (JSON)  from data_prep.fit_quantizer: ``reconstruction``
                                   (:func:`reconstruction_table` rows on the fit sample),
                                   ``inertia`` (per level, after its final assignment),
                                   ``inertia_history`` (per level, one value per assignment pass),
                                   ``reseeded`` (empty clusters re-seeded per level),
                                   ``sum_sq_norm`` (``sum |x|^2`` of the sample),
                                   ``level_seconds``, ``fit_seconds``, ``sample_seconds``
==================  =============  ================================================================

:func:`load_quantizer` validates all of it and raises :class:`QuantizerError` (a
:class:`lcm_jax.errors.UserError`) naming the file and the field; :func:`check_dim` is the check a
model or a dataset makes against the quantizer's dim.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import time
import zipfile
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lcm_jax import normalizer as normalizer_lib
from lcm_jax.errors import UserError

FORMAT_VERSION = 1
QUANTIZER_NAME = "quantizer.npz"
INITS = ("kmeans++", "random")
INIT_OVERSAMPLE, MIN_INIT_SAMPLE = 4, 4096  # k-means++ subsample: min(N, max(4 K, 4096)) rows
# Rows per assignment chunk: the (chunk x K) float32 distance block stays near this many elements
# (32 MiB), within [MIN_CHUNK, MAX_CHUNK] rows. On 2 CPU cores 2048-4096 rows were as fast as or
# faster than larger chunks for K = 256..4096 (D = 1024; 16384 rows: up to 20% slower at K = 256).
CHUNK_ELEMENTS = 1 << 23
MIN_CHUNK, MAX_CHUNK = 64, 4096
REQUIRED_SETTINGS = ("num_codebooks", "codebook_size", "dim")
_PRECISION = jax.lax.Precision.HIGHEST


class QuantizerError(UserError):
  """A quantizer file, or the data a quantizer is fitted on or applied to, is bad; names the file
  and field. Argument checks (a bad ``iters``, ``num_codebooks`` < 1) stay plain ``ValueError``."""


@dataclasses.dataclass
class LevelStats:
  """What :func:`fit_rvq` reports for one level (to its ``progress`` callback).

  Attributes:
    level: 1-based level number.
    num_levels: C, the number of codebooks being fitted.
    inertia: sum over the samples of the squared residual norm after this level (float64 sum).
    inertia_history: the inertia of each assignment pass (``iters + 1`` values: the passes before
      each update, then the final one), float32 sums on the device.
    reseeded: empty clusters re-seeded over the level's iterations.
    seconds: wall time of the level (its init, its jitted call and the host transfers; the first
      level's includes the compilation).
    samples: N.
    passes: assignment passes over the samples (``iters + 1``).
  """

  level: int
  num_levels: int
  inertia: float
  inertia_history: list[float]
  reseeded: int
  seconds: float
  samples: int
  passes: int

  @property
  def vectors_per_s(self) -> float:
    """Samples through this level (all its passes) per second."""
    return self.samples / max(self.seconds, 1e-12)


def default_chunk(num_rows: int, codebook_size: int) -> int:
  """Rows per chunk: at most ``CHUNK_ELEMENTS / K`` clipped to ``[MIN_CHUNK, MAX_CHUNK]``, split
  evenly over the chunks ``num_rows`` needs (a multiple of 8), so the padding of the last chunk
  stays below 8 rows per chunk."""
  rows = min(MAX_CHUNK, max(MIN_CHUNK, CHUNK_ELEMENTS // max(1, codebook_size)))
  n = max(1, int(num_rows))
  blocks = -(-n // rows)
  per_block = -(-n // blocks)
  return -(-per_block // 8) * 8


def default_counts(num_codebooks: int) -> tuple[int, ...]:
  """``(1, 2, 4, ..., C)``: the powers of two below ``C``, then ``C``."""
  out, c = [], 1
  while c < num_codebooks:
    out.append(c)
    c *= 2
  return tuple(out + [num_codebooks])


def random_init_indices(num_samples: int, codebook_size: int, seed: int,
                        level: int) -> np.ndarray:
  """``init="random"``: the K distinct rows whose residuals start level ``level`` (0-based),
  ``np.random.default_rng((seed, level)).choice(N, K, replace=False)``; centroid ``j`` starts at
  row ``indices[j]``."""
  rng = np.random.default_rng((int(seed), int(level)))
  return rng.choice(int(num_samples), size=int(codebook_size), replace=False).astype(np.int64)


def default_init_sample(num_samples: int, codebook_size: int) -> int:
  """Rows k-means++ draws from: ``min(N, max(INIT_OVERSAMPLE * K, MIN_INIT_SAMPLE))``."""
  return min(int(num_samples), max(INIT_OVERSAMPLE * int(codebook_size), MIN_INIT_SAMPLE))


def kmeanspp_candidates(codebook_size: int) -> int:
  """Candidates per greedy k-means++ step: ``2 + floor(ln K)`` (as scikit-learn)."""
  return 2 + int(math.log(max(1, int(codebook_size))))


@functools.partial(jax.jit, static_argnames=("k", "candidates"))
def _kmeanspp(points: jax.Array, key: jax.Array, k: int, candidates: int) -> jax.Array:
  """Greedy k-means++ over the rows of ``points`` (M, D): K distinct row indices."""
  m = points.shape[0]
  p_sq = jnp.sum(points * points, axis=-1)

  def sqdist(js):  # (M, len(js)) squared distances to rows js, one matmul
    d = p_sq[:, None] - 2.0 * jnp.dot(points, points[js].T, precision=_PRECISION) + p_sq[js]
    return jnp.maximum(d, 0.0)

  first = jax.random.randint(jax.random.fold_in(key, 0), (), 0, m).astype(jnp.int32)
  chosen = jnp.zeros((m,), bool).at[first].set(True)
  dist = jnp.where(chosen, 0.0, sqdist(first[None])[:, 0])
  state = (jnp.zeros((k,), jnp.int32).at[0].set(first), dist, chosen)

  def step(i, state):
    idx, dist, chosen = state
    # D^2 sampling by inverse CDF: the row where the cumulative distance first exceeds u * sum.
    # A row at distance 0 (chosen already) adds nothing to the sum, so it is never drawn.
    cum = jnp.cumsum(dist)
    u = jax.random.uniform(jax.random.fold_in(key, i), (candidates,)) * cum[-1]
    cand = jnp.clip(jnp.searchsorted(cum, u, side="right"), 0, m - 1).astype(jnp.int32)
    cand = jnp.where(dist[cand] > 0, cand, jnp.argmax(dist).astype(jnp.int32))
    d = sqdist(cand)
    best = jnp.argmin(jnp.sum(jnp.minimum(dist[:, None], d), axis=0))
    # All rows at distance 0 (fewer distinct vectors than K): the first row not chosen yet.
    j = jnp.where(cum[-1] > 0, cand[best], jnp.argmin(chosen).astype(jnp.int32))
    chosen = chosen.at[j].set(True)
    dist = jnp.where(chosen, 0.0, jnp.minimum(dist, d[:, best]))
    return idx.at[i].set(j), dist, chosen

  idx, _, _ = jax.lax.fori_loop(1, k, step, state)
  return idx


@jax.jit
def _gather_rows(res: jax.Array, idx: jax.Array) -> jax.Array:
  """Rows ``idx`` of the chunked residual (B, R, D), as (len(idx), D)."""
  return res.reshape(-1, res.shape[-1])[idx]


def _subsample(num_samples: int, size: int, seed: int, level: int) -> np.ndarray:
  rng = np.random.default_rng((int(seed), int(level)))
  if size >= num_samples:
    return np.arange(num_samples, dtype=np.int64)
  return np.sort(rng.choice(int(num_samples), size=int(size), replace=False)).astype(np.int64)


def kmeanspp_init_indices(points: Any, codebook_size: int, seed: int, level: int,
                          init_sample: int | None = None) -> np.ndarray:
  """``init="kmeans++"`` (module docstring): K distinct row indices of ``points`` (N, D).

  ``init_sample`` rows (default :func:`default_init_sample`) are drawn first; the result indexes
  ``points`` itself. Deterministic in ``(seed, level)``.
  """
  points = np.asarray(points, np.float32)
  return _kmeanspp_rows(jnp.asarray(points)[None], len(points), codebook_size, seed, level,
                        init_sample)


def _kmeanspp_rows(res: jax.Array, n: int, k: int, seed: int, level: int,
                   init_sample: int | None) -> np.ndarray:
  """k-means++ on the first ``n`` rows of the chunked ``res`` (B, R, D)."""
  m = default_init_sample(n, k) if init_sample is None else min(n, int(init_sample))
  if m < k:
    raise ValueError(f"k-means++ init: init_sample {m} < codebook_size {k}")
  sub = _subsample(n, m, seed, level)
  key = jax.random.fold_in(jax.random.key(int(seed)), int(level))
  idx = _kmeanspp(_gather_rows(res, jnp.asarray(sub)), key, k=int(k),
                  candidates=kmeanspp_candidates(k))
  return sub[np.asarray(idx)]


def _blocks(x: np.ndarray, chunk: int) -> tuple[np.ndarray, np.ndarray]:
  """``(B, chunk, D)`` float32 rows (zero padding at the end) and the ``(B, chunk)`` mask."""
  n, d = x.shape
  b = max(1, -(-n // chunk))
  out = np.zeros((b * chunk, d), np.float32)
  out[:n] = x
  mask = np.zeros(b * chunk, np.float32)
  mask[:n] = 1.0
  return out.reshape(b, chunk, d), mask.reshape(b, chunk)


def _scores(r: jax.Array, c: jax.Array, c_sq: jax.Array) -> jax.Array:
  """``|c|^2 - 2 r.c`` for rows ``r`` (R, D) and centroids ``c`` (K, D): the squared distance
  minus ``|r|^2``, which does not change the argmin."""
  return c_sq[None, :] - 2.0 * jnp.dot(r, c.T, precision=_PRECISION)


def _assign_pass(res: jax.Array, mask: jax.Array, cents: jax.Array):
  """One pass of nearest-centroid assignment over the chunks of ``res``.

  Returns ``(sums (K, D), counts (K,), inertia, codes (B, R) int32, dist (B, R))``: per-cluster
  sums and counts of the real rows, the sum of their squared distances, each row's code and its
  squared distance (-1 on padding rows, so they are never picked for re-seeding).
  """
  k, d = cents.shape
  c_sq = jnp.sum(cents * cents, axis=-1)

  def body(carry, inp):
    sums, counts, inertia = carry
    rb, mb = inp
    s = _scores(rb, cents, c_sq)
    a = jnp.argmin(s, axis=-1).astype(jnp.int32)
    dist = jnp.maximum(jnp.sum(rb * rb, axis=-1) + jnp.min(s, axis=-1), 0.0)
    sums = sums + jax.ops.segment_sum(rb * mb[:, None], a, num_segments=k)
    counts = counts + jax.ops.segment_sum(mb.astype(jnp.int32), a, num_segments=k)
    inertia = inertia + jnp.sum(dist * mb)
    return (sums, counts, inertia), (a, jnp.where(mb > 0, dist, -1.0))

  init = (jnp.zeros((k, d), jnp.float32), jnp.zeros((k,), jnp.int32), jnp.zeros((), jnp.float32))
  (sums, counts, inertia), (codes, dist) = jax.lax.scan(body, init, (res, mask))
  return sums, counts, inertia, codes, dist


@functools.partial(jax.jit, static_argnames=("iters",), donate_argnums=(0,))
def _fit_level(res: jax.Array, mask: jax.Array, cents: jax.Array, iters: int):
  """k-means of one level on the chunked residual ``res`` (B, R, D), then the next residual.

  Returns ``(centroids (K, D), new residual (B, R, D), codes (B, R), dist (B, R), inertia per pass
  (iters + 1,), re-seeded clusters)``. ``res`` is donated: its buffer holds the new residual.
  """
  k, d = cents.shape
  flat = res.reshape(-1, d)
  hist = jnp.zeros((iters + 1,), jnp.float32)

  def lloyd(i, state):
    cents, hist, reseeded = state
    sums, counts, inertia, _, dist = _assign_pass(res, mask, cents)
    new = sums / jnp.maximum(counts, 1).astype(jnp.float32)[:, None]
    empty = counts == 0

    def reseed(new):
      _, far = jax.lax.top_k(dist.reshape(-1), k)  # largest errors first, lower index on ties
      rank = jnp.clip(jnp.cumsum(empty) - 1, 0, k - 1)
      return jnp.where(empty[:, None], flat[far[rank]], new)

    new = jax.lax.cond(jnp.any(empty), reseed, lambda c: c, new)
    return new, hist.at[i].set(inertia), reseeded + jnp.sum(empty).astype(jnp.int32)

  cents, hist, reseeded = jax.lax.fori_loop(0, iters, lloyd,
                                            (cents, hist, jnp.zeros((), jnp.int32)))
  _, _, inertia, codes, dist = _assign_pass(res, mask, cents)
  hist = hist.at[iters].set(inertia)
  new_res = res - cents[codes] * mask[..., None]
  return cents, new_res, codes, dist, hist, reseeded


def _check_data(x: Any, what: str) -> np.ndarray:
  x = np.asarray(x)
  if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
    raise QuantizerError(f"{what}: expected a non-empty (num_samples, dim) array, got shape "
                         f"{x.shape}")
  if not np.issubdtype(x.dtype, np.floating):
    raise QuantizerError(f"{what}: expected float vectors, got dtype {x.dtype}")
  step = max(1, (64 << 20) // x.shape[1])  # bounded memory for the mask
  for start in range(0, x.shape[0], step):
    finite = np.isfinite(x[start:start + step])
    if not finite.all():
      r, c = np.argwhere(~finite)[0]
      raise QuantizerError(f"{what}: non-finite value at sample {start + int(r)}, dim {int(c)}")
  return x


def fit_rvq(x: Any, num_codebooks: int, codebook_size: int, *, iters: int, seed: int,
            init: str = "kmeans++", init_sample: int | None = None, chunk: int | None = None,
            progress: Callable[[LevelStats], None] | None = None) -> np.ndarray:
  """Fits ``num_codebooks`` residual k-means codebooks on ``x`` (module docstring).

  Args:
    x: (N, D) float vectors, finite, N >= ``codebook_size``.
    num_codebooks: C >= 1.
    codebook_size: K >= 1.
    iters: Lloyd iterations per level (>= 0; 0 keeps the init).
    seed: the init draws.
    init: ``"kmeans++"`` (:func:`kmeanspp_init_indices`) or ``"random"``
      (:func:`random_init_indices`), module docstring.
    init_sample: rows k-means++ draws from (default :func:`default_init_sample`).
    chunk: rows per assignment chunk (default :func:`default_chunk`); changes memory, not results
      (up to float rounding in the per-chunk sums).
    progress: called with a :class:`LevelStats` after each level.

  Returns:
    (C, K, D) float32 codebooks.

  Raises:
    QuantizerError: non-finite data, or fewer samples than ``codebook_size``.
  """
  x = _check_data(x, "fit_rvq")
  n, d = x.shape
  if num_codebooks < 1 or codebook_size < 1 or iters < 0:
    raise ValueError(f"fit_rvq: need num_codebooks >= 1, codebook_size >= 1, iters >= 0; got "
                     f"{num_codebooks}, {codebook_size}, {iters}")
  if codebook_size > n:
    raise QuantizerError(f"fit_rvq: codebook_size {codebook_size} > {n} samples (k-means needs "
                         "at least one sample per centroid)")
  if init not in INITS:
    raise ValueError(f"fit_rvq: init must be one of {INITS}, got {init!r}")
  chunk = default_chunk(n, codebook_size) if chunk is None else int(chunk)
  if chunk < 1:
    raise ValueError(f"fit_rvq: chunk must be >= 1, got {chunk}")
  blocks, mask_np = _blocks(x, chunk)
  res = jnp.asarray(blocks)
  del blocks
  mask = jnp.asarray(mask_np)
  codebooks = np.zeros((num_codebooks, codebook_size, d), np.float32)
  for level in range(num_codebooks):
    t0 = time.perf_counter()
    if init == "random":
      idx = random_init_indices(n, codebook_size, seed, level)
    else:
      idx = _kmeanspp_rows(res, n, codebook_size, seed, level, init_sample)
    start = _gather_rows(res, jnp.asarray(idx))
    cents, res, _, dist, hist, reseeded = _fit_level(res, mask, start, iters=iters)
    codebooks[level] = np.asarray(cents)
    inertia = float(np.asarray(dist, np.float64).reshape(-1)[:n].sum())
    seconds = time.perf_counter() - t0
    if progress is not None:
      progress(LevelStats(level=level + 1, num_levels=num_codebooks, inertia=inertia,
                          inertia_history=[float(v) for v in np.asarray(hist)],
                          reseeded=int(reseeded), seconds=seconds, samples=n, passes=iters + 1))
  return codebooks


def _check_codebooks(codebooks: Any) -> np.ndarray:
  cb = np.asarray(codebooks)
  if cb.ndim != 3 or min(cb.shape) == 0:
    raise ValueError(f"expected codebooks of shape (C, K, D), got {cb.shape}")
  return cb.astype(np.float32, copy=False)


@functools.partial(jax.jit, static_argnames=("with_stats",))
def _encode_blocks(xs: jax.Array, mask: jax.Array, cbs: jax.Array, with_stats: bool):
  """Greedy codes (B, R, C) of the chunked rows ``xs`` (B, R, D); or, with ``with_stats``, per
  chunk and level the sums over its real rows of ``(relative L2, cosine, squared error)`` of the
  prefix reconstruction, (B, C, 3)."""
  c_sq = jnp.sum(cbs * cbs, axis=-1)
  tiny = jnp.finfo(jnp.float32).tiny

  def block(inp):
    xb, mb = inp
    x_norm = jnp.sqrt(jnp.sum(xb * xb, axis=-1))

    def level(carry, cb_sq):
      r, xhat = carry
      cb, sq = cb_sq
      a = jnp.argmin(_scores(r, cb, sq), axis=-1).astype(jnp.int32)
      c = cb[a]
      r, xhat = r - c, xhat + c
      if not with_stats:
        return (r, xhat), a
      err = xb - xhat
      err2 = jnp.sum(err * err, axis=-1)
      rel = jnp.sqrt(err2) / jnp.maximum(x_norm, tiny)
      cos = jnp.sum(xb * xhat, axis=-1) / jnp.maximum(
          x_norm * jnp.sqrt(jnp.sum(xhat * xhat, axis=-1)), tiny)
      return (r, xhat), jnp.stack([rel, cos, err2], axis=-1).T @ mb  # (3,)

    _, out = jax.lax.scan(level, (xb, jnp.zeros_like(xb)), (cbs, c_sq))
    return out if with_stats else out.T

  return jax.lax.map(block, (xs, mask))


def _encode(x: Any, codebooks: Any, num_codebooks: int | None, chunk: int | None,
            with_stats: bool) -> np.ndarray:
  """Codes (N, C) int32, or with ``with_stats`` the per-level sums over rows (C, 3) float64."""
  cb = _check_codebooks(codebooks)
  x = _check_data(x, "encode")
  if x.shape[1] != cb.shape[2]:
    raise QuantizerError(f"encode: vectors of dim {x.shape[1]}, codebooks of dim {cb.shape[2]}")
  c = cb.shape[0] if num_codebooks is None else int(num_codebooks)
  if not 1 <= c <= cb.shape[0]:
    raise ValueError(f"encode: num_codebooks {c} not in [1, {cb.shape[0]}]")
  n = x.shape[0]
  chunk = default_chunk(n, cb.shape[1]) if chunk is None else int(chunk)
  blocks, mask = _blocks(x, chunk)
  out = np.asarray(_encode_blocks(jnp.asarray(blocks), jnp.asarray(mask), jnp.asarray(cb[:c]),
                                  with_stats=with_stats))
  if with_stats:
    return out.astype(np.float64).sum(axis=0)
  return out.reshape(-1, c)[:n].astype(np.int32)


def encode(x: Any, codebooks: Any, num_codebooks: int | None = None, *,
           chunk: int | None = None) -> np.ndarray:
  """Greedy RVQ codes: per level, the nearest centroid to what the levels before left.

  Args:
    x: (N, D) vectors (finite).
    codebooks: (C, K, D).
    num_codebooks: use the first this many codebooks (default all).
    chunk: rows per jitted chunk (default :func:`default_chunk`).

  Returns:
    (N, num_codebooks) int32 codes in ``[0, K)``.
  """
  return _encode(x, codebooks, num_codebooks, chunk, with_stats=False)


def decode(codes: Any, codebooks: Any) -> np.ndarray:
  """``sum_c codebooks[c, codes[:, c]]`` (levels in order, float32): (N, D) float32.

  ``codes`` may use fewer codebooks than ``codebooks`` holds (the first ``codes.shape[1]``).
  """
  cb = _check_codebooks(codebooks)
  codes = np.asarray(codes)
  if codes.ndim != 2 or not np.issubdtype(codes.dtype, np.integer):
    raise ValueError(f"decode: expected (N, C) integer codes, got {codes.dtype} {codes.shape}")
  if codes.shape[1] > cb.shape[0]:
    raise ValueError(f"decode: codes for {codes.shape[1]} codebooks, only {cb.shape[0]} given")
  if codes.size and (codes.min() < 0 or codes.max() >= cb.shape[1]):
    raise ValueError(f"decode: codes outside [0, {cb.shape[1]})")
  out = np.zeros((codes.shape[0], cb.shape[2]), np.float32)
  for c in range(codes.shape[1]):
    out += cb[c][codes[:, c]]
  return out


def reconstruction_table(x: Any, codebooks: Any, counts: Sequence[int] | None = None, *,
                         chunk: int | None = None) -> list[dict[str, float]]:
  """How well the first ``count`` codebooks reconstruct ``x`` (greedy codes), per count.

  Args:
    x: (N, D) vectors.
    codebooks: (C, K, D).
    counts: numbers of codebooks to report (default :func:`default_counts`: 1, 2, 4, ..., C).
    chunk: rows per jitted chunk.

  Returns:
    One dict per count: ``count``; ``rel_l2``, the mean over rows of ``|x - x_hat| / |x|``;
    ``cosine``, the mean of ``cos(x, x_hat)``; ``mse``, the mean over rows AND dims of
    ``(x - x_hat)^2``. Row figures and their sums over each chunk are float32, the rest float64.
  """
  cb = _check_codebooks(codebooks)
  counts = default_counts(cb.shape[0]) if counts is None else tuple(int(c) for c in counts)
  if not counts or min(counts) < 1 or max(counts) > cb.shape[0]:
    raise ValueError(f"reconstruction_table: counts {counts} not in [1, {cb.shape[0]}]")
  sums = _encode(x, cb, max(counts), chunk, with_stats=True)
  n, d = np.shape(x)
  return [{"count": c, "rel_l2": float(sums[c - 1, 0] / n), "cosine": float(sums[c - 1, 1] / n),
           "mse": float(sums[c - 1, 2] / (n * d))} for c in counts]


def format_table(rows: Sequence[Mapping[str, float]]) -> str:
  """The reconstruction table as text, one line per count."""
  lines = [f"{'codebooks':>9}  {'rel_L2':>8}  {'cosine':>8}  {'MSE':>10}"]
  for r in rows:
    lines.append(f"{int(r['count']):>9}  {r['rel_l2']:>8.4f}  {r['cosine']:>8.4f}  "
                 f"{r['mse']:>10.4g}")
  return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# The artifact

def normalizer_fingerprint(norm: normalizer_lib.Normalizer | None) -> str | None:
  """sha256 of a normalizer's float32 ``center``, ``scale`` (and clip bounds): a quantizer fitted
  in normalized space records it, so that a model can check it normalizes the same way."""
  if norm is None:
    return None
  h = hashlib.sha256()
  for arr in (norm.center, norm.scale, norm.clip_min, norm.clip_max):
    h.update(b"-" if arr is None else np.ascontiguousarray(arr, np.float32).tobytes())
  return h.hexdigest()


@dataclasses.dataclass
class Quantizer:
  """A loaded RVQ artifact.

  Attributes:
    codebooks: (C, K, D) float32 (the first ``num_codebooks`` of the file when asked for fewer).
    settings: the fit settings (JSON object of the file).
    stats: the fit statistics (JSON object of the file).
    path: the file it was loaded from ("" if built in memory).
  """

  codebooks: np.ndarray
  settings: dict[str, Any] = dataclasses.field(default_factory=dict)
  stats: dict[str, Any] = dataclasses.field(default_factory=dict)
  path: str = ""

  @property
  def num_codebooks(self) -> int:
    return int(self.codebooks.shape[0])

  @property
  def codebook_size(self) -> int:
    return int(self.codebooks.shape[1])

  @property
  def dim(self) -> int:
    return int(self.codebooks.shape[2])

  def encode(self, x: Any, num_codebooks: int | None = None) -> np.ndarray:
    """:func:`encode` with these codebooks."""
    return encode(x, self.codebooks, num_codebooks)

  def decode(self, codes: Any) -> np.ndarray:
    """:func:`decode` with these codebooks."""
    return decode(codes, self.codebooks)


def save_quantizer(path: str, codebooks: Any, settings: Mapping[str, Any],
                   stats: Mapping[str, Any] | None = None) -> str:
  """Writes the artifact (module docstring) to ``path`` atomically; returns ``path``.

  ``settings`` gets ``num_codebooks``, ``codebook_size`` and ``dim`` from the codebooks' shape.
  """
  cb = _check_codebooks(codebooks)
  if not np.isfinite(cb).all():
    raise ValueError("save_quantizer: non-finite codebook value")
  c, k, d = cb.shape
  settings = dict(settings, num_codebooks=c, codebook_size=k, dim=d)
  return normalizer_lib.write_npz_atomic(path, {
      "codebooks": cb,
      "format_version": np.int64(FORMAT_VERSION),
      "settings": np.str_(json.dumps(settings, sort_keys=True)),
      "stats": np.str_(json.dumps(dict(stats or {}), sort_keys=True)),
  })


def _json_field(path: str, data: Mapping[str, np.ndarray], key: str) -> dict[str, Any]:
  arr = data[key]
  if arr.shape != () or arr.dtype.kind != "U":
    raise QuantizerError(f"{path}: field '{key}': expected a JSON string, got {arr.dtype} "
                         f"{arr.shape}")
  try:
    obj = json.loads(str(arr))
  except json.JSONDecodeError as e:
    raise QuantizerError(f"{path}: field '{key}': not valid JSON ({e})") from None
  if not isinstance(obj, dict):
    raise QuantizerError(f"{path}: field '{key}': expected a JSON object, got "
                         f"{type(obj).__name__}")
  return obj


def load_quantizer(path: str, num_codebooks: int | None = None) -> Quantizer:
  """Reads and validates an artifact written by :func:`save_quantizer`.

  Args:
    path: the ``.npz``.
    num_codebooks: keep only the first this many codebooks (a coarser quantizer; default all).

  Raises:
    QuantizerError: naming the file and field, if the file is missing or not an ``.npz``, lacks a
      key, has codebooks that are not a (C, K, D) float32 array or hold NaN/inf, has settings
      that are not JSON or disagree with the codebooks' shape, is of a newer format, or holds
      fewer than ``num_codebooks`` codebooks.
  """
  if not os.path.exists(path):
    raise QuantizerError(f"{path}: no such quantizer file")
  if os.path.isdir(path):
    raise QuantizerError(f"{path}: is a directory, not a quantizer .npz")
  try:
    with np.load(path, allow_pickle=False) as z:
      data = {k: z[k] for k in z.files}
  except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
    raise QuantizerError(
        f"{path}: not a readable quantizer .npz ({type(e).__name__}: {e})") from None
  for key in ("codebooks", "format_version", "settings", "stats"):
    if key not in data:
      raise QuantizerError(f"{path}: field '{key}': missing (keys present: {sorted(data)})")
  version = data["format_version"]
  if version.shape != () or not np.issubdtype(version.dtype, np.integer):
    raise QuantizerError(f"{path}: field 'format_version': expected an integer, got "
                         f"{version.dtype} {version.shape}")
  if int(version) > FORMAT_VERSION:
    raise QuantizerError(f"{path}: field 'format_version': {int(version)} is newer than "
                         f"supported {FORMAT_VERSION}")
  cb = data["codebooks"]
  if cb.dtype != np.float32:
    raise QuantizerError(f"{path}: field 'codebooks': expected float32, got dtype {cb.dtype}")
  if cb.ndim != 3 or min(cb.shape) == 0:
    raise QuantizerError(f"{path}: field 'codebooks': expected shape (num_codebooks, "
                         f"codebook_size, dim), all >= 1, got {cb.shape}")
  finite = np.isfinite(cb)
  if not finite.all():
    c, k, d = (int(i) for i in np.argwhere(~finite)[0])
    raise QuantizerError(f"{path}: field 'codebooks': non-finite value at codebook {c}, "
                         f"centroid {k}, dim {d}")
  settings = _json_field(path, data, "settings")
  stats = _json_field(path, data, "stats")
  for key, size in zip(REQUIRED_SETTINGS, cb.shape):
    if key not in settings:
      raise QuantizerError(f"{path}: field 'settings': missing '{key}'")
    if settings[key] != size:
      raise QuantizerError(f"{path}: field 'settings': '{key}' is {settings[key]!r}, the "
                           f"codebooks have {size} (shape {cb.shape})")
  if num_codebooks is not None:
    if isinstance(num_codebooks, bool) or int(num_codebooks) != num_codebooks or num_codebooks < 1:
      raise QuantizerError(f"{path}: num_codebooks {num_codebooks!r} asked for; must be an "
                           "int >= 1")
    if num_codebooks > cb.shape[0]:
      raise QuantizerError(f"{path}: num_codebooks {num_codebooks} asked for, the file holds "
                           f"{cb.shape[0]} codebooks")
    cb = cb[:int(num_codebooks)]
  return Quantizer(codebooks=np.ascontiguousarray(cb), settings=settings, stats=stats, path=path)


def check_dim(quantizer: Quantizer, dim: int, what: str) -> None:
  """Raises :class:`QuantizerError` naming ``what`` (a model, a dataset) and the quantizer file
  when ``dim`` is not the quantizer's dim."""
  if int(dim) != quantizer.dim:
    where = quantizer.path or "quantizer"
    raise QuantizerError(f"{what}: dim {int(dim)} does not match {where} (codebooks of dim "
                         f"{quantizer.dim})")
