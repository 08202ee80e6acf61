#!/usr/bin/env bash
# Creates (or reuses) the project environment in .venv/ and installs lcm_jax into it.
#   bash scripts/setup.sh            # JAX core + test tools
#   EXTRAS=test,data bash scripts/setup.sh   # also the PyTorch-side data_prep tools
# The environment is rebuilt when pyproject.toml (the pins) changes; pip's wheel cache makes
# a rebuild take ~1 minute after the first one.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
EXTRAS="${EXTRAS:-test}"
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
echo "$stamp" > .venv/.lcm_jax_stamp
echo "[setup] done: $(.venv/bin/python -c 'import jax, flax; print("jax", jax.__version__, "flax", flax.__version__)')" >&2
