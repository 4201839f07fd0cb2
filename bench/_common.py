"""What every benchmark records beside its figures: the machine (CPU model, cores, load at
start, GPU, library versions) and, per figure, min/median/max over repeats after warm-up.

Figures taken on a shared machine are noisy; the load at start and the spread say how much,
and every bench measures its reference in the same run, interleaved, so that a ratio compares
like with like. Quote medians with their spread.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from typing import Callable, Optional

import torch


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def library_versions() -> dict:
    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "torch_cuda": torch.version.cuda}
    for name in ("transformers", "torchvision", "onnxruntime"):
        try:
            module = __import__(name)
            versions[name] = getattr(module, "__version__", "?")
        except Exception:  # not installed, or fails to import: recorded as absent
            versions[name] = None
    return versions


def machine(load_at_start: Optional[tuple] = None) -> dict:
    """Where the figures were taken. Call `load_at_start = os.getloadavg()` first thing in main."""
    load = load_at_start if load_at_start is not None else os.getloadavg()
    info = {"cpu_model": cpu_model(), "cpu_cores": os.cpu_count(),
            "cpu_cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "torch_threads": torch.get_num_threads(), "load_at_start_1_5_15min": [round(x, 2) for x in load],
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "versions": library_versions()}
    return info


def spread(samples: list[float]) -> dict:
    """min/median/max of samples (seconds or any unit), and their count."""
    return {"min": min(samples), "median": statistics.median(samples), "max": max(samples), "n": len(samples)}


def ratio_spread(numerators: list[float], denominators: list[float]) -> dict:
    """min/median/max of per-repeat ratios of interleaved measurements (reference / ours): the
    two were taken back to back, so each ratio saw about the same load."""
    return spread([a / b for a, b in zip(numerators, denominators)])


def time_interleaved(actions: dict[str, Callable[[], None]], repeats: int, warmup: int = 1,
                     synchronize: Callable[[], None] = lambda: None,
                     min_seconds: float = 0.0) -> dict[str, list[float]]:
    """Run each action `warmup` times, then `repeats` rounds of all of them in turn (the reference
    and the candidate see the same load); returns the seconds per action per round. With
    `min_seconds`, short actions are repeated inside one sample until it lasts that long and the
    sample is the mean per call (timer resolution and launch noise)."""
    for action in actions.values():
        for _ in range(warmup):
            action()
        synchronize()
    inner = {}
    for name, action in actions.items():
        count = 1
        if min_seconds > 0:
            start = time.perf_counter()
            action()
            synchronize()
            once = max(time.perf_counter() - start, 1e-9)
            count = max(1, min(1000, int(min_seconds / once)))
        inner[name] = count
    samples: dict[str, list[float]] = {name: [] for name in actions}
    for _ in range(repeats):
        for name, action in actions.items():
            start = time.perf_counter()
            for _ in range(inner[name]):
                action()
            synchronize()
            samples[name].append((time.perf_counter() - start) / inner[name])
    return samples


def fmt(stats: dict, scale: float = 1.0, digits: int = 2) -> str:
    """'median (min-max)'."""
    return (f"{stats['median'] * scale:.{digits}f} ({stats['min'] * scale:.{digits}f}-"
            f"{stats['max'] * scale:.{digits}f})")


def write_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as out:
        json.dump(payload, out, indent=2)
        out.write("\n")
    os.replace(tmp, path)
