"""CPU time of one training step and of inference: this project's Deformable DETR against transformers'.

Two configurations (`--config`), each model built as the other:
- small: ResNet-18 layout backbone, frozen (transformers freezes its whole ResNet), 2+2 layers,
  hidden 64, 100 queries, 4 levels, box refinement; 128 px.
- tao_default: TAO's default model: ResNet-50 (layer2-4 trained, the stem and layer1 frozen, as the
  original; transformers' backbone unfrozen to match), hidden 256, 6+6 layers, 300 queries, 4
  levels, box refinement, dropout 0.3; 256 px (TAO trains at ~800x1333; 256 px keeps a run to a
  few minutes on 2 cores). Also the peak memory of a training step of each model, with
  activation checkpointing (ours: train.activation_checkpoint; transformers: gradient
  checkpointing) on and off, each in its own process (the rise of the resident set over the step).
No pretrained weights. Each time is min/median/max over interleaved repeats after a warm-up (the
models take turns, so they see the same machine load), each speedup the min/median/max of the
per-round ratios. Quote the median with its spread. Ours runs with the PyTorch reference
attention (the same algorithm as transformers' pure-PyTorch path), with whatever
`deformable_detr.ops` picks by default (a compiled CPU kernel when one builds here), and with that
kernel but the frozen BatchNorms applied after their convolutions instead of folded into them
(`unfolded`: the fold's share alone), and with each of the other speed changes of ours (CHANGES:
sampling locations, decoder self-attention, FFN ReLU, box refinement's boxes) done the original
Deformable-DETR's way instead, one at a time (`original_<change>`: that change's share alone). Each such
revert is patched in here, not in the model, and is first checked to compute the current model's
outputs within float rounding (one eval forward; the run stops if one does not).
Breakdown: after the timed rounds, more training steps of ours (default attention) and of
transformers' run under torch.profiler, one step per profile, the two models in turns; the JSON records, per model, where a step's operator time
goes (self CPU time per step by kind of operator: convolutions, matrix products, deformable
attention, dropout's random numbers, pooling, the rest) and the top operators, median (min-max)
over profiled steps taken in turns.
Prints a table and writes bench/results/model_step.json (small) or model_step_tao_default.json.

    OMP_NUM_THREADS=2 python3 bench/model_step.py [--config small|tao_default] [--image-size N] [--batch 2]
                                                  [--repeats N] [--output F]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from unittest import mock

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import fmt, machine, ratio_spread, spread, time_interleaved, write_json  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
CLASSES = 4
CONFIGS = {
    "small": {"backbone": "resnet_18", "hidden": 64, "heads": 8, "queries": 100, "layers": 2, "ffn": 256,
              "dropout": 0.1, "train_backbone": False, "image_size": 128, "repeats": 15, "profile_rounds": 5,
              "memory": False},
    "tao_default": {"backbone": "resnet_50", "hidden": 256, "heads": 8, "queries": 300, "layers": 6, "ffn": 1024,
                    "dropout": 0.3, "train_backbone": True, "image_size": 256, "repeats": 5, "profile_rounds": 3,
                    "memory": True},
}
# transformers' ResNet layouts of torchvision's resnet18 and resnet50.
HF_RESNETS = {"resnet_18": dict(hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2], layer_type="basic"),
              "resnet_50": dict(hidden_sizes=[256, 512, 1024, 2048], depths=[3, 4, 6, 3], layer_type="bottleneck")}


def ours(c: dict, activation_checkpoint: bool = False):
    from deformable_detr.config.schema import ExperimentConfig
    from deformable_detr.model import build_model

    spec = ExperimentConfig()
    spec.dataset.num_classes = CLASSES
    m = spec.model
    m.backbone, m.hidden_dim, m.nheads, m.num_queries = c["backbone"], c["hidden"], c["heads"], c["queries"]
    m.enc_layers = m.dec_layers = c["layers"]
    m.dim_feedforward, m.dropout_ratio, m.with_box_refine = c["ffn"], c["dropout"], True
    m.cls_loss_coef = 1.0  # transformers' fixed weight of the classification loss
    m.train_backbone = c["train_backbone"]
    spec.train.activation_checkpoint = activation_checkpoint
    model, criterion, _ = build_model(spec)
    return model, criterion


def theirs(c: dict, activation_checkpoint: bool = False):
    from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection, ResNetConfig

    backbone = ResNetConfig(embedding_size=64, out_features=["stage2", "stage3", "stage4"], **HF_RESNETS[c["backbone"]])
    config = DeformableDetrConfig(
        backbone_config=backbone, d_model=c["hidden"], encoder_layers=c["layers"], decoder_layers=c["layers"],
        encoder_attention_heads=c["heads"], decoder_attention_heads=c["heads"], encoder_ffn_dim=c["ffn"],
        decoder_ffn_dim=c["ffn"],
        # The original Deformable DETR's dropouts, as ours has them: after the FFN's activation and in the
        # decoder's self-attention too (transformers' defaults leave those two at 0, a lighter model).
        num_queries=c["queries"], num_labels=CLASSES, dropout=c["dropout"], attention_dropout=c["dropout"],
        activation_dropout=c["dropout"], with_box_refine=True, auxiliary_loss=True,
        disable_custom_kernels=True, tie_word_embeddings=False)
    model = DeformableDetrForObjectDetection(config)
    # transformers 5.18 freezes its whole ResNet (its name filter looks for "stage.1", its parameters
    # say "stages.1"); where ours trains layer2-4, train transformers' stages 1-3 alike.
    for name, parameter in model.model.backbone.named_parameters():
        if c["train_backbone"] and re.search(r"\.stages\.[123]\.", name):
            parameter.requires_grad_(True)
    if activation_checkpoint:
        model.gradient_checkpointing_enable()
    return model


def batch(size: int, count: int):
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(count, 3, size, size, generator=generator)
    masks = torch.zeros(count, size, size, dtype=torch.bool)
    masks[-1, :, size * 3 // 4:] = True
    targets = [{"labels": torch.randint(1, CLASSES, (3,), generator=generator),
                "boxes": torch.rand(3, 4, generator=generator) * 0.4 + 0.3} for _ in range(count)]
    return images, masks, targets


def make_steps(c: dict, size: int, count: int, activation_checkpoint: bool = False):
    """{"train"/"inference": (ours, transformers')} step functions, and our model."""
    images, masks, targets = batch(size, count)
    hf_labels = [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]
    model, criterion = ours(c, activation_checkpoint)
    hf = theirs(c, activation_checkpoint)

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

    return {"train": (our_train, hf_train), "inference": (our_infer, hf_infer)}, model


def with_impl(step, impl: str | None):
    """`step` run with DDETR_MSDA_IMPL set to `impl` (None: the default choice)."""
    def action():
        if impl is None:
            os.environ.pop("DDETR_MSDA_IMPL", None)
        else:
            os.environ["DDETR_MSDA_IMPL"] = impl
        step()
    return action


def unfolded(step, model):
    """`step` with the frozen BatchNorms applied after their convolutions, not folded into them."""
    from deformable_detr.model.backbone import set_batchnorm_folding

    def action():
        set_batchnorm_folding(model, False)
        try:
            step()
        finally:
            set_batchnorm_folding(model, True)
    return action


# Each speed change of commit ecb692b, written back the original Deformable-DETR's way so that a
# variant of ours with that one change undone times it alone: (short header, what the original does).
CHANGES = {
    "sampling_locations": ("sampling locations", "sampling locations broadcast over a last dimension of 2 "
                                                 "(now over contiguous rows of levels x points x 2)"),
    "self_attention_weights": ("self-attention weights", "decoder self-attention also computes the averaged "
                                                          "attention weights nobody reads (now fused SDPA)"),
    "relu_out_of_place": ("FFN ReLU copy", "feed-forward ReLU into a new tensor (now in place)"),
    "boxes_twice": ("boxes computed twice", "box refinement's heads run again by the detector on each decoder "
                                            "layer (now the decoder's boxes are the outputs)"),
}
# A revert must compute the current model's outputs within float rounding (one eval forward).
REVERT_ATOL, REVERT_RTOL = 1e-5, 1e-4


def _sampling_locations_last_dim_2(self, reference_points, sampling_offsets, input_spatial_shapes):
    """MSDeformAttn._sampling_locations as the original: each per-level factor broadcast over a
    trailing dimension of 2 ([N, Lq, 1, L, 1, 2] against [N, Lq, M, L, P, 2])."""
    if reference_points.shape[-1] == 2:
        per_level_wh = torch.stack([input_spatial_shapes[..., 1], input_spatial_shapes[..., 0]], -1)
        return reference_points[:, :, None, :, None, :] + sampling_offsets / per_level_wh[None, None, None, :, None, :]
    center, size = reference_points[:, :, None, :, None, :2], reference_points[:, :, None, :, None, 2:]
    return center + sampling_offsets / self.n_points * size * 0.5


def _relu_out_of_place(hidden):
    return torch.nn.functional.relu(hidden)


def _detector_forward_boxes_twice(self, images, masks):
    """DeformableDETR.forward as the original: the decoder hands back its refined references without
    gradient, and each layer's box head runs again on its hidden state here."""
    from deformable_detr.model.box_ops import inverse_sigmoid

    srcs, level_masks, level_pos = self._multi_scale_inputs(images, masks)
    hs, init_reference, references, enc_class, enc_coord_unact = self.transformer(
        srcs, level_masks, level_pos, None if self.two_stage else self.query_embed.weight)
    references = references.detach()
    classes, coords = [], []
    for level, state in enumerate(hs):
        reference = inverse_sigmoid(init_reference if level == 0 else references[level - 1])
        delta = self.bbox_embed[level](state)
        if reference.shape[-1] == 2:
            delta = torch.cat([delta[..., :2] + reference, delta[..., 2:]], -1)
        else:
            delta = delta + reference
        classes.append(self.class_embed[level](state))
        coords.append(delta.sigmoid())
    out = {"pred_logits": classes[-1], "pred_boxes": coords[-1]}
    if self.aux_loss:
        out["aux_outputs"] = [{"pred_logits": c, "pred_boxes": b} for c, b in zip(classes[:-1], coords[:-1])]
    if self.two_stage:
        out["enc_outputs"] = {"pred_logits": enc_class, "pred_boxes": enc_coord_unact.sigmoid()}
    return out


@contextmanager
def reverted(change: str, calls: dict | None = None):
    """Ours with `change` (a key of CHANGES) done the original's way while inside; `calls[change]`
    counts the calls of the original's code (a patch that nothing calls would time the current model)."""
    from deformable_detr.model import attention, detector, transformer

    mha_forward = torch.nn.MultiheadAttention.forward

    def with_weights(self, *args, **kwargs):  # the original passes no need_weights: True, averaged
        return mha_forward(self, *args, **{**kwargs, "need_weights": True})

    owner, name, replacement = {
        "sampling_locations": (attention.MSDeformAttn, "_sampling_locations", _sampling_locations_last_dim_2),
        "self_attention_weights": (torch.nn.MultiheadAttention, "forward", with_weights),
        "relu_out_of_place": (transformer, "_relu", _relu_out_of_place),
        "boxes_twice": (detector.DeformableDETR, "forward", _detector_forward_boxes_twice),
    }[change]
    getattr(owner, name)  # fails loudly when the current model no longer has what the revert replaces

    def counted(*args, **kwargs):
        if calls is not None:
            calls[change] = calls.get(change, 0) + 1
        return replacement(*args, **kwargs)
    with mock.patch.object(owner, name, counted):
        yield


def reverted_step(step, change: str):
    def action():
        with reverted(change):
            step()
    return action


def _tensors(outputs) -> list:
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    values = outputs.values() if isinstance(outputs, dict) else outputs
    return [t for value in values for t in _tensors(value)]


def check_reverts(model, images, masks, changes=CHANGES) -> dict:
    """One eval forward of the current model and of each revert on the same input: each revert must be
    called and match within REVERT_ATOL + REVERT_RTOL x |current| (else RuntimeError), so that its
    timing is of the same model. -> {change: largest absolute difference}."""
    model.eval()
    with torch.inference_mode():
        current = _tensors(model(images, masks))
        differences = {}
        for change in changes:
            calls: dict = {}
            with reverted(change, calls):
                original = _tensors(model(images, masks))
            if not calls.get(change):
                raise RuntimeError(f"revert {change!r}: the original's code was never called; the model changed")
            if len(original) != len(current) or not all(
                    a.shape == b.shape and torch.allclose(a, b, atol=REVERT_ATOL, rtol=REVERT_RTOL)
                    for a, b in zip(original, current)):
                worst = max(((a - b).abs().max().item() if a.shape == b.shape else float("inf"))
                            for a, b in zip(original, current))
                raise RuntimeError(f"revert {change!r} no longer computes the current model's outputs "
                                   f"(largest difference {worst:.3g}, tolerance atol {REVERT_ATOL} rtol {REVERT_RTOL})")
            differences[change] = max((a - b).abs().max().item() for a, b in zip(original, current))
    return differences


def _resident_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", open("/proc/self/status").read())[1])


def measure_memory(c: dict, size: int, count: int, which: str, activation_checkpoint: bool) -> dict:
    """In this (fresh) process: one training step as a warm-up, its freed memory handed back to
    the system (glibc's malloc_trim), then the peak rise of the resident set over a second step
    (Linux: /proc/self/clear_refs resets the high-water mark)."""
    import ctypes

    steps, _ = make_steps(c, size, count, activation_checkpoint)
    step = steps["train"][0 if which == "ours" else 1]
    step()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = _resident_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    start = time.perf_counter()
    step()
    seconds = time.perf_counter() - start
    return {"model": which, "activation_checkpoint": activation_checkpoint,
            "step_peak_rise_mib": (_resident_kib("VmHWM") - before) / 1024,
            "process_peak_mib": _resident_kib("VmHWM") / 1024, "step_s": seconds}


def memory_table(config: str, size: int, count: int) -> list[dict]:
    """Each model with and without activation checkpointing, each in its own process (so that
    neither inherits the other's freed but kept memory)."""
    rows = []
    for which in ("ours", "transformers"):
        for checkpoint in (False, True):
            command = [sys.executable, os.path.abspath(__file__), "--config", config, "--image-size", str(size),
                       "--batch", str(count), "--memory-of", f"{which}:{'on' if checkpoint else 'off'}"]
            out = subprocess.run(command, capture_output=True, text=True, check=True, env=os.environ)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return rows


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


def profile_breakdown(steps: dict, rounds: int, top: int = 12) -> dict:
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
    parser.add_argument("--config", choices=sorted(CONFIGS), default="small")
    parser.add_argument("--image-size", type=int, help="default: the configuration's (small 128, tao_default 256)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, help="default: the configuration's (small 15, tao_default 5)")
    parser.add_argument("--no-profile", action="store_true", help="skip the profiled breakdown")
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)  # ours|transformers:on|off, in a child process
    parser.add_argument("--output")
    args = parser.parse_args(argv)
    c = CONFIGS[args.config]
    size, repeats = args.image_size or c["image_size"], args.repeats or c["repeats"]
    torch.manual_seed(0)
    if args.memory_of:
        which, checkpoint = args.memory_of.split(":")
        print(json.dumps(measure_memory(c, size, args.batch, which, checkpoint == "on")))
        return 0
    output = args.output or os.path.join(
        RESULTS, "model_step.json" if args.config == "small" else f"model_step_{args.config}.json")
    from deformable_detr import ops

    default_impl = ops.select_implementation(torch.device("cpu"))
    steps, model = make_steps(c, size, args.batch)
    images, masks, _ = batch(size, args.batch)
    revert_differences = check_reverts(model, images, masks)
    rows = []
    for name, (our_step, hf_step) in steps.items():
        times = time_interleaved({"ours_reference": with_impl(our_step, "reference"),
                                  "ours_default": with_impl(our_step, None),
                                  "ours_default_unfolded": unfolded(with_impl(our_step, None), model),
                                  **{f"ours_default_original_{change}":
                                     reverted_step(with_impl(our_step, None), change) for change in CHANGES},
                                  "transformers": with_impl(hf_step, "reference")}, repeats, warmup=1)
        os.environ.pop("DDETR_MSDA_IMPL", None)
        rows.append({"work": name, "batch": args.batch, "image_size": size, "repeats": repeats,
                     "ours_default_impl": default_impl,
                     "seconds": {k: spread(v) for k, v in times.items()},
                     "speedup_reference": ratio_spread(times["transformers"], times["ours_reference"]),
                     "speedup_default": ratio_spread(times["transformers"], times["ours_default"]),
                     "batchnorm_fold_speedup": ratio_spread(times["ours_default_unfolded"], times["ours_default"]),
                     "change_speedups": {change: ratio_spread(times[f"ours_default_original_{change}"],
                                                              times["ours_default"]) for change in CHANGES}})
    breakdown = None
    if not args.no_profile:
        our_train, hf_train = steps["train"]
        breakdown = profile_breakdown({"ours_" + default_impl: our_train, "transformers": hf_train},
                                      rounds=c["profile_rounds"])
    del steps, model
    memory = memory_table(args.config, size, args.batch) if c["memory"] else None
    info = machine(load_at_start)
    info["shared"] = "a 2-core development VM, often shared with other engineers' builds and tests: read the ratios, not the seconds"
    print(f"{args.config}: {info['cpu_model']}, {info['torch_threads']} threads, load at start "
          f"{info['load_at_start_1_5_15min']}; median (min-max) of {repeats} interleaved rounds")
    print(f"{'work':<10} {'ours (ref) s':>20} {'ours (' + default_impl + ') s':>20} {'unfolded BN s':>20} "
          f"{'transformers s':>20} {'x (ref)':>18} {'x (' + default_impl + ')':>18} {'fold x':>18}")
    for r in rows:
        sec = r["seconds"]
        print(f"{r['work']:<10} {fmt(sec['ours_reference'], 1, 3):>20} {fmt(sec['ours_default'], 1, 3):>20} "
              f"{fmt(sec['ours_default_unfolded'], 1, 3):>20} {fmt(sec['transformers'], 1, 3):>20} "
              f"{fmt(r['speedup_reference']):>18} {fmt(r['speedup_default']):>18} {fmt(r['batchnorm_fold_speedup']):>18}")
    print("x = transformers time / ours, per round (above 1: ours is faster); fold x = unfolded / folded")
    print(f"each change of ours alone (ours with it done the original's way / ours, per round; outputs equal within "
          f"atol {REVERT_ATOL} + rtol {REVERT_RTOL}):")
    print(f"{'work':<10}" + "".join(f"{CHANGES[change][0]:>25}" for change in CHANGES))
    for r in rows:
        print(f"{r['work']:<10}" + "".join(f"{fmt(r['change_speedups'][change]):>25}" for change in CHANGES))
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
    if memory:
        print("peak rise of the resident set over a training step (MiB), one process each:")
        for m in memory:
            print(f"  {m['model']:<14} activation checkpointing {'on ' if m['activation_checkpoint'] else 'off'}: "
                  f"{m['step_peak_rise_mib']:8.0f} MiB (process peak {m['process_peak_mib']:.0f} MiB, "
                  f"step {m['step_s']:.1f} s)")
    config = {k: v for k, v in c.items() if k not in ("image_size", "repeats", "profile_rounds", "memory")}
    write_json(output, {"machine": info, "config_name": args.config, "config": config, "rows": rows,
                        "changes": {change: {"label": label, "original": text, "atol": REVERT_ATOL, "rtol": REVERT_RTOL,
                                             "outputs_max_abs_diff": revert_differences[change]}
                                    for change, (label, text) in CHANGES.items()},
                        "train_step_breakdown": breakdown, "train_step_memory": memory})
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
