"""CPU time of one training step and of inference: this project's Deformable DETR against transformers'.

Both models get the same small configuration (ResNet-18 layout backbone without pretrained
weights and frozen, as transformers freezes it, 2+2 layers, hidden 64, 4 levels, box refinement)
and the same batch; each figure is min/median/max over interleaved repeats after a warm-up
(the three models take turns, so they see the same machine load), and each speedup the
min/median/max of the per-round ratios. Quote the median with its spread. Ours runs twice: with the PyTorch reference attention (the
same algorithm as transformers' pure-PyTorch path) and with whatever `deformable_detr.ops`
picks by default (a compiled CPU kernel when one builds here).
Prints a table and writes bench/results/model_step.json.

    OMP_NUM_THREADS=2 python3 bench/model_step.py [--image-size 128] [--batch 2] [--repeats 9] [--output F]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import fmt, machine, ratio_spread, spread, time_interleaved, write_json  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "model_step.json")
HIDDEN, HEADS, QUERIES, CLASSES, LAYERS, FFN = 64, 8, 100, 4, 2, 256


def ours():
    from deformable_detr.config.schema import ExperimentConfig
    from deformable_detr.model import build_model

    spec = ExperimentConfig()
    spec.dataset.num_classes = CLASSES
    m = spec.model
    m.backbone, m.hidden_dim, m.nheads, m.num_queries = "resnet_18", HIDDEN, HEADS, QUERIES
    m.enc_layers = m.dec_layers = LAYERS
    m.dim_feedforward, m.dropout_ratio, m.with_box_refine = FFN, 0.1, True
    m.cls_loss_coef = 1.0  # transformers' fixed weight of the classification loss
    # transformers 5.18 freezes its whole ResNet backbone (its name filter looks for "stage.1", its
    # parameters say "stages.1"); freeze ours too so that both backward passes do the same work.
    m.train_backbone = False
    spec.train.activation_checkpoint = False
    model, criterion, _ = build_model(spec)
    return model, criterion


def theirs():
    from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection, ResNetConfig

    backbone = ResNetConfig(embedding_size=64, hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2],
                            layer_type="basic", out_features=["stage2", "stage3", "stage4"])
    config = DeformableDetrConfig(
        backbone_config=backbone, d_model=HIDDEN, encoder_layers=LAYERS, decoder_layers=LAYERS,
        encoder_attention_heads=HEADS, decoder_attention_heads=HEADS, encoder_ffn_dim=FFN, decoder_ffn_dim=FFN,
        num_queries=QUERIES, num_labels=CLASSES, dropout=0.1, with_box_refine=True, auxiliary_loss=True,
        disable_custom_kernels=True, tie_word_embeddings=False)
    return DeformableDetrForObjectDetection(config)


def batch(size: int, count: int):
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(count, 3, size, size, generator=generator)
    masks = torch.zeros(count, size, size, dtype=torch.bool)
    masks[-1, :, size * 3 // 4:] = True
    targets = [{"labels": torch.randint(1, CLASSES, (3,), generator=generator),
                "boxes": torch.rand(3, 4, generator=generator) * 0.4 + 0.3} for _ in range(count)]
    return images, masks, targets


def make_steps(size: int, count: int):
    images, masks, targets = batch(size, count)
    hf_labels = [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]
    model, criterion = ours()
    hf = theirs()

    def our_train():
        model.train()
        model.zero_grad(set_to_none=True)
        sum(criterion(model(images, masks), targets).values()).backward()

    def our_infer():
        model.eval()
        with torch.inference_mode():
            model(images, masks)

    def hf_train():
        hf.train()
        hf.zero_grad(set_to_none=True)
        hf(pixel_values=images, pixel_mask=(~masks).long(), labels=hf_labels).loss.backward()

    def hf_infer():
        hf.eval()
        with torch.inference_mode():
            hf(pixel_values=images, pixel_mask=(~masks).long())

    return {"train": (our_train, hf_train), "inference": (our_infer, hf_infer)}


def with_impl(step, impl: str | None):
    """`step` run with DDETR_MSDA_IMPL set to `impl` (None: the default choice)."""
    def action():
        if impl is None:
            os.environ.pop("DDETR_MSDA_IMPL", None)
        else:
            os.environ["DDETR_MSDA_IMPL"] = impl
        step()
    return action


def main(argv=None) -> int:
    load_at_start = os.getloadavg()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--output", default=RESULTS)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    from deformable_detr import ops

    default_impl = ops.select_implementation(torch.device("cpu"))
    steps = make_steps(args.image_size, args.batch)
    rows = []
    for name, (our_step, hf_step) in steps.items():
        times = time_interleaved({"ours_reference": with_impl(our_step, "reference"),
                                  "ours_default": with_impl(our_step, None),
                                  "transformers": with_impl(hf_step, "reference")}, args.repeats, warmup=1)
        os.environ.pop("DDETR_MSDA_IMPL", None)
        rows.append({"work": name, "batch": args.batch, "image_size": args.image_size, "repeats": args.repeats,
                     "ours_default_impl": default_impl,
                     "seconds": {k: spread(v) for k, v in times.items()},
                     "speedup_reference": ratio_spread(times["transformers"], times["ours_reference"]),
                     "speedup_default": ratio_spread(times["transformers"], times["ours_default"])})
    info = machine(load_at_start)
    print(f"{info['cpu_model']}, {info['torch_threads']} threads, load at start {info['load_at_start_1_5_15min']}; "
          f"median (min-max) of {args.repeats} interleaved rounds")
    print(f"{'work':<10} {'ours (ref) s':>20} {'ours (' + default_impl + ') s':>20} {'transformers s':>20} "
          f"{'x (ref)':>18} {'x (' + default_impl + ')':>18}")
    for r in rows:
        sec = r["seconds"]
        print(f"{r['work']:<10} {fmt(sec['ours_reference'], 1, 3):>20} {fmt(sec['ours_default'], 1, 3):>20} "
              f"{fmt(sec['transformers'], 1, 3):>20} {fmt(r['speedup_reference']):>18} {fmt(r['speedup_default']):>18}")
    print("x = transformers time / ours, per round (above 1: ours is faster)")
    write_json(args.output, {"machine": info, "config": {"hidden": HIDDEN, "heads": HEADS, "queries": QUERIES,
                                                         "layers": LAYERS, "ffn": FFN,
                                                         "backbone": "resnet_18 (frozen)"}, "rows": rows})
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
