"""The example's figures over several runs: `scripts/run_example.sh` as the README gives it, run in a
scratch copy of `scripts/` and `examples/`, each run's COCO figures appended to
bench/results/example_runs.json (the README's range is rendered from that file by
scripts/readme_figures.py).

    python3 bench/example_runs.py [--threads N] [--sse] [--epochs 6]

Training is deterministic on one machine with one configuration; what changes the numbers is the
floating-point summation order, which differs with the number of threads and with the instruction
set the math libraries pick for the CPU. `--threads` sets OMP_NUM_THREADS (what a machine or
container with that many CPUs runs) and `--sse` keeps PyTorch, oneDNN and MKL to SSE4 code paths
(what a CPU without AVX runs), so one machine reproduces what other CPUs give. Each record holds a
digest of every tensor of the final checkpoint: runs of the same configuration are compared tensor
by tensor.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from _common import cpu_model, write_json  # noqa: E402

RESULTS = os.path.join(HERE, "results", "example_runs.json")
# Older instruction sets for ATen's kernels, oneDNN's convolutions and MKL's BLAS.
SSE_ENV = {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"}
DETECTION_THRESHOLD = 0.4  # inference.conf_threshold of examples/tiny/spec.yaml: what the annotated images draw


def tensor_digests(checkpoint: str) -> dict[str, str]:
    import torch

    from deformable_detr.runtime.checkpoint import load_checkpoint

    state = load_checkpoint(checkpoint)["model"]
    return {name: hashlib.sha256(t.detach().contiguous().cpu().numpy().tobytes()).hexdigest()[:16]
            for name, t in state.items() if isinstance(t, torch.Tensor)}


CODE = ("trainer", "examples", "scripts/run_example.sh")  # what the example's figures depend on


def commit() -> str:
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", *CODE],
                           cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return head + ("-dirty" if dirty else "")


def code_digest(revision: str) -> str:
    """Git's object ids of what the example runs, at a commit: commits that differ elsewhere share it."""
    ids = subprocess.run(["git", "rev-parse", *(f"{revision}:{path}" for path in CODE)], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.split()
    return hashlib.sha256(" ".join(ids).encode()).hexdigest()[:12]


def run_once(threads: int, sse: bool, epochs: int) -> dict:
    measured = commit()  # before the run: a commit made meanwhile did not make these weights
    env = dict(os.environ, SKIP_INSTALL="1", PYTHON=sys.executable, EPOCHS=str(epochs), OMP_NUM_THREADS=str(threads))
    if sse:
        env.update(SSE_ENV)
    with tempfile.TemporaryDirectory(prefix="ddetr-example-") as work:
        for folder in ("scripts", "examples"):
            shutil.copytree(os.path.join(ROOT, folder), os.path.join(work, folder))
        start = time.monotonic()
        subprocess.run(["bash", "scripts/run_example.sh"], cwd=work, env=env, check=True,
                       stdout=subprocess.DEVNULL)
        wall = time.monotonic() - start
        results = os.path.join(work, "example_run", "results")
        with open(os.path.join(results, "evaluate", "results.json")) as fh:
            metrics = json.load(fh)
        with open(os.path.join(results, "evaluate", "detections.json")) as fh:
            detections = sum(d["score"] >= DETECTION_THRESHOLD for d in json.load(fh))
        digests = tensor_digests(os.path.join(results, "train", "dd_model_latest.pth"))
    code = "dirty" if measured.endswith("-dirty") else code_digest(measured)
    return {"commit": measured, "code": code, "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "cpu_model": cpu_model(), "threads": threads, "sse_only": sse, "epochs": epochs,
            "wall_s": round(wall, 1), "AP": round(metrics["AP"], 3), "AP50": round(metrics["AP50"], 3),
            "AP75": round(metrics["AP75"], 3), f"detections_at_{DETECTION_THRESHOLD}": int(detections),
            "tensor_digests": digests}


def differing_tensors(a: dict, b: dict) -> int:
    return sum(a["tensor_digests"].get(name) != digest for name, digest in b["tensor_digests"].items())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of the run")
    parser.add_argument("--sse", action="store_true", help="math libraries on SSE4 code paths only")
    parser.add_argument("--epochs", type=int, default=6, help="as run_example.sh's default")
    args = parser.parse_args(argv)
    record = run_once(args.threads, args.sse, args.epochs)
    runs = json.load(open(RESULTS))["runs"] if os.path.exists(RESULTS) else []
    same = [r for r in runs if (r.get("code"), r["cpu_model"], r["threads"], r["sse_only"], r["epochs"]) ==
            (record["code"], record["cpu_model"], record["threads"], record["sse_only"], record["epochs"])]
    if same:  # the same configuration again: does it give the same weights?
        record["tensors_differing_from_first_same_run"] = differing_tensors(same[0], record)
    runs.append(record)
    write_json(RESULTS, {"about": __doc__.splitlines()[0], "runs": runs})
    print("| commit | CPU | threads | SSE only | AP | AP50 | AP75 | detections >= 0.4 | tensors differing from an "
          "earlier same run | wall s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in runs:
        print(f"| {r['commit'][:10]} | {r['cpu_model']} | {r['threads']} | {r['sse_only']} | {r['AP']} | {r['AP50']} | "
              f"{r['AP75']} | {r[f'detections_at_{DETECTION_THRESHOLD}']} | "
              f"{r.get('tensors_differing_from_first_same_run', '-')} of {len(r['tensor_digests'])} | {r['wall_s']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
