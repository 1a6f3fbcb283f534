#!/usr/bin/env bash
# Download the wheels that benchmarks/gpu_check.py's checks 3-4 need on an offline GPU machine which has torch,
# triton, transformers, peft, accelerate, pyarrow, pandas, huggingface-hub, ... but no trl and no datasets.
#
#   bash benchmarks/gpu_wheels.sh [DEST] [EXTRA_REQUIREMENT ...]     # DEST defaults to benchmarks/gpu_wheels
#
# Fetched with --no-deps, for CPython 3.12 on x86-64 Linux (the GPU machine's Python; override with
# GPU_PYTHON_VERSION=3.11 etc.): trl, datasets and the two pure-Python dependencies of datasets the machine
# lacks (dill, multiprocess), pinned to the versions installed in this environment when they are (so the GPU
# run uses what CI tests), else the latest. supple itself is not packaged: the working tree travels with
# the device run and gpu_check.py imports it from the checkout. Extra requirements (e.g. pyarrow==26.0.1, if
# the machine's pyarrow is older than datasets needs) are fetched the same way.
#
# On the GPU machine gpu_check.py installs the folder itself (pip install --no-index --no-deps --target
# /tmp/supple-gpu-site benchmarks/gpu_wheels/*.whl); the folder is git-ignored, so name it in the device
# run's carry list. The total must stay under 64 MiB (the device run's working-tree limit).
set -euo pipefail
cd "$(dirname "$0")/.."
dest="${1:-benchmarks/gpu_wheels}"
shift || true
pyver="${GPU_PYTHON_VERSION:-3.12}"
py="${PYTHON:-python3}"

pin() {  # NAME -> NAME==VERSION installed here, or NAME
  "$py" - "$1" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version
name = sys.argv[1]
try:
    print(f"{name}=={version(name)}")
except PackageNotFoundError:
    print(name)
EOF
}

reqs=()
for name in trl datasets dill multiprocess; do reqs+=("$(pin "$name")"); done
reqs+=("$@")
mkdir -p "$dest"
echo "downloading into $dest for CPython $pyver: ${reqs[*]}"
"$py" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version "$pyver" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d "$dest" "${reqs[@]}"
ls -l "$dest"/*.whl
total=$(du -sm "$dest" | cut -f1)
echo "total: ${total} MiB in $dest"
if (( total > 64 )); then
  echo "over the 64 MiB a device run can carry: drop extras" >&2
  exit 1
fi
echo "on the GPU machine: python3 benchmarks/gpu_check.py --out \$OUT   (installs $dest offline), or"
echo "  python3 -m pip install --no-index --no-deps --target /tmp/supple-gpu-site $dest/*.whl && export PYTHONPATH=/tmp/supple-gpu-site"
