"""`scripts/local-cluster.sh up|down|status`: the tests' local control plane, for people
developing the operator and for ad-hoc checks.

    python3 -m ddetr_localcluster serve --state DIR --bin BIN   # foreground, until SIGTERM
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from .controlplane import LocalCluster


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["serve"])
    parser.add_argument("--state", type=Path, required=True)
    parser.add_argument("--bin", type=Path, required=True)
    parser.add_argument("--kwok-nodes", type=int, default=2)
    args = parser.parse_args(argv)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    cluster = LocalCluster(args.state, args.bin, kwok_nodes=args.kwok_nodes)
    try:
        cluster.start()
    except Exception as err:  # noqa: BLE001 - one line for the user, the logs for the rest
        print(f"local cluster: {err}", file=sys.stderr)
        return 1
    (args.state / "ready").write_text(str(cluster.kubeconfig))
    print(f"local cluster: up; KUBECONFIG={cluster.kubeconfig}", flush=True)
    try:
        while not stop.wait(2):
            for component in cluster.components:
                if component.process.poll() is not None:
                    print(f"local cluster: {component.name} exited ({component.process.returncode}); "
                          f"see {component.log}", file=sys.stderr)
                    return 1
    finally:
        (args.state / "ready").unlink(missing_ok=True)
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
