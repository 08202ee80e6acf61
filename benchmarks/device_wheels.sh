#!/usr/bin/env bash
# Wheels for an offline GPU host whose Python has JAX, Flax, Optax and Orbax but not the data
# stack: grain, array-record, ml-collections (the versions pyproject.toml pins) and portpicker.
#
#   bash benchmarks/device_wheels.sh DIR [PYTHON_VERSION]     # default Python 3.12, x86-64 Linux
#   DEVICE_CHECK_WHEELS=DIR bash benchmarks/device_check.sh   # then, on the GPU host
#
# Run it where pip reaches a package index. device_check.sh installs DIR's wheels (no index, no
# dependencies) into a private folder on PYTHONPATH before its preflight import check.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
dir=${1:?usage: bash benchmarks/device_wheels.sh DIR [PYTHON_VERSION]}
pyver=${2:-3.12}
pin() {  # the version pyproject.toml pins for package $1
  sed -n "s/^ *\"$1==\([^\"]*\)\",*$/\1/p" pyproject.toml | head -n 1
}
pkgs=()
for name in grain array-record ml-collections; do
  version=$(pin "$name")
  [[ -n $version ]] || { echo "error: pyproject.toml pins no version of $name" >&2; exit 1; }
  pkgs+=("$name==$version")
done
pkgs+=(portpicker==1.6.0)
mkdir -p "$dir"
"${PYTHON:-python3}" -m pip download --quiet --no-deps --only-binary=:all: \
  --python-version "$pyver" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
  -d "$dir" "${pkgs[@]}"
ls -1 "$dir"
