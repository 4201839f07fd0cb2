"""What a real node leaves once its processes are stopped, or after it was killed, and
how to remove it: containerd's shims (they outlive it by design) and their sockets, mounts
under its state (volumes, rootfs, network-namespace files), the bridge and packet-filter
rules (realnode_net), the kubelet's cgroups. `leftovers()` lists whatever is still there."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from . import realnode_net as net

SHIM_SOCKETS = Path("/run/containerd/s")  # containerd 2.x puts its shims' sockets here, whatever its state


def remove_leftovers(cluster_state: Path) -> None:
    """What a real node under `cluster_state` leaves once its processes are stopped, or after
    it was killed: containerd's shims (they outlive it by design), mounts (volumes, rootfs,
    network-namespace files), the bridge and packet-filter rules, the kubelet's cgroups."""
    node_dir = cluster_state / "real-node"
    if not node_dir.exists():
        return
    sockets = _shim_sockets(f"{node_dir}/")
    kill_processes_naming(f"{node_dir}/")
    for path in sockets:
        path.unlink(missing_ok=True)
    cache = Path(os.environ.get("DDETR_REAL_NODE_CACHE", Path.home() / ".cache" / "ddetr-real-node"))
    _unmount_under(node_dir, cache / "containerd")
    net.close_network()
    _remove_cgroups("kubepods")
    for folder in (SHIM_SOCKETS, SHIM_SOCKETS.parent):  # only when empty: ours are gone by now
        try:
            folder.rmdir()
        except OSError:
            pass


def _shim_sockets(marker: str) -> list[Path]:
    """The sockets our shims listen on under SHIM_SOCKETS (a killed shim leaves its socket)."""
    inodes = set()
    for pid in _pids_naming(marker):
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            pass
    found = []
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 8 and parts[6] in inodes and parts[7].startswith(f"{SHIM_SOCKETS}/"):
            found.append(Path(parts[7]))
    return found


def leftovers(cluster_state: Path) -> list[str]:
    """What remove_leftovers() should have removed and is still there (empty: nothing)."""
    node_dir = f"{cluster_state / 'real-node'}/"
    found = [f"interface {net.BRIDGE}"] if net.exists() else []
    for tool in ("iptables-save", "ip6tables-save"):
        if shutil.which(tool):
            dump = subprocess.run([tool], capture_output=True, text=True).stdout
            found += [f"{tool}: {line}" for line in dump.splitlines()
                      if line.startswith((":KUBE-", f":{net.CHAIN}")) or f"-j {net.CHAIN}" in line]
    found += [f"mount {line.split()[4]}" for line in Path("/proc/self/mountinfo").read_text().splitlines()
              if line.split()[4].startswith(node_dir) or line.split()[4] == node_dir[:-1]]
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and node_dir.encode() in (proc / "cmdline").read_bytes():
                found.append(f"process {proc.name}")
        except OSError:
            pass
    found += [f"cgroup {path}" for path in Path("/sys/fs/cgroup").glob("*/kubepods")]
    return found


# The programs a local cluster starts: only these are ended for naming its state folder (a
# user's `kubectl --kubeconfig <state>/kubeconfig` is not).
COMPONENTS = {"etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok", "kubelet",
              "kube-proxy", "containerd", "containerd-shim-runc-v2", "coredns", "ddetr-gpu-plugin"}


def _pids_naming(marker: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        ours = (os.path.basename(argv[0].decode(errors="replace")) in COMPONENTS
                or any(b"ddetr_localcluster" in arg for arg in argv))
        if ours and any(marker.encode() in arg for arg in argv):
            pids.append(int(proc.name))
    return pids


def kill_processes_naming(marker: str, wait: float = 10) -> None:
    """SIGKILL the cluster's processes (COMPONENTS, the pod runner) whose command line names
    `marker` (a state folder), by pid, and wait until they are gone."""
    for pid in _pids_naming(marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + wait
    while _pids_naming(marker) and time.monotonic() < deadline:
        time.sleep(0.1)


def _unmount_under(*folders: Path) -> None:
    """Lazily unmount every mount point under the folders, deepest first (volumes, rootfs,
    network-namespace files)."""
    prefixes = [str(folder.resolve()) + "/" for folder in folders]
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if any(point.startswith(prefix) for prefix in prefixes):
            points.append(point)
    for point in sorted(set(points), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True)


def _remove_cgroups(top: str) -> None:
    """SIGKILL what still runs in the kubelet's cgroup tree (containers whose shim was killed),
    then rmdir the tree in every hierarchy, leaves first."""
    roots = [hierarchy / top for hierarchy in Path("/sys/fs/cgroup").iterdir() if (hierarchy / top).is_dir()]
    for root in roots:
        for procs in root.rglob("cgroup.procs"):
            for pid in procs.read_text().split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
    deadline = time.monotonic() + 10  # a killed process leaves its cgroup a moment later
    while roots and time.monotonic() < deadline:
        for root in roots:
            for folder, _, _ in sorted(os.walk(root), key=lambda entry: entry[0].count("/"), reverse=True):
                try:
                    os.rmdir(folder)
                except OSError:
                    pass
        roots = [root for root in roots if root.exists()]
        time.sleep(0.2 if roots else 0)
