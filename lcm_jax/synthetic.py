"""A synthetic concept corpus with known structure, for tests, tiny runs and benchmarks.

Run:
  python -m data_prep.synthetic --out=data/synthetic --num_docs=2000 --dim=32 --seed=0
  python -m data_prep.synthetic --help

The corpus is a first-order Markov chain over ``P`` prototype concept vectors, written in the
shard schema of :mod:`lcm_jax.schema`:

* ``P`` prototypes: random directions scaled to a SONAR-like norm (``--proto_norm``), spread out by
  farthest-point selection so that any two are far apart even in low dimension, plus a fixed
  "end of text" vector (the same for every seed of a given ``dim``, like SONAR's "End of text.").
* Each prototype has 1-3 successors (never itself) with fixed probabilities: about 40% have one,
  35% two and 25% three, so well over half are branch points. Branch probabilities are one of
  (.5 .5), (.6 .4), (.7 .3), (1/3 1/3 1/3), (.4 .35 .25), (.5 .3 .2); the successors of a branch
  point are chosen far apart from each other. A random cycle through all prototypes is part of
  the graph, so the chain is irreducible and every prototype is visited often.
* The normalizer is fitted on every concept except the end-of-text ones (an exact atom that would
  pin the robust tail quantiles of some dims). The robust scale of a mixture of ``P`` narrow
  clusters is set by the noise (the 0.25th..0.75th percentiles fall inside the most extreme
  cluster of each dim), which is why the default noise (0.25) is not smaller: it puts normalized
  components at a spread of ~1-3, like normalized SONAR, instead of ~5-10.
* A document draws its total length ``n`` uniformly in ``[min_len, max_len]``, starts at a
  uniformly random prototype, walks the chain for ``n - 1`` steps emitting ``prototype +
  N(0, noise_std^2)`` per component, and ends with the exact end-of-text vector (no noise, as in
  SONAR). ``noise_std = noise * proto_norm / sqrt(dim)``: a noise vector's norm is
  ~``noise * proto_norm``, well below the distance between prototypes (~``sqrt(2) * proto_norm``).

Outputs in ``--out``: the shards, ``manifest.json`` (producer = this tool + all its arguments),
``normalizer.npz`` (:func:`lcm_jax.normalizer.fit_robust_scaler` on the corpus, named in the
manifest's ``normalizer`` field) and ``process.npz`` (the chain, see :class:`Process`) so that
evaluations can find branch points and true successors. Everything is written into a temporary
sibling directory that is renamed into place at the end: a failed run leaves nothing behind.
The output is a deterministic function of the arguments (same seed, byte-identical shards).

What is there to learn: the next concept depends only on the current one. At single-successor
prototypes (and at the start of the walk) a model can predict the next concept up to the noise;
at branch points an MSE model can do no better than the probability-weighted mean of the
successors (:meth:`Process.best_prediction_l2`), while a sampler that picks one successor lands
near a true prototype. The end of a document is not predictable beyond its length distribution.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Sequence

import numpy as np

from lcm_jax import fileio
from lcm_jax import normalizer as normalizer_lib
from lcm_jax import schema
from lcm_jax.errors import UserError

TOOL = "data_prep.synthetic"
PROCESS_NAME = "process.npz"
PROCESS_FORMAT_VERSION = 1
EOT_TEXT = "End of text."
MAX_SUCCESSORS = 3
_EOT_SEED = 20241212  # Fixed: the end-of-text vector depends on dim only, never on --seed.
_MAX_FIT_SAMPLES = 1_000_000
_BRANCH_PROBS = {
    2: ((0.5, 0.5), (0.6, 0.4), (0.7, 0.3)),
    3: ((1 / 3, 1 / 3, 1 / 3), (0.4, 0.35, 0.25), (0.5, 0.3, 0.2)),
}
_SUCCESSOR_SHARES = (0.40, 0.35, 0.25)  # share of prototypes with 1, 2, 3 successors

DEFAULTS: dict[str, Any] = dict(
    num_docs=2000, dim=32, seed=0, num_prototypes=32, num_shards=4, noise=0.25, proto_norm=0.25,
    min_len=4, max_len=40, dtype="float16", texts=False)


@dataclasses.dataclass
class Process:
  """The Markov chain behind a synthetic corpus (saved as ``process.npz``).

  Attributes:
    prototypes: (P, dim) float32 prototype concept vectors.
    eot: (dim,) float32 end-of-text vector (every document's last concept, exactly).
    successors: (P, 3) int32 successor indices, padded with -1.
    successor_probs: (P, 3) float64 transition probabilities (rows sum to 1), padded with 0.
    start_probs: (P,) float64 distribution of the first concept.
    noise_std: per-component std of the Gaussian noise added to every emitted prototype.
    proto_norm: L2 norm of every prototype and of ``eot``.
    seed: the seed the process was drawn from.
  """

  prototypes: np.ndarray
  eot: np.ndarray
  successors: np.ndarray
  successor_probs: np.ndarray
  start_probs: np.ndarray
  noise_std: float
  proto_norm: float
  seed: int

  @property
  def num_prototypes(self) -> int:
    return int(self.prototypes.shape[0])

  @property
  def dim(self) -> int:
    return int(self.prototypes.shape[1])

  @property
  def num_successors(self) -> np.ndarray:
    """(P,) number of successors of each prototype (1..3)."""
    return (self.successors >= 0).sum(axis=1)

  @property
  def branch_points(self) -> np.ndarray:
    """Indices of the prototypes with two or more successors."""
    return np.flatnonzero(self.num_successors >= 2)

  def successors_of(self, i: int) -> tuple[np.ndarray, np.ndarray]:
    """``(indices, probabilities)`` of prototype ``i``'s successors."""
    k = int(self.num_successors[i])
    return self.successors[i, :k], self.successor_probs[i, :k]

  def nearest(self, x: np.ndarray) -> np.ndarray:
    """Nearest prototype index for each vector of ``x`` (..., dim); ``P`` means end-of-text."""
    table = np.concatenate([self.prototypes, self.eot[None]], axis=0).astype(np.float64)
    x = np.asarray(x, dtype=np.float64)
    d2 = ((x[..., None, :] - table) ** 2).sum(-1)
    return d2.argmin(-1)

  def expected_next(self, i: int) -> np.ndarray:
    """The probability-weighted mean of ``i``'s successors: the MSE-optimal prediction."""
    idx, p = self.successors_of(i)
    return (p[:, None] * self.prototypes[idx].astype(np.float64)).sum(0)

  def best_prediction_l2(self, i: int) -> float:
    """Expected L2 distance from :meth:`expected_next` to the true (noise-free) successor.

    0 for single-successor prototypes; at branch points the floor an MSE regressor cannot beat
    (ignoring noise and the end-of-text hazard).
    """
    idx, p = self.successors_of(i)
    mean = self.expected_next(i)
    return float((p * np.linalg.norm(self.prototypes[idx] - mean, axis=1)).sum())

  def save(self, path: str) -> str:
    """Writes ``process.npz`` atomically (``lcm_jax.normalizer.write_npz_atomic``)."""
    arrays = dict(
        format_version=np.int64(PROCESS_FORMAT_VERSION), prototypes=self.prototypes,
        eot=self.eot, successors=self.successors, successor_probs=self.successor_probs,
        num_successors=self.num_successors.astype(np.int32), start_probs=self.start_probs,
        noise_std=np.float64(self.noise_std), proto_norm=np.float64(self.proto_norm),
        seed=np.int64(self.seed))
    return normalizer_lib.write_npz_atomic(path, arrays)


def load_process(data_dir: str) -> Process:
  """Reads ``DIR/process.npz`` written by :func:`generate`."""
  path = os.path.join(data_dir, PROCESS_NAME)
  if not os.path.exists(path):
    raise UserError(f"{path}: missing (is {data_dir} a data_prep.synthetic corpus?)")
  try:
    with np.load(path, allow_pickle=False) as z:
      d = {k: z[k] for k in z.files}
  except Exception as e:  # zipfile.BadZipFile, ValueError, OSError
    raise UserError(f"{path}: not a readable .npz ({type(e).__name__}: {e})") from None
  for key in ("prototypes", "eot", "successors", "successor_probs", "start_probs", "noise_std",
              "proto_norm", "seed"):
    if key not in d:
      raise UserError(f"{path}: field '{key}': missing")
  p, dim = d["prototypes"].shape
  if d["eot"].shape != (dim,) or d["successors"].shape != (p, MAX_SUCCESSORS) or \
      d["successor_probs"].shape != (p, MAX_SUCCESSORS) or d["start_probs"].shape != (p,):
    raise UserError(
        f"{path}: field 'successors': shapes inconsistent with prototypes ({p}, {dim})")
  return Process(prototypes=d["prototypes"], eot=d["eot"], successors=d["successors"],
                 successor_probs=d["successor_probs"], start_probs=d["start_probs"],
                 noise_std=float(d["noise_std"]), proto_norm=float(d["proto_norm"]),
                 seed=int(d["seed"]))


def eot_vector(dim: int, proto_norm: float = DEFAULTS["proto_norm"]) -> np.ndarray:
  """The end-of-text vector for ``dim``: a fixed random direction of norm ``proto_norm``."""
  v = np.random.default_rng(_EOT_SEED + dim).normal(size=dim)
  return (v / np.linalg.norm(v) * proto_norm).astype(np.float32)


def make_process(dim: int, num_prototypes: int, seed: int, *, noise: float = DEFAULTS["noise"],
                 proto_norm: float = DEFAULTS["proto_norm"]) -> Process:
  """Draws the chain (prototypes, successor table, start distribution) from ``seed``."""
  rng = np.random.default_rng([seed, 1])
  p = num_prototypes
  eot = eot_vector(dim, proto_norm)
  # Farthest-point selection among random directions: well spread in any dim, far from eot.
  cand = rng.normal(size=(16 * p, dim))
  cand = cand / np.linalg.norm(cand, axis=1, keepdims=True) * proto_norm
  chosen = []
  min_d = np.linalg.norm(cand - eot, axis=1)
  for _ in range(p):
    j = int(min_d.argmax())
    chosen.append(j)
    min_d = np.minimum(min_d, np.linalg.norm(cand - cand[j], axis=1))
  protos = cand[rng.permutation(chosen)]
  dist = np.linalg.norm(protos[:, None] - protos[None], axis=-1)
  far = float(np.median(dist[np.triu_indices(p, 1)])) if p > 1 else 0.0

  # Number of successors: exact shares, shuffled; never more than the other prototypes.
  counts = np.round(np.array(_SUCCESSOR_SHARES) * p).astype(int)
  counts[0] = p - counts[1:].sum()
  k = np.minimum(np.repeat(np.arange(1, MAX_SUCCESSORS + 1), counts), p - 1)
  k = k[rng.permutation(p)]

  successors = np.full((p, MAX_SUCCESSORS), -1, np.int32)
  probs = np.zeros((p, MAX_SUCCESSORS), np.float64)
  # A random Hamiltonian cycle makes the chain irreducible (every prototype is reachable and
  # visited often); extra successors of branch points go to far-apart, least-targeted prototypes.
  cycle = rng.permutation(p)
  indegree = np.ones(p, np.int64)
  for pos, i in enumerate(cycle):
    picks = [int(cycle[(pos + 1) % p])]
    while len(picks) < k[i]:
      rest = np.array([j for j in range(p) if j != i and j not in picks])
      sep = dist[np.ix_(rest, picks)].min(axis=1)
      good = rest[sep >= far]
      if len(good):
        least = good[indegree[good] == indegree[good].min()]
        j = int(rng.choice(least))
      else:
        j = int(rest[sep.argmax()])
      picks.append(j)
      indegree[j] += 1
    successors[i, :k[i]] = picks
    if k[i] == 1:
      probs[i, 0] = 1.0
    else:
      pattern = _BRANCH_PROBS[int(k[i])][int(rng.integers(len(_BRANCH_PROBS[int(k[i])])))]
      probs[i, :k[i]] = np.array(pattern)[rng.permutation(int(k[i]))]
  return Process(prototypes=protos.astype(np.float32), eot=eot, successors=successors,
                 successor_probs=probs, start_probs=np.full(p, 1.0 / p), seed=int(seed),
                 noise_std=float(noise * proto_norm / np.sqrt(dim)), proto_norm=float(proto_norm))


def _validate(num_docs: int, dim: int, num_prototypes: int, num_shards: int, noise: float,
              proto_norm: float, min_len: int, max_len: int, dtype: str) -> None:
  """Raises UserError with a message naming the bad flag."""
  checks = [
      (num_docs >= 1, f"--num_docs must be >= 1 (got {num_docs})"),
      (dim >= 1, f"--dim must be >= 1 (got {dim})"),
      (num_prototypes >= 2, f"--num_prototypes must be >= 2 (got {num_prototypes})"),
      (num_shards >= 1, f"--num_shards must be >= 1 (got {num_shards})"),
      (num_shards <= max(num_docs, 1),
       f"--num_shards ({num_shards}) must not exceed --num_docs ({num_docs})"),
      (np.isfinite(noise) and noise >= 0, f"--noise must be finite and >= 0 (got {noise})"),
      (np.isfinite(proto_norm) and proto_norm > 0,
       f"--proto_norm must be finite and > 0 (got {proto_norm})"),
      (min_len >= 2, f"--min_len must be >= 2: one concept plus end-of-text (got {min_len})"),
      (max_len >= min_len, f"--max_len ({max_len}) must be >= --min_len ({min_len})"),
      (dtype in schema.ALLOWED_DTYPES,
       f"--dtype must be one of {schema.ALLOWED_DTYPES} (got {dtype!r})"),
  ]
  for ok, msg in checks:
    if not ok:
      raise UserError(msg)


def _documents(process: Process, num_docs: int, min_len: int, max_len: int, seed: int,
               texts: bool) -> Any:
  """Yields the corpus' documents in order (float32 embeddings), deterministically from ``seed``."""
  rng = np.random.default_rng([seed, 2])
  cum = np.cumsum(process.successor_probs, axis=1)
  cum[:, -1] = 1.0 + 1e-12  # guard against rounding: searchsorted never runs past the last column
  protos = process.prototypes.astype(np.float32)
  p = process.num_prototypes
  for d in range(num_docs):
    n = int(rng.integers(min_len, max_len + 1))
    states = np.empty(n - 1, np.int64)
    states[0] = rng.choice(p, p=process.start_probs)
    u = rng.random(n - 2)
    for t in range(1, n - 1):
      s = states[t - 1]
      states[t] = process.successors[s, np.searchsorted(cum[s], u[t - 1], side="right")]
    noise = rng.normal(scale=process.noise_std, size=(n - 1, process.dim)).astype(np.float32)
    emb = np.concatenate([protos[states] + noise, process.eot[None]], axis=0)
    doc_texts = [f"proto_{s}" for s in states] + [EOT_TEXT] if texts else None
    yield schema.Document(id=f"synthetic-s{seed}-{d:07d}", embeddings=emb, texts=doc_texts)


def generate(out: str, num_docs: int = DEFAULTS["num_docs"], dim: int = DEFAULTS["dim"],
             seed: int = DEFAULTS["seed"], *, num_prototypes: int = DEFAULTS["num_prototypes"],
             num_shards: int = DEFAULTS["num_shards"], noise: float = DEFAULTS["noise"],
             proto_norm: float = DEFAULTS["proto_norm"], min_len: int = DEFAULTS["min_len"],
             max_len: int = DEFAULTS["max_len"], dtype: str = DEFAULTS["dtype"],
             texts: bool = DEFAULTS["texts"], overwrite: bool = False,
             verbose: bool = False) -> dict[str, Any]:
  """Writes a synthetic corpus to ``out`` and returns its manifest (see the module docstring).

  Raises:
    lcm_jax.errors.UserError: on a bad argument, an ``out`` that is a file or cannot be created
      (before anything is written), or if ``out`` exists, is not empty and ``overwrite`` is False.
  """
  _validate(num_docs, dim, num_prototypes, num_shards, noise, proto_norm, min_len, max_len, dtype)
  fileio.check_output_path(out, "--out", directory=True)
  out = os.path.abspath(out)
  if os.path.exists(out) and not (os.path.isdir(out) and not os.listdir(out)) and not overwrite:
    raise UserError(f"--out {out} exists and is not empty (pass --overwrite to replace it)")
  args = dict(out=out, num_docs=num_docs, dim=dim, seed=seed, num_prototypes=num_prototypes,
              num_shards=num_shards, noise=noise, proto_norm=proto_norm, min_len=min_len,
              max_len=max_len, dtype=dtype, texts=texts)
  log = print if verbose else (lambda *a, **k: None)
  t0 = time.time()
  parent = os.path.dirname(out)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".tmp-{os.path.basename(out)}-", dir=parent)
  try:
    process = make_process(dim, num_prototypes, seed, noise=noise, proto_norm=proto_norm)
    process.save(os.path.join(tmp, PROCESS_NAME))
    docs = _documents(process, num_docs, min_len, max_len, seed, texts)
    # Fit sample: every concept when the corpus is small, else a deterministic Bernoulli subsample.
    expected = num_docs * (min_len + max_len) / 2
    keep_p = min(1.0, _MAX_FIT_SAMPLES / expected)
    fit_rng = np.random.default_rng([seed, 3])
    fit_parts: list[np.ndarray] = []
    shards = []
    bounds = np.linspace(0, num_docs, num_shards + 1).round().astype(int)

    def shard_docs(count: int) -> Any:
      for _ in range(count):
        doc = next(docs)
        # Fit on exactly what lands on disk, minus the end-of-text vector: thousands of identical
        # copies of one vector would pin the robust tail quantiles of some dims (zero spread).
        stored = doc.embeddings[:-1].astype(dtype)
        fit_parts.append(stored if keep_p >= 1 else stored[fit_rng.random(len(stored)) < keep_p])
        yield doc

    for k in range(num_shards):
      name = schema.shard_name(k, num_shards)
      entry = schema.write_shard(os.path.join(tmp, name),
                                 shard_docs(int(bounds[k + 1] - bounds[k])), dtype=dtype)
      shards.append(entry)
      log(f"[{TOOL}] shard {k + 1}/{num_shards}: {entry['num_documents']} documents, "
          f"{entry['num_concepts']} concepts -> {name}", flush=True)
    fit_x = np.concatenate(fit_parts, axis=0)
    norm = normalizer_lib.fit_robust_scaler(fit_x)
    norm.save(os.path.join(tmp, normalizer_lib.NORMALIZER_NAME))
    manifest = schema.make_manifest(
        dim=dim, dtype=dtype, shards=shards, has_texts=texts,
        normalizer=normalizer_lib.NORMALIZER_NAME,
        producer={"tool": TOOL, "args": args, "process": PROCESS_NAME})
    schema.write_manifest(tmp, manifest)
    normalizer_lib.apply_umask_permissions(tmp)
    schema.move_dir_into_place(tmp, out, overwrite)
    tmp = None
  finally:
    if tmp is not None and os.path.exists(tmp):
      shutil.rmtree(tmp, ignore_errors=True)
  if verbose:
    _summary(out, manifest, process, norm, len(fit_x), time.time() - t0)
  return manifest




def _summary(out: str, manifest: dict[str, Any], process: Process,
             norm: normalizer_lib.Normalizer, num_fit: int, seconds: float) -> None:
  ns = process.num_successors
  d = np.linalg.norm(process.prototypes[:, None] - process.prototypes[None], axis=-1)
  min_d = float(d[np.triu_indices(process.num_prototypes, 1)].min())
  noise_norm = process.noise_std * np.sqrt(process.dim)
  branch_l2 = np.mean([process.best_prediction_l2(i) for i in process.branch_points]) \
      if len(process.branch_points) else 0.0
  texts = ", with texts" if manifest["has_texts"] else ""
  print(f"[{TOOL}] wrote {out}: {manifest['num_documents']} documents, "
        f"{manifest['num_concepts']} concepts, {len(manifest['shards'])} shards, "
        f"dim {manifest['dim']}, {manifest['dtype']}{texts}")
  print(f"[{TOOL}] process: {process.num_prototypes} prototypes of norm {process.proto_norm:g}; "
        f"{int((ns >= 2).sum())} branch points ({int((ns == 2).sum())} with 2 successors, "
        f"{int((ns == 3).sum())} with 3); min inter-prototype distance {min_d:.3f}, noise norm "
        f"~{noise_norm:.3f}; MSE-optimal L2 at branch points {branch_l2:.3f} -> {PROCESS_NAME}")
  print(f"[{TOOL}] normalizer: fitted on {num_fit} concepts (end-of-text excluded), mean scale "
        f"{float(norm.scale.mean()):.4g} -> {normalizer_lib.NORMALIZER_NAME}")
  print(f"[{TOOL}] done in {seconds:.1f} s")


def ensure_corpus(path: str, dim: int = DEFAULTS["dim"], **kwargs: Any) -> dict[str, Any]:
  """Returns ``path``'s manifest, generating the corpus first if ``path/manifest.json`` is missing.

  ``kwargs`` are :func:`generate`'s (``num_docs``, ``seed``, ...). Safe to call from several
  processes at once: each generates privately and the first rename wins.

  Raises:
    lcm_jax.errors.UserError: if an existing corpus has a different ``dim``.
  """
  manifest_path = os.path.join(path, schema.MANIFEST_NAME)
  if not os.path.exists(manifest_path):
    try:
      return generate(path, dim=dim, **kwargs)
    except (ValueError, OSError):
      if not os.path.exists(manifest_path):  # Not a lost race with another process: a real error.
        raise
  manifest = schema.read_manifest(path)
  if int(manifest["dim"]) != dim:
    raise UserError(f"{manifest_path}: field 'dim': corpus has dim {manifest['dim']}, expected "
                    f"{dim} (delete {path} or point the config elsewhere)")
  return manifest


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog=f"python -m {TOOL}",
      description="Write a synthetic concept corpus (a Markov chain over prototype vectors "
                  "with branch points) as lcm_jax shards + manifest.json + normalizer.npz + "
                  "process.npz.",
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--out", required=True, help="output directory (must not exist, or be empty)")
  p.add_argument("--num_docs", type=int, default=DEFAULTS["num_docs"], help="number of documents")
  p.add_argument("--dim", type=int, default=DEFAULTS["dim"], help="embedding dimension")
  p.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="seed; same seed, same bytes")
  p.add_argument("--num_prototypes", type=int, default=DEFAULTS["num_prototypes"],
                 help="number of prototype concepts (chain states), end-of-text excluded")
  p.add_argument("--num_shards", type=int, default=DEFAULTS["num_shards"], help="number of shards")
  p.add_argument("--noise", type=float, default=DEFAULTS["noise"],
                 help="noise std relative to a prototype's per-component scale: the noise vector's "
                      "norm is ~noise*proto_norm")
  p.add_argument("--proto_norm", type=float, default=DEFAULTS["proto_norm"],
                 help="L2 norm of every prototype and of the end-of-text vector")
  p.add_argument("--min_len", type=int, default=DEFAULTS["min_len"],
                 help="minimum concepts per document, end-of-text included")
  p.add_argument("--max_len", type=int, default=DEFAULTS["max_len"],
                 help="maximum concepts per document, end-of-text included")
  p.add_argument("--dtype", default=DEFAULTS["dtype"], choices=schema.ALLOWED_DTYPES,
                 help="storage dtype of the embeddings")
  p.add_argument("--texts", action=argparse.BooleanOptionalAction, default=DEFAULTS["texts"],
                 help="store a text per concept ('proto_12', 'End of text.')")
  p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
  return p


def main(argv: Sequence[str] | None = None) -> int:
  """Command-line entry point; returns the exit status."""
  parser = _parser()
  a = parser.parse_args(argv)
  try:
    generate(a.out, a.num_docs, a.dim, a.seed, num_prototypes=a.num_prototypes,
             num_shards=a.num_shards, noise=a.noise, proto_norm=a.proto_norm, min_len=a.min_len,
             max_len=a.max_len, dtype=a.dtype, texts=a.texts, overwrite=a.overwrite, verbose=True)
  except UserError as e:  # only the input checks; any other exception is a bug (traceback)
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
