#!/usr/bin/env bash
# Set up a fresh machine and run the main job on the embedded example.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
OUT=${OUT:-example_run}
mkdir -p "$OUT"
deformable-detr default-spec > "$OUT/default_spec.yaml"
echo "complete default spec: $OUT/default_spec.yaml"
