r"""Train-step benchmark: a config's step next to a plain matmul, timed in the same run.

  .venv/bin/python benchmarks/train_step.py                      # Base-LCM bench config
  .venv/bin/python benchmarks/train_step.py --rounds=7 --packed  # + realistic document lengths
  .venv/bin/python benchmarks/train_step.py --config=configs/two_tower_1b6.py:bench  # Two-Tower

Prints step time, concepts/s, achieved model FLOP/s and the ratio to the FLOP/s of plain jnp
matmuls of the config's size class ((B*L x d) @ (d x d) and (B*L x d) @ (d x ffn), d = model_dim,
ffn = the SwiGLU inner dim, compute dtype; benchmarks/common.py), measured interleaved with the
step so machine noise hits both. Medians over ``--rounds`` rounds; one device.

Model FLOPs (the family's train_flops_per_concept, lcm_jax.families): 6 x matmul parameters per concept
plus the attention score and value products (x3 for forward + backward), counted on all
positions of every row (see that module's docstring). Two-Tower: as executed with the exact
shortcuts (no denoiser q/k projections or self-attention products; the timestep embedding and
modulators on the (T, d) table once per step, amortised over the step's B*L concepts).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # pylint: disable=g-import-not-at-top,wrong-import-position


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
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="configs/mse_1b6.py:bench",
                      help="config file[:variant], either family (default %(default)s; e.g. "
                      "configs/two_tower_1b6.py:bench)")
  parser.add_argument("--rounds", "--repeats", dest="rounds", type=int, default=5,
                      help="interleaved rounds, medians reported (default %(default)s)")
  parser.add_argument("--iters", type=int, default=3,
                      help="steps timed per round; the matmul is timed 4x as often "
                      "(default %(default)s)")
  parser.add_argument("--packed", action="store_true",
                      help="rows packed with documents of 4..64 concepts instead of full rows")
  parser.add_argument("--set", action="append", default=[],
                      help="config override FIELD=VALUE, repeatable (e.g. model.scan_layers=False)")
  args = parser.parse_args()

  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from lcm_jax import sharding, train  # pylint: disable=g-import-not-at-top

  config = common.load_config(args.config, args.set)
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

  matmul = common.MatmulReference(s.model_cfg, b * l, rng)

  t0 = time.perf_counter()
  jax.block_until_ready(run_step())
  compile_s = time.perf_counter() - t0

  # rows_per_step: a per-step cost (the Two-Tower's timestep table), amortised over the step.
  step_flops = s.family.train_flops_per_concept(s.model_cfg, l, rows_per_step=b) * b * l
  real = float((seg > 0).sum())
  step_times, mm_times = common.interleaved_rounds(args.rounds, run_step, args.iters, matmul,
                                                   args.iters * 4)
  st, mt = statistics.median(step_times), statistics.median(mm_times)
  step_rate, mm_rate = step_flops / st, matmul.flops / mt
  lo, hi = common.ratio_range(step_flops, step_times, matmul.flops, mm_times)
  print(f"device                {common.device_line(s.model_cfg)}")
  print(f"config                {args.config} {common.describe_model(s.model_cfg)} batch={b}x{l} "
        f"packed={args.packed} overrides={args.set}")
  print(f"compile               {compile_s:.1f} s")
  print(f"step time (median)    {st * 1e3:.1f} ms over {args.rounds} rounds x {args.iters} steps")
  print(f"concepts/s            {real / st:,.0f} real ({b * l / st:,.0f} incl. padding)")
  print(f"model FLOP/s          {step_rate / 1e9:.1f} GFLOP/s ({step_flops / 1e9:.1f} GFLOP/step)")
  print(f"matmul FLOP/s         {mm_rate / 1e9:.1f} GFLOP/s (median, same run)")
  print(f"ratio step/matmul     {step_rate / mm_rate:.3f} (per-round min {lo:.3f}, max {hi:.3f})")


if __name__ == "__main__":
  main()
