#!/usr/bin/env bash
# Sets up .venv (if needed) and runs the whole test suite on CPU with 8 fake devices.
# XManager lives in its own environment, .xmvenv (it pins protobuf < 7, the project >= 7), built
# from launch/requirements-xm.txt (~1 min from pip's cache) for tests/launching/test_xm_launch.py's real
# local launches. LCM_XM=0 skips it (those tests then skip).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 JAX_PLATFORMS=cpu
if [[ "${LCM_XM:-1}" == 1 ]]; then
  PY="${PYTHON:-python3.11}"
  command -v "$PY" >/dev/null || PY=python3
  xs="$(sha256sum launch/requirements-xm.txt | cut -c1-16)"
  if [[ ! -f .xmvenv/.stamp || "$(cat .xmvenv/.stamp)" != "$xs" ]]; then
    echo "[test] creating .xmvenv (XManager) from launch/requirements-xm.txt" >&2
    rm -rf .xmvenv && "$PY" -m venv .xmvenv
    .xmvenv/bin/pip install --quiet --disable-pip-version-check -r launch/requirements-xm.txt \
      2> >(grep -v "^WARNING: Location" >&2)
    echo "$xs" > .xmvenv/.stamp
  fi
  export LCM_XM_PYTHON="$PWD/.xmvenv/bin/python"
fi
exec .venv/bin/python -m pytest -q "$@"
