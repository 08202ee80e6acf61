"""Fit the SONAR normalizer over a weighted mix of embedding datasets.

Run:
  python -m data_prep.fit_normalizer --data=data/wiki:3 --data=data/books:1 \\
      --max_samples=1000000 --out=data/wiki/normalizer.npz --exclude_last --set_manifest
  python -m data_prep.fit_normalizer --help

Samples concept vectors from the datasets (``DIR[:WEIGHT]``, each an lcm_jax dataset: shards +
``manifest.json``) in proportion to their weights with :func:`lcm_jax.normalizer.sample_embeddings`
and fits the reference normalizer on that sample with :func:`lcm_jax.normalizer.fit_robust_scaler`:
sklearn's ``RobustScaler(unit_variance=True, quantile_range=(0.25, 0.75))`` (the reference's normalizer;
the range is in PERCENT), optionally with per-dimension clipping bounds at quantiles of the
normalized sample (``--clip`` for the reference's 1e-4 / 1-1e-4, or ``--clip_quantiles``). The
sample is a deterministic function of the datasets, weights, ``--max_samples``, ``--seed`` and
``--exclude_last``. When a dataset holds fewer concepts than its share, every share shrinks by the
same factor (the proportions hold; the sample is smaller than ``--max_samples``).

The normalizer file (``.npz``, see :mod:`lcm_jax.normalizer`) is written atomically: on any error
nothing is left behind. ``--set_manifest`` then records the file's name in the ``normalizer`` field
of the manifest of every ``--data`` directory that holds the file, which is where training looks
when ``config.data.normalizer`` is empty (:func:`lcm_jax.data.resolve_normalizer_path`).

Degenerate fits are refused (one ``error:`` line, exit status 2, nothing written):

* fewer than ``--min_samples`` vectors (default 401, :data:`DEFAULT_MIN_SAMPLES`): the scale is the
  spread between the 0.25th and the 0.75th PERCENTILE, and with n samples the 0.25th percentile
  sits at order statistic ``0.0025 * (n - 1)``; below 401 samples it is an interpolation between
  the smallest and the second-smallest value, so the scale would measure the one or two most
  extreme values of each dim (one vector: every dim gets sklearn's fallback 2.669). A smaller
  ``--min_samples`` (>= 2) allows such fits for tiny demo corpora;
* EVERY dimension with zero spread (the sample is copies of one vector): nothing was measured.

A dimension whose spread is zero (constant, or more than 0.75% of the sample tied at the low end,
typically the end-of-text vector repeated in every document: see ``--exclude_last``) gets sklearn's
fallback ``scale = 1 / 0.3747 = 2.669``, which measures nothing. When only some dims are like that
it is a WARNING in the summary (``warning: ... dims have zero spread``, naming them), not an
error: it is what the reference's own sklearn fit does on data with end-of-text vectors, the
rest of the normalizer is sound, and ``--exclude_last`` is the usual fix.

A user error (a missing or malformed dataset, a bad weight, datasets of different dims, an
``--out`` that is a directory or cannot be created, a degenerate fit, a bad flag) prints one
``error: ...`` line naming the directory, file or flag and exits with status 2; ``--out`` is
checked before anything is read. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any, NoReturn, Sequence

import numpy as np

from lcm_jax import fileio
from lcm_jax import normalizer as normalizer_lib
from lcm_jax import schema
from lcm_jax.errors import UserError

TOOL = "data_prep.fit_normalizer"
DEFAULT_MAX_SAMPLES = 1_000_000
# The 0.25th percentile of n values is at order statistic 0.0025 * (n - 1): at least the second
# smallest value (index 1) from n = 401 on; fewer samples measure the minimum (module docstring).
DEFAULT_MIN_SAMPLES = math.floor(100.0 / normalizer_lib.DEFAULT_QUANTILE_RANGE[0]) + 1


class UsageError(UserError):
  """A bad flag or dataset, or a degenerate fit: reported as one ``error:`` line, exit status 2."""


def parse_data_arg(text: str) -> tuple[str, float]:
  """``"DIR"`` -> ``(DIR, 1.0)``; ``"DIR:WEIGHT"`` -> ``(DIR, WEIGHT)``; weight finite and > 0."""
  head, sep, tail = text.rpartition(":")
  if not sep:
    return text, 1.0
  try:
    weight = float(tail)
  except ValueError:
    if os.path.isdir(text):  # A directory whose name holds a colon.
      return text, 1.0
    raise UsageError(f"--data {text}: dataset {head}: weight {tail!r} is not a number "
                     "(use DIR or DIR:WEIGHT)") from None
  if not head:
    raise UsageError(f"--data {text}: missing the dataset directory before ':'")
  if not math.isfinite(weight) or weight <= 0:
    raise UsageError(f"--data {text}: dataset {head}: weight must be finite and > 0, got {tail}")
  return head, weight


def parse_clip_quantiles(text: str) -> tuple[float, float]:
  """``"1e-4,0.9999"`` -> ``(1e-4, 0.9999)``: fractions with ``0 <= lo < hi <= 1``."""
  parts = text.split(",")
  try:
    lo, hi = (float(p) for p in parts)
  except ValueError:
    raise UsageError(f"--clip_quantiles {text!r}: expected two numbers LO,HI such as "
                     "1e-4,0.9999") from None
  if not 0.0 <= lo < hi <= 1.0:
    raise UsageError(f"--clip_quantiles {text!r}: need 0 <= LO < HI <= 1 (fractions, not percent)")
  return lo, hi


def planned_counts(manifests: Sequence[dict[str, Any]], weights: Sequence[float], max_samples: int,
                   exclude_last: bool) -> tuple[np.ndarray, np.ndarray]:
  """``(samples per dataset, eligible concepts per dataset)`` that ``sample_embeddings`` draws.

  Mirrors the allocation of :func:`lcm_jax.normalizer.sample_embeddings` (its proportional split
  and its shrinking when a dataset is too small) for the summary; :func:`fit` checks that the
  counts add up to the sample it got.
  """
  w = np.asarray(weights, np.float64)
  # pylint: disable=protected-access
  sizes = np.array([normalizer_lib._num_eligible(m, exclude_last) for m in manifests], np.int64)
  total = int(max_samples)
  for i in np.flatnonzero(w > 0):
    total = min(total, int(np.floor(sizes[i] * w.sum() / w[i] + 1e-9)))
  counts = normalizer_lib._allocate(total, w)
  # pylint: enable=protected-access
  return np.minimum(counts, sizes), sizes


def check_datasets(data: Sequence[tuple[str, float]],
                   what: str = "normalizer") -> list[dict[str, Any]]:
  """Reads every manifest; raises UsageError naming the directory on any problem (a dataset
  given twice, a malformed manifest, datasets of different dims, which cannot share one
  ``what``). Shared with data_prep.fit_quantizer."""
  seen: dict[str, str] = {}
  manifests = []
  for path, _ in data:
    key = os.path.realpath(path)
    if key in seen:
      raise UsageError(f"--data {path}: the same dataset as --data {seen[key]} (give it once, "
                       "with the sum of the weights)")
    seen[key] = path
    manifests.append(schema.read_manifest(path))  # ShardFormatError (a UserError) names the file
  dims = {int(m["dim"]) for m in manifests}
  if len(dims) > 1:
    detail = ", ".join(f"{p} has dim {m['dim']}" for (p, _), m in zip(data, manifests))
    raise UsageError(f"--data: datasets of different dims cannot share a {what} ({detail})")
  return manifests


def _manifest_dirs_holding(out: str, data: Sequence[tuple[str, float]]) -> list[str]:
  """The ``--data`` dirs that ``out`` lives in (directly)."""
  parent = os.path.realpath(os.path.dirname(os.path.abspath(out)))
  return [p for p, _ in data if os.path.realpath(p) == parent]


def fit(data: Sequence[tuple[str, float]], out: str, *, max_samples: int = DEFAULT_MAX_SAMPLES,
        seed: int = 0, clip_quantiles: tuple[float, float] | None = None,
        exclude_last: bool = False, compute_dtype: str = "float64", set_manifest: bool = False,
        min_samples: int = DEFAULT_MIN_SAMPLES, verbose: bool = True) -> normalizer_lib.Normalizer:
  """Samples, fits and writes the normalizer to ``out``; returns it.

  Args:
    data: ``[(dataset_dir, weight), ...]``.
    out: the normalizer file to write (atomically); its directory is created if missing.
    max_samples: upper bound on the number of sampled concept vectors.
    seed: sampling seed.
    clip_quantiles: ``(lo, hi)`` fractions for ``clip_min``/``clip_max``, or None for no clipping.
    exclude_last: leave every document's last concept (its end-of-text marker) out of the sample.
    compute_dtype: ``"float64"`` (most accurate) or ``"float32"`` (the reference's own precision).
    set_manifest: write ``basename(out)`` into the ``normalizer`` field of the manifest of every
      dataset directory that holds ``out`` (at least one must).
    min_samples: refuse a sample of fewer vectors (module docstring; at least 2).
    verbose: print the summary.

  Raises:
    lcm_jax.errors.UserError: (UsageError, ShardFormatError, NormalizerError) naming the
      directory, file or flag; nothing has been written then.
  """
  log = (lambda msg: print(f"[{TOOL}] {msg}", flush=True)) if verbose else (lambda msg: None)
  t0 = time.time()
  if not data:
    raise UsageError("--data: give at least one dataset directory")
  if max_samples < 1:
    raise UsageError(f"--max_samples must be >= 1, got {max_samples}")
  if compute_dtype not in ("float64", "float32"):
    raise UsageError(f"--compute_dtype must be float64 or float32, got {compute_dtype!r}")
  if min_samples < 2:
    raise UsageError(f"--min_samples must be >= 2, got {min_samples}")
  if os.path.isdir(out):
    raise UsageError(f"--out {out}: is a directory; give a file name such as "
                     f"{os.path.join(out, normalizer_lib.NORMALIZER_NAME)}")
  fileio.check_output_path(out, "--out")
  manifests = check_datasets(data)
  holders = _manifest_dirs_holding(out, data)
  if set_manifest and not holders:
    raise UsageError(f"--set_manifest: --out {out} is not inside any --data directory; a "
                     "manifest's 'normalizer' field names a file in the dataset's own directory")

  weights = [w for _, w in data]
  counts, sizes = planned_counts(manifests, weights, max_samples, exclude_last)
  _check_sample_size(data, sizes, int(counts.sum()), max_samples, min_samples, exclude_last)
  x = normalizer_lib.sample_embeddings(list(data), max_samples, seed, exclude_last=exclude_last)
  t_sample = time.time() - t0
  _check_sample_size(data, sizes, len(x), max_samples, min_samples, exclude_last)
  zero_spread: list[int] = []
  norm = normalizer_lib.fit_robust_scaler(x, clip_quantiles=clip_quantiles,
                                          compute_dtype=np.dtype(compute_dtype),
                                          zero_spread=zero_spread)
  zero_msg = None
  if zero_spread:
    shown = ", ".join(str(d) for d in zero_spread[:8]) + (", ..." if len(zero_spread) > 8 else "")
    zero_msg = (f"{describe_data(data, sizes, exclude_last)}: {len(zero_spread)} of {x.shape[1]} "
                f"dims have zero spread between the {norm.quantile_range[0]:g}th and "
                f"{norm.quantile_range[1]:g}th percentiles of the {len(x)} sampled vectors (dims "
                f"{shown}); such a dim gets sklearn's fallback scale "
                f"{1.0 / normalizer_lib.unit_variance_adjust(norm.quantile_range):.4g}, which "
                "measures nothing")
    if len(zero_spread) == x.shape[1]:
      raise UsageError(f"{zero_msg}: every dim, so the sample is copies of one vector; refusing "
                       "to write a normalizer that measured nothing")
    if not exclude_last:
      zero_msg += " (if the end-of-text vector pins them, --exclude_last leaves it out)"
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  norm.save(out)
  updated = []
  if set_manifest:
    for d in holders:
      path = os.path.join(d, schema.MANIFEST_NAME)
      with open(path) as f:
        manifest = json.load(f)
      old = manifest.get("normalizer")
      manifest["normalizer"] = os.path.basename(out)
      schema.write_json_atomic(path, manifest)
      updated.append((path, old))

  total_w = sum(weights)
  per_dataset = int(counts.sum()) == len(x)
  what = "concepts, end-of-text excluded" if exclude_last else "concepts"
  for (d, w), c, n in zip(data, counts, sizes):
    got = f"{int(c)} samples" if per_dataset else "samples"
    log(f"{d}: weight {w:g} ({100 * w / total_w:.1f}%), {got} of {int(n)} {what}")
  if len(x) < max_samples:
    log(f"note: {len(x)} samples < --max_samples {max_samples}: the datasets hold too few "
        "concepts for the weighted shares (every share shrank by the same factor)")
  clip = (f", clip at quantiles {norm.clip_quantiles[0]:g}..{norm.clip_quantiles[1]:g}"
          if norm.has_clipping else "")
  log(f"fitted on {len(x)} x {x.shape[1]} ({compute_dtype}, quantile_range "
      f"{norm.quantile_range} percent{clip}): mean scale {float(norm.scale.mean()):.4g}, mean "
      f"|center| {float(np.abs(norm.center).mean()):.4g}; sampling {t_sample:.1f} s, total "
      f"{time.time() - t0:.1f} s -> {out}")
  if zero_msg is not None:
    log(f"warning: {zero_msg}")
  for path, old in updated:
    log(f"{path}: field 'normalizer' {old!r} -> {os.path.basename(out)!r}")
  not_updated = [d for d, _ in data if d not in holders]
  if set_manifest and not_updated:
    log(f"manifest not changed for {', '.join(not_updated)} (--out is not in that directory)")
  return norm


def describe_data(data: Sequence[tuple[str, float]], sizes: np.ndarray, exclude_last: bool) -> str:
  """``--data D1 (N1 concepts), D2 (N2 concepts)``: the datasets and their sampleable sizes."""
  what = "concepts without end of text" if exclude_last else "concepts"
  return "--data " + ", ".join(f"{d} ({int(n)} {what})" for (d, _), n in zip(data, sizes))


def _check_sample_size(data: Sequence[tuple[str, float]], sizes: np.ndarray, n: int,
                       max_samples: int, min_samples: int, exclude_last: bool) -> None:
  """UsageError naming the datasets and their counts if ``n`` vectors are too few to fit."""
  if n >= min_samples:
    return
  if n == 0:
    raise UsageError(f"{describe_data(data, sizes, exclude_last)}: no concepts to sample")
  if max_samples < min_samples:
    cause = f"--max_samples {max_samples} is below --min_samples {min_samples}"
  else:
    cause = "the datasets hold too few concepts for the weighted shares"
  raise UsageError(
      f"{describe_data(data, sizes, exclude_last)}: {n} vectors to fit on, fewer than --min_samples "
      f"{min_samples} ({cause}). The scale is the spread between the 0.25th and 0.75th "
      "percentiles; with fewer samples it measures only the most extreme values of each dim. "
      "Give more data, or a smaller --min_samples (>= 2) for a demo corpus")


class _Parser(argparse.ArgumentParser):
  """Reports a bad command line as one ``error:`` line (exit status 2), like every other error."""

  def error(self, message: str) -> NoReturn:
    print(f"error: {message} (see --help)", file=sys.stderr)
    sys.exit(2)


def _parser() -> argparse.ArgumentParser:
  p = _Parser(
      prog=f"python -m {TOOL}",
      description="Fit the SONAR normalizer (sklearn RobustScaler(unit_variance=True, "
                  "quantile_range=(0.25, 0.75)), optionally with clipping) on concept vectors "
                  "sampled from a weighted mix of lcm_jax embedding datasets. Refused (exit 2): "
                  "fewer than --min_samples vectors, or a sample with zero spread in every dim. "
                  "A dim with zero spread (e.g. pinned by the end-of-text vector: see "
                  "--exclude_last) is a warning in the summary; it gets sklearn's fallback scale "
                  "2.669.",
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--data", action="append", required=True, metavar="DIR[:WEIGHT]",
                 help="an lcm_jax dataset directory (manifest.json + shards), with an optional "
                      "sampling weight (default 1); repeat for a mix. Shares are proportional to "
                      "the weights")
  p.add_argument("--out", required=True,
                 help="normalizer file to write (.npz), e.g. DIR/normalizer.npz")
  p.add_argument("--max_samples", type=int, default=DEFAULT_MAX_SAMPLES,
                 help="number of concept vectors to sample in total (fewer if the datasets are "
                      "too small for the weighted shares)")
  p.add_argument("--seed", type=int, default=0, help="sampling seed")
  clip = p.add_mutually_exclusive_group()
  clip.add_argument("--clip", action="store_true",
                    help="also store clip_min/clip_max at the reference's quantiles "
                         f"{normalizer_lib.DEFAULT_CLIP_QUANTILES[0]:g},"
                         f"{normalizer_lib.DEFAULT_CLIP_QUANTILES[1]:g} of the normalized sample")
  clip.add_argument("--clip_quantiles", metavar="LO,HI", default=None,
                    help="store clip_min/clip_max at these quantiles (fractions) of the "
                         "normalized sample, e.g. 1e-4,0.9999")
  p.add_argument("--exclude_last", action="store_true",
                 help="leave each document's last concept (the end-of-text marker) out of the "
                      "sample: many copies of one vector can pin the tail quantiles of a dim")
  p.add_argument("--compute_dtype", choices=("float64", "float32"), default="float64",
                 help="precision of the fit (float32 = the reference's own; the file stores "
                      "float32 either way)")
  p.add_argument("--min_samples", type=int, default=DEFAULT_MIN_SAMPLES,
                 help="refuse to fit on fewer vectors: below 401 the 0.25th percentile is an "
                      "interpolation from each dim's minimum, so the scale would measure the "
                      "extreme values only (lower it, >= 2, for tiny demo corpora)")
  p.add_argument("--set_manifest", action="store_true",
                 help="write the file name into the 'normalizer' field of the manifest of each "
                      "--data directory that holds --out (training uses it when "
                      "config.data.normalizer is empty)")
  return p


def _fail(message: str) -> NoReturn:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def main(argv: Sequence[str] | None = None) -> int:
  """Command-line entry point; returns the exit status (2 on a user error)."""
  a = _parser().parse_args(argv)
  try:
    data = [parse_data_arg(d) for d in a.data]
    clip: tuple[float, float] | None = None
    if a.clip:
      clip = normalizer_lib.DEFAULT_CLIP_QUANTILES
    elif a.clip_quantiles is not None:
      clip = parse_clip_quantiles(a.clip_quantiles)
    fit(data, a.out, max_samples=a.max_samples, seed=a.seed, clip_quantiles=clip,
        exclude_last=a.exclude_last, compute_dtype=a.compute_dtype, set_manifest=a.set_manifest,
        min_samples=a.min_samples)
  except UserError as e:  # only the project's input checks: anything else is a bug (traceback)
    _fail(str(e))
  return 0


if __name__ == "__main__":
  sys.exit(main())
