#!/usr/bin/env bash
# A real Kubernetes control plane on 127.0.0.1, built from Go modules (see localcluster/):
# etcd, kube-apiserver, kube-controller-manager, kube-scheduler, KWOK (fake GPU nodes
# labelled type=kwok) and the pod runner (node ddetr-runner: runs its pods as local
# processes, one network namespace each). Nothing is installed into it.
#   bash scripts/local-cluster.sh up       # starts it in the background; last line: KUBECONFIG=<path>
#   bash scripts/local-cluster.sh up --real-node  # plus one real node: kubelet, containerd, runc,
#        CNI bridge, kube-proxy, CoreDNS (localcluster/ddetr_localcluster/realnode.py), with the
#        images from scripts/build-images.sh imported (its archives in DDETR_IMAGES_DIR)
#   bash scripts/local-cluster.sh status   # is it up?
#   bash scripts/local-cluster.sh down     # stops it and removes its state
# Needs root (network namespaces), Go 1.26 and the Go module proxy the first time (the
# build takes about 30 minutes on 2 cores, then it is cached). Env: DDETR_LOCAL_CLUSTER_STATE.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
state=${DDETR_LOCAL_CLUSTER_STATE:-$HOME/.cache/ddetr-local-cluster}
PY=${PYTHON:-python3}

running_pid() {
  [ -f "$state/pid" ] && kill -0 "$(cat "$state/pid")" 2>/dev/null && cat "$state/pid"
}

case "${1:-}" in
  up)
    if pid=$(running_pid); then
      echo "local cluster: already up (pid $pid)" >&2
      echo "KUBECONFIG=$state/kubeconfig"
      exit 0
    fi
    extra=()
    if [ "${2:-}" = "--real-node" ]; then
      bin=$(bash "$root/scripts/build-control-plane.sh" --real-node | tail -n 1)
      runtime=$(bash "$root/localcluster/realnode/build.sh" | tail -n 1)
      images=${DDETR_IMAGES_DIR:-$HOME/.cache/ddetr-images}
      extra=(--real-node --runtime-bin "$runtime")
      for name in operator trainer; do
        if [ ! -f "$images/$name.tar" ]; then
          echo "local cluster: no $images/$name.tar: run scripts/build-images.sh first" >&2
          exit 2
        fi
        extra+=(--image-archive "$images/$name.tar")
      done
    elif [ -n "${2:-}" ]; then
      echo "usage: scripts/local-cluster.sh up [--real-node]|down|status" >&2
      exit 2
    else
      bin=$(bash "$root/scripts/build-control-plane.sh" | tail -n 1)
    fi
    rm -rf "$state" && mkdir -p "$state"
    nohup env PYTHONPATH="$root/localcluster${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m ddetr_localcluster serve --state "$state" --bin "$bin" \
      "${extra[@]}" >"$state/cluster.log" 2>&1 &
    echo $! >"$state/pid"
    echo "local cluster: starting (log: $state/cluster.log)..." >&2
    for _ in $(seq 1 1200); do
      if [ -f "$state/ready" ]; then
        echo "local cluster: up; component logs in $state/logs" >&2
        echo "KUBECONFIG=$state/kubeconfig"
        exit 0
      fi
      if ! kill -0 "$(cat "$state/pid")" 2>/dev/null; then
        echo "local cluster: failed to start:" >&2
        tail -n 20 "$state/cluster.log" >&2
        exit 1
      fi
      sleep 0.5
    done
    echo "local cluster: not ready after 600 s (the first --real-node start imports the images); see $state/cluster.log" >&2
    exit 1
    ;;
  down)
    if pid=$(running_pid); then
      kill -TERM "$pid"
      for _ in $(seq 1 120); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
      kill -KILL "$pid" 2>/dev/null || true
    fi
    # A killed real node leaves shims, mounts, its bridge and packet-filter rules: remove them.
    [ -d "$state" ] && env PYTHONPATH="$root/localcluster${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m ddetr_localcluster cleanup --state "$state"
    rm -rf "$state"
    echo "local cluster: down" >&2
    ;;
  status)
    if pid=$(running_pid) && [ -f "$state/ready" ]; then
      echo "local cluster: up (pid $pid)"; echo "KUBECONFIG=$state/kubeconfig"
    else
      echo "local cluster: down"; exit 1
    fi
    ;;
  *)
    echo "usage: scripts/local-cluster.sh up [--real-node]|down|status" >&2
    exit 2
    ;;
esac
