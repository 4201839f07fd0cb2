#!/usr/bin/env bash
# The real node of the local cluster (scripts/local-cluster.sh up --real-node): kubelet and
# kube-proxy (built with the control plane from localcluster/go.mod), containerd 2.x, ctr,
# containerd-shim-runc-v2, CoreDNS and the pause binary (built from localcluster/realnode/go.mod
# into ${DDETR_REAL_NODE_CACHE:-~/.cache/ddetr-real-node}/<hash of go.mod+go.sum+pause>/bin),
# runc and the CNI plugins (Debian packages runc, containernetworking-plugins).
# Cold: about 15 minutes on 2 cores; warm: a no-op. Exits 1 naming the tool that failed.
set -uo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
fail() { echo "real-node.sh: $*" >&2; exit 1; }
command -v go >/dev/null 2>&1 || fail "go not found (kubelet, containerd and CoreDNS are built from Go modules)"

missing_debs=()
command -v runc >/dev/null 2>&1 || missing_debs+=(runc)
[ -x /usr/lib/cni/bridge ] || missing_debs+=(containernetworking-plugins)
command -v iptables >/dev/null 2>&1 || missing_debs+=(iptables)
if [ ${#missing_debs[@]} -gt 0 ]; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing_debs[@]}" >/dev/null ||
    fail "apt-get install ${missing_debs[*]} failed"
fi
for plugin in bridge host-local loopback portmap; do
  [ -x "/usr/lib/cni/$plugin" ] || fail "CNI plugin $plugin missing from /usr/lib/cni (containernetworking-plugins)"
done

bash "$root/scripts/build-control-plane.sh" --real-node >/dev/null || fail "building kubelet and kube-proxy failed"
bash "$root/localcluster/realnode/build.sh" >/dev/null || fail "building containerd, CoreDNS or pause failed"
