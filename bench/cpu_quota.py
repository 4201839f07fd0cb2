"""Training steps inside a 1-CPU quota, with and without sizing the thread pools from it.

A container limited to 1 CPU (a pod's `resources.limits.cpu: 1`) still sees every core of its
host, and torch alone starts one thread per core in its affinity mask; the trainer sizes its pools
from the quota instead (runtime/cpu_budget.py). This runs the same training steps of the tiny
configuration (`examples/tiny/spec.yaml`'s model, its batch of 8 at 96 px, AdamW) in fresh worker
processes placed in a cgroup limited to 1 CPU, made here (bench/_cgroup.py; needs root):

    sized     apply_cpu_budget(), as every task calls it at start: 1 thread
    unsized   torch's own choice: one thread per CPU in the affinity mask (the reference)

in interleaved rounds (each round runs both in turn, so they see the same load), and prints
median (min-max) step times and the per-round ratio unsized / sized; writes bench/results/cpu_quota.json.
The effect grows with the host's cores: on this project's 2-core machines torch starts only 2 threads.

    python3 bench/cpu_quota.py [--rounds 3] [--steps 4] [--cpus 1]    # as root
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from _cgroup import cpu_quota_cgroup, join  # noqa: E402
from _common import fmt, machine, ratio_spread, spread, write_json  # noqa: E402

RESULTS = os.path.join(HERE, "results", "cpu_quota.json")
SPEC = os.path.join(ROOT, "examples", "tiny", "spec.yaml")
WARMUP = 2


def worker(sized: bool, steps: int) -> None:
    """One process: build the tiny model, run WARMUP + `steps` training steps, print JSON of the timings."""
    import torch

    from deformable_detr.config.loader import load_spec
    from deformable_detr.model import build_model
    from deformable_detr.runtime.logging import setup_logging

    if sized:
        from deformable_detr.runtime.cpu_budget import apply_cpu_budget

        setup_logging()
        apply_cpu_budget()
    spec = load_spec(SPEC)
    torch.manual_seed(0)
    model, criterion, _ = build_model(spec)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.train.optim.lr)
    size, count = spec.dataset.augmentation.random_resize_max_size, spec.dataset.batch_size
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(count, 3, size, size, generator=generator)
    masks = torch.zeros(count, size, size, dtype=torch.bool)
    targets = [{"labels": torch.randint(1, spec.dataset.num_classes, (3,), generator=generator),
                "boxes": torch.rand(3, 4, generator=generator) * 0.4 + 0.3} for _ in range(count)]
    seconds = []
    for index in range(WARMUP + steps):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        sum(criterion(model(images, masks), targets).values()).backward()
        optimizer.step()
        if index >= WARMUP:
            seconds.append(time.perf_counter() - start)
    print(json.dumps({"threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
                      "step_s": statistics.median(seconds), "steps": seconds}))


def run_worker(sized: bool, steps: int, cgroup: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    run = subprocess.run([sys.executable, __file__, "--worker", "sized" if sized else "unsized", "--steps", str(steps)],
                         env=env, capture_output=True, text=True, check=False,
                         preexec_fn=lambda: join(cgroup))
    if run.returncode != 0:
        raise SystemExit(f"worker failed ({run.returncode}): {run.stderr[-2000:]}")
    result = json.loads(run.stdout.strip().splitlines()[-1])
    result["log"] = [line for line in run.stderr.splitlines() if "CPU threads:" in line]
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4, help="timed training steps per worker (after 2 warm-up)")
    parser.add_argument("--cpus", type=float, default=1.0, help="the cgroup's CPU quota")
    parser.add_argument("--worker", choices=["sized", "unsized"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker == "sized", args.steps)
        return 0
    load_at_start = os.getloadavg()
    names = ("unsized", "sized")
    runs: dict[str, list[dict]] = {name: [] for name in names}
    with cpu_quota_cgroup(args.cpus) as cgroup:
        for round_index in range(args.rounds):
            order = names if round_index % 2 == 0 else tuple(reversed(names))  # neither always goes first
            for name in order:
                runs[name].append(run_worker(name == "sized", args.steps, cgroup))
            print(f"round {round_index + 1}/{args.rounds}: " + ", ".join(
                f"{name} {runs[name][-1]['step_s']:.3f} s/step ({runs[name][-1]['threads']} threads)" for name in names),
                flush=True)
    step = {name: [r["step_s"] for r in runs[name]] for name in names}
    ratio = ratio_spread(step["unsized"], step["sized"])
    result = {"machine": machine(load_at_start), "cpu_quota": args.cpus, "rounds": args.rounds, "steps": args.steps,
              "warmup_steps": WARMUP, "spec": os.path.relpath(SPEC, ROOT),
              "rows": {name: {"threads": sorted({r["threads"] for r in runs[name]}),
                              "interop_threads": sorted({r["interop_threads"] for r in runs[name]}),
                              "step_s": spread(step[name]), "per_round_step_s": step[name],
                              "log": runs[name][0]["log"]} for name in names},
              "unsized_over_sized": ratio}
    write_json(RESULTS, result)
    print(f"\n{args.cpus:g}-CPU quota, {result['machine']['cpu_cores']} cores, load at start "
          f"{load_at_start[0]:.1f}; median (min-max) over {args.rounds} interleaved rounds of {args.steps} steps\n")
    print("| run | threads | step time, s |")
    print("| --- | --- | --- |")
    for name in names:
        row = result["rows"][name]
        print(f"| {name} | {'/'.join(map(str, row['threads']))} | {fmt(row['step_s'], digits=3)} |")
    print(f"\nunsized / sized step time: {fmt(ratio)}x  ->  {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
