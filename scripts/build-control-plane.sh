#!/usr/bin/env bash
# Build the local control plane (kube-apiserver, kube-controller-manager, kube-scheduler,
# kubectl, etcd, kwok) from the Go module in localcluster/ into a cache outside the repo,
# keyed by the hash of localcluster/go.mod + go.sum. A warm cache makes this a no-op.
#   bash scripts/build-control-plane.sh              # prints the bin folder as its last line
#   bash scripts/build-control-plane.sh --real-node  # also kubelet, kube-proxy and the fake GPU plugin (the real node)
# Cold: about 30 minutes on 2 cores (module download plus compile); warm: instant.
# Env: DDETR_CONTROL_PLANE_CACHE (default ~/.cache/ddetr-control-plane).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
module="$root/localcluster"
if ! command -v go >/dev/null 2>&1; then
  echo "build-control-plane.sh: go not found on PATH; the cluster tests skip" >&2
  exit 3
fi
key=$(cat "$module/go.mod" "$module/go.sum" | sha256sum | cut -c1-16)
cache=${DDETR_CONTROL_PLANE_CACHE:-$HOME/.cache/ddetr-control-plane}
bin="$cache/$key/bin"
tools=(kube-apiserver kube-controller-manager kube-scheduler kubectl etcd kwok)
# The real node's kubelet and kube-proxy: about 9 and 4 minutes cold on 2 cores.
[ "${1:-}" = "--real-node" ] && tools+=(kubelet kube-proxy)

# The real node's fake GPU device plugin (localcluster/gpuplugin): seconds to build, so keyed by
# its own source and rebuilt when that changes.
if [ "${1:-}" = "--real-node" ]; then
  plugin_key=$(sha256sum <"$module/gpuplugin/main.go" | cut -c1-16)
  if [ "$(cat "$bin/ddetr-gpu-plugin.key" 2>/dev/null)" != "$plugin_key" ]; then
    echo "control plane: building ddetr-gpu-plugin (localcluster/gpuplugin)..." >&2
    mkdir -p "$bin"
    (cd "$module" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$bin/ddetr-gpu-plugin" ./gpuplugin)
    echo "$plugin_key" >"$bin/ddetr-gpu-plugin.key"
  fi
fi

missing=()
for tool in "${tools[@]}"; do [ -x "$bin/$tool" ] || missing+=("$tool"); done
if [ ${#missing[@]} -eq 0 ]; then
  echo "control plane: cache warm ($bin)" >&2
  echo "$bin"
  exit 0
fi

cd "$module"
mod_version() { go list -m -f '{{.Version}}' "$1"; }
echo "control plane: downloading modules (first time: a few minutes)" >&2
go mod download
k8s=$(mod_version k8s.io/kubernetes)
etcd=$(mod_version go.etcd.io/etcd/server/v3)
kwok=$(mod_version sigs.k8s.io/kwok)
k8s_minor=${k8s#v1.}; k8s_minor=${k8s_minor%%.*}
build_date=$(date -u +%Y-%m-%dT%H:%M:%SZ)
k8s_flags=""
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  k8s_flags+=" -X $pkg.gitVersion=$k8s -X $pkg.gitMajor=1 -X $pkg.gitMinor=$k8s_minor"
  k8s_flags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=$build_date"
done

package_of() {
  case $1 in
    etcd) echo go.etcd.io/etcd/server/v3 ;;
    kwok) echo sigs.k8s.io/kwok/cmd/kwok ;;
    *) echo "k8s.io/kubernetes/cmd/$1" ;;
  esac
}
ldflags_of() {
  case $1 in
    etcd) echo "-s -w -X go.etcd.io/etcd/api/v3/version.GitSHA=$etcd" ;;
    kwok) echo "-s -w -X sigs.k8s.io/kwok/pkg/consts.Version=${kwok#v}" ;;
    *) echo "-s -w$k8s_flags" ;;
  esac
}

mkdir -p "$bin"
export CGO_ENABLED=0
for tool in "${missing[@]}"; do
  start=$(date +%s)
  echo "control plane: building $tool ($(package_of "$tool"))..." >&2
  go build -trimpath -ldflags "$(ldflags_of "$tool")" -o "$bin/$tool.partial" "$(package_of "$tool")"
  mv -f "$bin/$tool.partial" "$bin/$tool"
  echo "control plane: built $tool in $(( $(date +%s) - start )) s" >&2
done
echo "control plane: k8s $k8s, etcd $etcd, kwok $kwok in $bin" >&2
echo "$bin"
