"""Concurrent builds of the CPU kernel: processes that find a build under way wait for it and
load its result, so every rank of a job runs the same implementation."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from filelock import FileLock

from deformable_detr.ops import kernels

HAS_TOOLCHAIN = shutil.which("c++") is not None and shutil.which("ninja") is not None
needs_toolchain = pytest.mark.skipif(not HAS_TOOLCHAIN, reason="no C++ compiler or ninja to build the CPU kernel")

# One process of a job: picks the implementation the way the model does, runs it on fixed
# inputs and prints the implementation and the output's checksum.
WORKER = (
    "import torch\n"
    "from deformable_detr.runtime.logging import setup_logging\n"
    "from deformable_detr.ops import select_implementation, multi_scale_deformable_attention as msda\n"
    "setup_logging()\n"
    "g = torch.Generator().manual_seed(0)\n"
    "shapes = torch.tensor([[4, 5], [2, 3]]); start = torch.tensor([0, 20])\n"
    "args = (torch.randn(1, 26, 2, 4, generator=g), shapes, start,\n"
    "        torch.rand(1, 3, 2, 2, 2, 2, generator=g), torch.rand(1, 3, 2, 2, 2, generator=g))\n"
    "print(select_implementation(torch.device('cpu')), repr(msda(*args).double().sum().item()), flush=True)\n"
)
WAITING = "another process is building the CPU kernel"


def start_worker(extensions_dir: Path, wait_s: float) -> subprocess.Popen:
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(extensions_dir), DDETR_MSDA_IMPL="",
               OMP_NUM_THREADS="1", **{kernels.BUILD_WAIT_ENV: str(wait_s)})
    return subprocess.Popen([sys.executable, "-c", WORKER], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def read_until_waiting(worker: subprocess.Popen) -> list[str]:
    """stderr lines of `worker` up to its log line saying that it waits for another build."""
    lines = []
    for line in worker.stderr:
        lines.append(line)
        if WAITING in line:
            return lines
    raise AssertionError("the worker never waited:\n" + "".join(lines))


def finish(worker: subprocess.Popen, earlier_stderr: list[str]) -> tuple[str, str]:
    stdout, stderr = worker.communicate(timeout=600)  # a real CPU build takes minutes on a loaded 2-core machine
    stderr = "".join(earlier_stderr) + stderr
    assert worker.returncode == 0, stderr
    return stdout, stderr


def implementation_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "deformable attention on cpu" in line]


@pytest.fixture()
def cache_folder(tmp_path: Path) -> Path:
    """The CPU build folder under a fresh TORCH_EXTENSIONS_DIR (tmp_path), created empty."""
    folder = tmp_path / "deformable_detr" / kernels.extension_name("cpu")
    folder.mkdir(parents=True)
    return folder


@needs_toolchain
def test_waiter_loads_the_build_it_waited_for(tmp_path, cache_folder):
    """While another process holds the build lock, a worker waits (and says so); when that build
    lands it loads the compiled kernel instead of falling back to the reference."""
    built = kernels.build("cpu")  # the persistent cache's build stands in for the other process's
    lock = FileLock(str(cache_folder / "build.lock"))
    lock.acquire()
    try:
        worker = start_worker(tmp_path, wait_s=120)
        earlier = read_until_waiting(worker)
        library = f"{kernels.extension_name('cpu')}.so"
        shutil.copy(Path(built.__file__), cache_folder / library)
        (cache_folder / "BUILT").write_text(kernels.extension_name("cpu") + "\n")
    finally:
        lock.release()
    stdout, stderr = finish(worker, earlier)
    assert stdout.split()[0] == "cpu"
    chosen = implementation_lines(stderr)
    assert len(chosen) == 1 and chosen[0].endswith("multi-scale deformable attention on cpu: compiled cpu kernel")
    assert "building the CPU kernel of multi-scale" not in stderr  # it loaded the other build, it did not compile


def test_waiter_falls_back_once_when_the_build_it_waited_for_failed(tmp_path, cache_folder):
    lock = FileLock(str(cache_folder / "build.lock"))
    lock.acquire()
    try:
        worker = start_worker(tmp_path, wait_s=120)
        earlier = read_until_waiting(worker)
        (cache_folder / "FAILED").write_text("msda_cpu.cpp:1: error: boom\n")
    finally:
        lock.release()
    stdout, stderr = finish(worker, earlier)
    assert stdout.split()[0] == "reference"
    fallback = implementation_lines(stderr)
    assert len(fallback) == 1
    assert "PyTorch reference (cpu kernel unavailable: the build by another process failed " \
           "(msda_cpu.cpp:1: error: boom)" in fallback[0]
    assert "building the CPU kernel of multi-scale" not in stderr  # a recorded failure is not retried by every rank


def test_waiter_falls_back_once_after_the_bounded_wait(tmp_path, cache_folder):
    with FileLock(str(cache_folder / "build.lock")):
        stdout, stderr = finish(start_worker(tmp_path, wait_s=1), [])
    assert stdout.split()[0] == "reference"
    assert WAITING in stderr and "waiting up to 1 s" in stderr
    fallback = implementation_lines(stderr)
    assert len(fallback) == 1 and "gave up after waiting 1 s for another process's build" in fallback[0]


@pytest.mark.slow
@needs_toolchain
def test_concurrent_processes_build_once_and_all_run_the_kernel(tmp_path):
    """Three processes starting together on an empty cache (a real build, ~30 s): one compiles,
    the others wait for it; all run the compiled kernel with identical results."""
    workers = [start_worker(tmp_path, wait_s=600) for _ in range(3)]
    results = [finish(worker, []) for worker in workers]
    assert [stdout.split()[0] for stdout, _ in results] == ["cpu"] * 3
    assert len({stdout.split()[1] for stdout, _ in results}) == 1
    assert sum("building the CPU kernel of multi-scale" in stderr for _, stderr in results) == 1
    for _, stderr in results:
        chosen = implementation_lines(stderr)
        assert len(chosen) == 1 and chosen[0].endswith("compiled cpu kernel")
