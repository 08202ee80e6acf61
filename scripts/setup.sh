#!/usr/bin/env bash
# Creates (or reuses) the project environment in .venv/ and installs lcm_jax into it.
#   bash scripts/setup.sh                # JAX core + test tools + the PyTorch-side data_prep tools
#   EXTRAS=test bash scripts/setup.sh    # JAX side only (no torch/SONAR/SaT; data_prep tests skip)
# The data extra pulls PyPI's torch 2.9.1 (a CUDA build, ~4.3 GB download, ~8 GB installed): fairseq2n
# is linked against exactly that torch. fairseq2n needs libsndfile.so.1; the copy bundled in the
# soundfile wheel is linked into .venv/lib/, where fairseq2n looks, so no system package is needed.
# The environment is rebuilt when pyproject.toml (the pins) changes; pip's wheel cache makes
# a rebuild take ~1 minute after the first one.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
EXTRAS="${EXTRAS:-test,data}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3
stamp="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)-${EXTRAS}"
if [[ -f .venv/.lcm_jax_stamp && "$(cat .venv/.lcm_jax_stamp)" == "$stamp" ]]; then
  exit 0
fi
echo "[setup] creating .venv with $("$PY" --version) (extras: $EXTRAS)" >&2
rm -rf .venv
"$PY" -m venv .venv
.venv/bin/pip install --quiet --upgrade pip >/dev/null
.venv/bin/pip install --quiet --disable-pip-version-check -e ".[${EXTRAS}]"
if [[ ",$EXTRAS," == *",data,"* ]]; then
  sndfile="$(ls .venv/lib/python3*/site-packages/_soundfile_data/libsndfile*.so 2>/dev/null | head -1)"
  [[ -n "$sndfile" ]] || { echo "[setup] error: soundfile's bundled libsndfile not found" >&2; exit 1; }
  ln -sf "$(realpath "$sndfile")" .venv/lib/libsndfile.so.1
fi
echo "$stamp" > .venv/.lcm_jax_stamp
echo "[setup] done: $(.venv/bin/python -c 'import jax, flax; print("jax", jax.__version__, "flax", flax.__version__)')" >&2
