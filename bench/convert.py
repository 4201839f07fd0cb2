"""Throughput of `convert`: KITTI label files per second on a generated 50k-image tree.

The tree is one data source of 50k images (one small JPEG hard-linked 50k times, so
image headers are still opened and read per file) with 1..9 KITTI lines per label file.
Reference, measured in the same run: a bare pass that only opens and reads every label
file and every image header (no parsing, no JSON), the floor any converter pays.

    python bench/convert.py [--images 50000] [--shards 32]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
from PIL import Image

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "convert.json")
CLASSES = ("Person", "rider", "backpack", "face", "car", "rolling_bag")


def make_tree(root: str, num_images: int, seed: int = 0) -> str:
    source = os.path.join(root, "source")
    os.makedirs(os.path.join(source, "images"))
    os.makedirs(os.path.join(source, "labels"))
    template = os.path.join(root, "template.jpg")
    Image.new("RGB", (96, 64), (40, 80, 120)).save(template)
    rng = np.random.default_rng(seed)
    for index in range(num_images):
        name = f"{index:07d}"
        os.link(template, os.path.join(source, "images", f"{name}.jpg"))
        lines = []
        for _ in range(int(rng.integers(1, 10))):
            x1, y1 = rng.uniform(0, 60, 2)
            w, h = rng.uniform(2, 30, 2)
            cls = CLASSES[int(rng.integers(len(CLASSES)))]
            lines.append(f"{cls} 0.00 0 0.00 {x1:.2f} {y1:.2f} {x1 + w:.2f} {y1 + h:.2f} "
                         "0.00 0.00 0.00 0.00 0.00 0.00 0.00\n")
        with open(os.path.join(source, "labels", f"{name}.txt"), "w") as fh:
            fh.writelines(lines)
    listing = os.path.join(root, "sources.txt")
    with open(listing, "w") as fh:
        fh.write("source\n")
    return listing


def bare_read(root: str) -> float:
    start = time.perf_counter()
    source = os.path.join(root, "source")
    for name in sorted(os.listdir(os.path.join(source, "images"))):
        with open(os.path.join(source, "labels", name[:-4] + ".txt"), "rb") as fh:
            fh.read()
        with Image.open(os.path.join(source, "images", name)) as image:
            image.size
    return time.perf_counter() - start


def run_convert(listing: str, out: str, shards: int) -> float:
    from deformable_detr.config.loader import spec_from_dict
    from deformable_detr.tasks import convert

    spec = spec_from_dict({"results_dir": out, "convert": {"input_source": listing, "num_shards": shards}})
    start = time.perf_counter()
    assert convert.run(spec) == 0
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=50_000)
    parser.add_argument("--shards", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        listing = make_tree(root, args.images)
        bare_s = bare_read(root)
        convert_s = run_convert(listing, os.path.join(root, "out"), args.shards)
    rows = [("bare read (reference)", bare_s), ("convert", convert_s)]
    print(f"{args.images} KITTI label files, {args.shards} shards")
    print(f"{'pass':<24} {'seconds':>8} {'files/s':>9}")
    for name, seconds in rows:
        print(f"{name:<24} {seconds:>8.1f} {args.images / seconds:>9.0f}")
    print(f"convert / bare read time: {convert_s / bare_s:.2f}")
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as fh:
        json.dump({"images": args.images, "shards": args.shards, "bare_read_s": bare_s, "convert_s": convert_s,
                   "convert_files_per_s": args.images / convert_s, "bare_files_per_s": args.images / bare_s,
                   "convert_over_bare": convert_s / bare_s}, fh, indent=2)
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
