#!/usr/bin/env bash
# Build the real node's runtime tools from this Go module into a cache keyed by go.mod,
# go.sum and the pause source: containerd, containerd-shim-runc-v2, ctr (containerd 2.x),
# coredns and pause (static). A warm cache is a no-op. Prints the bin folder as its last line.
# Env: DDETR_REAL_NODE_CACHE (default ~/.cache/ddetr-real-node).
set -euo pipefail
module="$(cd "$(dirname "$0")" && pwd)"
key=$(cat "$module/go.mod" "$module/go.sum" "$module/pause/main.go" | sha256sum | cut -c1-16)
bin="${DDETR_REAL_NODE_CACHE:-$HOME/.cache/ddetr-real-node}/$key/bin"
tools=(containerd containerd-shim-runc-v2 ctr coredns pause)
package_of() {
  case $1 in
    coredns) echo github.com/coredns/coredns ;;
    pause) echo ddetr.dev/localcluster/realnode/pause ;;
    *) echo "github.com/containerd/containerd/v2/cmd/$1" ;;
  esac
}
mkdir -p "$bin"
cd "$module"
export CGO_ENABLED=0
for tool in "${tools[@]}"; do
  [ -x "$bin/$tool" ] && continue
  start=$(date +%s)
  echo "real node: building $tool ($(package_of "$tool"))..." >&2
  # no_btrfs/no_devmapper: snapshotters that need C headers; overlayfs and native stay.
  go build -trimpath -tags no_btrfs,no_devmapper,no_zfs -ldflags "-s -w" -o "$bin/$tool.partial" "$(package_of "$tool")"
  mv -f "$bin/$tool.partial" "$bin/$tool"
  echo "real node: built $tool in $(( $(date +%s) - start )) s" >&2
done
echo "$bin"
