#!/usr/bin/env bash
# A real Kubernetes control plane on 127.0.0.1, built from Go modules (see localcluster/):
# etcd, kube-apiserver, kube-controller-manager, kube-scheduler, KWOK (fake GPU nodes
# labelled type=kwok) and the pod runner (node ddetr-runner: runs its pods as local
# processes, one network namespace each). Nothing is installed into it.
#   bash scripts/local-cluster.sh up       # starts it in the background; last line: KUBECONFIG=<path>
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
    bin=$(bash "$root/scripts/build-control-plane.sh" | tail -n 1)
    rm -rf "$state" && mkdir -p "$state"
    nohup env PYTHONPATH="$root/localcluster${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m ddetr_localcluster serve --state "$state" --bin "$bin" \
      >"$state/cluster.log" 2>&1 &
    echo $! >"$state/pid"
    echo "local cluster: starting (log: $state/cluster.log)..." >&2
    for _ in $(seq 1 240); do
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
    echo "local cluster: not ready after 120 s; see $state/cluster.log" >&2
    exit 1
    ;;
  down)
    if pid=$(running_pid); then
      kill -TERM "$pid"
      for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
      kill -KILL "$pid" 2>/dev/null || true
    fi
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
    echo "usage: scripts/local-cluster.sh up|down|status" >&2
    exit 2
    ;;
esac
