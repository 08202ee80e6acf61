r"""Where a train step's time goes on this machine: a jax.profiler trace, grouped by model part.

  .venv/bin/python benchmarks/profile_step.py                          # Base-LCM bench
  .venv/bin/python benchmarks/profile_step.py --config=configs/two_tower_1b6.py:bench
  .venv/bin/python benchmarks/profile_step.py --config=configs/mse_1b6.py:bench \
      --config=configs/two_tower_1b6.py:bench --plot=docs/train_step_profile.png

Traces ``--steps`` train steps of the config (after a warm-up step), reads the XSpace file the
profiler wrote (a minimal protobuf reader below, no TensorFlow needed) and sums the duration of
every executed XLA op (CPU: one event per thunk; GPU: one per kernel). Each op is mapped to its
HLO instruction in the compiled step and put in a category from the instruction's opcode and the
``op_name`` metadata (the Flax module path and the JAX primitive that produced it):
matmul, attention (scores/softmax/values), dropout (mask and apply), norm, rope, SwiGLU activation,
AdaLN gather/modulation, optimizer,
loss, other elementwise, copies/transposes. Times are summed over threads, so on a
multi-threaded CPU they can add up to more than the step's wall time: the table gives shares.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # pylint: disable=g-import-not-at-top,wrong-import-position


# ----------------------------------------------------------------------------------------------
# A minimal reader of the profiler's XSpace protobuf (the fields used here only).

def _varint(buf: bytes, i: int) -> tuple[int, int]:
  value = shift = 0
  while True:
    byte = buf[i]
    i += 1
    value |= (byte & 0x7F) << shift
    shift += 7
    if byte < 0x80:
      return value, i


def _fields(buf: bytes):
  """Yields (field number, value) of one message: ints for varints, bytes otherwise."""
  i, n = 0, len(buf)
  while i < n:
    key, i = _varint(buf, i)
    number, wire = key >> 3, key & 7
    if wire == 0:
      value, i = _varint(buf, i)
    elif wire == 1:
      value, i = buf[i:i + 8], i + 8
    elif wire == 2:
      size, i = _varint(buf, i)
      value, i = buf[i:i + size], i + size
    elif wire == 5:
      value, i = buf[i:i + 4], i + 4
    else:
      raise ValueError(f"unsupported protobuf wire type {wire}")
    yield number, value


def read_xspace(path: str) -> list[dict]:
  """[{name, events: [(event name, line name, duration_ps)]}] per plane of an .xplane.pb."""
  with open(path, "rb") as f:
    data = f.read()
  planes = []
  for number, plane_buf in _fields(data):
    if number != 1:  # XSpace.planes
      continue
    name, names, lines = "", {}, []
    for pf, pv in _fields(plane_buf):
      if pf == 2:  # XPlane.name
        name = pv.decode()
      elif pf == 4:  # XPlane.event_metadata: map<int64, XEventMetadata>
        key, meta_name = None, ""
        for ef, ev in _fields(pv):
          if ef == 1:
            key = ev
          elif ef == 2:
            for mf, mv in _fields(ev):
              if mf == 2:
                meta_name = mv.decode(errors="replace")
        names[key] = meta_name
      elif pf == 3:  # XPlane.lines
        line_name, events = "", []
        for lf, lv in _fields(pv):
          if lf == 2:
            line_name = lv.decode(errors="replace")
          elif lf == 4:  # XLine.events
            meta_id = duration = 0
            for xf, xv in _fields(lv):
              if xf == 1:
                meta_id = xv
              elif xf == 3:
                duration = xv
            events.append((meta_id, duration))
        lines.append((line_name, events))
    planes.append({"name": name, "events": [(names.get(m, str(m)), ln, d)
                                            for ln, evs in lines for m, d in evs]})
  return planes


# ----------------------------------------------------------------------------------------------
# HLO instructions and categories

_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = [^=]*? ([\w\-]+)\(")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_COMP = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")


def hlo_instructions(text: str) -> dict[str, dict]:
  """name -> {opcode, op_names (own + fused body), computation} from compiled HLO text."""
  comps: dict[str, list[tuple[str, str, str]]] = {}
  current = None
  for line in text.splitlines():
    m = _COMP.match(line)
    if m and "=" not in line.split("{")[0]:
      current = m.group(1)
      comps[current] = []
      continue
    m = _INSTR.match(line)
    if m and current is not None:
      op = _OP_NAME.search(line)
      calls = _CALLS.search(line)
      comps[current].append((m.group(1), m.group(2), op.group(1) if op else "",
                             calls.group(1) if calls else ""))
  out = {}
  for comp, instrs in comps.items():
    for name, opcode, op_name, calls in instrs:
      body = comps.get(calls, [])
      out[name] = {"opcode": opcode, "op_name": op_name,
                   "body_opcodes": [b[1] for b in body], "body_op_names": [b[2] for b in body]}
  return out


CATEGORIES = ("matmul", "attention matmuls", "attention softmax/mask", "dropout", "norm", "rope",
              "swiglu activation", "adaln gather/modulation", "loss", "scan slicing",
              "optimizer", "copy/transpose", "other elementwise")


def categorize(info: dict | None, event: str) -> str:
  """A category of :data:`CATEGORIES` for one executed op (see the module docstring)."""
  if info is None:
    return "other elementwise"
  own = info["op_name"]
  names = " ".join([own, *info["body_op_names"]])
  opcodes = {info["opcode"], *info["body_opcodes"]}
  if "dot" in opcodes or "convolution" in opcodes:
    if re.search(r"bqhd,bkhd|bhqk,bkhd|bqhd,bkhd", names):
      return "attention matmuls"
    return "matmul"
  if re.search(r"threefry|random_bits|rng_bit|_dropout/|/dropout/", names) or \
     "rng-bit-generator" in opcodes:
    return "dropout"
  if re.search(r"softmax|_attend/|dot_product_attention", own):
    return "attention softmax/mask"
  if re.search(r"RMSNorm|layer_norm|rsqrt", names):
    return "norm"
  if "rope" in names:
    return "rope"
  if "gather" in opcodes or "modulat" in names:
    return "adaln gather/modulation"
  if re.search(r"/ffn/(jit\(silu\)|mul)", own):
    return "swiglu activation"
  if own and "jvp(" not in own:  # outside the model's forward and backward
    return "optimizer"
  if re.search(r"loss", own):
    return "loss"
  if re.search(r"dynamic_slice|dynamic_update_slice", own):
    return "scan slicing"
  if opcodes <= {"copy", "transpose", "bitcast", "parameter", "fusion"}:
    return "copy/transpose"
  return "other elementwise"


def profile_config(spec: str, overrides: list[str], steps: int, top: int,
                   trace_dir: str) -> dict[str, float]:
  """Traces ``steps`` train steps of ``spec``, prints the breakdown; returns seconds per category
  (op time per step, summed over threads) plus ``"wall"`` (the traced steps' wall time)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from benchmarks import train_step  # pylint: disable=g-import-not-at-top

  config = common.load_config(spec, overrides)
  stepper = train_step.Stepper(config)
  s = stepper.setup
  b, l = config.data.global_batch_size, config.data.seq_len
  seg = np.ones((b, l), np.int32)
  pos = np.tile(np.arange(l, dtype=np.int32), (b, 1))
  batch = stepper.device_batch(seg, pos, ((seg > 0) & (pos > 0)).astype(np.float32),
                               np.random.default_rng(0))
  instrs = hlo_instructions(stepper.hlo_text(batch))
  jax.block_until_ready(stepper(batch))

  trace_dir = trace_dir or tempfile.mkdtemp(prefix="lcm_profile_")
  jax.profiler.start_trace(trace_dir)
  t0 = time.perf_counter()
  for _ in range(steps):
    loss = stepper(batch)
  jax.block_until_ready(loss)
  wall = (time.perf_counter() - t0) / steps
  jax.profiler.stop_trace()
  paths = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True),
                 key=os.path.getmtime)
  if not paths:
    raise SystemExit(f"error: no .xplane.pb under {trace_dir}")

  per_op: dict[str, float] = collections.Counter()
  for plane in read_xspace(paths[-1]):
    for name, line, dur in plane["events"]:
      if name in instrs and not line.startswith("python"):
        per_op[name] += dur * 1e-12 / steps
  per_cat: dict[str, float] = collections.Counter()
  for name, sec in per_op.items():
    per_cat[categorize(instrs.get(name), name)] += sec
  total = sum(per_cat.values())
  print(f"config          {spec} {common.describe_model(s.model_cfg)} batch={b}x{l} "
        f"overrides={overrides}")
  print(f"step wall time  {wall:.2f} s (traced, {steps} steps); op time summed over threads "
        f"{total:.2f} s/step; trace in {trace_dir}")
  print(f"{'category':28s} {'s/step':>8s} {'share':>7s}")
  for cat in sorted(per_cat, key=per_cat.get, reverse=True):
    print(f"{cat:28s} {per_cat[cat]:8.3f} {per_cat[cat] / total:7.1%}")
  ranked = sorted(per_op.items(), key=lambda kv: -kv[1])
  others = [kv for kv in ranked if "matmul" not in categorize(instrs.get(kv[0]), kv[0])]
  for title, rows in ((f"top {top} ops", ranked), (f"top {top} ops that are not matmuls", others)):
    print(f"\n{title}")
    for name, sec in rows[:top]:
      info = instrs.get(name, {})
      print(f"{sec:8.3f} s {sec / total:6.1%} {categorize(info, name):26s} {name:28s} "
            f"{info.get('opcode', '?'):10s} {(info.get('op_name') or '')[-90:]}")
  print(flush=True)
  return dict(per_cat, wall=wall)


def plot(results: dict[str, dict[str, float]], path: str) -> None:
  """One horizontal bar per config: its op time split into the categories, as shares."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, ax = plt.subplots(figsize=(11, 2.6 + 0.5 * len(results)))
  colors = plt.get_cmap("tab20").colors
  labels, labelled = list(results), set()
  for row, label in enumerate(labels):
    cats = {k: v for k, v in results[label].items() if k != "wall"}
    total, left = sum(cats.values()), 0.0
    for i, cat in enumerate(CATEGORIES):
      share = cats.get(cat, 0.0) / total
      if share <= 0:
        continue
      ax.barh(row, share, left=left, color=colors[i % len(colors)],
              label=None if cat in labelled else cat)
      labelled.add(cat)
      if share >= 0.03:
        ax.text(left + share / 2, row, f"{share:.0%}", ha="center", va="center", fontsize=8)
      left += share
  ax.set_yticks(range(len(labels)), labels)
  ax.set_xlim(0, 1)
  ax.set_xlabel("share of the train step's op time (jax.profiler trace, CPU)")
  ax.invert_yaxis()
  ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
  fig.tight_layout()
  fig.savefig(path, dpi=120, bbox_inches="tight")
  print(f"wrote {path}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", action="append", default=[],
                      help="config file[:variant], repeatable (default configs/mse_1b6.py:bench)")
  parser.add_argument("--steps", type=int, default=2, help="traced steps (default %(default)s)")
  parser.add_argument("--top", type=int, default=25, help="ops listed (default %(default)s)")
  parser.add_argument("--set", action="append", default=[],
                      help="config override FIELD=VALUE for every config, repeatable (e.g. "
                      "model.scan_layers=True)")
  parser.add_argument("--trace_dir", default="", help="where the traces go (default: temp dirs)")
  parser.add_argument("--plot", default="",
                      help="also draw the category shares of every config into this PNG")
  args = parser.parse_args()
  results = {}
  for spec in args.config or ["configs/mse_1b6.py:bench"]:
    results[spec] = profile_config(spec, args.set, args.steps, args.top, args.trace_dir)
  if args.plot:
    plot(results, args.plot)


if __name__ == "__main__":
  main()
