"""What TAO's pixels cost: the data pipeline with PIL's resize (TAO's, this project's now) against
torchvision's uint8 tensor resize (this project's before).

One sample is read from a JPEG file (decoded, EXIF orientation applied) and augmented by the
default spec's training pipeline, or by its evaluation pipeline (shorter side 800, longer capped
at 1333), per image. The two resizes take turns (interleaved, after a warm-up, the training
pipeline seeded alike for both) and each ratio is min/median/max of the per-round ratios
PIL / tensor. Also recorded: how far the tensor resize's normalised pixels are from PIL's.
Prints a table and writes bench/results/tao_pixels.json.

    OMP_NUM_THREADS=2 python3 bench/tao_pixels.py [--size 720x1280] [--repeats 15] [--output F]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import fmt, machine, ratio_spread, spread, time_interleaved, write_json  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "tao_pixels.json")


def tensor_resize(image: torch.Tensor, height: int, width: int):
    """The resize this project used before: torchvision's antialiased bilinear on the uint8 tensor."""
    import torchvision.transforms.v2.functional as F

    return F.resize(image, [height, width], antialias=True)


def photo_like(height: int, width: int):
    """Smooth gradients with noise, saved as a JPEG like a camera frame."""
    from PIL import Image

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / width, y / height, (x + y) / (width + height)], -1) * 200
    pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def main() -> None:
    load = os.getloadavg()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="720x1280", help="HxW of the JPEG")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--output", default=RESULTS)
    args = parser.parse_args()

    from torchvision import tv_tensors

    from deformable_detr.config.schema import AugmentationConfig
    from deformable_detr.data import transforms as tf
    from deformable_detr.data.images import load_image

    height, width = (int(v) for v in args.size.split("x"))
    folder = tempfile.mkdtemp()
    path = os.path.join(folder, "frame.jpg")
    photo_like(height, width).save(path, quality=90)
    aug = AugmentationConfig()
    pipelines = {"train": tf.build_train_transform(aug), "eval": tf.build_eval_transform(aug)}
    pil_resize = tf.resize_pixels

    def sample(pipeline, resize_fn, seed: int = 0):
        tf.resize_pixels = resize_fn  # `resize` looks it up at call time
        torch.manual_seed(seed)
        image = load_image(path)
        target = {"boxes": tv_tensors.BoundingBoxes(torch.tensor([[100.0, 100.0, 400.0, 300.0]]), format="XYXY",
                                                    canvas_size=(height, width)), "labels": torch.tensor([1])}
        return pipeline(image, target)[0]

    results = {}
    try:
        for name, pipeline in pipelines.items():
            samples = time_interleaved({"pil": lambda p=pipeline: sample(p, pil_resize),
                                        "tensor": lambda p=pipeline: sample(p, tensor_resize)},
                                       repeats=args.repeats, warmup=2)
            difference = (sample(pipeline, pil_resize) - sample(pipeline, tensor_resize)).abs()
            results[name] = {"seconds": {k: spread(v) for k, v in samples.items()},
                             "ratio_pil_over_tensor": ratio_spread(samples["pil"], samples["tensor"]),
                             "tensor_vs_pil_normalised_max_abs": float(difference.max()),
                             "tensor_vs_pil_share_of_values_differing": float((difference > 1e-6).float().mean())}
    finally:
        tf.resize_pixels = pil_resize

    print(f"{args.size} JPEG, read and augmented per image; ms, median (min-max) of {args.repeats} interleaved")
    print(f"{'pipeline':9} {'PIL (TAO)':>22} {'tensor (before)':>22} {'PIL / tensor':>18} {'max |diff|':>11}")
    for name, r in results.items():
        print(f"{name:9} {fmt(r['seconds']['pil'], 1000, 1):>22} {fmt(r['seconds']['tensor'], 1000, 1):>22} "
              f"{fmt(r['ratio_pil_over_tensor']):>18} {r['tensor_vs_pil_normalised_max_abs']:>11.4f}")
    write_json(args.output, {"machine": machine(load), "image_hw": [height, width], "repeats": args.repeats,
                             "results": results})
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
