"""Training and evaluation step time on TAO's fixed_padding canvas against the square one.

With `fixed_padding: true` TAO pads a landscape image to max(scales) x random_resize_max_size in
training and test_random_resize x random_resize_max_size in evaluation (800 x 1333 with the
defaults); this project used to pad to random_resize_max_size squared (1333 x 1333), 1.67x the
pixels. Both canvases come from `fixed_pad_size` / `collate_fn` (the square one by a canvas whose
two sides are random_resize_max_size), filled with the same two landscape images; the model is
the default spec's (ResNet-50, 6 + 6 layers, 300 queries, box refinement), backbone included.
`--scale` shrinks every size of the augmentation (the canvas ratio stays) so a CPU finishes.
Training step: forward, losses, backward, optimizer step; evaluation step: forward without
gradients. The two canvases take turns (interleaved, after a warm-up) and each speed-up is
min/median/max of the per-round ratios square / TAO's.
Prints a table and writes bench/results/tao_canvas.json.

    OMP_NUM_THREADS=2 python3 bench/tao_canvas.py [--scale 0.25] [--batch 2] [--repeats 5] [--output F]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import fmt, machine, ratio_spread, spread, time_interleaved, write_json  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "tao_canvas.json")


def scaled_spec(scale: float):
    from deformable_detr.config.schema import ExperimentConfig

    spec = ExperimentConfig()
    spec.dataset.num_classes = 4
    spec.train.activation_checkpoint = False
    spec.model.pretrained_backbone_path = None
    aug = spec.dataset.augmentation
    aug.scales = [max(32, int(s * scale)) for s in aug.scales]
    aug.random_resize_max_size = int(aug.random_resize_max_size * scale)
    aug.test_random_resize = int(aug.test_random_resize * scale)
    return spec


def batch(spec, training: bool, canvas, batch_size: int):
    """`batch_size` landscape images at the largest size the resize gives (shorter side at the canvas's
    short side, 4:3 here), with one box each, collated onto `canvas`."""
    from deformable_detr.data.collate import collate_fn

    height = canvas.across
    width = min(canvas.along, height * 4 // 3)
    generator = torch.Generator().manual_seed(0)
    items = [(torch.randn(3, height, width, generator=generator),
              {"image_id": torch.tensor(k), "labels": torch.tensor([1 + k % 3]),
               "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.4]])}) for k in range(batch_size)]
    return collate_fn(items, pad_to=canvas)


def main() -> None:
    load = os.getloadavg()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=0.25)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", default=RESULTS)
    args = parser.parse_args()

    from deformable_detr.data.transforms import FixedCanvas, fixed_pad_size
    from deformable_detr.model import build_model

    spec = scaled_spec(args.scale)
    torch.manual_seed(0)
    model, criterion, _ = build_model(spec)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    aug = spec.dataset.augmentation
    square = FixedCanvas(aug.random_resize_max_size, aug.random_resize_max_size)
    results = {}
    for phase, training in (("train", True), ("eval", False)):
        canvases = {"tao": fixed_pad_size(aug, training=training), "square": square}
        batches = {name: batch(spec, training, canvas, args.batch) for name, canvas in canvases.items()}

        def step(images, masks, targets):
            if training:
                model.train()
                losses = criterion(model(images, masks), targets)
                loss = sum(losses[k] * criterion.weight_dict[k] for k in losses if k in criterion.weight_dict)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            else:
                model.eval()
                with torch.no_grad():
                    model(images, masks)

        samples = time_interleaved({name: (lambda b=b: step(*b)) for name, b in batches.items()},
                                   repeats=args.repeats, warmup=1)
        results[phase] = {
            "canvas_hw": {name: list(b[0].shape[-2:]) for name, b in batches.items()},
            "pixel_ratio_square_over_tao": (batches["square"][0][0, 0].numel() / batches["tao"][0][0, 0].numel()),
            "seconds": {name: spread(s) for name, s in samples.items()},
            "speedup_square_over_tao": ratio_spread(samples["square"], samples["tao"]),
        }

    print(f"scale {args.scale}, batch {args.batch}, {args.repeats} interleaved repeats; seconds per step, "
          "median (min-max)")
    print(f"{'step':6} {'TAO canvas':>12} {'s':>22} {'square':>12} {'s':>22} {'speed-up':>20}")
    for phase, r in results.items():
        tao_hw, square_hw = ("x".join(map(str, r["canvas_hw"][k])) for k in ("tao", "square"))
        print(f"{phase:6} {tao_hw:>12} {fmt(r['seconds']['tao']):>22} {square_hw:>12} "
              f"{fmt(r['seconds']['square']):>22} {fmt(r['speedup_square_over_tao']):>20}")
    write_json(args.output, {"machine": machine(load), "scale": args.scale, "batch": args.batch,
                             "repeats": args.repeats, "augmentation": {
                                 "scales": aug.scales, "random_resize_max_size": aug.random_resize_max_size,
                                 "test_random_resize": aug.test_random_resize}, "results": results})
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
