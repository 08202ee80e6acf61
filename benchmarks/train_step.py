r"""Train-step benchmark: the bench config's step next to a plain matmul, timed in the same run.

  .venv/bin/python benchmarks/train_step.py                      # Base-LCM bench config
  .venv/bin/python benchmarks/train_step.py --repeats=7 --packed  # + realistic document lengths

Prints step time, concepts/s, achieved model FLOP/s and the ratio to the FLOP/s of plain jnp
matmuls of the same size class ((B*L x d) @ (d x d) and (B*L x d) @ (d x ffn)), measured
interleaved with the step so machine noise hits both. Medians over ``--repeats`` rounds.

Model FLOPs (lcm_jax.models.flops.train_flops_per_concept): 6 x matmul parameters per concept
plus the attention score and value products (x3 for forward + backward), counted on all
positions of every row (see that module's docstring).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _time(fn, iters: int) -> float:
  import jax  # pylint: disable=g-import-not-at-top
  jax.block_until_ready(fn())  # warm-up outside the timed window
  t0 = time.perf_counter()
  for _ in range(iters):
    out = fn()
  import jax  # pylint: disable=g-import-not-at-top
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / iters


def _packed_rows(rng, batch: int, seq_len: int, min_len: int, max_len: int):
  """Segment ids / positions for rows packed with documents of uniformly random length."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  seg = np.zeros((batch, seq_len), np.int32)
  pos = np.zeros((batch, seq_len), np.int32)
  for b in range(batch):
    t, s = 0, 1
    while t < seq_len:
      n = int(rng.integers(min_len, max_len + 1))
      if t + n > seq_len:
        n = seq_len - t if s == 1 else 0
        if n == 0:
          break
      seg[b, t:t + n] = s
      pos[b, t:t + n] = np.arange(n)
      t, s = t + n, s + 1
  return seg, pos


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="configs/mse_1b6.py:bench", help="config file[:variant]")
  parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds (median reported)")
  parser.add_argument("--iters", type=int, default=3, help="steps / matmuls timed per round")
  parser.add_argument("--packed", action="store_true",
                      help="rows packed with documents of 4..64 concepts instead of full rows")
  parser.add_argument("--set", action="append", default=[],
                      help="config override FIELD=VALUE (e.g. model.scan_layers=False)")
  args = parser.parse_args()

  import importlib.util  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from lcm_jax import sharding, train  # pylint: disable=g-import-not-at-top
  from lcm_jax.models import flops as flops_lib  # pylint: disable=g-import-not-at-top

  path, _, variant = args.config.partition(":")
  spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(variant) if variant else module.get_config()
  for item in args.set:
    key, value = item.split("=", 1)
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = type(node[leaf])(eval(value)) if not isinstance(node[leaf], str) else value  # pylint: disable=eval-used
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 1, 1

  s = train.setup(config, devices=jax.devices()[:1])
  state = train.init_state(s)
  step = train.make_train_step(s)
  b, l, d = config.data.global_batch_size, config.data.seq_len, s.model_cfg.sonar_embed_dim
  rng = np.random.default_rng(0)
  if args.packed:
    seg, pos = _packed_rows(rng, b, l, 4, 64)
  else:
    seg = np.ones((b, l), np.int32)
    pos = np.tile(np.arange(l, dtype=np.int32), (b, 1))
  target = ((seg > 0) & (pos > 0)).astype(np.float32)
  batch = sharding.global_batch_from_local(
      {"embeddings": rng.standard_normal((b, l, d), dtype=np.float32), "segment_ids": seg,
       "positions": pos, "target_mask": target}, s.mesh)

  holder = {"state": state}

  def run_step():
    holder["state"], m = step(holder["state"], batch)
    return m["loss"]

  dm, ffn = s.model_cfg.model_dim, s.model_cfg.swiglu_inner_dim
  x = jnp.asarray(rng.standard_normal((b * l, dm), dtype=np.float32)).astype(s.model_cfg.compute_dtype())
  w1 = jnp.asarray(rng.standard_normal((dm, dm), dtype=np.float32)).astype(x.dtype)
  w2 = jnp.asarray(rng.standard_normal((dm, ffn), dtype=np.float32)).astype(x.dtype)
  mm = jax.jit(lambda x, w1, w2: (x @ w1).sum() + (x @ w2).sum())
  mm_flops = 2 * b * l * dm * (dm + ffn)

  t0 = time.perf_counter()
  jax.block_until_ready(run_step())
  compile_s = time.perf_counter() - t0
  jax.block_until_ready(mm(x, w1, w2))

  step_flops = flops_lib.train_flops_per_concept(s.model_cfg, l) * b * l
  real = float((seg > 0).sum())
  step_times, mm_times = [], []
  for _ in range(args.repeats):
    mm_times.append(_time(lambda: mm(x, w1, w2), args.iters * 4))
    step_times.append(_time(run_step, args.iters))
  st, mt = statistics.median(step_times), statistics.median(mm_times)
  step_rate, mm_rate = step_flops / st, mm_flops / mt
  ratios = sorted((step_flops / a) / (mm_flops / c) for a, c in zip(step_times, mm_times))
  print(f"device                {jax.devices()[0].device_kind} ({jax.default_backend()}), "
        f"compute dtype {s.model_cfg.compute_dtype().__name__ if hasattr(s.model_cfg.compute_dtype(), '__name__') else s.model_cfg.compute_dtype()}")
  print(f"config                {args.config} d={dm} layers={s.model_cfg.num_layers} heads="
        f"{s.model_cfg.num_heads} ffn={ffn} batch={b}x{l} packed={args.packed} overrides={args.set}")
  print(f"compile               {compile_s:.1f} s")
  print(f"step time (median)    {st * 1e3:.1f} ms over {args.repeats} rounds x {args.iters} steps")
  print(f"concepts/s            {real / st:,.0f} real ({b * l / st:,.0f} incl. padding)")
  print(f"model FLOP/s          {step_rate / 1e9:.1f} GFLOP/s ({step_flops / 1e9:.1f} GFLOP/step)")
  print(f"matmul FLOP/s         {mm_rate / 1e9:.1f} GFLOP/s (median, same run)")
  print(f"ratio step/matmul     {step_rate / mm_rate:.3f} (per-round min {ratios[0]:.3f}, "
        f"max {ratios[-1]:.3f})")


if __name__ == "__main__":
  main()
