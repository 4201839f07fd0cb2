"""Issue 33's accounting within the operator's old API cost: rank 0's status.json moves every 30 s, but
status.progress is patched only when a person or a decision needs the change (decide/progress.py), and
the hang heartbeat lives in the operator's memory (decide/hangs.py), started again from the status
after a restart or a leader change without ever declaring a healthy job Hung."""
from __future__ import annotations

import copy
import datetime as dt

from ddetr_operator import passes
from ddetr_operator.decide import Observed, reconcile
from ddetr_operator.decide.hangs import next_heartbeat
from ddetr_operator.decide.model import Heartbeat
from ddetr_operator.decide.progress import finish_drifted, worth_patching
from operator_objects import pod, worker_job
from test_pass_cost import FakeApi, fake_cluster, versioned

from conftest import NOW

T = "2026-01-02T03:04:05Z"  # NOW
SHOWN = {"epoch": 2, "numEpochs": 10, "step": 400, "lastLoss": 1.2, "lastMap": 0.3, "state": "running",
         "lastCheckpoint": "s3://runs/demo/train/model_epoch_001.pth", "percent": 20.0, "imagesPerSecond": 30.0,
         "estimatedFinishTime": "2026-01-02T07:04:05Z", "updateTime": T}


def _after(seconds: float) -> dt.datetime:
    return NOW + dt.timedelta(seconds=seconds)


def test_steps_loss_percent_and_speed_alone_are_worth_no_patch():
    moved = {**SHOWN, "step": 450, "lastLoss": 1.1, "percent": 22.5, "imagesPerSecond": 31.0, "skippedSamples": 1,
             "estimatedFinishTime": "2026-01-02T07:06:05Z", "updateTime": "2026-01-02T03:05:05Z"}
    assert not worth_patching(SHOWN, moved, _after(60))


def test_an_epoch_a_validation_a_checkpoint_a_state_or_the_first_progress_is_worth_a_patch():
    for change in ({"epoch": 3}, {"lastMap": 0.35}, {"lastCheckpoint": "s3://runs/demo/train/model_epoch_002.pth"},
                   {"state": "completed"}, {"stopReason": "reached the target"}):
        assert worth_patching(SHOWN, {**SHOWN, "step": 500, **change}, _after(60)), change
    assert worth_patching(None, SHOWN, NOW)


def test_the_finish_estimate_is_patched_once_it_drifts_past_5_minutes_and_a_tenth_of_the_time_left():
    finish = "2026-01-02T05:04:05Z"  # 2 h after NOW: a tenth of that is 12 min
    assert not finish_drifted(finish, "2026-01-02T05:14:05Z", NOW)  # 10 min
    assert finish_drifted(finish, "2026-01-02T05:17:05Z", NOW)  # 13 min
    assert finish_drifted(finish, "2026-01-02T04:50:05Z", NOW)  # 14 min earlier
    near = "2026-01-02T03:24:05Z"  # 20 min left: 5 min is the larger bound
    assert not finish_drifted(near, "2026-01-02T03:28:05Z", NOW)
    assert finish_drifted(near, "2026-01-02T03:30:05Z", NOW)
    assert finish_drifted(None, near, NOW) and finish_drifted(near, None, NOW)  # warm-up over; finished
    assert not finish_drifted(near, "soon", NOW)  # unreadable: no patch of its own
    drifted = {**SHOWN, "estimatedFinishTime": "2026-01-02T07:54:05Z"}  # 50 min, 4 h left
    assert worth_patching(SHOWN, drifted, NOW)


def test_the_heartbeat_moves_with_any_change_of_status_json_and_stands_while_unreadable():
    first = next_heartbeat(None, SHOWN, None, NOW)
    content = {k: v for k, v in SHOWN.items() if k != "updateTime"}
    assert first == Heartbeat(content, NOW)
    same = {**SHOWN, "updateTime": "2026-01-02T03:05:05Z"}  # updateTime is the operator's, not the trainer's
    assert next_heartbeat(first, same, SHOWN, _after(60)) is first
    assert next_heartbeat(first, None, SHOWN, _after(60)) is first
    moved = next_heartbeat(first, {**SHOWN, "step": 401}, SHOWN, _after(30.5))
    assert moved.since == _after(30) and moved.progress["step"] == 401  # kept to the second, as status times
    assert next_heartbeat(None, None, SHOWN, NOW) is None  # nothing read yet: nothing judged


def test_after_an_operator_restart_the_heartbeat_starts_from_the_status():
    # status.json as last patched: it stood since then, as the status says.
    assert next_heartbeat(None, SHOWN, SHOWN, _after(900)).since == NOW
    # status.json moved after the last patch (an epoch's end, 20 min ago), at a time nobody saw: from now.
    assert next_heartbeat(None, {**SHOWN, "step": 900}, SHOWN, _after(1200)).since == _after(1200)


# --- the same through reconcile: a running job whose progress was last patched 20 min ago ---------------

LIMIT = 120
CHILDREN = dict(service=True, configmap=True)


def _running(make_job) -> dict:
    running = {"type": "Running", "status": "True", "reason": "AllWorkersRunning", "message": "2/2 worker(s) running",
               "lastTransitionTime": "2026-01-02T02:00:00Z"}
    status = {"phase": "Running", "attempt": 0, "restarts": 0, "workersReady": 2, "workerJob": "demo-a0",
              "conditions": [running], "progress": SHOWN, "epochs": "2/10"}
    return make_job(status=status, runPolicy={"progressDeadlineSeconds": LIMIT})


def _pass(job, seconds: float, step: int, beat: Heartbeat | None):
    trainer = {"epoch": 2, "num_epochs": 10, "step": step, "last_loss": 1.2, "last_map": 0.3, "state": "running",
               "last_checkpoint": "s3://runs/demo/train/model_epoch_001.pth", "percent": 20.0,
               "images_per_second": 30.0, "estimated_finish_time": "2026-01-02T07:04:05Z"}
    observed = Observed(worker_jobs=[worker_job("demo", 0)], pods=[pod("demo", 0, 0, "Running"),
                                                                    pod("demo", 0, 1, "Running")],
                        progress=trainer, heartbeat=beat, **CHILDREN)
    return reconcile(job, observed, _after(seconds))


def test_a_restarted_operator_never_calls_a_healthy_job_hung_and_still_finds_a_hang(make_job):
    job = _running(make_job)
    # First pass of a new operator, status.progress 20 min old, status.json moved since: running on.
    first = _pass(job, 1200, step=900, beat=None)
    assert first.status["phase"] == "Running" and first.status["progress"] == SHOWN  # a step alone: no patch
    moving = _pass(job, 1200 + 3 * LIMIT, step=1100, beat=first.heartbeat)
    assert moving.status["phase"] == "Running"
    # It stands still from there: Hung one deadline later, naming the step and when it was seen.
    hung = _pass(job, 1200 + 4 * LIMIT + 1, step=1100, beat=moving.heartbeat)
    assert hung.status["phase"] == "Restarting" and hung.status["hangs"] == 1
    assert "has not advanced for 121 s" in hung.status["lastFailure"]["message"]
    assert "last step 1100 seen at 2026-01-02T03:30:05Z" in hung.status["lastFailure"]["message"]
    # The patch the hang makes anyway shows the newest progress too.
    assert hung.status["progress"]["step"] == 1100


def test_a_restarted_operator_finds_a_job_hung_since_its_last_patch_at_once(make_job):
    job = _running(make_job)
    decision = _pass(job, LIMIT + 1, step=400, beat=None)  # status.json as patched at NOW
    assert decision.status["phase"] == "Restarting" and decision.status["hangs"] == 1


# --- the same through the passes: what a running job costs the API server ---------------------------------

def test_a_running_job_costs_a_patch_per_epoch_and_its_hang_is_found_from_memory(make_job, monkeypatch):
    monkeypatch.setattr(passes, "_HEARTBEATS", passes.JobMemory())
    clock = {"now": NOW}
    monkeypatch.setattr(passes, "now", lambda: clock["now"])
    trainer = {"epoch": 0, "num_epochs": 10, "step": 0, "state": "running", "percent": 0.0}
    monkeypatch.setattr(passes, "_read_progress", lambda *args: dict(trainer))
    job = make_job(nodes=1, runPolicy={"progressDeadlineSeconds": LIMIT})
    job["spec"]["artifacts"].pop("credentialsSecret", None)
    job["status"] = {"phase": "Running", "attempt": 0, "restarts": 0, "workersReady": 1, "workerJob": "demo-a0",
                     "conditions": [{"type": "Running", "status": "True", "reason": "AllWorkersRunning",
                                     "message": "1/1 worker(s) running", "lastTransitionTime": "2026-01-02T03:00:00Z"}]}
    api = FakeApi(versioned(job, 50, uid="0000-1111"), jobs=[versioned(worker_job("demo", 0), 10)],
                  pods=[versioned(pod("demo", 0, 0, "Running"), 11)])
    cluster = fake_cluster(api)
    body = passes.reconcile_once(cluster, "ml", "demo").body  # the first progress: one patch
    for kind, obj in (("jobs", api.jobs[0]), ("pods", api.pods[0])):
        cluster.children.record(kind, "ADDED", obj)
    api.calls.clear()

    def passes_for(seconds: int, step_every: int) -> None:
        nonlocal body
        for _ in range(seconds // 10):
            clock["now"] += dt.timedelta(seconds=10)
            if step_every and int((clock["now"] - NOW).total_seconds()) % step_every == 0:
                trainer.update(step=trainer["step"] + 30, percent=trainer["percent"] + 0.5)
            body = passes.reconcile_once(cluster, "ml", "demo", cached=body).body or body

    passes_for(600, step_every=30)  # 10 min of 30 s uploads within an epoch
    assert api.calls == [] and body["status"]["progress"]["step"] == 0
    trainer.update(epoch=1, last_map=0.1)
    passes_for(10, step_every=0)
    assert api.calls == ["patch_namespaced_custom_object_status"] and api.patches[-1]["progress"]["epoch"] == 1
    assert api.patches[-1]["progress"]["step"] == trainer["step"]  # the moving fields ride along
    api.calls.clear()
    passes_for(LIMIT, step_every=0)  # rank 0 stands still, its status 0 s old: no patch, yet Hung
    status = api.job["status"]
    assert status["phase"] == "Restarting" and status["hangs"] == 1, status.get("lastFailure")
    assert f"last step {trainer['step']} seen at" in status["lastFailure"]["message"]


def test_an_operator_restart_mid_epoch_does_not_hang_a_moving_job(make_job, monkeypatch):
    """The same job, its operator's memory lost (a restart or a new leader) mid-epoch: running on."""
    job = _running(make_job)
    beat = None
    for seconds in range(1200, 1200 + 5 * LIMIT, 30):
        if seconds == 1200 + 2 * LIMIT:
            beat = None  # memory lost
        decision = _pass(copy.deepcopy(job), seconds, step=400 + seconds, beat=beat)
        assert decision.status["phase"] == "Running", seconds
        beat = decision.heartbeat
