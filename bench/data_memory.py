"""Peak memory of a data-loading pass: dataset_type serialized against default.

Generates a COCO annotation file of 100k images (seeded; 1..9 boxes each), then, for
each dataset_type, runs one training pass over it (default_sampler: shuffled, as in
training) with 8 data-loader workers in a fresh process and samples the memory of that
process tree (main + workers) every 50 ms, separately while the dataset is built
(JSON parsed in the main process) and during the pass (workers running):
  - RSS summed over the tree (what `top` shows; shared pages count once per process),
  - PSS summed over the tree (shared pages split between sharers: the real footprint).
Images are not decoded (a blank image of the JSON's size stands in, 32x32) and each
worker reduces its batch to box counts before sending it back, so the numbers are
about annotation handling (every item still goes through the dataset and its
transform in a worker), not tensor transport; files are not checked. `default`
(Python objects) is the reference: workers touching Python objects copy their pages.

    python bench/data_memory.py [--images 100000] [--workers 8]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "data_memory.json")


def write_annotations(path: str, num_images: int, seed: int = 0) -> int:
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 10, size=num_images)
    images = [{"id": i + 1, "file_name": f"images/{i:07d}.jpg", "height": 32, "width": 32}
              for i in range(num_images)]
    xy = rng.uniform(0, 20, size=(int(counts.sum()), 2)).round(2)
    wh = rng.uniform(2, 12, size=(int(counts.sum()), 2)).round(2)
    cats = rng.integers(1, 11, size=int(counts.sum()))
    image_ids = np.repeat(np.arange(1, num_images + 1), counts)
    annotations = [{"id": k + 1, "image_id": int(i), "category_id": int(c), "bbox": [*map(float, p), *map(float, s)],
                    "area": float(s[0] * s[1]), "iscrowd": 0}
                   for k, (i, c, p, s) in enumerate(zip(image_ids, cats, xy, wh))]
    with open(path, "w") as fh:
        json.dump({"images": images, "annotations": annotations,
                   "categories": [{"id": c, "name": f"class_{c}"} for c in range(1, 11)]}, fh)
    return len(annotations)


def tree_pids(pid: int) -> list[int]:
    pids, stack = [], [pid]
    while stack:
        current = stack.pop()
        pids.append(current)
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as fh:
                    stack.extend(int(c) for c in fh.read().split())
        except (FileNotFoundError, ProcessLookupError):
            continue
    return pids


def rollup_kb(pid: int) -> tuple[int, int]:
    """(Rss, Pss) in kB of one process, or zeros when it is gone."""
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Rss:"):
                    rss = int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return rss, pss


def measure(dataset_type: str, json_file: str, workers: int, batch_size: int) -> dict:
    marker = json_file + f".{dataset_type}.pass"  # the child creates it when the pass starts
    child = subprocess.Popen([sys.executable, __file__, "--child", dataset_type, "--json", json_file,
                              "--workers", str(workers), "--batch-size", str(batch_size), "--marker", marker],
                             stdout=subprocess.PIPE, text=True)
    peaks = {"build": [0, 0], "pass": [0, 0]}
    peak_procs = 0
    while child.poll() is None:
        phase = "pass" if os.path.exists(marker) else "build"
        pids = tree_pids(child.pid)
        samples = [rollup_kb(p) for p in pids]
        peaks[phase][0] = max(peaks[phase][0], sum(s[0] for s in samples))
        peaks[phase][1] = max(peaks[phase][1], sum(s[1] for s in samples))
        peak_procs = max(peak_procs, len(pids))
        time.sleep(0.05)
    if child.returncode != 0:
        raise SystemExit(f"{dataset_type} child failed with {child.returncode}")
    report = json.loads(child.stdout.read().strip().splitlines()[-1])
    return {"dataset_type": dataset_type, "build_peak_rss_mib": peaks["build"][0] / 1024,
            "pass_peak_tree_rss_mib": peaks["pass"][0] / 1024, "pass_peak_tree_pss_mib": peaks["pass"][1] / 1024,
            "processes": peak_procs, **report}


def child_pass(dataset_type: str, json_file: str, workers: int, batch_size: int, marker: str) -> None:
    from deformable_detr.config.loader import spec_from_dict
    from deformable_detr.data import CocoDetection, build_dataloader, build_eval_transform

    spec = spec_from_dict({"dataset": {"dataset_type": dataset_type, "workers": workers, "batch_size": batch_size,
                                       "num_classes": 11, "pin_memory": False,
                                       "augmentation": {"test_random_resize": 32, "random_resize_max_size": 32,
                                                        "fixed_padding": False}}})
    start = time.perf_counter()
    dataset = CocoDetection([_source(json_file)], 11,
                            build_eval_transform(spec.dataset.augmentation), dataset_type,
                            check_files=False, decode_images=False)
    built = time.perf_counter()
    with open("/proc/self/status") as fh:
        rss_after_build = next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:")) / 1024
    loader = build_dataloader(spec, "train", dataset=dataset)  # shuffled; the dataset keeps the cheap eval resize
    loader.collate_fn = count_boxes
    loader.sampler.set_epoch(0)
    open(marker, "w").close()
    images = boxes = 0
    for batch_images, batch_boxes in loader:
        images += batch_images
        boxes += batch_boxes
        if images % 20_000 < batch_images:
            print(f"{dataset_type}: {images} images", file=sys.stderr, flush=True)
    done = time.perf_counter()
    print(json.dumps({"images": images, "boxes": boxes, "build_s": built - start, "pass_s": done - built,
                      "main_rss_after_build_mib": rss_after_build}))


def count_boxes(batch: list) -> tuple[int, int]:
    """Runs in the worker: (images, boxes) of a batch, so little crosses back to the main process."""
    return len(batch), sum(len(target["labels"]) for _, target in batch)


def _source(json_file: str):
    from deformable_detr.config.schema import DataSource
    return DataSource(image_dir=os.path.dirname(json_file), json_file=json_file)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--child", choices=["serialized", "default"])
    parser.add_argument("--json")
    parser.add_argument("--marker")
    args = parser.parse_args()
    if args.child:
        child_pass(args.child, args.json, args.workers, args.batch_size, args.marker)
        return
    with tempfile.TemporaryDirectory() as tmp:
        json_file = os.path.join(tmp, "annotations.json")
        num_boxes = write_annotations(json_file, args.images)
        size_mib = os.path.getsize(json_file) / 2**20
        rows = [measure(kind, json_file, args.workers, args.batch_size) for kind in ("default", "serialized")]
    reference, candidate = rows
    print(f"{args.images} images, {num_boxes} boxes ({size_mib:.0f} MiB JSON), {args.workers} workers, one pass")
    print(f"{'dataset_type':<12} {'main RSS after build':>21} {'pass: tree RSS peak':>20} "
          f"{'pass: tree PSS peak':>20} {'build s':>8} {'pass s':>7}   (MiB)")
    for row in rows:
        print(f"{row['dataset_type']:<12} {row['main_rss_after_build_mib']:>21.0f} {row['pass_peak_tree_rss_mib']:>20.0f} "
              f"{row['pass_peak_tree_pss_mib']:>20.0f} {row['build_s']:>8.1f} {row['pass_s']:>7.1f}")
    ratios = {key: candidate[key] / reference[key]
              for key in ("main_rss_after_build_mib", "pass_peak_tree_rss_mib", "pass_peak_tree_pss_mib")}
    print("serialized / default: " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as fh:
        json.dump({"images": args.images, "boxes": num_boxes, "json_mib": size_mib, "workers": args.workers,
                   "batch_size": args.batch_size, "rows": rows, "ratios": ratios,
                   "measured": "peaks over 50 ms samples of summed Rss/Pss (smaps_rollup) of the process tree "
                               "during one shuffled pass; images not decoded, batches reduced to counts in the workers"}, fh, indent=2)
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
