"""Does it learn? The tiny config on the embedded example, against a wall-clock budget.

Trains `examples/tiny/spec.yaml` from scratch on the CPU, validating on the held-out
generated images every epoch, and stops (SIGTERM: the trainer saves a checkpoint) when
the budget runs out. Then scores the final checkpoint with `deformable-detr evaluate`
on the held-out images and writes the curve (mAP against wall time) as JSON and PNG.

    python bench/learn.py [--budget-min 15] [--data example_data] [override ...]

Quality bar (issue 7): AP50 >= 0.8 and AP >= 0.5 within 15 minutes on a 2-core CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BAR = {"AP50": 0.8, "AP": 0.5}


def ensure_data(folder: str) -> None:
    if os.path.exists(os.path.join(folder, "train", "annotations.json")):
        return
    subprocess.run([sys.executable, "-m", "deformable_detr", "make-example-data", "--out", folder], check=True)


def read_validations(log_path: str) -> list[dict]:
    if not os.path.exists(log_path):
        return []
    with open(log_path, encoding="utf-8") as fh:
        return [r for r in map(json.loads, filter(str.strip, fh)) if r.get("kind") == "validation"]


def train_with_budget(spec: str, results: str, data: str, budget_s: float, overrides: list[str]) -> dict:
    cmd = [sys.executable, "-m", "deformable_detr", "train", "-e", spec, "-r", results,
           "train.auto_resume=false", *data_overrides(data), *overrides]
    print("running:", " ".join(cmd), flush=True)
    start = time.time()
    proc = subprocess.Popen(cmd)
    stopped = False
    while proc.poll() is None:
        if time.time() - start > budget_s and not stopped:
            print(f"budget of {budget_s:.0f}s reached: stopping training (SIGTERM)", flush=True)
            proc.send_signal(signal.SIGTERM)
            stopped = True
        time.sleep(1.0)
    return {"start": start, "seconds": time.time() - start, "exit_code": proc.returncode, "stopped_by_budget": stopped}


def data_overrides(data: str) -> list[str]:
    """Point the example spec's sources at `data` (the spec names example_data/ relative to the cwd)."""
    train = os.path.join(data, "train")
    val = os.path.join(data, "val")
    source = lambda d: f"{{image_dir: {os.path.join(d, 'images')}, json_file: {os.path.join(d, 'annotations.json')}}}"
    return [f"dataset.train_data_sources=[{source(train)}]", f"dataset.val_data_sources=[{source(val)}]",
            f"dataset.test_data_sources={source(val)}"]


def evaluate(spec: str, results: str, data: str, checkpoint: str) -> dict:
    cmd = [sys.executable, "-m", "deformable_detr", "evaluate", "-e", spec, "-r", results,
           f"evaluate.checkpoint={checkpoint}", *data_overrides(data)]
    subprocess.run(cmd, check=True)
    with open(os.path.join(results, "evaluate", "results.json"), encoding="utf-8") as fh:
        return json.load(fh)


def plot(curve: list[dict], path: str, budget_min: float) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    minutes = [p["minutes"] for p in curve]
    ax.plot(minutes, [p["AP50"] for p in curve], "o-", label="AP50")
    ax.plot(minutes, [p["AP"] for p in curve], "s-", label="AP")
    ax.axhline(BAR["AP50"], color="C0", ls=":", lw=1)
    ax.axhline(BAR["AP"], color="C1", ls=":", lw=1)
    ax.axvline(budget_min, color="grey", ls="--", lw=1, label="budget")
    ax.set_xlabel("wall time (minutes, training + validation)")
    ax.set_ylabel("COCO mAP on held-out images")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("tiny config, 2-core CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-min", type=float, default=15.0)
    parser.add_argument("--data", default=os.path.join(ROOT, "example_data"))
    parser.add_argument("--spec", default=os.path.join(ROOT, "examples", "tiny", "spec.yaml"))
    parser.add_argument("--results", default=os.path.join(ROOT, "example_run", "learn"))
    parser.add_argument("--out", default=os.path.join(HERE, "results", "learn"))
    parser.add_argument("overrides", nargs="*", help="extra section.field=value overrides for training")
    args = parser.parse_args()

    ensure_data(args.data)
    run = train_with_budget(args.spec, args.results, args.data, args.budget_min * 60, args.overrides)
    train_dir = os.path.join(args.results, "train")
    curve = [{"epoch": v["epoch"] + 1, "minutes": round((v["time"] - run["start"]) / 60, 2),
              "AP": v["mAP"], "AP50": v["mAP50"], "AP75": v["mAP75"]}
             for v in read_validations(os.path.join(train_dir, "train_log.jsonl"))]
    final = evaluate(args.spec, args.results, args.data, os.path.join(train_dir, "dd_model_latest.pth"))
    metrics = final.get("metrics", final)
    passed = metrics["AP50"] >= BAR["AP50"] and metrics["AP"] >= BAR["AP"]

    print(f"\n{'epoch':>5} {'minutes':>8} {'AP':>6} {'AP50':>6} {'AP75':>6}")
    for p in curve:
        print(f"{p['epoch']:>5} {p['minutes']:>8.2f} {p['AP']:>6.3f} {p['AP50']:>6.3f} {p['AP75']:>6.3f}")
    print(f"final (held-out, {run['seconds'] / 60:.1f} min): AP {metrics['AP']:.3f}  AP50 {metrics['AP50']:.3f}  "
          f"bar AP >= {BAR['AP']}, AP50 >= {BAR['AP50']}: {'met' if passed else 'NOT met'}")

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    report = {"budget_minutes": args.budget_min, "overrides": args.overrides, "train_run": run, "curve": curve,
              "final": {k: metrics[k] for k in ("AP", "AP50", "AP75", "APs", "APm", "APl") if k in metrics},
              "bar": BAR, "bar_met": passed, "cpu_count": os.cpu_count()}
    with open(args.out + ".json", "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=2)
    plot(curve, args.out + ".png", args.budget_min)
    print(f"wrote {args.out}.json and {args.out}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
