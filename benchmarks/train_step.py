r"""Train-step benchmark: a config's step next to a plain matmul, timed in the same run.

  .venv/bin/python benchmarks/train_step.py                      # Base-LCM bench config
  .venv/bin/python benchmarks/train_step.py --rounds=7 --packed  # + realistic document lengths
  .venv/bin/python benchmarks/train_step.py --config=configs/two_tower_1b6.py:bench  # Two-Tower
  .venv/bin/python benchmarks/train_step.py --json=step.json --peak_tflops=989.4     # + MFU, JSON
  .venv/bin/python benchmarks/train_step.py --compare_padding --docs=120 --iters=1  # packed/padded

Prints step time, concepts/s, achieved model FLOP/s and the ratio to the FLOP/s of plain jnp
matmuls of the config's size class ((B*L x d) @ (d x d) and (B*L x d) @ (d x ffn), d = model_dim,
ffn = the SwiGLU inner dim, compute dtype; benchmarks/common.py), measured interleaved with the
step so machine noise hits both. Medians over ``--rounds`` rounds; one device. Where the chip's
dense peak is known (lcm_jax.metrics.PEAK_FLOPS, the config's ``train.peak_flops`` or
``--peak_tflops``) also MFU = model FLOP/s / peak. ``--json=PATH`` writes the same figures as JSON.

Model FLOPs (the family's train_flops_per_concept, lcm_jax.families): 6 x matmul parameters per concept
plus the attention score and value products (x3 for forward + backward), counted on all
positions of every row (see that module's docstring). Two-Tower: as executed with the exact
shortcuts (no denoiser q/k projections or self-attention products; the timestep embedding and
modulators on the (T, d) table once per step, amortised over the step's B*L concepts).

``--compare_padding``: real (non-padding) concepts/s of two ways to batch the same documents, on
the same model in one run:

* packed (ours): documents wrapped into pieces of <= ``data.max_doc_len`` concepts and first-fit
  packed into rows of ``data.seq_len`` with segment ids, by the training pipeline's own packer
  (lcm_jax.data's ``_pack`` + ``_collate``, Grain's FirstFitPackIterDataset with the training
  run's number of bins), fed the documents from memory; every batch is ``B x seq_len``;
* padded (the reference's strategy): the same pieces, sorted by length within pools of
  ``--pool`` pieces (default: the whole sample), cut into batches of ``B`` rows (one piece per
  row), each batch padded to its longest piece, so batches are ``B x L`` with varying ``L``.

Document lengths (concepts = sentences per document), ``--doc_lengths``:

* ``lognormal`` (default): round(exp(N(ln ``--doc_median``, ``--doc_sigma``^2))) clipped to
  [``--doc_min``, ``--doc_max``]; defaults median 24, sigma 1.0, [2, 2048], i.e. mean ~40 and ~4-5%
  of documents longer than 128 concepts. Why: the pre-training corpora are web pages and
  Wikipedia-like articles split into sentences, whose lengths are right-skewed with a median of a
  few tens of sentences and a long tail of long articles; a log-normal is the usual shape for
  document lengths. The parameters are an assumption of that shape, not a fit to a corpus in this
  repository: change them with the flags;
* ``synthetic``: uniform in [4, 40], the lengths lcm_jax.synthetic draws by default (the tiny
  runs' corpus).

Timing: every distinct batch shape is compiled (and run once) first; compile time is reported
but excluded. Then ``--rounds`` rounds, each timing both strategies (their order alternating from
round to round): by default one representative batch per distinct shape (the first of that
shape), ``--iters`` steps each, weighted by how many batches have that shape; with
``--time_every_batch`` every batch is timed. A strategy's real concepts/s in a round = all real
concepts of the sample / its total step time for the sample. A partial last batch is charged by
its rows (rows used / B of a step): in a longer run those rows would carry the next documents;
padding fractions count the same rows. Printed: medians over rounds, per-round range, padding
fraction, number of shapes, compile time, and the ratio packed / padded.

The sample is also the padded strategy's sorting pool, so a small sample overstates its padding:
with the default lengths, 128-concept rows and 16 rows per batch its padding is 15% at 120
documents, 2.4% at 1,000 and 0.2% at 10,000 (packed: 4.4%, 2.4%, 1.7%), while it always runs
~3.2-3.6x as many steps as packing (one piece per row) and needs more shapes compiled (8, 51, 117).
The default sample (120 documents: 8 + 1 shapes) keeps the bench config under ~10 minutes on a
2-core CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import statistics
import sys
import time
from typing import Any, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # pylint: disable=g-import-not-at-top,wrong-import-position

DOC_LENGTHS = ("lognormal", "synthetic")


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


# ----------------------------------------------------------------------------------------------
# Documents and the two batching strategies (NumPy only)


@dataclasses.dataclass
class Rows:
  """One batch's layout: ``segment_ids`` / ``positions`` / ``target_mask`` (B, L) arrays."""
  segment_ids: Any
  positions: Any
  target_mask: Any

  @property
  def length(self) -> int:
    """L, concepts per row."""
    return int(self.segment_ids.shape[1])

  @property
  def real(self) -> int:
    """Non-padding concepts."""
    return int((self.segment_ids > 0).sum())

  @property
  def rows_used(self) -> int:
    """Rows holding at least one real concept."""
    return int((self.segment_ids > 0).any(axis=1).sum())


def document_lengths(kind: str, num_docs: int, rng: Any, median: float = 24.0,
                     sigma: float = 1.0, min_len: int = 2, max_len: int = 2048) -> Any:
  """``num_docs`` document lengths in concepts (int64), drawn as the module docstring says."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  if kind == "lognormal":
    raw = np.round(rng.lognormal(np.log(median), sigma, num_docs))
    return np.clip(raw, min_len, max_len).astype(np.int64)
  if kind == "synthetic":
    from lcm_jax import synthetic  # pylint: disable=g-import-not-at-top
    lo, hi = synthetic.DEFAULTS["min_len"], synthetic.DEFAULTS["max_len"]
    return rng.integers(lo, hi + 1, num_docs).astype(np.int64)
  raise ValueError(f"document lengths {kind!r}: expected one of {DOC_LENGTHS}")


def wrap_lengths(lengths: Sequence[int], max_doc_len: int) -> list[int]:
  """Piece lengths of the documents wrapped at ``max_doc_len`` concepts, in document order."""
  pieces = []
  for n in lengths:
    n = int(n)
    pieces.extend([max_doc_len] * (n // max_doc_len))
    if n % max_doc_len:
      pieces.append(n % max_doc_len)
  return pieces


def packed_batches(lengths: Sequence[int], config: Any, rows: int) -> list[Rows]:
  """The documents through the training pipeline's wrap + first-fit packer, batches of ``rows``.

  ``config.data`` gives ``seq_len``, ``max_doc_len`` and the number of packing bins (as in
  training: lcm_jax.data); the documents are fed from memory with 1-dim embeddings (only the
  layout matters here).
  """
  import grain  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from lcm_jax import data  # pylint: disable=g-import-not-at-top
  docs = [{"embeddings": np.zeros((int(n), 1), np.float32), "source_len": np.int64(0)}
          for n in lengths]
  ds = grain.MapDataset.source(docs).to_iter_dataset()
  # The pipeline's own packing (lcm_jax.data._train_stream's last two steps).
  ds = data._pack(ds, config, data._packing_bins(config, rows))  # pylint: disable=protected-access
  ds = ds.batch(rows, batch_fn=functools.partial(data._collate,  # pylint: disable=protected-access
                                                 batch_size=rows))
  return [Rows(b["segment_ids"], b["positions"], b["target_mask"]) for b in ds]


def padded_batches(pieces: Sequence[int], rows: int, pool: int = 0) -> list[Rows]:
  """The reference's batching: pieces sorted by length within pools of ``pool`` pieces (0 = all),
  cut into batches of ``rows`` pieces (one per row), each padded to its longest piece."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  pool = pool if pool > 0 else max(len(pieces), 1)
  out = []
  for start in range(0, len(pieces), pool):
    chunk = sorted(int(n) for n in pieces[start:start + pool])
    for b0 in range(0, len(chunk), rows):
      lens = chunk[b0:b0 + rows]
      length = max(lens)
      seg = np.zeros((rows, length), np.int32)
      pos = np.zeros((rows, length), np.int32)
      for i, n in enumerate(lens):
        seg[i, :n] = 1
        pos[i, :n] = np.arange(n)
      out.append(Rows(seg, pos, ((seg > 0) & (pos > 0)).astype(np.float32)))
  return out


def padding_fraction(batches: Sequence[Rows], rows: int) -> float:
  """1 - real / computed concepts, a batch computing ``rows_used x L`` (see the docstring)."""
  computed = sum(b.rows_used * b.length for b in batches)
  return 1.0 - sum(b.real for b in batches) / max(computed, 1)


def timing_plan(batches: Sequence[Rows], rows: int,
                every_batch: bool) -> list[tuple[Rows, float]]:
  """``(batch to time, weight)`` pairs whose weighted step times add up to the whole sample.

  The weight is the number of steps charged, ``rows_used / rows`` per batch; by default one
  representative per distinct length (the first) carries the weights of all its batches.
  """
  if every_batch:
    return [(b, b.rows_used / rows) for b in batches]
  plan: dict[int, list] = {}
  for b in batches:
    entry = plan.setdefault(b.length, [b, 0.0])
    entry[1] += b.rows_used / rows
  return [(b, w) for b, w in plan.values()]


# ----------------------------------------------------------------------------------------------
# The model


class Stepper:
  """The config's jitted train step on the first device; the state is carried from call to call."""

  def __init__(self, config: Any):
    import jax  # pylint: disable=g-import-not-at-top
    from lcm_jax import train  # pylint: disable=g-import-not-at-top
    self.config = config
    self.setup = train.setup(config, devices=jax.devices()[:1])
    self._state = train.init_state(self.setup)
    self._step = train.make_train_step(self.setup)

  def device_batch(self, seg: Any, pos: Any, target: Any, rng: Any,
                   zero_padding: bool = False) -> dict[str, Any]:
    """A global batch with standard-normal embeddings (zero on padding with ``zero_padding``)."""
    import numpy as np  # pylint: disable=g-import-not-at-top
    from lcm_jax import sharding  # pylint: disable=g-import-not-at-top
    b, l = seg.shape
    emb = rng.standard_normal((b, l, self.setup.model_cfg.sonar_embed_dim), dtype=np.float32)
    if zero_padding:
      emb *= (seg > 0)[..., None]
    return sharding.global_batch_from_local(
        {"embeddings": emb, "segment_ids": np.asarray(seg, np.int32),
         "positions": np.asarray(pos, np.int32), "target_mask": np.asarray(target, np.float32)},
        self.setup.mesh)

  def hlo_text(self, batch: dict[str, Any]) -> str:
    """The compiled step's optimized HLO for ``batch``'s shapes (benchmarks/profile_step.py)."""
    from lcm_jax import sharding  # pylint: disable=g-import-not-at-top
    with sharding.activate(self.setup.mesh):
      return self._step.jitted.lower(self._state, batch).compile().as_text()

  def __call__(self, batch: dict[str, Any]) -> Any:
    """One step on ``batch``; returns its loss (a device scalar, not waited for)."""
    self._state, metrics = self._step(self._state, batch)
    return metrics["loss"]


def _attention_impl(config: Any) -> Optional[str]:
  """``config.model.attention_impl`` where the config has that field, else None."""
  return config.model.get("attention_impl") if "attention_impl" in config.model else None


# ----------------------------------------------------------------------------------------------
# The default mode: one step shape next to the matmul


def bench_step(args: argparse.Namespace) -> dict[str, Any]:
  """Times the config's step interleaved with the matmul reference; prints and returns figures."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  config = common.load_config(args.config, args.set)
  stepper = Stepper(config)
  s = stepper.setup
  b, l = config.data.global_batch_size, config.data.seq_len
  rng = np.random.default_rng(0)
  if args.packed:
    seg, pos = _packed_rows(rng, b, l, 4, 64)
  else:
    seg = np.ones((b, l), np.int32)
    pos = np.tile(np.arange(l, dtype=np.int32), (b, 1))
  target = ((seg > 0) & (pos > 0)).astype(np.float32)
  batch = stepper.device_batch(seg, pos, target, rng)

  def run_step():
    return stepper(batch)

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
  peak, peak_source = common.peak_flops(args.peak_tflops, float(config.train.peak_flops))
  dtype = common.dtype_name(s.model_cfg)
  print(f"device                {common.device_line(s.model_cfg)}")
  print(f"config                {args.config} {common.describe_model(s.model_cfg)} batch={b}x{l} "
        f"packed={args.packed} overrides={args.set}")
  print(f"compile               {compile_s:.1f} s")
  print(f"step time (median)    {st * 1e3:.1f} ms over {args.rounds} rounds x {args.iters} steps")
  print(f"concepts/s            {real / st:,.0f} real ({b * l / st:,.0f} incl. padding)")
  print(f"model FLOP/s          {step_rate / 1e9:.1f} GFLOP/s ({step_flops / 1e9:.1f} GFLOP/step)")
  print(f"matmul FLOP/s         {mm_rate / 1e9:.1f} GFLOP/s (median, same run)")
  print(f"ratio step/matmul     {step_rate / mm_rate:.3f} (per-round min {lo:.3f}, max {hi:.3f})")
  if peak > 0:
    note = "" if dtype == "bfloat16" else f"; this run computes in {dtype}"
    print(f"MFU                   {step_rate / peak:.3f} of {peak / 1e12:.1f} TFLOP/s "
          f"({peak_source}{note}); matmul {mm_rate / peak:.3f} of peak")
  else:
    print(f"MFU                   n/a: {peak_source}")
  env = common.environment()
  return {
      "kind": "train_step", "config": args.config, "overrides": list(args.set),
      "family": s.model_cfg.family, "model": common.describe_model(s.model_cfg),
      "attention_impl": _attention_impl(config), "dtype": dtype,
      "dropout": float(s.model_cfg.dropout), "batch": b, "seq_len": l, "packed": args.packed,
      "rounds": args.rounds, "iters": args.iters, "compile_s": compile_s,
      "step_time_s": st, "step_times_s": step_times, "concepts_per_s": b * l / st,
      "real_concepts_per_s": real / st, "step_flops": step_flops, "model_flops_per_s": step_rate,
      "matmul_flops_per_s": mm_rate, "matmul_shape": matmul.shape_text(),
      "ratio": step_rate / mm_rate, "ratio_min": lo, "ratio_max": hi,
      "peak_flops": peak, "peak_source": peak_source,
      "mfu": step_rate / peak if peak > 0 else None,
      "matmul_fraction_of_peak": mm_rate / peak if peak > 0 else None, **env}


# ----------------------------------------------------------------------------------------------
# --compare_padding


def compare_padding(args: argparse.Namespace) -> dict[str, Any]:
  """Packed rows vs the reference's padded batches: prints the table and returns the figures."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  config = common.load_config(args.config, args.set)
  rows, seq_len = int(config.data.global_batch_size), int(config.data.seq_len)
  wrap = int(config.data.max_doc_len)
  if wrap > seq_len:
    raise SystemExit(f"error: --compare_padding: data.max_doc_len={wrap} > data.seq_len={seq_len};"
                     f" set --set data.max_doc_len={seq_len}")
  rng = np.random.default_rng(args.seed)
  lengths = document_lengths(args.doc_lengths, args.docs, rng, args.doc_median, args.doc_sigma,
                             args.doc_min, args.doc_max)
  pieces = wrap_lengths(lengths, wrap)
  total = int(lengths.sum())
  strategies = {"packed": packed_batches(lengths, config, rows),
                "padded": padded_batches(pieces, rows, args.pool)}
  for name, batches in strategies.items():
    got = sum(b.real for b in batches)
    if got != total:
      raise RuntimeError(f"{name}: batches hold {got} real concepts, the documents {total}")

  stepper = Stepper(config)
  s = stepper.setup
  plans = {name: timing_plan(batches, rows, args.time_every_batch)
           for name, batches in strategies.items()}
  device_plans, compile_s = {}, {}
  for name, plan in plans.items():
    device_plans[name] = [(stepper.device_batch(b.segment_ids, b.positions, b.target_mask, rng,
                                                zero_padding=True), w) for b, w in plan]
    compile_s[name] = 0.0
    seen = set()
    for (b, _), (batch, _) in zip(plan, device_plans[name]):
      t0 = time.perf_counter()
      jax.block_until_ready(stepper(batch))  # the first call of a shape compiles it
      if b.length not in seen:
        compile_s[name] += time.perf_counter() - t0
        seen.add(b.length)
    print(f"compiled {name}: {len(seen)} shape(s) in {compile_s[name]:.1f} s", flush=True)

  round_times = {name: [] for name in strategies}
  for r in range(args.rounds):
    order = list(strategies) if r % 2 == 0 else list(strategies)[::-1]
    for name in order:
      t = 0.0
      for batch, weight in device_plans[name]:
        t += weight * common.time_call(functools.partial(stepper, batch), args.iters,
                                       warmup=False)
      round_times[name].append(t)

  results = {}
  for name, batches in strategies.items():
    times = round_times[name]
    rates = sorted(total / t for t in times)
    lens = sorted({b.length for b in batches})
    results[name] = {
        "batches": len(batches), "shapes": len(lens), "lengths": lens,
        "steps_charged": sum(w for _, w in plans[name]),
        "rows_used": sum(b.rows_used for b in batches),
        "padding_fraction": padding_fraction(batches, rows),
        "compile_s": compile_s[name], "sample_time_s": statistics.median(times),
        "sample_times_s": times, "real_concepts_per_s": statistics.median(rates),
        "real_concepts_per_s_min": rates[0], "real_concepts_per_s_max": rates[-1]}
  ratios = sorted(p / q for p, q in zip(round_times["padded"], round_times["packed"]))
  ratio = statistics.median(ratios)

  dist = (f"log-normal median {args.doc_median:g} sigma {args.doc_sigma:g}, clipped to "
          f"[{args.doc_min}, {args.doc_max}]" if args.doc_lengths == "lognormal" else
          "uniform [4, 40] (lcm_jax.synthetic's default lengths)")
  over = int((lengths > wrap).sum())
  timed = "every batch" if args.time_every_batch else "one batch per shape, weighted"
  print(f"device               {common.device_line(s.model_cfg)}")
  print(f"config               {args.config} {common.describe_model(s.model_cfg)} "
        f"overrides={args.set}")
  print(f"documents            {args.docs} ({dist}), seed {args.seed}: {total:,} concepts, median "
        f"{int(np.median(lengths))}, mean {lengths.mean():.1f}, max {int(lengths.max())}; "
        f"{over} longer than {wrap} -> {len(pieces)} pieces of <= {wrap}")
  print(f"batches              {rows} rows each; packed rows of {seq_len}; padded pool "
        f"{args.pool or len(pieces)} pieces; timed: {timed}, {args.rounds} rounds x {args.iters} "
        "step(s), orders alternating")
  print(f"{'strategy':20} {'batches':>7} {'steps':>7} {'shapes':>6} {'L range':>9} {'padding':>8} "
        f"{'sample s':>9} {'real concepts/s (min..max)':>32} {'compile s':>9}")
  for name, label in (("packed", "packed (ours)"), ("padded", "padded (reference)")):
    r = results[name]
    span = f"{r['lengths'][0]}..{r['lengths'][-1]}"
    rate = (f"{r['real_concepts_per_s']:,.0f} ({r['real_concepts_per_s_min']:,.0f}.."
            f"{r['real_concepts_per_s_max']:,.0f})")
    print(f"{label:20} {r['batches']:>7} {r['steps_charged']:>7.2f} {r['shapes']:>6} {span:>9} "
          f"{100 * r['padding_fraction']:>7.1f}% {r['sample_time_s']:>9.2f} {rate:>32} "
          f"{r['compile_s']:>9.1f}")
  print(f"ratio packed/padded  {ratio:.3f} real concepts/s (per-round min {ratios[0]:.3f}, max "
        f"{ratios[-1]:.3f}); compile time excluded")
  return {
      "kind": "compare_padding", "config": args.config, "overrides": list(args.set),
      "family": s.model_cfg.family, "model": common.describe_model(s.model_cfg),
      "attention_impl": _attention_impl(config), "dtype": common.dtype_name(s.model_cfg),
      "rows": rows, "seq_len": seq_len, "max_doc_len": wrap, "doc_lengths": args.doc_lengths,
      "distribution": dist, "docs": args.docs, "seed": args.seed, "concepts": total,
      "pieces": len(pieces), "pool": args.pool or len(pieces), "rounds": args.rounds,
      "iters": args.iters, "time_every_batch": args.time_every_batch,
      "packed": results["packed"], "padded": results["padded"], "ratio_packed_over_padded": ratio,
      "ratio_min": ratios[0], "ratio_max": ratios[-1], **common.environment()}


# ----------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  """The command line (``argv``; default ``sys.argv[1:]``)."""
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="configs/mse_1b6.py:bench",
                      help="config file[:variant], either family (default %(default)s; e.g. "
                      "configs/two_tower_1b6.py:bench)")
  parser.add_argument("--rounds", "--repeats", dest="rounds", type=int, default=5,
                      help="interleaved rounds, medians reported (default %(default)s)")
  parser.add_argument("--iters", type=int, default=3,
                      help="steps timed per round (per shape with --compare_padding); the matmul "
                      "is timed 4x as often (default %(default)s)")
  parser.add_argument("--packed", action="store_true",
                      help="rows packed with documents of 4..64 concepts instead of full rows")
  parser.add_argument("--set", action="append", default=[],
                      help="config override FIELD=VALUE, repeatable (e.g. model.scan_layers=False, "
                      "model.dtype=bfloat16, data.global_batch_size=56)")
  parser.add_argument("--json", default="",
                      help="also write the figures to this JSON file (default: none)")
  parser.add_argument("--peak_tflops", type=float, default=0.0,
                      help="the device's dense peak in TFLOP/s for MFU; 0 = the config's "
                      "train.peak_flops, else lcm_jax.metrics' table (default %(default)s)")
  group = parser.add_argument_group("--compare_padding (packed rows vs the reference's padding)")
  group.add_argument("--compare_padding", action="store_true",
                     help="time packed rows against length-sorted padded batches of the same "
                     "documents (see above) instead of the default benchmark")
  group.add_argument("--docs", type=int, default=120,
                     help="documents in the sample (default %(default)s)")
  group.add_argument("--doc_lengths", choices=DOC_LENGTHS, default="lognormal",
                     help="document length distribution in concepts (default %(default)s)")
  group.add_argument("--doc_median", type=float, default=24.0,
                     help="lognormal: median length in concepts (default %(default)s)")
  group.add_argument("--doc_sigma", type=float, default=1.0,
                     help="lognormal: sigma of the log length (default %(default)s)")
  group.add_argument("--doc_min", type=int, default=2,
                     help="lognormal: shortest document, concepts (default %(default)s)")
  group.add_argument("--doc_max", type=int, default=2048,
                     help="lognormal: longest document, concepts (default %(default)s)")
  group.add_argument("--pool", type=int, default=0,
                     help="padded: pieces sorted by length together; 0 = the whole sample "
                     "(default %(default)s)")
  group.add_argument("--time_every_batch", action="store_true",
                     help="time every batch instead of one representative per shape")
  group.add_argument("--seed", type=int, default=0,
                     help="seed of the document lengths and embeddings (default %(default)s)")
  args = parser.parse_args(argv)
  for name in ("rounds", "iters", "docs", "doc_min"):
    if getattr(args, name) < 1:
      parser.error(f"--{name}: expected >= 1, got {getattr(args, name)}")
  if args.doc_max < args.doc_min:
    parser.error(f"--doc_max ({args.doc_max}) < --doc_min ({args.doc_min})")
  if args.doc_median <= 0 or args.doc_sigma < 0 or args.pool < 0 or args.peak_tflops < 0:
    parser.error("--doc_median must be > 0; --doc_sigma, --pool and --peak_tflops >= 0")
  return args


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  """Runs the benchmark the flags ask for; returns (and with ``--json`` writes) its figures."""
  args = parse_args(argv)
  result = compare_padding(args) if args.compare_padding else bench_step(args)
  if args.json:
    common.write_json(args.json, result)
  return result


if __name__ == "__main__":
  main()
