"""Images per second of `deformable-detr train` on the CPU: the data loader alone, then the whole
training loop with 1 and with 2 processes (torchrun, gloo), on the same small configuration.

The data loader alone is the reference: when training's images/s comes close to it, loading
bounds training; far below it, compute does. The 2-process figure over the 1-process one is
the scaling on this machine (on a 2-core machine two processes share the same cores, so
expect about 1x, not 2x). Training figures are the median images/s of the steps in
train_log.jsonl after the first (warm-up) steps, best of `--repeats` interleaved runs; all
runs happen in this one invocation.
Prints a table and writes bench/results/train_throughput.json.

    OMP_NUM_THREADS=2 python3 bench/train_throughput.py [--images 64] [--image-size 128] [--batch 4]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import yaml

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "train_throughput.json")
WARMUP_STEPS = 2


def small_spec(data: dict, results_dir: str, image_size: int, batch: int, workers: int) -> dict:
    """ResNet-18, hidden 64, 2 levels, 2+2 layers, 50 queries, square images padded to `image_size`."""
    return {
        "results_dir": results_dir,
        "model": {"backbone": "resnet_18", "hidden_dim": 64, "nheads": 4, "enc_layers": 2, "dec_layers": 2,
                  "dim_feedforward": 256, "num_queries": 50, "num_feature_levels": 2, "return_interm_indices": [2, 3],
                  "enc_n_points": 4, "dec_n_points": 4, "num_select": 50},
        "dataset": {"num_classes": data["num_classes"], "batch_size": batch, "workers": workers, "pin_memory": False,
                    "train_data_sources": [{"image_dir": data["train"]["image_dir"],
                                            "json_file": data["train"]["json_file"]}],
                    "augmentation": {"scales": [image_size], "train_random_resize": [image_size],
                                     "train_random_crop_min": image_size // 2, "train_random_crop_max": image_size,
                                     "random_resize_max_size": image_size, "test_random_resize": image_size,
                                     "fixed_padding": True}},
        "train": {"num_epochs": 1, "seed": 0, "activation_checkpoint": False, "auto_resume": False,
                  "checkpoint_interval": 1, "optim": {"lr": 1e-4}},
    }


def loader_images_per_second(spec_path: str) -> float:
    from deformable_detr.config import load_spec
    from deformable_detr.data import build_dataloader

    spec = load_spec(spec_path, [])
    loader = build_dataloader(spec, "train")
    loader.sampler.set_epoch(0)
    iterator = iter(loader)
    for _ in range(min(WARMUP_STEPS, len(loader) - 1)):  # let the workers start
        next(iterator)
    start, images = time.perf_counter(), 0
    for _images, _masks, targets in iterator:
        images += len(targets)
    return images / (time.perf_counter() - start)


def train_images_per_second(spec_path: str, results_dir: str, processes: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, int(os.environ.get("OMP_NUM_THREADS", "2")) // processes)))
    cmd = [sys.executable, "-m", "deformable_detr", "train", "-e", spec_path, "-r", results_dir]
    if processes > 1:
        cmd += ["--gpus", str(processes)]
    start = time.perf_counter()
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"training with {processes} process(es) failed:\n{result.stderr[-3000:]}")
    with open(os.path.join(results_dir, "train", "train_log.jsonl"), encoding="utf-8") as fh:
        steps = [r for r in map(json.loads, fh) if r["kind"] == "step"]
    timed = steps[WARMUP_STEPS:] or steps
    return {"images_per_s": statistics.median(r["images_per_s"] for r in timed),
            "data_wait_fraction": statistics.median(r["data_wait_seconds"] / r["step_seconds"] for r in timed),
            "steps": len(steps), "wall_seconds": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=64, help="training images")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4, help="images per process and step")
    parser.add_argument("--workers", type=int, default=1, help="data-loader workers per process")
    parser.add_argument("--repeats", type=int, default=2, help="training runs per process count (best kept)")
    args = parser.parse_args()

    from deformable_detr.data.example import make_example_data

    with tempfile.TemporaryDirectory(prefix="bench-train-") as folder:
        data = make_example_data(os.path.join(folder, "data"), num_train=args.images, num_val=2,
                                 image_size=args.image_size, seed=0, quiet=True)
        spec_path = os.path.join(folder, "spec.yaml")
        with open(spec_path, "w", encoding="utf-8") as fh:
            yaml.safe_dump(small_spec(data, os.path.join(folder, "unused"), args.image_size, args.batch,
                                      args.workers), fh)
        loader = loader_images_per_second(spec_path)
        runs: dict[int, list[dict]] = {1: [], 2: []}
        for repeat in range(args.repeats):  # interleaved, so both see the same machine load
            for processes in (1, 2):
                out = os.path.join(folder, f"p{processes}-{repeat}")
                runs[processes].append(train_images_per_second(spec_path, out, processes))
        one, two = (max(runs[p], key=lambda r: r["images_per_s"]) for p in (1, 2))

    rows = [("data loader alone (reference)", loader, None, None),
            ("train, 1 process", one["images_per_s"], one["data_wait_fraction"], one["steps"]),
            ("train, 2 processes (gloo)", two["images_per_s"], two["data_wait_fraction"], two["steps"])]
    print(f"{'what':<32} {'images/s':>9} {'vs loader':>10} {'data wait':>10} {'steps':>6}")
    for name, rate, wait, steps in rows:
        wait_text = "" if wait is None else f"{wait:.1%}"
        print(f"{name:<32} {rate:>9.2f} {rate / loader:>9.3f}x {wait_text:>10} {'' if steps is None else steps:>6}")
    print(f"2 processes / 1 process: {two['images_per_s'] / one['images_per_s']:.2f}x")

    report = {
        "config": {"images": args.images, "image_size": args.image_size, "batch_per_process": args.batch,
                   "workers": args.workers, "model": "resnet_18, hidden 64, 2 levels, 2+2 layers, 50 queries",
                   "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "cpu_count": os.cpu_count(),
                   "machine": platform.machine(), "torch": torch.__version__, "device": "cpu"},
        "repeats": args.repeats,
        "loader_images_per_s": loader,
        "train_1_process": one, "train_2_processes": two,
        "train_1_process_vs_loader": one["images_per_s"] / loader,
        "scaling_2_vs_1": two["images_per_s"] / one["images_per_s"],
    }
    from deformable_detr.runtime.files import write_text_atomic

    write_text_atomic(RESULTS, json.dumps(report, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
