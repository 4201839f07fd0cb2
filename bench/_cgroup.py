"""A cgroup with a CPU quota, made directly (as root), for running a command as a container with
`resources.limits.cpu` runs: `bench/cpu_quota.py` and `tests/trainer/test_cpu_budget.py` use it.

The cgroup is made below this process's own, in the cgroup v1 `cpu` hierarchy where the kernel
mounts one, else in cgroup v2 (which needs the `cpu` controller enabled for children, refused in a
cgroup that holds processes other than the root). Processes join it with `join` (a Popen
`preexec_fn`); it is removed when the block ends.
"""
from __future__ import annotations

import contextlib
import os
import uuid
from typing import Iterator

PERIOD_US = 100_000  # the kernel's default CFS period, as a kubelet sets it


class CgroupUnavailable(RuntimeError):
    """No cgroup with a CPU quota can be made here (not root, no cpu controller, cgroup v2 refused it)."""


def _own_cgroup_folder() -> tuple[str, str]:
    """('v1' | 'v2', the folder of this process's cgroup that a CPU quota goes into)."""
    from deformable_detr.runtime.cpu_budget import cgroup_folders

    folders = cgroup_folders("/")  # this process's cgroup first, then its parents, per hierarchy
    for version in ("v1", "v2"):
        for found_version, folder in folders:
            if found_version == version:
                return version, folder
    raise CgroupUnavailable("no cgroup hierarchy with a cpu controller is mounted")


def _write(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)


@contextlib.contextmanager
def cpu_quota_cgroup(cpus: float) -> Iterator[str]:
    """A new cgroup limited to `cpus` CPUs (its folder); raises CgroupUnavailable naming why not."""
    version, parent = _own_cgroup_folder()
    folder = os.path.join(parent, f"ddetr-quota-{uuid.uuid4().hex[:8]}")
    try:
        if version == "v2":
            _write(os.path.join(parent, "cgroup.subtree_control"), "+cpu")
        os.mkdir(folder)
        quota = str(int(cpus * PERIOD_US))
        if version == "v2":
            _write(os.path.join(folder, "cpu.max"), f"{quota} {PERIOD_US}")
        else:
            _write(os.path.join(folder, "cpu.cfs_period_us"), str(PERIOD_US))
            _write(os.path.join(folder, "cpu.cfs_quota_us"), quota)
    except OSError as err:
        with contextlib.suppress(OSError):
            os.rmdir(folder)
        raise CgroupUnavailable(f"cannot make a cgroup {version} with a CPU quota under {parent}: {err}") from None
    try:
        yield folder
    finally:
        os.rmdir(folder)  # its processes have ended: an empty cgroup is removed with rmdir


def join(folder: str) -> None:
    """Move the calling process into the cgroup at `folder` (use as a Popen preexec_fn)."""
    _write(os.path.join(folder, "cgroup.procs"), str(os.getpid()))
