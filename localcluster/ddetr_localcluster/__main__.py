"""`scripts/local-cluster.sh up|down|status`: the tests' local control plane, for people
developing the operator and for ad-hoc checks.

    python3 -m ddetr_localcluster serve --state DIR --bin BIN   # foreground, until SIGTERM
    python3 -m ddetr_localcluster cleanup --state DIR           # what a killed `serve` left
        [--real-node --runtime-bin RT --image-archive A ...]     # plus one real node
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
    parser.add_argument("command", choices=["serve", "cleanup"],
                        help="cleanup: end what a killed `serve` left running and remove what its real node left")
    parser.add_argument("--state", type=Path, required=True)
    parser.add_argument("--bin", type=Path)
    parser.add_argument("--kwok-nodes", type=int, default=2)
    parser.add_argument("--real-node", action="store_true", help="add a real node (kubelet, containerd)")
    parser.add_argument("--runtime-bin", type=Path, help="localcluster/realnode/build.sh's bin folder")
    parser.add_argument("--image-archive", type=Path, action="append", default=[],
                        help="an image archive to import into the real node (repeatable)")
    args = parser.parse_args(argv)
    if args.command == "cleanup":
        from .realnode_cleanup import kill_processes_naming, remove_leftovers
        remove_leftovers(args.state.resolve())  # first: it reads the shims' sockets before killing them
        kill_processes_naming(f"{args.state.resolve()}/")  # components that outlived a killed `serve`
        return 0
    if args.bin is None:
        parser.error("serve needs --bin")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    if args.real_node and args.runtime_bin is None:
        parser.error("--real-node needs --runtime-bin")
    for archive in args.image_archive:
        if not archive.is_file():
            parser.error(f"--image-archive {archive}: no such file (scripts/build-images.sh writes them)")
    cluster = LocalCluster(args.state, args.bin, kwok_nodes=args.kwok_nodes, real_node=args.real_node,
                           runtime_bin=args.runtime_bin, image_archives=args.image_archive)
    try:
        cluster.start()
    except Exception as err:  # noqa: BLE001 - one line for the user, the logs for the rest
        print(f"local cluster: {err}", file=sys.stderr)
        return 1
    (args.state / "ready").write_text(str(cluster.kubeconfig))
    print(f"local cluster: up; KUBECONFIG={cluster.kubeconfig}", flush=True)
    if cluster.node is not None:
        print(f"local cluster: real node {cluster.node.name} up; seconds per step: {cluster.node.timings}", flush=True)
    try:
        while not stop.wait(2):
            for component in cluster.all_components():
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
