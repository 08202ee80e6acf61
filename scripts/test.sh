#!/usr/bin/env bash
# Sets up .venv (if needed) and runs the whole test suite on CPU with 8 fake devices.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 JAX_PLATFORMS=cpu
exec .venv/bin/python -m pytest -q "$@"
