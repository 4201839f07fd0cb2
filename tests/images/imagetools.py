"""Running the images built by scripts/build-images.sh, without a container engine daemon.

`run_in_image` starts a command the way a kubelet with the chart's securityContext would: the
image's root filesystem mounted read-only, the image's user (numeric uid:gid), its environment and
workdir, and a writable folder at the workdir (an emptyDir there; here a host folder, so a test
can read what the command wrote, or a tmpfs). buildah mounts the image; util-linux's unshare gives
the command its own mount and PID namespaces; chroot switches to the image's root and user.
(podman run would do the same, but its runtime cannot set rlimits on this machine.)
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "scripts" / "build-images.sh"


def storage_env() -> dict[str, str]:
    """The storage driver scripts/build-images.sh uses, for buildah/podman calls of the tests."""
    driver = subprocess.run(["bash", str(REPO / "scripts" / "images" / "storage-driver.sh")],
                            capture_output=True, text=True, check=True).stdout.strip()
    return {**os.environ, "STORAGE_DRIVER": driver}


def parse_outputs(stdout: str) -> dict[str, str]:
    """The KEY=value lines build-images.sh ends with, in order."""
    return dict(line.split("=", 1) for line in stdout.splitlines() if "=" in line and line.split("=", 1)[0].isupper())


def build(*images: str, env: Optional[dict] = None, timeout: int = 3600) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(BUILD_SCRIPT), *images], capture_output=True, text=True,
                          env={**storage_env(), **(env or {})}, timeout=timeout)


def image_config(ref: str) -> dict:
    """The image's Docker config (User, Entrypoint, Env, WorkingDir, Labels, ...)."""
    out = subprocess.run(["buildah", "inspect", "--type", "image", ref], capture_output=True, text=True,
                         check=True, env=storage_env()).stdout
    return json.loads(out)["Docker"]["config"]


@contextmanager
def mounted(ref: str) -> Iterator[Path]:
    """The image's root filesystem, mounted on the host (a working container, removed after)."""
    env = storage_env()
    container = subprocess.run(["buildah", "from", "--quiet", "--pull-never", ref], capture_output=True, text=True,
                               check=True, env=env).stdout.strip()
    try:
        root = subprocess.run(["buildah", "mount", container], capture_output=True, text=True, check=True,
                              env=env).stdout.strip()
        yield Path(root)
    finally:
        subprocess.run(["buildah", "umount", container], capture_output=True, env=env)
        subprocess.run(["buildah", "rm", container], capture_output=True, env=env)


def run_in_image(ref: str, argv: list[str], workdir_from: Optional[Path] = None, timeout: int = 600,
                 extra_env: Optional[dict] = None) -> subprocess.CompletedProcess:
    """Run argv in the image as its user, read-only root, with a writable workdir: the host folder
    `workdir_from` (given to the image's uid) or a fresh tmpfs. /tmp is a tmpfs too, /dev/shm the host's.
    The entrypoint is not used: argv[0] is found on the image's PATH."""
    config = image_config(ref)
    user = config.get("User") or "0:0"
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and gid.isdigit(), f"{ref}: USER {user!r} is not numeric uid:gid"
    workdir = config.get("WorkingDir") or "/"
    env = [item for item in config.get("Env") or []] + [f"{k}={v}" for k, v in (extra_env or {}).items()]
    if workdir_from is not None:
        os.chown(workdir_from, int(uid), int(gid))
    with mounted(ref) as root:
        setup = [f"mount --bind {root} {root}", f"mount -o remount,bind,ro {root}",
                 f"mount --rbind /dev {root}/dev", f"mount -t proc proc {root}/proc",
                 f"mount -t tmpfs -o mode=1777 tmpfs {root}/tmp"]
        if workdir != "/tmp":
            setup.append(f"mount --bind {shlex.quote(str(workdir_from))} {root}{workdir}" if workdir_from is not None
                         else f"mount -t tmpfs -o uid={uid},gid={gid},mode=0750 tmpfs {root}{workdir}")
        inner = ["chroot", f"--userspec={uid}:{gid}", str(root), "/usr/bin/env", "-i", *env, "/bin/sh", "-c",
                 'cd "$0" && exec "$@"', workdir, *argv]
        script = " && ".join(setup) + " && exec " + shlex.join(inner)
        return subprocess.run(["unshare", "--mount", "--pid", "--fork", "--propagation", "private", "sh", "-c", script],
                              capture_output=True, text=True, timeout=timeout)


def writable_workdir() -> tempfile.TemporaryDirectory:
    """A host folder for run_in_image's workdir (removed with the context)."""
    return tempfile.TemporaryDirectory(prefix="ddetr-image-work-")


def tools_missing() -> list[str]:
    return [tool for tool in ("buildah", "unshare", "chroot") if shutil.which(tool) is None]
