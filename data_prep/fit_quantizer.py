r"""Fit a residual vector quantizer (RVQ) of SONAR space on a weighted mix of embedding datasets.

Run:
  python -m data_prep.fit_quantizer --data=data/wiki:3,data/books:1 --out=data/quantizer.npz \
      --num_codebooks=64 --codebook_size=8192 --max_samples=1000000 --iters=10 --seed=0
  python -m data_prep.fit_quantizer --help

Samples concept vectors from the datasets (``DIR[:WEIGHT],...``, each an lcm_jax dataset: shards +
``manifest.json``) in proportion to their weights with :func:`lcm_jax.normalizer.sample_embeddings`
(the same deterministic sample as ``data_prep.fit_normalizer`` for the same datasets, weights,
``--max_samples``, ``--seed`` and ``--exclude_last``), in raw SONAR space, or in normalized space
with ``--normalizer=PATH`` (the file's ``normalize`` is applied to the sample first; the artifact
records the path and a fingerprint of the normalizer). Then :func:`lcm_jax.quantizer.fit_rvq`
fits ``--num_codebooks`` codebooks of ``--codebook_size`` centroids, one residual k-means level
after the other (``--init``: k-means++ on a subsample by default, or FAISS's random rows; then
``--iters`` Lloyd iterations; see :mod:`lcm_jax.quantizer`), printing one line per level: its
inertia (sum of squared residual norms left after the level), that inertia as a fraction of the
sample's ``sum |x|^2``, the empty clusters re-seeded, its time and the vectors/s (samples
through all ``--iters + 1`` assignment passes of the level per second; the first level includes
the compilation).

The artifact (``.npz``: ``codebooks`` (C, K, D) float32, ``settings`` and ``stats`` JSON; see
:mod:`lcm_jax.quantizer`) is written atomically at the end, and the reconstruction table on the
fit sample (1, 2, 4, ..., C codebooks: mean relative L2 ``|x - x_hat| / |x|``, mean cosine, MSE
per dim) is printed. Load it with :func:`lcm_jax.quantizer.load_quantizer`.

User errors print one ``error: ...`` line on stderr and exit with status 2, writing nothing:
a bad flag; an ``--out`` that exists (unless ``--overwrite``: a fit can take hours, and a model
trained on codes needs the codebooks it was trained with), is a directory or cannot be written
(checked before anything is read); a missing or malformed dataset, datasets of different dims, a
normalizer of another dim; a non-finite value in a shard (the shard reader names the file, record,
document and concept); ``--codebook_size`` above the number of vectors the sample will hold.
Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Optional, Sequence

import numpy as np

from data_prep import fit_normalizer
from lcm_jax import errors
from lcm_jax import fileio
from lcm_jax import normalizer as normalizer_lib
from lcm_jax.errors import UserError

TOOL = "data_prep.fit_quantizer"
DEFAULT_NUM_CODEBOOKS = 64      # the paper's
DEFAULT_CODEBOOK_SIZE = 8192    # the paper's
DEFAULT_MAX_SAMPLES = 1_000_000
DEFAULT_ITERS = 10


class UsageError(UserError):
  """A bad flag or dataset: reported as one ``error:`` line, exit status 2."""


def parse_data(spec: str) -> list[tuple[str, float]]:
  """``"DIR[:W],DIR[:W],..."`` -> ``[(DIR, W), ...]`` (weight 1 by default, finite and > 0)."""
  items = [s.strip() for s in (spec or "").split(",") if s.strip()]
  if not items:
    raise UsageError("--data: give at least one dataset directory (DIR[:WEIGHT],...)")
  return [fit_normalizer.parse_data_arg(s) for s in items]


def fit(data: Sequence[tuple[str, float]], out: str, *, num_codebooks: int = DEFAULT_NUM_CODEBOOKS,
        codebook_size: int = DEFAULT_CODEBOOK_SIZE, max_samples: int = DEFAULT_MAX_SAMPLES,
        iters: int = DEFAULT_ITERS, seed: int = 0, init: str = "kmeans++",
        normalizer: str | None = None, exclude_last: bool = False, overwrite: bool = False,
        chunk: int = 0,
        log: Callable[[str], None] | None = None) -> tuple[Any, list[dict[str, float]]]:
  """Samples, fits and writes the quantizer to ``out``.

  Args:
    data: ``[(dataset_dir, weight), ...]``.
    out: the artifact to write (atomically); its directory is created if missing.
    num_codebooks, codebook_size, iters: the RVQ (:func:`lcm_jax.quantizer.fit_rvq`).
    max_samples: upper bound on the number of sampled concept vectors.
    seed: the sampling seed and the k-means init seed.
    init: ``"kmeans++"`` or ``"random"`` (:func:`lcm_jax.quantizer.fit_rvq`).
    normalizer: a normalizer ``.npz``: quantize normalized vectors instead of raw SONAR ones.
    exclude_last: leave every document's last concept (its end-of-text marker) out of the sample.
    overwrite: replace an existing ``out``.
    chunk: rows per assignment chunk (0: :func:`lcm_jax.quantizer.default_chunk`).
    log: where progress lines go (default: stdout with the tool's prefix).

  Returns:
    ``(codebooks (C, K, D), reconstruction table rows)``.

  Raises:
    lcm_jax.errors.UserError: naming the flag, directory or file; nothing has been written then.
  """
  log = log or (lambda msg: print(f"[{TOOL}] {msg}", flush=True))
  t0 = time.time()
  for name, value, low in (("--num_codebooks", num_codebooks, 1),
                           ("--codebook_size", codebook_size, 1), ("--max_samples", max_samples, 1),
                           ("--iters", iters, 0), ("--chunk", chunk, 0)):
    if value < low:
      raise UsageError(f"{name} must be >= {low}, got {value}")
  if init not in ("kmeans++", "random"):
    raise UsageError(f"--init must be kmeans++ or random, got {init!r}")
  if not data:
    raise UsageError("--data: give at least one dataset directory")
  # The output first: a bad path must cost no sampling and no fit.
  if not out:
    raise UsageError("--out is required (the quantizer .npz to write)")
  if os.path.isdir(out):
    raise UsageError(f"--out {out}: is a directory; give a file name such as "
                     f"{os.path.join(out, 'quantizer.npz')}")
  if os.path.exists(out) and not overwrite:
    raise UsageError(f"--out {out}: already exists (pass --overwrite to replace it)")
  fileio.check_output_path(out, "--out")

  manifests = fit_normalizer.check_datasets(data, "quantizer")  # twice given, malformed, dims
  dim = int(manifests[0]["dim"])
  norm = None
  if normalizer:
    norm = normalizer_lib.Normalizer.load(normalizer)  # NormalizerError names the file
    if norm.dim != dim:
      raise UsageError(f"--normalizer {normalizer}: dim {norm.dim}, the datasets have dim {dim}")
  weights = [w for _, w in data]
  counts, sizes = fit_normalizer.planned_counts(manifests, weights, max_samples, exclude_last)
  if int(counts.sum()) < codebook_size:
    raise UsageError(
        f"--codebook_size {codebook_size} > the {int(counts.sum())} vectors to fit on "
        f"({fit_normalizer.describe_data(data, sizes, exclude_last)}, --max_samples {max_samples}): k-means needs at "
        "least one sample per centroid (and many more to fit well)")

  x = normalizer_lib.sample_embeddings(list(data), max_samples, seed, exclude_last=exclude_last)
  t_sample = time.time() - t0
  if len(x) < codebook_size:  # planned_counts mirrors the sampler; this is a safety net
    raise UsageError(f"--codebook_size {codebook_size} > the {len(x)} sampled vectors "
                     f"({fit_normalizer.describe_data(data, sizes, exclude_last)})")
  bad = ~np.isfinite(x)
  if bad.any():  # the shard reader refuses these first; a sampler change must not let one through
    r, c = np.argwhere(bad)[0]
    raise UsageError(f"{fit_normalizer.describe_data(data, sizes, exclude_last)}: non-finite value in sampled vector "
                     f"{int(r)}, dim {int(c)}")
  space = "raw"
  if norm is not None:
    x = norm.normalize(x).astype(np.float32)
    space = "normalized"
  n = len(x)
  energy = float(np.einsum("ij,ij->i", x, x).sum(dtype=np.float64))  # no (N, D) float64 copy
  log(f"sampled {n} x {dim} ({space} space) from {fit_normalizer.describe_data(data, sizes, exclude_last)} in "
      f"{t_sample:.1f} s; fitting {num_codebooks} codebooks x {codebook_size} centroids, {iters} "
      "iterations each")

  # JAX only now: every check above runs (and fails) in a fraction of a second.
  from lcm_jax import quantizer as quantizer_lib  # pylint: disable=g-import-not-at-top

  levels: list[Any] = []

  def progress(s: Any) -> None:
    levels.append(s)
    note = " (includes compilation)" if s.level == 1 else ""
    frac = s.inertia / max(energy, 1e-300)
    log(f"level {s.level}/{s.num_levels}: inertia {s.inertia:.5g} ({frac:.4f} of sum |x|^2), "
        f"{s.reseeded} empty clusters re-seeded, {s.seconds:.2f} s{note}, elapsed "
        f"{time.time() - t0:.1f} s, {s.vectors_per_s:.0f} vectors/s ({s.passes} passes)")

  t_fit = time.time()
  codebooks = quantizer_lib.fit_rvq(x, num_codebooks, codebook_size, iters=iters, seed=seed,
                                    init=init, chunk=chunk or None, progress=progress)
  fit_seconds = time.time() - t_fit
  table = quantizer_lib.reconstruction_table(x, codebooks, chunk=chunk or None)
  settings = {
      "num_codebooks": num_codebooks, "codebook_size": codebook_size, "dim": dim, "iters": iters,
      "seed": seed, "samples": n, "max_samples": max_samples, "init": init,
      "init_sample": (quantizer_lib.default_init_sample(n, codebook_size)
                      if init == "kmeans++" else None),
      "data": [{"path": p, "weight": w} for p, w in data], "exclude_last": bool(exclude_last),
      "space": space, "normalizer": normalizer or None,
      "normalizer_fingerprint": quantizer_lib.normalizer_fingerprint(norm), "tool": TOOL,
  }
  stats = {
      "reconstruction": table, "sum_sq_norm": energy,
      "inertia": [s.inertia for s in levels],
      "inertia_history": [s.inertia_history for s in levels],
      "reseeded": [s.reseeded for s in levels],
      "level_seconds": [s.seconds for s in levels],
      "fit_seconds": fit_seconds, "sample_seconds": t_sample,
  }
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  quantizer_lib.save_quantizer(out, codebooks, settings, stats)
  log(f"fitted in {fit_seconds:.1f} s ({n * num_codebooks / max(fit_seconds, 1e-9):.0f} "
      f"vector-levels/s), total {time.time() - t0:.1f} s -> {out}")
  return codebooks, table


def _define_flags() -> Any:
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags
  f.DEFINE_string("data", None, "Datasets to sample: 'DIR[:WEIGHT],DIR[:WEIGHT],...' (lcm_jax "
                  "dataset directories: manifest.json + shards; weight 1 by default). Shares are "
                  "proportional to the weights.")
  f.DEFINE_string("out", None, "The quantizer .npz to write (atomically), e.g. "
                  "DIR/quantizer.npz.")
  f.DEFINE_integer("num_codebooks", DEFAULT_NUM_CODEBOOKS,
                   "C: residual levels (the paper's 64).")
  f.DEFINE_integer("codebook_size", DEFAULT_CODEBOOK_SIZE,
                   "K: centroids per codebook (the paper's 8192); at most the sample size.")
  f.DEFINE_integer("max_samples", DEFAULT_MAX_SAMPLES,
                   "Concept vectors to sample in total (fewer if the datasets are too small for "
                   "the weighted shares).")
  f.DEFINE_integer("iters", DEFAULT_ITERS, "Lloyd iterations per level (after the init).")
  f.DEFINE_integer("seed", 0, "Seed of the sample and of the k-means init.")
  f.DEFINE_enum("init", "kmeans++", ["kmeans++", "random"],
                "k-means init of each level: k-means++ (D^2 sampling) on a subsample of "
                "max(4 * codebook_size, 4096) rows, or FAISS's random distinct rows.")
  f.DEFINE_string("normalizer", None, "Optional normalizer .npz: quantize the NORMALIZED vectors "
                  "(the artifact records the path and a fingerprint of the normalizer).")
  f.DEFINE_boolean("exclude_last", False, "Leave each document's last concept (the end-of-text "
                   "marker) out of the sample.")
  f.DEFINE_boolean("overwrite", False, "Replace an existing --out.")
  f.DEFINE_integer("chunk", 0, "Rows per assignment chunk (0: about 2^23 / codebook_size, in "
                   "[64, 4096]): bounds the distance block's memory.")
  return f.FLAGS


def _run(fv: Any) -> Optional[str]:
  if not fv.data:
    raise UsageError("--data is required (DIR[:WEIGHT],...)")
  if not fv.out:
    raise UsageError("--out is required (the quantizer .npz to write)")
  _, table = fit(parse_data(fv.data), fv.out, num_codebooks=fv.num_codebooks,
                 codebook_size=fv.codebook_size, max_samples=fv.max_samples, iters=fv.iters,
                 seed=fv.seed, init=fv.init, normalizer=fv.normalizer,
                 exclude_last=fv.exclude_last, overwrite=fv.overwrite, chunk=fv.chunk)
  from lcm_jax import quantizer as quantizer_lib  # pylint: disable=g-import-not-at-top
  return ("reconstruction of the fit sample by the first c codebooks:\n"
          f"{quantizer_lib.format_table(table)}\n-> {fv.out}")


main = errors.absl_main(_run)
"""absl entry point: user errors -> one ``error:`` line on stderr and exit status 2."""


def run() -> None:
  """``python -m data_prep.fit_quantizer``."""
  errors.run_absl_tool(_define_flags, main)


if __name__ == "__main__":
  run()
