#!/usr/bin/env bash
# The prepared GPU check: train-step and generation throughput of the 1.6B recipes on one device.
#
#   bash benchmarks/device_check.sh                      # one H100/H200-class GPU, < 8 minutes
#   DEVICE_CHECK_TINY=1 bash benchmarks/device_check.sh  # the same steps on CPU, :tiny configs
#
# Run from the repository root. Steps, each a separate process under `timeout`:
#   1. the device: jax.devices(), backend, device kind, JAX/jaxlib/Python versions (nvidia-smi's
#      name, driver and memory where it exists);
#   2. train steps (benchmarks/train_step.py) of the 1.6B Base-LCM (configs/mse_1b6.py) and the
#      1.6B Two-Tower (configs/two_tower_1b6.py) in bf16 at the reference's per-GPU batch, 56 rows
#      x 128 concepts, dropout 0.1 as the recipes train, once per attention implementation (xla,
#      cudnn: --set model.attention_impl=NAME): step time, concepts/s, model FLOP/s, MFU against
#      the chip's dense bf16 peak (lcm_jax.metrics.PEAK_FLOPS) and the ratio to a plain bf16
#      matmul timed in the same run;
#   3. generation concepts/s (benchmarks/generate.py) of both families, bf16, 56 prompts of 16
#      concepts, 16 generated per prompt (Two-Tower: 40 DDIM steps, guidance 3), attention as
#      the config's default;
#   4. the report: printed, and written to $DEVICE_CHECK_REPORT (default ${OUT:-/tmp}/
#      device_check.txt), with the same figures as JSON (.json beside it) and every sub-run's
#      output (.log beside it).
# Time budget: every sub-run gets a timeout; a run gets at most its cap and never so much that
# the runs after it would have less than a reserve each, so the whole script ends inside the
# budget (440 s by default, well under 8 minutes). A failed, timed-out or skipped sub-run is
# reported as such (with the last line of its output) and the script goes on.
#
# Tiny mode (DEVICE_CHECK_TINY=1, for CPU): the :tiny configs, 4 rows x 32 concepts, the
# default compute dtype (float32 on CPU), 1 round; attention xla only (cudnn is reported as
# skipped: it needs a GPU). Under a minute on a 2-core CPU.
#
# Environment:
#   DEVICE_CHECK_TINY=1         tiny mode (above)
#   DEVICE_CHECK_REPORT=PATH    the report file (default ${OUT:-/tmp}/device_check.txt); the JSON is
#                               PATH with .txt replaced by .json (or PATH.json), the logs .log
#   DEVICE_CHECK_BUDGET_S=N     the whole script's time budget in seconds (default 440; tiny 110)
#   DEVICE_CHECK_PEAK_TFLOPS=X  the chip's dense peak for MFU, if lcm_jax.metrics lacks it
#   PYTHON=...                  the interpreter (default .venv/bin/python if present, else python3)
#   DEVICE_CHECK_WHEELS=DIR     wheels to install first (an offline host; benchmarks/device_wheels.sh)
#
# The attention implementation is set with --set model.attention_impl=NAME unless the device step
# found that the configs lack that field; then the xla run uses the config's default attention
# (labelled so) and the cudnn run is skipped with that reason.
#
# Exit status: 0 when the report was written, whatever the sub-runs did; 2 when the interpreter
# lacks a package the benchmarks import (named; nothing is run); non-zero otherwise.

set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1

if [[ -n "${PYTHON:-}" ]]; then
  PY=$PYTHON
elif [[ -x .venv/bin/python ]]; then
  PY=.venv/bin/python
else
  PY=python3
fi
export PYTHONUNBUFFERED=1

TINY=${DEVICE_CHECK_TINY:-0}
[[ "$TINY" == "1" ]] || TINY=0
REPORT=${DEVICE_CHECK_REPORT:-${OUT:-/tmp}/device_check.txt}
case "$REPORT" in
  *.txt) BASE=${REPORT%.txt} ;;
  *) BASE=$REPORT ;;
esac
REPORT_JSON=$BASE.json
REPORT_LOG=$BASE.log
WORK=$(mktemp -d "${TMPDIR:-/tmp}/device_check.XXXXXX") || exit 1
trap 'rm -rf "$WORK"' EXIT

# Preflight: the Python packages the benchmarks import. An offline GPU host whose image lacks
# some (typically grain, array-record, ml-collections) takes them as wheels: DEVICE_CHECK_WHEELS=
# DIR (made with benchmarks/device_wheels.sh) is installed into a private folder on PYTHONPATH.
if [[ -n "${DEVICE_CHECK_WHEELS:-}" ]]; then
  shopt -s nullglob
  wheels=("$DEVICE_CHECK_WHEELS"/*.whl)
  shopt -u nullglob
  if ((${#wheels[@]} == 0)); then
    echo "error: DEVICE_CHECK_WHEELS=$DEVICE_CHECK_WHEELS holds no .whl files" >&2
    exit 2
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" \
    "${wheels[@]}" || { echo "error: installing the wheels of $DEVICE_CHECK_WHEELS failed" >&2; exit 2; }
  export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
fi
missing=$("$PY" - <<'PYEOF'
import importlib
names = ("jax", "flax", "optax", "orbax.checkpoint", "grain", "array_record", "ml_collections",
         "etils", "absl", "numpy")
missing = []
for name in names:
  try:
    importlib.import_module(name)
  except Exception:  # pylint: disable=broad-except  (any failure means the run cannot start)
    missing.append(name)
print(" ".join(missing))
PYEOF
) || missing="(the interpreter $PY does not run)"
if [[ -n $missing ]]; then
  echo "error: $PY cannot import: $missing. Install them, or on a machine with a package index run" \
    "'bash benchmarks/device_wheels.sh DIR' and pass DEVICE_CHECK_WHEELS=DIR here." >&2
  exit 2
fi

mkdir -p "$(dirname "$REPORT")" || exit 1

if [[ $TINY == 1 ]]; then
  BUDGET=${DEVICE_CHECK_BUDGET_S:-110}
  RESERVE=10     # seconds kept for each later sub-run
  MIN_RUN=5      # a sub-run with less than this left is skipped
  CAP_DEVICE=40 CAP_TRAIN=45 CAP_GEN=45
  SUFFIX=":tiny"
  SHAPE=(--set data.global_batch_size=4 --set data.seq_len=32)
  TRAIN_ARGS=(--rounds=1 --iters=1 --set model.dropout=0.1 "${SHAPE[@]}")
  GEN_ARGS=(--batch=4 --prompt_len=8 --max_len=4 --num_steps=4 --rounds=1 --matmul_iters=2
            "${SHAPE[@]}")
  MODE="tiny (:tiny configs, 4 x 32 concepts, default dtype, dropout 0.1, 1 round)"
else
  BUDGET=${DEVICE_CHECK_BUDGET_S:-440}
  RESERVE=40
  MIN_RUN=20
  CAP_DEVICE=60 CAP_TRAIN=120 CAP_GEN=100
  SUFFIX=""
  SHAPE=(--set model.dtype=bfloat16 --set data.global_batch_size=56 --set data.seq_len=128)
  TRAIN_ARGS=(--rounds=3 --iters=5 --set model.dropout=0.1 "${SHAPE[@]}")
  GEN_ARGS=(--batch=56 --prompt_len=16 --max_len=16 --rounds=2 --matmul_iters=12 "${SHAPE[@]}")
  MODE="full (1.6B shapes, bf16, 56 x 128 concepts, dropout 0.1)"
fi
if [[ -n "${DEVICE_CHECK_PEAK_TFLOPS:-}" ]]; then
  TRAIN_ARGS+=(--peak_tflops="$DEVICE_CHECK_PEAK_TFLOPS")
fi

START=$SECONDS
REMAINING=7    # sub-runs still to start: device, 4 train steps, 2 generations
RUNS=$WORK/runs.tsv
: >"$RUNS"

# record NAME KIND FAMILY CONFIG ATTENTION STATUS SECONDS LIMIT REASON: one line of runs.tsv.
record() {
  local reason=${9//$'\t'/ }
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" "$6" "$7" "$8" "$reason" \
    >>"$RUNS"
}

# skip NAME KIND FAMILY CONFIG ATTENTION REASON: a sub-run that is not run.
skip() {
  REMAINING=$((REMAINING - 1))
  record "$1" "$2" "$3" "$4" "$5" skipped 0 0 "$6"
  echo "[device_check] $1: skipped: $6"
}

# run_sub NAME KIND FAMILY CONFIG ATTENTION CAP CMD...: runs CMD under timeout (its output in
# $WORK/NAME.log) and records ok / failed / timeout / skipped (time budget).
run_sub() {
  local name=$1 kind=$2 family=$3 config=$4 attention=$5 cap=$6
  shift 6
  REMAINING=$((REMAINING - 1))
  local left=$((BUDGET - (SECONDS - START) - REMAINING * RESERVE))
  local limit=$((left < cap ? left : cap))
  if ((limit < MIN_RUN)); then
    record "$name" "$kind" "$family" "$config" "$attention" skipped 0 0 \
      "time budget: ${left} s left for it (budget ${BUDGET} s)"
    echo "[device_check] $name: skipped (time budget)"
    return
  fi
  local shown="$*"
  shown=${shown//$'\n'/ }
  echo "[device_check] $name: running (limit ${limit} s): ${shown:0:400}"
  local t0=$SECONDS rc
  timeout --kill-after=10 "$limit" "$@" >"$WORK/$name.log" 2>&1
  rc=$?
  local took=$((SECONDS - t0)) last
  last=$(grep -v '^[[:space:]]*$' "$WORK/$name.log" | tail -n 1 | cut -c1-300)
  [[ -n $last ]] || last="(none)"
  if ((rc == 0)); then
    record "$name" "$kind" "$family" "$config" "$attention" ok "$took" "$limit" ""
  elif ((rc == 124 || rc == 137)); then
    record "$name" "$kind" "$family" "$config" "$attention" timeout "$took" "$limit" \
      "timed out after ${limit} s; last output: $last"
  else
    record "$name" "$kind" "$family" "$config" "$attention" failed "$took" "$limit" \
      "exit $rc: $last"
  fi
  echo "[device_check] $name: $(tail -n 1 "$RUNS" | cut -f6) in ${took} s"
}

# 1. The device (and whether the configs have model.attention_impl).
if command -v nvidia-smi >/dev/null 2>&1; then
  timeout 15 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader \
    >"$WORK/nvidia_smi.txt" 2>/dev/null || rm -f "$WORK/nvidia_smi.txt"
fi
cat >"$WORK/device_step.py" <<'PYEOF'
"""The device step: benchmarks.common.environment() + whether the configs have attention_impl."""
import os
import sys
sys.path.insert(0, os.getcwd())  # the repository root
from benchmarks import common  # pylint: disable=g-import-not-at-top,wrong-import-position
env = common.environment()
env["has_attention_impl"] = "attention_impl" in common.load_config("configs/mse_1b6.py:tiny").model
common.write_json(sys.argv[1], env)
print(env)
PYEOF
run_sub device device - - - "$CAP_DEVICE" "$PY" "$WORK/device_step.py" "$WORK/device.json"

BACKEND=unknown
HAS_ATTN=unknown
if [[ -f "$WORK/device.json" ]]; then
  read -r BACKEND HAS_ATTN < <("$PY" -c 'import json, sys; e = json.load(open(sys.argv[1]))
print(e["backend"], int(e["has_attention_impl"]))' "$WORK/device.json")
fi

# 2. Train steps, per family and attention implementation.
for family in base_lcm two_tower; do
  if [[ $family == base_lcm ]]; then config=configs/mse_1b6.py$SUFFIX
  else config=configs/two_tower_1b6.py$SUFFIX; fi
  for attention in xla cudnn; do
    name=train_${family}_$attention
    if [[ $attention == cudnn && $TINY == 1 ]]; then
      skip "$name" train_step "$family" "$config" cudnn \
        "cudnn needs a GPU (tiny mode runs xla only)"
      continue
    fi
    if [[ $attention == cudnn && $BACKEND != gpu && $BACKEND != unknown ]]; then
      skip "$name" train_step "$family" "$config" cudnn "cudnn needs a GPU; backend is $BACKEND"
      continue
    fi
    impl=(--set "model.attention_impl=$attention")
    label=$attention
    if [[ $HAS_ATTN == 0 ]]; then
      if [[ $attention == cudnn ]]; then
        skip "$name" train_step "$family" "$config" cudnn \
          "the config has no model.attention_impl field to select cudnn"
        continue
      fi
      impl=()
      label="default (no model.attention_impl field)"
      [[ $BACKEND == cpu ]] && label="xla (default on cpu; no model.attention_impl field)"
    fi
    run_sub "$name" train_step "$family" "$config" "$label" "$CAP_TRAIN" \
      "$PY" benchmarks/train_step.py --config="$config" "${TRAIN_ARGS[@]}" "${impl[@]}" \
      --json="$WORK/$name.json"
  done
done

# 3. Generation, per family (the config's default attention).
for family in base_lcm two_tower; do
  if [[ $family == base_lcm ]]; then config=configs/mse_1b6.py$SUFFIX
  else config=configs/two_tower_1b6.py$SUFFIX; fi
  run_sub "generate_$family" generate "$family" "$config" default "$CAP_GEN" \
    "$PY" benchmarks/generate.py --configs="$config" "${GEN_ARGS[@]}" \
    --json="$WORK/generate_$family.json"
done

# 4. The report.
for f in "$WORK"/*.log; do
  [[ -f $f ]] || continue
  echo "===== $(basename "$f" .log) ====="
  cat "$f"
done >"$REPORT_LOG"
"$PY" - "$WORK" "$REPORT" "$REPORT_JSON" "$REPORT_LOG" "$MODE" "$BUDGET" \
  "$((SECONDS - START))" <<'PYEOF'
import json
import math
import os
import sys
import time

work, report, report_json, log, mode, budget, wall = sys.argv[1:8]
device = {}
if os.path.isfile(os.path.join(work, "device.json")):
  with open(os.path.join(work, "device.json")) as f:
    device = json.load(f)
smi = os.path.join(work, "nvidia_smi.txt")
if os.path.isfile(smi):
  device["nvidia_smi"] = open(smi).read().strip()

entries = []
for line in open(os.path.join(work, "runs.tsv")):
  name, kind, family, config, attention, status, secs, limit, reason = (
      line.rstrip("\n").split("\t"))
  entry = {"name": name, "kind": kind, "family": family, "config": config,
           "attention": attention, "status": status, "seconds": int(secs),
           "limit_s": int(limit), "reason": reason, "figures": None}
  path = os.path.join(work, name + ".json")
  if kind != "device" and os.path.isfile(path):
    with open(path) as f:
      figures = json.load(f)
    entry["figures"] = figures["results"][0] if kind == "generate" else figures
  if status == "ok" and kind != "device" and entry["figures"] is None:
    entry["status"], entry["reason"] = "failed", "exited 0 without writing its JSON"
  entries.append(entry)


def num(x, fmt):
  return format(x, fmt) if isinstance(x, (int, float)) and math.isfinite(x) else "-"


out = [f"device check: {mode}, {time.strftime('%Y-%m-%d %H:%M:%S')}"]
if device:
  out.append(f"device       {device.get('devices')}; backend {device.get('backend')}; kind "
             f"{device.get('device_kind')!r}; jax {device.get('jax_version')}, jaxlib "
             f"{device.get('jaxlib_version')}; python {device.get('python_version')}")
else:
  out.append("device       unknown (the device step did not finish)")
if device.get("nvidia_smi"):
  out.append(f"nvidia-smi   {device['nvidia_smi']}")
train = [e for e in entries if e["kind"] == "train_step"]
peak = next((e["figures"] for e in train if e["figures"]), None)
if peak and peak.get("peak_flops"):
  out.append(f"peak         {peak['peak_flops'] / 1e12:.1f} TFLOP/s from {peak['peak_source']}")
elif peak:
  out.append(f"peak         none: {peak['peak_source']}; MFU not reported")
out.append("")
out.append(f"{'train step (median)':32} {'attention':10} {'status':8} {'step ms':>8} "
           f"{'concepts/s':>11} {'model TF/s':>10} {'MFU':>6} {'mm TF/s':>8} {'step/mm':>7} "
           f"{'compile s':>9}")
notes = []
for e in train:
  f = e["figures"] or {}
  label = f"{e['family']} {e['config'].split('/')[-1]}"
  attention = e["attention"] if len(e["attention"]) <= 10 else e["attention"].split()[0] + "*"
  if e["attention"] != attention:
    notes.append(f"* {e['name']}: attention {e['attention']}")
  if e["status"] == "ok":
    out.append(f"{label:32} {attention:10} {'ok':8} {num(f['step_time_s'] * 1e3, '8.1f')} "
               f"{num(f['real_concepts_per_s'], '11,.0f')} "
               f"{num(f['model_flops_per_s'] / 1e12, '10.3f')} "
               f"{num(f.get('mfu'), '6.3f'):>6} {num(f['matmul_flops_per_s'] / 1e12, '8.3f')} "
               f"{num(f['ratio'], '7.3f')} {num(f['compile_s'], '9.1f')}")
  else:
    out.append(f"{label:32} {attention:10} {e['status']:8} {e['reason']}")
out.append("")
out.append(f"{'generation (median)':32} {'attention':10} {'status':8} {'concepts/s':>11} "
           f"{'ms/step':>8} {'model TF/s':>10} {'mm TF/s':>8} {'gen/mm':>7} {'compile s':>9}")
for e in entries:
  if e["kind"] != "generate":
    continue
  f = e["figures"] or {}
  label = f"{e['family']} {e['config'].split('/')[-1]}"
  attention = f.get("attention_impl") or e["attention"]
  if e["status"] == "ok":
    out.append(f"{label:32} {attention:10} {'ok':8} {num(f['concepts_per_s'], '11,.1f')} "
               f"{num(f['ms_per_step'], '8.2f')} {num(f['model_flops_per_s'] / 1e12, '10.4f')} "
               f"{num(f['matmul_flops_per_s'] / 1e12, '8.3f')} {num(f['ratio'], '7.4f')} "
               f"{num(f['compile_s'], '9.1f')}")
  else:
    out.append(f"{label:32} {attention:10} {e['status']:8} {e['reason']}")
if train and (train[0]["figures"] or {}).get("batch"):
  f = train[0]["figures"]
  out.append("")
  out.append(f"train: {f['batch']} x {f['seq_len']} concepts, {f['dtype']}, dropout "
             f"{f['dropout']}, {f['rounds']} round(s) x {f['iters']} step(s); matmul "
             f"{f['matmul_shape']}")
gens = [e["figures"] for e in entries if e["kind"] == "generate" and e["figures"]]
if gens:
  gen = gens[0]
  line = (f"generation: {gen['batch']} prompts x {gen['prompt_len']} -> {gen['max_len']} "
          f"concepts, {gen['dtype']}, {gen['rounds']} round(s)")
  sampled = next((g for g in gens if g.get("num_steps")), None)
  if sampled:
    line += (f"; Two-Tower {sampled['num_steps']} DDIM steps ({sampled['visited_timesteps']} "
             f"visited timesteps) x {sampled['halves']} guidance half(s), "
             f"{num(sampled['denoiser_evals_per_s'], ',.0f')} denoiser evals/s")
  out.append(line)
out.extend(notes)
device_entry = next((e for e in entries if e["kind"] == "device"), None)
if device_entry and device_entry["status"] != "ok":
  out.append(f"device step: {device_entry['status']}: {device_entry['reason']}")
out.append(f"wall {wall} s of a {budget} s budget; report {report}, JSON {report_json}, "
           f"logs {log}")
text = "\n".join(out) + "\n"
with open(report, "w") as f:
  f.write(text)
with open(report_json, "w") as f:
  json.dump({"mode": mode, "budget_s": int(budget), "wall_s": int(wall), "report": report,
             "log": log, "device": device, "entries": entries}, f, indent=1)
  f.write("\n")
print(text, end="")
PYEOF
