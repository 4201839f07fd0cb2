#!/usr/bin/env bash
# The local Kubernetes control plane for tests/e2e (kube-apiserver, kube-controller-manager,
# kube-scheduler, kubectl, etcd, KWOK), built from the Go module in localcluster/ into a
# cache keyed by its go.sum (~/.cache/ddetr-control-plane), and the modules of the CRD checker
# (tests/operator/crdcheck: the API server's own CRD validation), which its test builds offline.
# Cold: about 20 minutes on 2 cores; warm: a no-op. Exits 1 naming what failed.
set -uo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
if ! command -v go >/dev/null 2>&1; then
  echo "control-plane.sh: go not found (the control plane and the CRD checker are built from Go modules)" >&2
  exit 1
fi
bash "$root/scripts/build-control-plane.sh" >/dev/null || exit 1
if ! (cd "$root/tests/operator/crdcheck" && go mod download); then
  echo "control-plane.sh: go mod download failed for tests/operator/crdcheck (k8s.io/apiextensions-apiserver)" >&2
  exit 1
fi
