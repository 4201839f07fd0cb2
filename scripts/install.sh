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
if [ "${1:-}" = "test" ]; then  # the local Kubernetes the e2e tests start (localcluster/)
  "$PY" -m pip install --quiet --disable-pip-version-check -e ./localcluster
fi
if [ "${1:-}" = "test" ] && [ -d scripts/test-deps.d ]; then
  # Extra system tools the tests use (Prometheus, helm, the control plane...). Each script is idempotent
  # and fails naming the tool it could not provide: the suite never skips for something set-up owes it.
  for step in scripts/test-deps.d/*.sh; do
    [ -e "$step" ] || continue
    if ! bash "$step"; then
      echo "set-up failed: $step could not provide its tools (its message is above)" >&2
      exit 1
    fi
  done
fi
