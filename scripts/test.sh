#!/usr/bin/env bash
# Set up a fresh machine and run the whole test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh test
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
"${PYTHON:-python3}" -m pytest -q "$@"
