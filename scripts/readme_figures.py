"""The README's benchmark figures for bench/msda.py, bench/model_step.py (both configurations), bench/cpu_quota.py,
bench/example_runs.py and bench/accounting_cost.py,
rendered from the JSON those benches wrote to bench/results/, so that the README cannot drift from them.

    python3 scripts/readme_figures.py           # print the rows
    python3 scripts/readme_figures.py --check   # exit 1 when README.md differs (a test runs this)
    python3 scripts/readme_figures.py --write   # replace the rows in README.md after re-running a bench

Each row is a line of the Benchmarks table starting with "| `bench/<name>.py`"; figures are
medians with their min-max over the repeats, and the load at the start of the run.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
RESULTS = REPO / "bench" / "results"


def x(stats: dict) -> str:
    return f"{stats['median']:.2f}x ({stats['min']:.2f}-{stats['max']:.2f})"


def machine_note(info: dict) -> str:
    load = info["load_at_start_1_5_15min"][0]
    return f"{info['cpu_cores']}-core {info['cpu_model']}, {info['torch_threads']} threads, load {load:.1f} at start"


# How the README names bench/msda.py's kernel phases (where its samples were placed).
PHASE_LABELS = {"outside": "off the map", "one_pixel": "on one pixel",
                "cached_window": "in an 8x8-pixel window per level (L2-resident)",
                "model_like": "as the model places them", "scattered": "scattered at random"}


def msda_row(data: dict) -> str:
    rows = {(r["case"], r["implementation"]): r for r in data["rows"] if r["device"] == "cpu" and r["dtype"] == "float32"}
    encoder, decoder = rows[("encoder", "cpu")], rows[("decoder", "cpu")]
    image = "x".join(map(str, data["image"]))
    c = data["config"]
    text = (f"| `bench/msda.py` (batch {c['batch']}, {c['heads']} heads x {c['channels']}, {len(data['levels'])} levels "
            f"of an {image} image, {c['points']} points) | compiled CPU kernel vs the PyTorch reference in the same "
            f"run, median (min-max) of {encoder['repeats']} rounds: encoder ({encoder['queries']:,} queries) forward "
            f"{x(encoder['forward_speedup'])}, forward+backward {x(encoder['forward_backward_speedup'])}; decoder "
            f"({decoder['queries']} queries) forward {x(decoder['forward_speedup'])}, forward+backward "
            f"{x(decoder['forward_backward_speedup'])}")
    phases = data.get("kernel_phases")
    if phases:
        text += "; encoder forward / forward+backward with every sample " + ", ".join(
            f"{label} {phases['forward_s'][where]['median'] * 1e3:.0f}, "
            f"{phases['forward_backward_s'][where]['median'] * 1e3:.0f} ms"
            for where, label in PHASE_LABELS.items() if where in phases["forward_s"])
        copy = data["copy_bandwidth"]["cpu"]["bytes_per_s"]
        text += (f"; encoder forward {encoder['forward_s']['median'] * 1e3:.0f} ms, forward+backward "
                 f"{encoder['forward_backward_s']['median'] * 1e3:.0f} ms: "
                 f"{100 * encoder['forward_fraction_of_copy_bandwidth']:.1f}% / "
                 f"{100 * encoder['forward_backward_fraction_of_copy_bandwidth']:.1f}% of the copy bandwidth "
                 f"({copy['median'] / 1e9:.1f} GB/s, {copy['min'] / 1e9:.1f}-{copy['max'] / 1e9:.1f})")
        if "cached_window" in phases["forward_s"]:
            # The same bytes over the cached window's times: the fraction with every read an L2 hit.
            cached = [100 * encoder[f"{k}_min_bytes"] / phases[f"{k}_s"]["cached_window"]["median"] / copy["median"]
                      for k in ("forward", "forward_backward")]
            text += f", {cached[0]:.1f}% / {cached[1]:.1f}% with every read from the window in L2"
    scaling = data.get("thread_scaling")
    if scaling and len(scaling) > 1:
        text += "; encoder by threads, forward+backward: " + ", ".join(
            f"{s['threads']}: {s['forward_backward_s']['median'] * 1e3:.0f} ms" for s in scaling)
    return text + f" ({machine_note(data['machine'])}) |"


def changes_text(data: dict, train: dict, infer: dict) -> str:
    """Each speed change of ours alone (bench/model_step.py's CHANGES), where the run measured them."""
    if "change_speedups" not in train:
        return ""
    return ("; each other speed change alone, ours with it done the original's way vs ours (training / inference): "
            + ", ".join(f"{change['label']} {x(train['change_speedups'][name])} / {x(infer['change_speedups'][name])}"
                        for name, change in data["changes"].items()))


def model_step_row(data: dict) -> str:
    rows = {r["work"]: r for r in data["rows"]}
    train, infer = rows["train"], rows["inference"]
    impl = train["ours_default_impl"]
    return (f"| `bench/model_step.py` (small config, batch {train['batch']}, {train['image_size']} px) | vs "
            f"transformers' DeformableDetr, median (min-max) of {train['repeats']} interleaved rounds: training step "
            f"{x(train['speedup_default'])}, inference {x(infer['speedup_default'])} faster with the {impl} "
            f"kernel; with the PyTorch reference attention instead: {x(train['speedup_reference'])} / "
            f"{x(infer['speedup_reference'])}" + (
                f"; frozen BatchNorm folded into the convolutions vs applied after them: "
                f"{x(train['batchnorm_fold_speedup'])} / {x(infer['batchnorm_fold_speedup'])}"
                if "batchnorm_fold_speedup" in train else "") + changes_text(data, train, infer)
            + f" ({machine_note(data['machine'])}) |")


def model_step_tao_row(data: dict) -> str:
    rows = {r["work"]: r for r in data["rows"]}
    train, infer = rows["train"], rows["inference"]
    impl, c = train["ours_default_impl"], data["config"]
    memory = {(m["model"], m["activation_checkpoint"]): m["step_peak_rise_mib"] for m in data["train_step_memory"]}
    return (f"| `bench/model_step.py --config tao_default` (TAO's default model: {c['backbone']}, hidden {c['hidden']}, "
            f"{c['layers']}+{c['layers']} layers, {c['queries']} queries, 4 levels, box refinement; batch "
            f"{train['batch']}, {train['image_size']} px) | vs transformers' DeformableDetr built as the same model, "
            f"median (min-max) of {train['repeats']} interleaved rounds: training step {x(train['speedup_default'])}, "
            f"inference {x(infer['speedup_default'])} faster with the {impl} kernel; with the PyTorch reference "
            f"attention: {x(train['speedup_reference'])} / {x(infer['speedup_reference'])}; frozen BatchNorm folded "
            f"into the convolutions vs applied after them: {x(train['batchnorm_fold_speedup'])} / "
            f"{x(infer['batchnorm_fold_speedup'])}{changes_text(data, train, infer)}; peak rise of the resident set "
            f"over a training step: ours "
            f"{memory[('ours', False)]:.0f} MiB ({memory[('ours', True)]:.0f} with activation checkpointing), "
            f"transformers {memory[('transformers', False)]:.0f} MiB ({memory[('transformers', True)]:.0f}) "
            f"({machine_note(data['machine'])}) |")


EXPORT_MODELS = {"small": "small config: ResNet-18, hidden 64, 2+2 layers", "tao_default": "TAO's default model"}


def export_row(data: dict) -> str:
    rows = {r["batch"]: r for r in data["rows"]}
    one, four = rows[1], rows[4]
    command = "bench/export.py" + ("" if data["config"] == "small" else f" --config {data['config']}")
    return (f"| `{command}` ({EXPORT_MODELS[data['config']]}, {one['image_size']} px, plain-op "
            f"attention) | onnxruntime vs PyTorch eager per image, per-round ratios, median (min-max) of "
            f"{one['ms_per_image']['eager']['n']} interleaved rounds: vs eager with the reference attention (the "
            f"graph's algorithm) {x(one['speedup_per_round'])} at batch 1, {x(four['speedup_per_round'])} at batch 4; "
            f"vs eager with the compiled CPU kernel {x(one['speedup_vs_eager_kernel_per_round'])} / "
            f"{x(four['speedup_vs_eager_kernel_per_round'])}; TensorRT not measured here (needs a GPU) "
            f"({machine_note(data['machine'])}, shared with other work) |")


def cpu_quota_row(data: dict) -> str:
    rows = data["rows"]
    sized, unsized = rows["sized"], rows["unsized"]
    return (f"| `bench/cpu_quota.py` (tiny config's training step in a {data['cpu_quota']:g}-CPU cgroup quota) | "
            f"threads sized from the quota ({'/'.join(map(str, sized['threads']))}) vs torch's own choice "
            f"({'/'.join(map(str, unsized['threads']))}, one per core), median (min-max) of {data['rounds']} "
            f"interleaved rounds: {x(data['unsized_over_sized'])} faster sized "
            f"({sized['step_s']['median']:.2f} s vs {unsized['step_s']['median']:.2f} s a step) "
            f"({machine_note(data['machine'])}) |")


def span(values) -> str:
    low, high = min(values), max(values)
    return f"{low:g}" if low == high else f"{low:g}-{high:g}"


def example_runs_row(data: dict) -> str:
    """The example's figures as the range over the runs of the newest code measured (trainer, example)."""
    newest = data["runs"][-1]["code"]
    runs = [r for r in data["runs"] if r["code"] == newest]
    configs = "; ".join(f"{r['threads']} thread{'s' if r['threads'] > 1 else ''}"
                        + (", math libraries on SSE4 code paths (a CPU without AVX)" if r["sse_only"] else "")
                        for r in runs)
    repeats = [r["tensors_differing_from_first_same_run"] for r in runs if "tensors_differing_from_first_same_run" in r]
    same = (f"; a repeated configuration: {max(repeats)} of {len(runs[0]['tensor_digests'])} tensors differ"
            if repeats else "")
    detections = [r[k] for r in runs for k in r if k.startswith("detections_at_")]
    return (f"| `bench/example_runs.py` (`scripts/run_example.sh`: tiny config, {runs[0]['epochs']} epochs) | "
            f"AP {span([r['AP'] for r in runs])}, AP50 {span([r['AP50'] for r in runs])}, "
            f"AP75 {span([r['AP75'] for r in runs])}, detections at or above the drawing threshold "
            f"{span(detections)}, over {len(runs)} run{'s' if len(runs) > 1 else ''} of the code at commit {runs[0]['commit'][:10]} "
            f"({configs}; {runs[0]['cpu_model']}){same} |")


def accounting_cost_row(data: dict) -> str:
    """Exact counts on a simulated clock (no timing, so no spread): one run, the reference in it."""
    modes = data["modes"]
    today, every, needed = modes["today"], modes["every change"], modes["when needed"]

    def cost(row: dict) -> str:
        return f"{row['requests_per_min']:.2f} / {row['patches_per_min']:.2f}"
    return (f"| `bench/accounting_cost.py` (one running job, {data['minutes']} simulated minutes, "
            f"{data['epoch_minutes']}-minute epochs, status.json every 30 s) | Kubernetes API requests / status "
            f"patches per job per minute against the operator before issue 33 in the same run ({cost(today)}): "
            f"patched when needed {cost(needed)} ({needed['requests_vs_today']:.2f}x / {needed['patches_vs_today']:.2f}x), "
            f"hang heartbeat at most {needed['heartbeat_age_max_s']:.0f} s old, status.progress at most "
            f"{needed['shown_progress_age_max_s']:.0f} s; every change patched {cost(every)} "
            f"({every['requests_vs_today']:.2f}x / {every['patches_vs_today']:.2f}x) |")


RENDERERS = {"bench/msda.py": ("msda.json", msda_row), "bench/model_step.py": ("model_step.json", model_step_row),
             "bench/model_step.py --config tao_default": ("model_step_tao_default.json", model_step_tao_row),
             "bench/export.py": ("export.json", export_row),
             "bench/export.py --config tao_default": ("export_tao_default.json", export_row),
             "bench/cpu_quota.py": ("cpu_quota.json", cpu_quota_row),
             "bench/example_runs.py": ("example_runs.json", example_runs_row),
             "bench/accounting_cost.py": ("accounting_cost.json", accounting_cost_row)}


def expected_rows() -> dict[str, str]:
    return {name: render(json.loads((RESULTS / file).read_text())) for name, (file, render) in RENDERERS.items()}


def readme_rows(text: str) -> dict[str, str]:
    found = {}
    for line in text.splitlines():
        for name in RENDERERS:
            if line.startswith(f"| `{name}`"):
                found[name] = line
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--check", action="store_true")
    group.add_argument("--write", action="store_true")
    args = parser.parse_args(argv)
    expected = expected_rows()
    text = README.read_text()
    current = readme_rows(text)
    if args.write:
        for name, line in expected.items():
            if name not in current:
                print(f"README.md has no row for {name} in the Benchmarks table", file=sys.stderr)
                return 1
            text = text.replace(current[name], line)
        README.write_text(text)
        print("README.md rows updated")
        return 0
    if args.check:
        stale = [name for name, line in expected.items() if current.get(name) != line]
        for name in stale:
            print(f"README.md row for {name} differs from bench/results:\n  README:   {current.get(name)}\n"
                  f"  expected: {expected[name]}\n(run: python3 scripts/readme_figures.py --write)", file=sys.stderr)
        return 1 if stale else 0
    print("\n".join(expected.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
