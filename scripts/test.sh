#!/usr/bin/env bash
# Set up a fresh machine and run the whole test suite (what CI runs).
#   PYTHON=.venv/bin/python bash scripts/test.sh    # in a virtual environment (no need to activate it)
set -euo pipefail
source "$(dirname "$0")/python-env.sh"
cd "$(dirname "$0")/.."
bash scripts/install.sh test
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
# The set-up above provided every tool: a test that still skips for one is a failure (tests/conftest.py),
# except for what this kind of machine cannot have (a GPU, TensorRT).
export DDETR_SETUP_COMPLETE=1
bash scripts/check-free-disk.sh
"$PY" -m pytest -q "$@"
