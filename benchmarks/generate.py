r"""Generation throughput: generated concepts/s with the KV cache, both families, tiny and bench.

  .venv/bin/python benchmarks/generate.py                 # the 4 configs below, paper sampler
  .venv/bin/python benchmarks/generate.py --configs=configs/two_tower_1b6.py:tiny --rounds=1
  .venv/bin/python benchmarks/generate.py --configs=configs/mse_1b6.py --batch=56 \
      --set model.dtype=bfloat16 --json=gen.json       # the 1.6B shape, bf16, figures as JSON

Default configs: configs/mse_1b6.py and configs/two_tower_1b6.py, each ``:tiny`` and ``:bench``.
For each config: randomly initialised weights (lcm_jax.train.init_state), ``--batch`` random
prompts of ``--prompt_len`` concepts, ``--max_len`` concepts generated per prompt by
lcm_jax.generate.Generator (one jitted ``lax.while_loop``) with every early stop off (no
end-of-text vector, no repetition threshold, ``min_gen_len = max_len``), so every row generates
exactly ``max_len`` concepts (checked). Two-Tower: DDIM with ``--num_steps`` (default 40; the
reference's ``trailing_reference`` spacing then visits 50 of the 100 timesteps) and classifier-free
guidance ``--guidance_scale`` (default 3: the conditional and unconditional halves run as one
batch of 2B); the other sampler settings are lcm_jax.diffusion.SamplerConfig's defaults.

Timing: one warm-up call (compile + one full generation, reported as ``compile``), then
``--rounds`` rounds, each ``--matmul_iters`` plain matmuls followed by ONE full generation call
(prefill + ``max_len`` concepts, results fetched to the host); medians over rounds, one device.

Printed per config (one line):
  * concepts/s: ``batch * max_len`` / generation time; ms/concept is its inverse; ms/step is the
    time per concept step (one new concept for every row), i.e. generation time / ``max_len``;
  * Two-Tower: denoiser evaluations/s = concepts/s x visited timesteps x halves (2 with
    guidance): one evaluation = one query through the denoiser;
  * GFLOP/concept: model FLOPs of the whole call (prefill included) / generated concepts, counted
    as the family's ``generation_flops`` says (forward only: 2 x matmul parameters per row processed plus
    the attention score and value products over every cache slot the dense kernel reads);
  * model GFLOP/s, the plain-matmul GFLOP/s measured in the same run and their ratio (median
    rates; per-round min..max of the ratio), as in benchmarks/train_step.py. The matmul is the
    train-step reference ((R x d) @ (d x d) + (R x d) @ (d x ffn), R = the config's
    batch x seq_len rows, compute dtype) unless ``--matmul_rows`` is given. Decoding runs on a
    few rows at a time, so the ratio is expected to be far below the train step's.

``--json=PATH`` also writes these figures, one entry per config (benchmarks/device_check.sh reads
them).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # pylint: disable=g-import-not-at-top,wrong-import-position

DEFAULT_CONFIGS = ("configs/mse_1b6.py:tiny", "configs/two_tower_1b6.py:tiny",
                   "configs/mse_1b6.py:bench", "configs/two_tower_1b6.py:bench")


def bench_one(spec: str, args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
  """Times generation for one config; returns its result line and its figures."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from lcm_jax import diffusion, generate, sharding, train  # pylint: disable=g-import-not-at-top

  config = common.load_config(spec, args.set)
  s = train.setup(config, devices=jax.devices()[:1])
  state = train.init_state(s)
  variables = {"params": state["params"], "buffers": state["buffers"]}
  del state  # the optimizer state is not needed
  cfg = s.model_cfg
  family = s.family
  sampler = diffusion.SamplerConfig(num_steps=args.num_steps, guidance_scale=args.guidance_scale)
  visited, halves = 0, 1
  if family.samples:
    sampler.validate(cfg.num_diffusion_train_steps)
    visited = len(diffusion.ddim_timesteps(cfg.num_diffusion_train_steps, sampler.num_steps,
                                           sampler.timestep_spacing))
    halves = 2 if sampler.guidance_scale != 1.0 else 1
  gen_cfg = generate.GenerationConfig(max_len=args.max_len, min_gen_len=args.max_len,
                                      repetition_threshold=None)
  generator = generate.Generator(s.model, gen_cfg, sampler=sampler, eot_vector=None)
  rng = np.random.default_rng(0)
  prompts = jnp.asarray(rng.standard_normal((args.batch, args.prompt_len, cfg.sonar_embed_dim),
                                            dtype=np.float32))
  lengths = jnp.full((args.batch,), args.prompt_len, jnp.int32)
  key = jax.random.PRNGKey(0)

  def run():
    with sharding.activate(s.mesh):
      return generator(variables, prompts, lengths, rng=key)

  t0 = time.perf_counter()
  result = run()
  compile_s = time.perf_counter() - t0
  if not np.all(result.lengths == args.max_len):
    raise RuntimeError(f"{spec}: rows stopped early: lengths {result.lengths}, reasons "
                       f"{result.reason_names()}")
  rows = args.matmul_rows or config.data.global_batch_size * config.data.seq_len
  matmul = common.MatmulReference(cfg, rows, rng)
  gen_times, mm_times = common.interleaved_rounds(args.rounds, run, 1, matmul, args.matmul_iters,
                                                  model_warmup=False)
  flops = family.generation_flops(cfg, args.batch, args.prompt_len, args.max_len, visited, halves)
  gt, mt = statistics.median(gen_times), statistics.median(mm_times)
  concepts = args.batch * args.max_len
  rate, mm_rate = flops / gt, matmul.flops / mt
  lo, hi = common.ratio_range(flops, gen_times, matmul.flops, mm_times)
  evals = f"{concepts * visited * halves / gt:>10,.0f}" if family.samples else f"{'-':>10}"
  line = (f"{spec:31} {concepts / gt:>10,.1f} {1e3 * gt / concepts:>9.3f} "
          f"{1e3 * gt / args.max_len:>9.1f} {evals} {flops / concepts / 1e9:>11.4f} "
          f"{rate / 1e9:>8.2f} {mm_rate / 1e9:>8.1f} {rate / mm_rate:>7.4f} "
          f"({lo:.4f}..{hi:.4f})  {compile_s:.1f} s  [matmul rows {rows}]")
  figures = {
      "config": spec, "family": cfg.family, "model": common.describe_model(cfg),
      "dtype": common.dtype_name(cfg),
      "attention_impl": (config.model.get("attention_impl")
                         if "attention_impl" in config.model else None),
      "batch": args.batch, "prompt_len": args.prompt_len, "max_len": args.max_len,
      "num_steps": args.num_steps if family.samples else None,
      "guidance_scale": args.guidance_scale if family.samples else None,
      "visited_timesteps": visited if family.samples else None, "halves": halves,
      "rounds": args.rounds, "compile_s": compile_s, "generation_time_s": gt,
      "generation_times_s": gen_times, "concepts_per_s": concepts / gt,
      "ms_per_concept": 1e3 * gt / concepts, "ms_per_step": 1e3 * gt / args.max_len,
      "denoiser_evals_per_s": concepts * visited * halves / gt if family.samples else None,
      "flops_per_concept": flops / concepts, "model_flops_per_s": rate,
      "matmul_flops_per_s": mm_rate, "matmul_rows": rows, "ratio": rate / mm_rate,
      "ratio_min": lo, "ratio_max": hi}
  return line, figures


def main(argv: Optional[Sequence[str]] = None) -> list[dict[str, Any]]:
  """Times every config of ``--configs``; returns (and with ``--json`` writes) the figures."""
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                      help="comma-separated config files[:variant] (default: the 4 above)")
  parser.add_argument("--batch", type=int, default=8,
                      help="prompts generated together (default %(default)s)")
  parser.add_argument("--prompt_len", type=int, default=16,
                      help="concepts per prompt (default %(default)s)")
  parser.add_argument("--max_len", type=int, default=16,
                      help="concepts generated per prompt, all of them (default %(default)s)")
  parser.add_argument("--num_steps", type=int, default=40,
                      help="Two-Tower: requested DDIM steps (default %(default)s)")
  parser.add_argument("--guidance_scale", type=float, default=3.0,
                      help="Two-Tower: classifier-free guidance scale; 1 = conditional half only "
                      "(default %(default)s)")
  parser.add_argument("--rounds", type=int, default=3,
                      help="timed generation calls, interleaved with the matmul; medians "
                      "reported (default %(default)s)")
  parser.add_argument("--matmul_iters", type=int, default=12,
                      help="plain matmuls timed per round (default %(default)s)")
  parser.add_argument("--matmul_rows", type=int, default=0,
                      help="rows R of the matmul reference; 0 = the config's batch x seq_len, as "
                      "in train_step.py (default %(default)s)")
  parser.add_argument("--set", action="append", default=[],
                      help="config override FIELD=VALUE applied to every config, repeatable (e.g. "
                      "model.dtype=bfloat16)")
  parser.add_argument("--json", default="",
                      help="also write the figures to this JSON file: the device, the flags and "
                      "one entry per config (default: none)")
  args = parser.parse_args(argv)
  for name in ("batch", "prompt_len", "max_len", "rounds", "matmul_iters"):
    if getattr(args, name) < 1:
      parser.error(f"--{name}: expected >= 1, got {getattr(args, name)}")
  if args.matmul_rows < 0:
    parser.error(f"--matmul_rows: expected >= 0, got {args.matmul_rows}")

  import jax  # pylint: disable=g-import-not-at-top
  print(f"device {jax.devices()[0].device_kind} ({jax.default_backend()}); batch {args.batch} x "
        f"prompt {args.prompt_len} -> {args.max_len} concepts per row; Two-Tower: {args.num_steps} "
        f"DDIM steps, guidance {args.guidance_scale}; medians of {args.rounds} rounds")
  print(f"{'config':31} {'concepts/s':>10} {'ms/concept':>9} {'ms/step':>9} {'den.eval/s':>10} "
        f"{'GFLOP/conc':>11} {'GFLOP/s':>8} {'mm GF/s':>8} {'ratio':>7} (per-round)  compile")
  results = []
  for spec in args.configs.split(","):
    line, figures = bench_one(spec.strip(), args)
    print(line, flush=True)
    results.append(figures)
    if args.json:  # rewritten after every config: a run cut short keeps what it measured
      common.write_json(args.json, {"kind": "generate", "overrides": list(args.set),
                                    "results": results, **common.environment()})
  return results


if __name__ == "__main__":
  main()
