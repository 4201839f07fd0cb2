#!/usr/bin/env bash
# The local Kubernetes control plane for tests/e2e (kube-apiserver, kube-controller-manager,
# kube-scheduler, kubectl, etcd, KWOK), built from the Go module in localcluster/ into a
# cache keyed by its go.sum (~/.cache/ddetr-control-plane). Cold: about 30 minutes on 2
# cores; warm: a no-op. Without Go or the module proxy the cluster tests skip with the reason.
set -uo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
if ! command -v go >/dev/null 2>&1; then
  echo "control-plane.sh: go not found; the local-cluster tests will skip" >&2
  exit 1
fi
bash "$root/scripts/build-control-plane.sh" >/dev/null
