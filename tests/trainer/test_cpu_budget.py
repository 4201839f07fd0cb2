"""Thread pools sized from the container (runtime/cpu_budget.py): cgroup v1/v2 quota files read from a
fake /proc and /sys, the choice and its precedence, and the trainer itself under a real CPU quota
(a cgroup made here) and a real affinity mask (taskset)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from deformable_detr.errors import UsageError
from deformable_detr.runtime.cpu_budget import CpuQuota, apply_cpu_budget, cgroup_cpu_quota, choose
from deformable_detr.runtime.logging import setup_logging
from test_train import tiny_train_spec
from train_records import read_log

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from _cgroup import cpu_quota_cgroup, join  # noqa: E402


def fake_root(tmp_path, mounts: list[str], cgroup: list[str], files: dict[str, str]) -> str:
    """A folder standing for `/`: proc/self/mountinfo (lines after the mount id fields), proc/self/cgroup,
    and the cgroup files at their paths."""
    proc = tmp_path / "proc" / "self"
    proc.mkdir(parents=True)
    (proc / "mountinfo").write_text("".join(f"{30 + i} 1 0:{40 + i} {line}\n" for i, line in enumerate(mounts)))
    (proc / "cgroup").write_text("".join(line + "\n" for line in cgroup))
    for path, text in files.items():
        target = tmp_path / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text + "\n")
    return str(tmp_path)


V2_MOUNT = "/ /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate"
ROOT_MOUNT = "/ / rw,relatime - overlay overlay rw"


def test_cgroup_v2_container_reads_its_own_cpu_max(tmp_path):
    root = fake_root(tmp_path, [ROOT_MOUNT, V2_MOUNT], ["0::/"], {"/sys/fs/cgroup/cpu.max": "150000 100000"})
    quota = cgroup_cpu_quota(root)
    assert quota.cpus == 1.5 and quota.source.endswith("sys/fs/cgroup/cpu.max 150000 100000")
    assert choose({}, quota, affinity=16).threads == 2  # 1.5 CPUs: rounded up


def test_cgroup_v2_parent_quota_limits_the_child(tmp_path):
    """A pod's quota sits on the pod's cgroup; the container below it says max."""
    pod = "/sys/fs/cgroup/kubepods.slice/pod1"
    root = fake_root(tmp_path, [V2_MOUNT], ["0::/kubepods.slice/pod1/ctr"],
                     {f"{pod}/ctr/cpu.max": "max 100000", f"{pod}/cpu.max": "100000 100000",
                      "/sys/fs/cgroup/kubepods.slice/cpu.max": "max 100000"})
    quota = cgroup_cpu_quota(root)
    assert quota.cpus == 1.0 and f"{pod}/cpu.max" in quota.source


def test_cgroup_v1_bind_mounted_container_folder(tmp_path):
    """Docker's and containerd's v1 layout: the container's own cgroup folder mounted at /sys/fs/cgroup/cpu,cpuacct,
    /proc/self/cgroup naming its path on the host."""
    mount = "/docker/abc /sys/fs/cgroup/cpu,cpuacct ro,nosuid - cgroup cgroup rw,cpu,cpuacct"
    root = fake_root(tmp_path, [mount], ["4:cpu,cpuacct:/docker/abc", "3:memory:/docker/abc"],
                     {"/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us": "200000",
                      "/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us": "100000"})
    quota = cgroup_cpu_quota(root)
    assert quota.cpus == 2.0 and "cpu.cfs_quota_us 200000 / cpu.cfs_period_us 100000" in quota.source


def test_cgroup_v1_nested_path_with_an_escaped_space(tmp_path):
    mount = "/ /sys/fs/cgroup/my\\040cpu rw - cgroup cgroup rw,cpu"
    folder = "/sys/fs/cgroup/my cpu/jobs/one"
    root = fake_root(tmp_path, [mount], ["1:cpu:/jobs/one"],
                     {f"{folder}/cpu.cfs_quota_us": "50000", f"{folder}/cpu.cfs_period_us": "100000",
                      "/sys/fs/cgroup/my cpu/jobs/cpu.cfs_quota_us": "-1",
                      "/sys/fs/cgroup/my cpu/jobs/cpu.cfs_period_us": "100000"})
    assert cgroup_cpu_quota(root).cpus == 0.5
    assert choose({}, cgroup_cpu_quota(root), affinity=4).threads == 1


def test_no_quota_anywhere(tmp_path):
    """This machine's hybrid layout: v1 cpu without a quota (-1), v2 without the cpu controller."""
    root = fake_root(tmp_path, ["/ /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu",
                                "/ /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw"],
                     ["1:cpu:/", "2:cpuacct:/", "0::/"],
                     {"/sys/fs/cgroup/cpu/cpu.cfs_quota_us": "-1", "/sys/fs/cgroup/cpu/cpu.cfs_period_us": "100000"})
    assert cgroup_cpu_quota(root) is None
    budget = choose({}, None, affinity=3)
    assert budget.threads == 3 and budget.reason == "from the affinity mask (3 CPU(s)); no CPU quota"
    assert cgroup_cpu_quota(str(tmp_path / "nothing-here")) is None  # no /proc at all


def test_choice_and_precedence():
    one = CpuQuota(1.0, "q")
    assert choose({}, CpuQuota(4.0, "q"), affinity=2).threads == 2  # the affinity mask is tighter
    assert choose({}, CpuQuota(0.2, "q"), affinity=8).threads == 1  # never 0
    assert choose({"LOCAL_WORLD_SIZE": "2"}, CpuQuota(4.0, "q"), affinity=8).threads == 2
    explicit = choose({"OMP_NUM_THREADS": "3"}, one, affinity=8)  # the user's setting wins over the quota
    assert explicit.threads == 3 and explicit.reason == "set by OMP_NUM_THREADS=3"
    assert choose({"OMP_NUM_THREADS": "4,2"}, one, affinity=8).threads == 4  # OpenMP's per-level list
    for bad in ("abc", "0", "-2"):
        with pytest.raises(UsageError, match=f"OMP_NUM_THREADS: '{bad}' is not accepted; accepted: a whole number"):
            choose({"OMP_NUM_THREADS": bad}, one, affinity=8)


def test_apply_sets_torch_and_logs_one_line(tmp_path, logged):
    root = fake_root(tmp_path, [V2_MOUNT], ["0::/"], {"/sys/fs/cgroup/cpu.max": "100000 100000"})
    setup_logging()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        budget = apply_cpu_budget({}, root=root)
        assert budget.threads == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    lines = [m for m in logged if m.startswith("CPU threads:")]
    assert len(lines) == 1 and lines[0].startswith("CPU threads: 1, from the cgroup CPU quota 1 (")


def _train_under(tiny_coco, tmp_path, preexec) -> tuple[str, list]:
    """`deformable-detr train` (one epoch of the tiny set) in a child process; its stderr and log records."""
    spec = tiny_train_spec(tiny_coco, tmp_path / "results", num_epochs=1)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # let the trainer choose
    run = subprocess.run([sys.executable, "-m", "deformable_detr", "train", "-e", str(path)], env=env,
                         preexec_fn=preexec, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stderr, read_log(str(tmp_path / "results" / "train"))


def _chosen(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if "CPU threads:" in line]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0].split("CPU threads: ", 1)[1]


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs 2 CPUs to tell a 1-CPU quota from the affinity mask")
def test_trainer_under_a_real_cpu_quota(tiny_coco, tmp_path):
    """A cgroup limited to 1 CPU on this machine of 2 or more: the trainer takes 1 thread (torch alone: all)."""
    with cpu_quota_cgroup(1.0) as folder:
        stderr, records = _train_under(tiny_coco, tmp_path, lambda: join(folder))
    chosen = _chosen(stderr)
    assert chosen.startswith(f"1, from the cgroup CPU quota 1 ({folder}/cpu."), chosen
    assert any(r["kind"] == "step" for r in records)


def test_trainer_under_a_one_cpu_affinity_mask(tiny_coco, tmp_path):
    cpu = sorted(os.sched_getaffinity(0))[0]
    stderr, records = _train_under(tiny_coco, tmp_path, lambda: os.sched_setaffinity(0, {cpu}))
    assert _chosen(stderr).startswith("1, from the affinity mask (1 CPU(s));"), stderr[-2000:]
    assert any(r["kind"] == "step" for r in records)
