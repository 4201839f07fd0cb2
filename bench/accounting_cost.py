"""What issue 33's accounting costs the operator: Kubernetes API requests, status patches and patch bytes
per running job per minute, against the operator's reporting before it, in the same run.

    python3 bench/accounting_cost.py [--minutes 60] [--epoch-minutes 20]

The real `kube.Cluster` and `passes.reconcile_once` run on a counting stand-in for the API server (the
one tests/operator/test_pass_cost.py uses), on a simulated clock: one running one-node job, a pass every
10 s (the operator's default interval), a full pass every 300 s (its default), the rest cached. Rank 0's
status.json (a step a second, its finish estimate wobbling +-2 min as a measured rate does) is what the
pass reads from S3, in four modes:

  today         the fields of status.json before issue 33, in S3 at each epoch's end (as uploaded then),
                each change patched: the reference
  same cadence  every field issue 33 added (progress, best checkpoint, goodput accounts), same cadence
  every change  every field, in S3 every 30 s (outputs.STATUS_UPLOAD_EVERY_S), each change patched
                (issue 33 as first built)
  when needed   every field, in S3 every 30 s, the status patched only when decide.progress.worth_patching
                says so (an epoch, a validation, a checkpoint, a state, the finish estimate drifting; the
                other modes take it as always true), the hang heartbeat in the operator's memory

Besides the cost, how current each mode keeps what matters: the oldest the hang heartbeat got (seconds
since status.json last moved, as a pass saw it) and the oldest status.progress a person could read.
Counts are exact (no timing): one run. Prints a table and writes bench/results/accounting_cost.json.
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "operator"))
sys.path.insert(0, str(REPO / "bench"))

INTERVAL_S, FULL_EVERY_S = 10, 300
MODES = ("today", "same cadence", "every change", "when needed")
TODAY_FIELDS = ("num_epochs", "epoch", "epochs_completed", "epoch_index", "step", "last_loss", "last_map",
                "last_checkpoint", "state", "attempt", "skipped_samples", "not_uploaded")


def trainer_status(second: int, epoch_s: int, epochs: int, start: dt.datetime) -> dict:
    """Rank 0's status.json after `second` s of training, a step a second, validating at epoch ends."""
    epoch, into = divmod(second, epoch_s)
    wobble = 120.0 * math.sin(2 * math.pi * second / 900.0)  # the recent step rate's noise, in the estimate
    finish = start + dt.timedelta(seconds=epoch_s * epochs + round(wobble))
    return {"num_epochs": epochs, "epoch": epoch, "epochs_completed": epoch, "epoch_index": epoch,
            "step": second, "last_loss": round(2.0 - second / (epoch_s * epochs), 4),
            "last_map": 0.1 * epoch if epoch else None, "state": "running", "attempt": 1, "skipped_samples": 0,
            "last_checkpoint": f"s3://runs/demo/train/model_epoch_{max(epoch - 1, 0):03d}_step_{epoch * epoch_s:05d}.pth",
            "percent": round(100.0 * second / (epoch_s * epochs), 2), "images_per_second": 32.0,
            "eta_seconds": float(epoch_s * epochs - second), "estimated_finish_time": finish.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "best_map": 0.1 * epoch if epoch else None, "best_epoch": epoch - 1 if epoch else None,
            "best_checkpoint": f"s3://runs/demo/train/model_epoch_{epoch - 1:03d}.pth" if epoch else None,
            "train_seconds": float(second), "eval_seconds": 30.0 * epoch, "checkpoint_seconds": 5.0 * epoch,
            "startup_seconds": 40.0, "recomputed_seconds": 0.0, "recomputed_steps": 0,
            "unsaved_seconds": float(into)}


def run(mode: str, minutes: int, epoch_s: int) -> dict:
    from ddetr_operator import passes
    from ddetr_operator.decide import progress as decide_progress
    from ddetr_operator.decide.model import parse_time
    from operator_objects import pod, worker_job
    from test_pass_cost import FakeApi, fake_cluster, versioned

    from conftest import BASE_JOB

    start = dt.datetime(2026, 1, 2, 3, 0, 0, tzinfo=dt.timezone.utc)
    clock = {"now": start}
    passes.now = lambda: clock["now"]
    epochs = max(1, (minutes * 60) // epoch_s + 1)
    upload_every = 30 if mode in ("every change", "when needed") else epoch_s
    worth_patching = decide_progress.worth_patching
    if mode != "when needed":  # the operator before this decision: every change patched
        decide_progress.worth_patching = lambda *args: True
    passes._HEARTBEATS.clear()
    fields = TODAY_FIELDS if mode == "today" else None

    def read(*_args):
        second = int((clock["now"] - start).total_seconds())
        status = trainer_status(second - second % upload_every, epoch_s, epochs, start)
        return {k: v for k, v in status.items() if fields is None or k in fields}

    passes._read_progress = read
    job = copy.deepcopy(BASE_JOB)
    job["spec"]["nodes"] = 1
    job["spec"]["artifacts"].pop("credentialsSecret", None)
    job["metadata"]["creationTimestamp"] = "2026-01-02T02:55:00Z"
    job["status"] = {"phase": "Running", "attempt": 0, "restarts": 0, "workersReady": 1, "workerJob": "demo-a0",
                     "startTime": "2026-01-02T03:00:00Z", "conditions": []}
    job = versioned(job, 50, uid="0000-1111")
    api = FakeApi(job, jobs=[versioned(worker_job("demo", 0), 10)], pods=[versioned(pod("demo", 0, 0, "Running"), 11)])
    cluster = fake_cluster(api)
    body = passes.reconcile_once(cluster, "ml", "demo").body or api.job  # settle: not counted
    for kind, obj in (("jobs", api.jobs[0]), ("pods", api.pods[0])):
        cluster.children.record(kind, "ADDED", obj)
    api.calls.clear()
    patches_before = len(api.patches)
    heartbeat_age = shown_age = 0.0
    for tick in range(1, minutes * 60 // INTERVAL_S + 1):
        clock["now"] = start + dt.timedelta(seconds=tick * INTERVAL_S)
        full = tick % (FULL_EVERY_S // INTERVAL_S) == 0
        result = passes.reconcile_once(cluster, "ml", "demo", cached=None if full else body)
        body = result.body or api.job
        beat = passes._HEARTBEATS.get("0000-1111")
        heartbeat_age = max(heartbeat_age, (clock["now"] - beat.since).total_seconds() if beat else float("inf"))
        shown = parse_time(api.job["status"]["progress"]["updateTime"])
        shown_age = max(shown_age, (clock["now"] - shown).total_seconds())
    decide_progress.worth_patching = worth_patching
    patches = api.patches[patches_before:]
    return {"requests_per_min": len(api.calls) / minutes, "patches_per_min": len(patches) / minutes,
            "patch_bytes_per_min": sum(len(json.dumps({"status": p})) for p in patches) / minutes,
            "status_fields_patched": sorted({k for p in patches for k in p}),
            "heartbeat_age_max_s": heartbeat_age, "shown_progress_age_max_s": shown_age}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=int, default=60)
    parser.add_argument("--epoch-minutes", type=int, default=20)
    args = parser.parse_args()
    from _common import machine, write_json

    rows = {mode: run(mode, args.minutes, args.epoch_minutes * 60) for mode in MODES}
    today = rows["today"]
    for row in rows.values():
        row["requests_vs_today"] = round(row["requests_per_min"] / today["requests_per_min"], 4)
        row["patches_vs_today"] = round(row["patches_per_min"] / today["patches_per_min"], 4)
    print(f"one running job, {args.minutes} simulated minutes, epochs of {args.epoch_minutes} min, a pass every "
          f"{INTERVAL_S} s, a full pass every {FULL_EVERY_S} s")
    print(f"{'mode':<14}{'API requests/min':>18}{'status patches/min':>20}{'patch bytes/min':>17}"
          f"{'vs today (req, patch)':>23}{'heartbeat age':>15}{'progress age':>14}")
    for mode, row in rows.items():
        print(f"{mode:<14}{row['requests_per_min']:>18.2f}{row['patches_per_min']:>20.2f}"
              f"{row['patch_bytes_per_min']:>17.0f}{row['requests_vs_today']:>15.2f}x {row['patches_vs_today']:.2f}x"
              f"{row['heartbeat_age_max_s']:>13.0f} s{row['shown_progress_age_max_s']:>12.0f} s")
    write_json(str(REPO / "bench" / "results" / "accounting_cost.json"),
               {"machine": machine(), "minutes": args.minutes, "epoch_minutes": args.epoch_minutes,
                "interval_s": INTERVAL_S, "full_pass_every_s": FULL_EVERY_S, "modes": rows})


if __name__ == "__main__":
    main()
