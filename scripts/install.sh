#!/usr/bin/env bash
# Install the trainer (and the operator, when present) into $PYTHON (default python3), with test extras if asked.
#   bash scripts/install.sh          # runtime only
#   bash scripts/install.sh test     # plus what the test suite needs
#   PYTHON=.venv/bin/python bash scripts/install.sh    # into a virtual environment (no need to activate it)
set -euo pipefail
source "$(dirname "$0")/python-env.sh"
cd "$(dirname "$0")/.."
extra=""
[ "${1:-}" = "test" ] && extra="[test]"
"$PY" -m pip install --quiet --disable-pip-version-check -e "./trainer${extra}"
if [ -f operator/pyproject.toml ]; then
  "$PY" -m pip install --quiet --disable-pip-version-check -e "./operator${extra}"
fi
if [ "${1:-}" = "test" ] && [ -d scripts/test-deps.d ]; then
  # Extra system tools some tests use (Prometheus, helm...). Each script is idempotent and never fatal:
  # the tests that need a missing tool skip with the reason.
  for step in scripts/test-deps.d/*.sh; do
    [ -e "$step" ] || continue
    bash "$step" || echo "warning: $step failed; tests that need it will skip" >&2
  done
fi
