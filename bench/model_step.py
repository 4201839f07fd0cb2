"""CPU time of one training step and of inference: this project's Deformable DETR against transformers'.

Both models get the same small configuration (ResNet-18 layout backbone without pretrained
weights and frozen, as transformers freezes it, 2+2 layers, hidden 64, 4 levels, box refinement)
and the same batch; each figure is min/median/max over interleaved repeats after a warm-up
(the three models take turns, so they see the same machine load), and each speedup the
min/median/max of the per-round ratios. Quote the median with its spread. Ours runs twice: with the PyTorch reference attention (the
same algorithm as transformers' pure-PyTorch path) and with whatever `deformable_detr.ops`
picks by default (a compiled CPU kernel when one builds here).
Breakdown: after the timed rounds, more training steps of ours (default attention) and of
transformers' run under torch.profiler, one step per profile, the two models in turns; the JSON records, per model, where a step's operator time
goes (self CPU time per step by kind of operator: convolutions, matrix products, deformable
attention, dropout's random numbers, pooling, the rest) and the top operators, median (min-max)
over profiled steps taken in turns.
Prints a table and writes bench/results/model_step.json.

    OMP_NUM_THREADS=2 python3 bench/model_step.py [--image-size 128] [--batch 2] [--repeats 15] [--output F]
"""
from __future__ import annotations

import argparse
import os
import statistics
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
        # The original Deformable DETR's dropouts, as ours has them: after the FFN's activation and in the
        # decoder's self-attention too (transformers' defaults leave those two at 0, a lighter model).
        num_queries=QUERIES, num_labels=CLASSES, dropout=0.1, attention_dropout=0.1, activation_dropout=0.1,
        with_box_refine=True, auxiliary_loss=True,
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


# Kinds of operators in the breakdown, by the profiler's operator names (first match wins).
KINDS = [
    ("convolution", ("convolution",)),
    ("matrix products", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "scaled_dot_product", "aten::linear")),
    ("deformable attention sampling", ("MSDeformAttn", "grid_sampler")),
    ("dropout random numbers", ("bernoulli", "aten::uniform_", "aten::rand")),
    ("pooling", ("pool",)),
]


def kind_of(name: str) -> str:
    for kind, needles in KINDS:
        if any(needle in name for needle in needles):
            return kind
    return "element-wise, copies and the rest"


def profile_once(step) -> dict[str, tuple[float, int]]:
    """{operator: (self CPU ms, calls)} of one step under torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return {e.key: (e.self_cpu_time_total / 1e3, e.count) for e in prof.key_averages()}


def profile_breakdown(steps: dict, rounds: int = 5, top: int = 12) -> dict:
    """Per model, self CPU ms of a training step by kind of operator and for the top operators:
    median over `rounds` profiled steps, the models taking turns (as in the timing) so that load
    from other work hits both alike; min-max beside each median."""
    for step in steps.values():
        step()
    samples: dict[str, list] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            samples[name].append(profile_once(step))
    result = {}
    for name, runs in samples.items():
        kinds: dict[str, list[float]] = {}
        for run in runs:
            per_kind: dict[str, float] = {}
            for op, (ms, _) in run.items():
                per_kind[kind_of(op)] = per_kind.get(kind_of(op), 0.0) + ms
            for kind, ms in per_kind.items():
                kinds.setdefault(kind, []).append(ms)
        totals = [sum(ms for ms, _ in run.values()) for run in runs]
        ops = sorted({op for run in runs for op in run},
                     key=lambda op: -statistics.median([run.get(op, (0.0, 0))[0] for run in runs]))
        result[name] = {
            "rounds": rounds, "self_cpu_ms_per_step": spread(totals),
            "by_kind_ms_per_step": dict(sorted(((k, spread(v + [0.0] * (rounds - len(v)))) for k, v in kinds.items()),
                                               key=lambda kv: -kv[1]["median"])),
            "top_ops": [{"op": op, "ms_per_step": spread([run.get(op, (0.0, 0))[0] for run in runs]),
                         "calls_per_step": runs[0].get(op, (0.0, 0))[1]} for op in ops[:top]]}
    return result


def main(argv=None) -> int:
    load_at_start = os.getloadavg()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--no-profile", action="store_true", help="skip the profiled breakdown")
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
    breakdown = None
    if not args.no_profile:
        our_train, hf_train = steps["train"]
        breakdown = profile_breakdown({"ours_" + default_impl: our_train, "transformers": hf_train})
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
    if breakdown:
        print("training step under torch.profiler, self CPU ms per step by kind of operator:")
        names = list(breakdown)
        kinds = list(dict.fromkeys(k for b in breakdown.values() for k in b["by_kind_ms_per_step"]))
        print(f"  {'kind':<36}" + "".join(f"{n:>22}" for n in names))
        for kind in kinds + ["total"]:
            values = [b["self_cpu_ms_per_step"] if kind == "total" else
                      b["by_kind_ms_per_step"].get(kind, {"median": 0.0, "min": 0.0, "max": 0.0})
                      for b in breakdown.values()]
            print(f"  {kind:<36}" + "".join(f"{fmt(v, 1, 1):>22}" for v in values))
    write_json(args.output, {"machine": info, "config": {"hidden": HIDDEN, "heads": HEADS, "queries": QUERIES,
                                                         "layers": LAYERS, "ffn": FFN,
                                                         "backbone": "resnet_18 (frozen)"}, "rows": rows,
                             "train_step_breakdown": breakdown})
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
