#!/usr/bin/env bash
# The whole CPU test suite: lint, unit + integration tests, then the Triton kernels under the interpreter.
# Slow tests (a real SmolLM2-135M) are opt-in: SUPPLE_SLOW=1 bash tests/run_all.sh
set -euo pipefail
cd "$(dirname "$0")/.."
marker="not slow and not triton"
if [[ "${SUPPLE_SLOW:-0}" == "1" ]]; then marker="not triton"; fi
ruff check supple tests benchmarks examples
python -m pytest -q -p no:cacheprovider -m "$marker" tests
TRITON_INTERPRET=1 python -m pytest -q -p no:cacheprovider -m triton tests/test_kernels_triton.py
