r"""Residual k-means (lcm_jax.quantizer) throughput: the fit, its k-means++ init, the encoder.

  .venv/bin/python benchmarks/quantizer.py              # the default grid below (~4 min, 2 cores)
  .venv/bin/python benchmarks/quantizer.py --dim=64 --samples=2000,4000 --codebook_sizes=16,64 \
      --codebooks=1,2 --iters=3 --rounds=2 --encode_rows=4000   # a smoke run in seconds
  .venv/bin/python benchmarks/quantizer.py --json=quantizer.json   # figures as JSON too

Default grid: D = 1024, N in {10000, 20000} samples, K in {256, 1024} centroids, C in {2, 4}
codebooks, 10 Lloyd iterations, Gaussian data, one device. For each (N, K) a fit with C = 1
compiles the level function first (every level and every C share it); then each (N, K, C) fit
(``init="random"``: its Lloyd passes only, see below) runs ``--rounds`` times and its median wall
time T is reported with:

* vectors/s = N / T (samples through all C levels) and vector-levels/s = N C / T;
* ns per unit = T / (N C K P) in nanoseconds, P = iters + 1 assignment passes per level (the
  iterations and the final assignment): the fit's cost model is ``T = unit * N * C * K * P``, so a
  constant unit across the grid IS linear scaling in samples, codebooks and codebook size;
* GFLOP/s of the assignment matmuls (2 D N C K P FLOPs) and their ratio to a plain float32
  (chunk x D) @ (D x K) matmul at the same precision, timed in the same run;
* then the time ratios between grid points that differ in one factor only (N x2, C x2, K x4),
  next to the ratio linear scaling predicts.

The k-means++ init (the fit's default) is timed apart: ``kmeanspp_init_indices`` on the largest N
for each K (its cost depends on K and its subsample, ``min(N, max(4 K, 4096))`` rows, not on N),
also as a number of Lloyd passes over that N. Encoding: ``encode`` of a shard-sized batch
(``--encode_rows``, default 50000: about one ``--shard_docs=2000`` shard of the embedding tool)
with the codebooks of the last grid fit (largest K and C), vectors/s. Medians over ``--rounds``
after one warm-up call.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # pylint: disable=g-import-not-at-top,wrong-import-position


def _ints(text: str) -> list[int]:
  return [int(v) for v in text.split(",") if v.strip()]


def _timed(fn: Any, rounds: int) -> list[float]:
  out = []
  for _ in range(rounds):
    t0 = time.perf_counter()
    fn()
    out.append(time.perf_counter() - t0)
  return out


def _matmul_gflops(rows: int, dim: int, k: int, rounds: int) -> float:
  """GFLOP/s of a plain float32 (rows x dim) @ (dim x k) matmul at precision HIGHEST."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.standard_normal((rows, dim), dtype=np.float32))
  b = jnp.asarray(rng.standard_normal((k, dim), dtype=np.float32))
  f = jax.jit(lambda a, b: jnp.dot(a, b.T, precision=jax.lax.Precision.HIGHEST))
  iters = 3
  seconds = statistics.median(common.time_call(lambda: f(a, b), iters) for _ in range(rounds))
  return 2.0 * rows * dim * k / seconds / 1e9


def run(args: argparse.Namespace) -> dict[str, Any]:
  """Runs the grid; prints one line per measurement; returns the figures."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from lcm_jax import quantizer  # pylint: disable=g-import-not-at-top

  samples, sizes, codebooks = _ints(args.samples), _ints(args.codebook_sizes), _ints(args.codebooks)
  d, iters, rounds = args.dim, args.iters, args.rounds
  passes = iters + 1
  env = common.environment()
  print(f"device: {env['device_kind']} ({env['backend']}), {os.cpu_count()} CPUs, jax "
        f"{env['jax_version']}; D={d}, {iters} iterations ({passes} assignment passes per level), "
        f"init=random for the grid, medians of {rounds} rounds", flush=True)
  rng = np.random.default_rng(0)
  data = rng.standard_normal((max(samples), d), dtype=np.float32)
  grid, matmul = [], {}
  last_cb = None
  for k in sizes:
    matmul[k] = _matmul_gflops(quantizer.default_chunk(max(samples), k), d, k, rounds)
    for n in samples:
      x = data[:n]
      t0 = time.perf_counter()
      quantizer.fit_rvq(x, 1, k, iters=iters, seed=0, init="random")  # compiles the level
      compile_s = time.perf_counter() - t0
      for c in codebooks:
        holder: dict[str, Any] = {}

        def fit():
          holder["cb"] = quantizer.fit_rvq(x, c, k, iters=iters, seed=0, init="random")

        times = _timed(fit, rounds)
        last_cb = holder["cb"]
        t = statistics.median(times)
        units = n * c * k * passes
        gflops = 2.0 * d * units / t / 1e9
        row = {"samples": n, "codebook_size": k, "codebooks": c, "seconds": t,
               "seconds_min": min(times), "seconds_max": max(times),
               "first_call_s": compile_s, "vectors_per_s": n / t,
               "vector_levels_per_s": n * c / t, "ns_per_unit": t / units * 1e9,
               "gflops": gflops, "matmul_gflops": matmul[k], "ratio": gflops / matmul[k]}
        grid.append(row)
        print(f"fit N={n} K={k} C={c}: {t:.3f} s ({min(times):.3f}..{max(times):.3f}), "
              f"{n / t:.0f} vectors/s, {n * c / t:.0f} vector-levels/s, "
              f"{row['ns_per_unit']:.4f} ns per sample x codebook x centroid x pass, "
              f"{gflops:.1f} GFLOP/s = {row['ratio']:.2f} x plain matmul ({matmul[k]:.1f})",
              flush=True)

  ratios = []
  by_key = {(r["samples"], r["codebook_size"], r["codebooks"]): r for r in grid}
  for (n, k, c), r in sorted(by_key.items()):
    for what, other in (("N", (2 * n, k, c)), ("C", (n, k, 2 * c)), ("K", (n, 4 * k, c))):
      if other in by_key:
        factor = {"N": 2, "C": 2, "K": 4}[what]
        got = by_key[other]["seconds"] / r["seconds"]
        ratios.append({"factor": what, "from": [n, k, c], "to": list(other), "time_ratio": got,
                       "linear": factor})
        print(f"ratio {what} x{factor}: (N={n} K={k} C={c}) -> (N={other[0]} K={other[1]} "
              f"C={other[2]}): time x{got:.2f} (linear: x{factor})", flush=True)
  units = [r["ns_per_unit"] for r in grid]
  if units:
    print(f"ns per unit over the grid: {min(units):.4f}..{max(units):.4f} (max/min "
          f"{max(units) / min(units):.2f})", flush=True)

  init = []
  n_init = max(samples)
  for k in sizes:
    x = data[:n_init]
    quantizer.kmeanspp_init_indices(x, k, 0, 0)  # compile
    times = _timed(lambda: quantizer.kmeanspp_init_indices(x, k, 0, 0), rounds)
    t = statistics.median(times)
    per_pass = next((r["seconds"] / (r["codebooks"] * passes) for r in grid
                     if r["samples"] == n_init and r["codebook_size"] == k), float("nan"))
    m = quantizer.default_init_sample(n_init, k)
    init.append({"codebook_size": k, "init_sample": m, "seconds": t,
                 "lloyd_passes": t / per_pass})
    print(f"k-means++ init K={k} (subsample {m} rows, {quantizer.kmeanspp_candidates(k)} "
          f"candidates per step): {t:.3f} s per level = {t / per_pass:.2f} Lloyd passes at "
          f"N={n_init}", flush=True)

  encode = None
  if args.encode_rows > 0 and last_cb is not None:
    xe = rng.standard_normal((args.encode_rows, d), dtype=np.float32)
    quantizer.encode(xe, last_cb)  # compile
    times = _timed(lambda: quantizer.encode(xe, last_cb), rounds)
    t = statistics.median(times)
    c, k, _ = last_cb.shape
    encode = {"rows": args.encode_rows, "codebooks": c, "codebook_size": k, "seconds": t,
              "vectors_per_s": args.encode_rows / t,
              "gflops": 2.0 * d * k * c * args.encode_rows / t / 1e9}
    print(f"encode {args.encode_rows} x {d} with C={c} K={k}: {t:.3f} s, "
          f"{args.encode_rows / t:.0f} vectors/s, {encode['gflops']:.1f} GFLOP/s", flush=True)
  return {"environment": env, "dim": d, "iters": iters, "rounds": rounds, "grid": grid,
          "ratios": ratios, "kmeanspp_init": init, "encode": encode}


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(
      description="Fit and encode throughput of lcm_jax.quantizer (residual k-means).",
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--dim", type=int, default=1024, help="vector dim D")
  p.add_argument("--samples", default="10000,20000", help="N values, comma-separated")
  p.add_argument("--codebook_sizes", default="256,1024", help="K values, comma-separated")
  p.add_argument("--codebooks", default="2,4", help="C values, comma-separated")
  p.add_argument("--iters", type=int, default=10, help="Lloyd iterations per level")
  p.add_argument("--rounds", type=int, default=3, help="timed rounds per measurement (median)")
  p.add_argument("--encode_rows", type=int, default=50000,
                 help="rows of the encoding batch (0: skip)")
  p.add_argument("--json", default="", help="also write the figures to this JSON file")
  args = p.parse_args(argv)
  for name in ("samples", "codebook_sizes", "codebooks"):
    values = _ints(getattr(args, name))
    if not values or min(values) < 1:
      p.error(f"--{name}: expected positive integers, got {getattr(args, name)!r}")
  if max(_ints(args.codebook_sizes)) > min(_ints(args.samples)):
    p.error("every K must be <= every N")
  if args.rounds < 1 or args.iters < 0 or args.dim < 1:
    p.error("--rounds and --dim must be >= 1, --iters >= 0")
  result = run(args)
  if args.json:
    common.write_json(args.json, result)
  return 0


if __name__ == "__main__":
  sys.exit(main())
