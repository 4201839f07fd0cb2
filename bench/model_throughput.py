"""Training throughput at real size: this project's Deformable DETR against transformers'
DeformableDetr on the same device, inputs and precision.

Real size (the default): ResNet-50 layout (random weights, nothing downloaded), hidden 256, 8
heads, 6+6 layers, 300 queries, 4 levels, 4 points, box refinement, 800x1333 images, batch 2
(per GPU), in float32, float16 and bfloat16 autocast, with and without activation
checkpointing. Per configuration: images/s (min/median/max over timed steps after warm-up,
the two models interleaved step by step) and peak memory (CUDA: max allocated; CPU: not
measured). Both backbones are frozen, as transformers 5.18 freezes its own (its name filter
misses "stages.N"), so both backward passes do the same work. float16 steps run without a
GradScaler on both sides (throughput only).

`--tiny` (ResNet-18 layout, hidden 32, 1+1 layers, 10 queries, 64x64 images, float32 only) runs on a CPU in
seconds: the dry run of scripts/gpu_check.sh and its test use it.

    python3 bench/model_throughput.py --device cuda [--steps 10] [--output F]
    OMP_NUM_THREADS=2 python3 bench/model_throughput.py --device cpu --tiny
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import fmt, machine, ratio_spread, spread, write_json  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "model_throughput.json")
CLASSES = 4
REAL = {"backbone": "resnet_50", "hidden": 256, "heads": 8, "layers": 6, "ffn": 1024, "queries": 300,
        "image": (800, 1333), "batch": 2}
TINY = {"backbone": "resnet_18", "hidden": 32, "heads": 4, "layers": 1, "ffn": 64, "queries": 10,
        "image": (64, 64), "batch": 2}
DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def ours(size: dict, checkpointing: bool):
    from deformable_detr.config.schema import ExperimentConfig
    from deformable_detr.model import build_model

    spec = ExperimentConfig()
    spec.dataset.num_classes = CLASSES
    m = spec.model
    m.backbone, m.hidden_dim, m.nheads, m.num_queries = size["backbone"], size["hidden"], size["heads"], size["queries"]
    m.enc_layers = m.dec_layers = size["layers"]
    m.dim_feedforward, m.dropout_ratio, m.with_box_refine = size["ffn"], 0.1, True
    m.num_select = min(m.num_select, size["queries"])
    m.cls_loss_coef = 1.0
    m.train_backbone = False
    spec.train.activation_checkpoint = checkpointing
    model, criterion, _ = build_model(spec)
    return model, criterion


def theirs(size: dict, checkpointing: bool):
    from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection, ResNetConfig

    if size["backbone"] == "resnet_50":
        backbone = ResNetConfig(embedding_size=64, hidden_sizes=[256, 512, 1024, 2048], depths=[3, 4, 6, 3],
                                layer_type="bottleneck", out_features=["stage2", "stage3", "stage4"])
    else:
        backbone = ResNetConfig(embedding_size=64, hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2],
                                layer_type="basic", out_features=["stage2", "stage3", "stage4"])
    config = DeformableDetrConfig(
        backbone_config=backbone, d_model=size["hidden"], encoder_layers=size["layers"],
        decoder_layers=size["layers"], encoder_attention_heads=size["heads"], decoder_attention_heads=size["heads"],
        encoder_ffn_dim=size["ffn"], decoder_ffn_dim=size["ffn"], num_queries=size["queries"], num_labels=CLASSES,
        # The original Deformable DETR's dropouts, as ours has them: after the FFN's activation and in the
        # decoder's self-attention too (transformers' defaults leave those two at 0, a lighter model).
        dropout=0.1, attention_dropout=0.1, activation_dropout=0.1, with_box_refine=True, auxiliary_loss=True,
        disable_custom_kernels=True,
        tie_word_embeddings=False)
    model = DeformableDetrForObjectDetection(config)
    for name, parameter in model.named_parameters():
        if "backbone" in name:
            parameter.requires_grad_(False)
    if checkpointing:
        model.gradient_checkpointing_enable()  # raises where the model does not support it
    return model


def make_batch(size: dict, device: str):
    generator = torch.Generator().manual_seed(0)
    count, (height, width) = size["batch"], size["image"]
    images = torch.randn(count, 3, height, width, generator=generator)
    masks = torch.zeros(count, height, width, dtype=torch.bool)
    masks[-1, :, width * 3 // 4:] = True
    targets = [{"labels": torch.randint(1, CLASSES, (5,), generator=generator),
                "boxes": torch.rand(5, 4, generator=generator) * 0.4 + 0.3} for _ in range(count)]
    targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
    return images.to(device), masks.to(device), targets


def train_steps(size: dict, device: str, dtype, checkpointing: bool):
    images, masks, targets = make_batch(size, device)
    hf_labels = [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]
    model, criterion = ours(size, checkpointing)
    model.to(device).train()
    criterion.to(device)
    try:
        hf = theirs(size, checkpointing).to(device).train()
        hf_error = None
    except Exception as error:  # e.g. gradient checkpointing unsupported
        hf, hf_error = None, f"{type(error).__name__}: {error}"
    autocast = lambda: torch.autocast(device_type=device, dtype=dtype or torch.float32,  # noqa: E731
                                      enabled=dtype is not None)

    def our_step():
        model.zero_grad(set_to_none=True)
        with autocast():
            outputs = model(images, masks)
        outputs = {k: (v.float() if torch.is_tensor(v) else v) for k, v in outputs.items()}
        sum(criterion(outputs, targets).values()).backward()

    def hf_step():
        hf.zero_grad(set_to_none=True)
        with autocast():
            loss = hf(pixel_values=images, pixel_mask=(~masks).long(), labels=hf_labels).loss
        loss.float().backward()

    return {"ours": our_step, "transformers": hf_step if hf is not None else None}, hf_error


def measure(step, device: str, warmup: int, steps: int) -> tuple[list[float], float | None]:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
    return times, peak


def main(argv=None) -> int:
    load_at_start = os.getloadavg()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per model and configuration")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--precisions", default=None, help="comma list of fp32,fp16,bf16 (default: all on "
                                                           "CUDA, fp32 on CPU)")
    parser.add_argument("--checkpointing", choices=["off", "on", "both"], default="both",
                        help="activation checkpointing variants to run")
    parser.add_argument("--output", default=RESULTS)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no GPU here", file=sys.stderr)
        return 3
    size = TINY if args.tiny else REAL
    precisions = (args.precisions.split(",") if args.precisions else
                  list(DTYPES) if args.device == "cuda" else ["fp32"])
    torch.manual_seed(0)
    rows = []
    for precision in precisions:
        for checkpointing in {"off": (False,), "on": (True,), "both": (False, True)}[args.checkpointing]:
            steps, hf_error = train_steps(size, args.device, DTYPES[precision], checkpointing)
            row = {"precision": precision, "activation_checkpointing": checkpointing, "steps": args.steps,
                   "transformers_error": hf_error}
            samples = {}
            for name, step in steps.items():
                if step is None:
                    continue
                # One model at a time (peak memory is per model); alternated runs would mix the two.
                if args.device == "cuda":
                    torch.cuda.empty_cache()
                times, peak = measure(step, args.device, args.warmup, args.steps)
                samples[name] = times
                row[name] = {"step_s": spread(times),
                             "images_per_s": spread([size["batch"] / t for t in times]), "peak_memory_mib": peak}
            if "transformers" in samples:
                row["speedup"] = ratio_spread(samples["transformers"], samples["ours"])
            rows.append(row)
            del steps
    info = machine(load_at_start)
    print(f"{args.device}: {info['gpu'] or info['cpu_model']}, load at start {info['load_at_start_1_5_15min']}; "
          f"{size['backbone']}, {size['image'][0]}x{size['image'][1]}, batch {size['batch']}")
    print(f"{'prec':5s} {'ckpt':5s} {'ours img/s med (min-max)':>26s} {'peak MiB':>9s} "
          f"{'transformers img/s':>26s} {'peak MiB':>9s} {'x':>16s}")
    for r in rows:
        o, t = r.get("ours"), r.get("transformers")
        print(f"{r['precision']:5s} {str(r['activation_checkpointing']):5s} {fmt(o['images_per_s']):>26s} "
              f"{(o['peak_memory_mib'] or 0):9.0f} {(fmt(t['images_per_s']) if t else r['transformers_error'][:26]):>26s} "
              f"{((t or {}).get('peak_memory_mib') or 0):9.0f} {(fmt(r['speedup']) if t else '-'):>16s}")
    write_json(args.output, {"machine": info, "device": args.device, "size": {**size, "image": list(size["image"])},
                             "rows": rows})
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
