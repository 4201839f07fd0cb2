"""Inference throughput on the CPU and COCO scoring time: prints a table, writes bench/results/inference.json.

1. Images/s of the whole detector (model + post-processing) on a small configuration at
   batch 1 and 4, against a reference measured in the same run: the bare torchvision
   ResNet of the same depth on the same batches, timed back to back in each round (medians
   reported, so the ratio holds on a noisy, shared machine).
2. COCO evaluation time of 5k images' worth of generated detections (100 per image, as
   model.num_select gives): pycocotools (the reference) against faster-coco-eval, with
   the largest difference between their numbers.

    OMP_NUM_THREADS=2 python3 bench/inference.py [--images 5000] [--skip-model]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "inference.json")


def small_spec(image_size: int):
    from deformable_detr.config.loader import spec_from_dict

    return spec_from_dict({
        "model": {"backbone": "resnet_18", "num_queries": 100, "num_feature_levels": 2, "return_interm_indices": [3, 4],
                  "hidden_dim": 64, "nheads": 4, "enc_layers": 2, "dec_layers": 2, "dim_feedforward": 128,
                  "num_select": 100, "two_stage": False, "with_box_refine": True},
        "dataset": {"num_classes": 4, "augmentation": {"test_random_resize": image_size,
                                                        "random_resize_max_size": image_size}},
    })


def _timed(step) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def _interleaved_rates(detector_step, reference_step, batch: int, repeats: int) -> tuple[float, float, float]:
    """Median images/s of both steps and median per-round ratio, the two timed back to back each round
    so that load from other processes hits both alike."""
    detector_step(), reference_step()  # warm-up: first-call allocations and kernel selection
    detector, reference = [], []
    for _ in range(repeats):
        detector.append(batch / _timed(detector_step))
        reference.append(batch / _timed(reference_step))
    ratios = [d / r for d, r in zip(detector, reference)]
    return statistics.median(detector), statistics.median(reference), statistics.median(ratios)


def bench_model(image_size: int, repeats: int) -> list[dict]:
    import torchvision

    from deformable_detr.model import build_model

    torch.manual_seed(0)
    model, _criterion, postprocessor = build_model(small_spec(image_size))
    model.eval()
    reference = torchvision.models.resnet18(weights=None).eval()
    rows = []
    for batch in (1, 4):
        images = torch.randn(batch, 3, image_size, image_size)
        masks = torch.zeros(batch, image_size, image_size, dtype=torch.bool)
        sizes = torch.tensor([[image_size, image_size]] * batch)

        def detector_step(images=images, masks=masks, sizes=sizes):
            with torch.inference_mode():
                postprocessor(model(images, masks), sizes)

        def reference_step(images=images):
            with torch.inference_mode():
                reference(images)

        detector, backbone, ratio = _interleaved_rates(detector_step, reference_step, batch, repeats)
        rows.append({"what": f"detector, batch {batch}", "images_per_s": detector,
                     "reference_images_per_s": backbone, "ratio_to_reference": ratio})
    return rows


def generated_detections(num_images: int, num_classes: int = 20, per_image: int = 100, seed: int = 0):
    """COCO ground truth (1..12 boxes an image) and `per_image` detections an image: jittered hits plus noise."""
    rng = np.random.default_rng(seed)
    images, annotations, detections = [], [], []
    for image_id in range(1, num_images + 1):
        images.append({"id": image_id, "width": 640, "height": 480, "file_name": f"{image_id}.jpg"})
        count = int(rng.integers(1, 13))
        wh = rng.uniform(8, 300, size=(count, 2))
        xy = rng.uniform(0, 1, size=(count, 2)) * (np.array([640, 480]) - wh)
        cats = rng.integers(1, num_classes + 1, size=count)
        for box, cat in zip(np.hstack([xy, wh]), cats):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": int(cat),
                                "bbox": box.tolist(), "area": float(box[2] * box[3]), "iscrowd": 0})
        hits = np.hstack([xy, wh]) + rng.normal(0, 0.08, size=(count, 4)) * np.hstack([wh, wh])
        noise_wh = rng.uniform(8, 300, size=(per_image - count, 2))
        noise = np.hstack([rng.uniform(0, 1, size=(per_image - count, 2)) * (np.array([640, 480]) - noise_wh),
                           noise_wh])
        boxes = np.vstack([hits, noise])
        boxes[:, 2:] = np.maximum(boxes[:, 2:], 1.0)
        labels = np.concatenate([cats, rng.integers(1, num_classes + 1, size=per_image - count)])
        scores = np.concatenate([rng.uniform(0.3, 1.0, count), rng.uniform(0.0, 0.6, per_image - count)])
        for box, label, score in zip(boxes.tolist(), labels.tolist(), scores.tolist()):
            detections.append({"image_id": image_id, "category_id": label, "bbox": box, "score": score})
    categories = [{"id": i, "name": f"class_{i}"} for i in range(1, num_classes + 1)]
    return {"images": images, "annotations": annotations, "categories": categories}, detections


def bench_coco_eval(num_images: int) -> list[dict]:
    from deformable_detr.data.coco_eval import STAT_NAMES, evaluate_coco

    gt, detections = generated_detections(num_images)
    rows, metrics = [], {}
    for backend in ("pycocotools", "faster_coco_eval"):
        start = time.perf_counter()
        metrics[backend] = evaluate_coco(gt, detections, backend=backend)
        rows.append({"what": f"COCO eval, {backend}", "seconds": time.perf_counter() - start,
                     "images": num_images, "detections": len(detections), "AP": metrics[backend]["AP"]})
    reference_s = rows[0]["seconds"]
    difference = max(abs(metrics["pycocotools"][name] - metrics["faster_coco_eval"][name]) for name in STAT_NAMES)
    for row in rows:
        row["speedup_vs_pycocotools"] = reference_s / row["seconds"]
        row["max_abs_metric_difference"] = difference
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=5000, help="images of generated detections to score")
    parser.add_argument("--image-size", type=int, default=320, help="side of the square input images")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds per measurement (median reported)")
    parser.add_argument("--skip-model", action="store_true", help="only the COCO scoring part")
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))

    model_rows = [] if args.skip_model else bench_model(args.image_size, args.repeats)
    coco_rows = bench_coco_eval(args.images)
    print(f"CPU, {torch.get_num_threads()} threads, {args.image_size}x{args.image_size} inputs, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    if model_rows:
        print(f"{'model':<22} {'images/s':>9} {'resnet18 images/s':>18} {'ratio':>7}")
        for row in model_rows:
            print(f"{row['what']:<22} {row['images_per_s']:>9.2f} {row['reference_images_per_s']:>18.2f} "
                  f"{row['ratio_to_reference']:>7.3f}")
    print(f"{'scoring':<30} {'seconds':>8} {'speed-up':>9} {'AP':>8}")
    for row in coco_rows:
        print(f"{row['what']:<30} {row['seconds']:>8.2f} {row['speedup_vs_pycocotools']:>9.2f} {row['AP']:>8.4f}")
    print(f"largest difference between the two libraries' numbers: {coco_rows[0]['max_abs_metric_difference']:.2e}")
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    # The machine is shared: record how busy it was, since absolute rates depend on it (ratios less so).
    result = {"threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "load_average": os.getloadavg(),
              "image_size": args.image_size, "model": model_rows, "coco_eval": coco_rows}
    tmp = RESULTS + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=2)
    os.replace(tmp, RESULTS)
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
