"""How many CPU threads this process uses: sized from its container, not from the host.

PyTorch sizes its thread pools from the CPUs it can be scheduled on (the affinity mask). A container
limited by a CFS quota (a pod's `resources.limits.cpu`) still sees every core of the host, so a pod
limited to 2 CPUs on a 64-core node runs 64 threads that exhaust the quota in a few milliseconds of
each period and then all wait, throttled, for the next one. The budget here is the smaller of the
affinity mask and the tightest CPU quota on the process's cgroup path (cgroup v2 `cpu.max`, cgroup
v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`; a parent's quota limits its children too), rounded up,
shared among the local torchrun workers. `OMP_NUM_THREADS`, when set, wins: the user (or torchrun,
which sets it to 1 for several workers per node) chose. One log line says what was chosen and why.

Data-loader workers need nothing here: `dataset.workers` is the spec's, and PyTorch gives each
worker process one thread.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Mapping, Optional

from ..errors import UsageError
from .logging import get_logger

log = get_logger("cpu")


@dataclasses.dataclass(frozen=True)
class CpuQuota:
    cpus: float  # CPU time per wall-clock second the cgroup may use
    source: str  # the file it was read from, with its value


@dataclasses.dataclass(frozen=True)
class CpuBudget:
    threads: int  # for torch's intra-op and inter-op pools (and so OpenMP's and MKL's)
    reason: str


def _unescape(path: str) -> str:
    # /proc/self/mountinfo writes space, tab, newline and backslash in paths as octal escapes.
    return path.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def cgroup_folders(root: str) -> list[tuple[str, str]]:
    """(version, folder) of this process's cgroup and its parents, in each hierarchy that can hold a
    CPU quota."""
    mounts: dict[str, tuple[str, str]] = {}  # "v2" / "v1" -> (root of the mount, where it is mounted)
    with open(os.path.join(root, "proc/self/mountinfo"), encoding="utf-8") as fh:
        for line in fh:
            fields = line.split()
            if "-" not in fields:
                continue
            tail = fields[fields.index("-") + 1:]
            fstype, options = tail[0], (tail[2] if len(tail) > 2 else "")
            if fstype == "cgroup2":
                mounts.setdefault("v2", (_unescape(fields[3]), _unescape(fields[4])))
            elif fstype == "cgroup" and "cpu" in options.split(","):
                mounts.setdefault("v1", (_unescape(fields[3]), _unescape(fields[4])))
    dirs: list[tuple[str, str, str]] = []  # (version, our cgroup's folder, the mount point above it)
    with open(os.path.join(root, "proc/self/cgroup"), encoding="utf-8") as fh:
        for line in fh:
            hierarchy, controllers, path = line.rstrip("\n").split(":", 2)
            version = "v2" if hierarchy == "0" and controllers == "" else "v1"
            if version == "v1" and "cpu" not in controllers.split(","):
                continue
            if version not in mounts:
                continue
            mount_root, mount_point = mounts[version]
            mount_point = os.path.join(root, mount_point.lstrip("/"))
            # The mount shows the hierarchy from mount_root down (a container sees its own cgroup as
            # the top); a path outside it (another cgroup namespace) means the mount is ours.
            relative = os.path.relpath(path, mount_root)
            inside = os.path.normpath(os.path.join(mount_point, relative)) if not relative.startswith("..") \
                else mount_point
            dirs.append((version, inside, mount_point))
    return [(version, folder) for version, inside, top in dirs for folder in _up_to(inside, top)]


def _up_to(folder: str, top: str) -> list[str]:
    folders = [folder]
    while os.path.normpath(folder) != os.path.normpath(top) and folder not in ("", "/"):
        folder = os.path.dirname(folder)
        folders.append(folder)
    return folders


def _read(path: str) -> Optional[str]:
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read().strip()
    except OSError:  # not there (no cpu controller at this level), or not readable
        return None


def _quota_at(version: str, folder: str) -> Optional[CpuQuota]:
    if version == "v2":
        text = _read(os.path.join(folder, "cpu.max"))  # "<quota> <period>" or "max <period>"
        if not text or text.split()[0] == "max":
            return None
        quota, period = (int(x) for x in text.split()[:2])
        return CpuQuota(quota / period, f"{folder}/cpu.max {text}")
    quota_text = _read(os.path.join(folder, "cpu.cfs_quota_us"))
    period_text = _read(os.path.join(folder, "cpu.cfs_period_us"))
    if not quota_text or not period_text or int(quota_text) <= 0:  # -1: no quota
        return None
    return CpuQuota(int(quota_text) / int(period_text),
                    f"{folder}/cpu.cfs_quota_us {quota_text} / cpu.cfs_period_us {period_text}")


def cgroup_cpu_quota(root: str = "/") -> Optional[CpuQuota]:
    """The tightest CPU quota over this process's cgroups and their parents; None = unlimited.
    `root` is where /proc and /sys are found (tests pass a folder of fake files)."""
    try:
        quotas = [q for version, folder in cgroup_folders(root) if (q := _quota_at(version, folder))]
    except OSError:  # no /proc (not Linux): nothing limits us that we could read
        return None
    return min(quotas, key=lambda q: q.cpus, default=None)


def affinity_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def choose(environ: Mapping[str, str], quota: Optional[CpuQuota], affinity: int) -> CpuBudget:
    """Threads per process: OMP_NUM_THREADS when set, else min(affinity, ceil(quota)) / local workers."""
    explicit = environ.get("OMP_NUM_THREADS", "").strip()
    if explicit:
        first = explicit.split(",")[0]  # OpenMP allows a list, one count per nesting level
        if not first.isdigit() or int(first) < 1:
            raise UsageError(f"OMP_NUM_THREADS: {explicit!r} is not accepted; accepted: a whole number >= 1")
        return CpuBudget(int(first), f"set by OMP_NUM_THREADS={explicit}")
    limit = math.ceil(quota.cpus - 1e-9) if quota is not None else None  # 1.5 CPUs: 2 threads
    if limit is not None and limit < affinity:
        cpus, reason = max(1, limit), f"from the cgroup CPU quota {quota.cpus:g} ({quota.source}); " \
                                      f"{affinity} CPU(s) in the affinity mask"
    else:
        cpus = affinity
        reason = f"from the affinity mask ({affinity} CPU(s)); " + (
            f"CPU quota {quota.cpus:g} ({quota.source})" if quota is not None else "no CPU quota")
    workers = int(environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    if workers > 1:
        reason += f"; shared by {workers} local workers"
    return CpuBudget(max(1, cpus // workers), reason)


def apply_cpu_budget(environ: Optional[Mapping[str, str]] = None, root: str = "/") -> CpuBudget:
    """Size torch's thread pools for this process (call once, at task start) and log the choice."""
    import torch

    budget = choose(os.environ if environ is None else environ, cgroup_cpu_quota(root), affinity_cpus())
    torch.set_num_threads(budget.threads)  # also OpenMP's and MKL's
    interop = ""
    if torch.get_num_interop_threads() != budget.threads:
        try:
            torch.set_num_interop_threads(budget.threads)
        except RuntimeError:  # its pool already started (an earlier task in this process): it stays
            interop = f"; the inter-op pool had started with {torch.get_num_interop_threads()}"
    log.info("CPU threads: %d, %s%s", torch.get_num_threads(), budget.reason, interop)
    return budget
