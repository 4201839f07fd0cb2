"""The gang of the current attempt: its support children, starting it, suspending and resuming it,
and following it to success or failure."""
from __future__ import annotations

from deformable_detr.config.schema import ExperimentConfig

from ..render import (render_configmap, render_network_policy, render_podgroup, render_service, render_worker_job,
                      worker_job_name)
from .attempts import alive, current_pods, job_condition, old_pods_alive, record_attempt, tear_down
from .conditions import condition, stalled, transition
from .deadlines import blocker, startup_deadline_exceeded
from .failures import Failure, first_failure, handle_failure
from .hangs import count_hang, hung
from .model import Create, SetSuspend, State, timestamp
from .resize import plan_attempt, resized


def _running(pod: dict) -> bool:
    """Running and not being deleted: a Terminating pod never counts as a ready worker."""
    return (pod.get("status") or {}).get("phase") == "Running" and not pod["metadata"].get("deletionTimestamp")


def ensure_support_children(s: State, experiment: ExperimentConfig) -> None:
    observed = s.observed
    if not observed.service:
        s.actions.append(Create(render_service(s.job)))
    if not observed.configmap:
        s.actions.append(Create(render_configmap(s.job, experiment)))
    podgroup = render_podgroup(s.job)
    if podgroup is not None and not observed.podgroup:
        s.actions.append(Create(podgroup))
    policy = render_network_policy(s.job)
    if policy is not None and not observed.network_policy:
        s.actions.append(Create(policy))


def suspend(s: State, worker: dict | None) -> None:
    if worker is not None and s.queued:
        # Kueue owns the worker Job's suspend switch: stopping by flipping it would fight Kueue.
        # Stop by deleting the attempt instead; resuming starts the next attempt (recorded here
        # first, deleted by the next pass), so the deleted Job's name is never reused.
        s.status["attempt"] = s.attempt + 1
        s.status["workerJob"] = worker_job_name(s.name, s.attempt)
    elif worker is not None and not (worker.get("spec") or {}).get("suspend"):
        s.actions.append(SetSuspend(worker["metadata"]["name"], True))
    s.status["workersReady"] = 0
    stalled(s, None)
    transition(s, "Suspended", "SuspendedByUser",
               "runPolicy.suspend is true: the gang is stopped; unsuspend to resume from the checkpoint")


def start_attempt(s: State) -> None:
    if old_pods_alive(s):
        return  # wait until the previous gang is gone, so two gangs never share the results
    refused = plan_attempt(s)
    if refused is not None:  # a resize the run's global batch cannot take: nothing starts
        transition(s, "Pending", "ResizeRefused", refused)
        return
    name = worker_job_name(s.name, s.attempt)
    s.actions.append(Create(render_worker_job(s.job, s.attempt)))
    s.status["workerJob"] = name
    s.status["workersReady"] = 0
    record_attempt(s)
    if not s.queued:  # with Kueue, the job starts when the Job is admitted (see follow)
        s.status.setdefault("startTime", timestamp(s.now))
    never_created = condition(s, "Created") is None
    if s.status.get("phase") in (None, "Suspended") or never_created:  # (Pending after a refused create)
        resumed = s.status.get("phase") == "Suspended"
        transition(s, "Pending", "Resumed" if resumed else "GangCreated",
                   f"created worker Job {name} with {s.job.spec.nodes} pod(s)")


def _resume_or_queue(s: State, worker: dict, pods: list[dict]) -> None:
    name = worker["metadata"]["name"]
    if resized(s):
        # Resized while suspended: a Job's gang size is fixed, so the next attempt runs at the new one
        # (this Job is deleted by the next pass, as an earlier attempt's that did not fail).
        s.status["attempt"] = s.attempt + 1
        s.status["workerJob"] = worker_job_name(s.name, s.attempt)
    elif s.queued:
        transition(s, "Pending", "Queued", f"worker Job {name} waits for admission by Kueue")
    elif not any(alive(p) for p in pods):  # (the suspended gang's pods still terminating: resume once gone)
        s.actions.append(SetSuspend(name, False))
        s.status["startTime"] = timestamp(s.now)  # as the Job controller does on resume
        transition(s, "Pending", "Resumed", f"resuming worker Job {name} from the newest checkpoint")


def follow(s: State, worker: dict) -> None:
    name = worker["metadata"]["name"]
    s.status["workerJob"] = name
    pods = current_pods(s)
    if (worker.get("spec") or {}).get("suspend"):
        _resume_or_queue(s, worker, pods)
        return
    if s.queued and not s.status.get("startTime"):
        # activeDeadlineSeconds counts from admission (Kueue unsuspending the Job), not from creation.
        s.status["startTime"] = (worker.get("status") or {}).get("startTime") or timestamp(s.now)
    nodes = s.job.spec.nodes
    running = sum(1 for p in pods if _running(p))
    s.status["workersReady"] = running
    if job_condition(worker, "Complete") or job_condition(worker, "SuccessCriteriaMet"):
        s.status["workersReady"] = 0
        record_attempt(s, finishTime=timestamp(s.now), outcome="Succeeded")
        transition(s, "Succeeded", "Completed", f"all {nodes} worker(s) finished")
        return
    failure = first_failure(pods)
    job_failed = job_condition(worker, "Failed") or job_condition(worker, "FailureTarget")
    if failure is None and job_failed:
        failure = Failure(True, job_failed.get("reason") or "WorkerJobFailed",
                          f"worker Job {name} failed: {job_failed.get('message', '')}")
    if failure is not None:
        handle_failure(s, failure)
        return
    if running >= nodes:
        stalled(s, None)
        if s.status.get("phase") != "Running":
            transition(s, "Running", "AllWorkersRunning", f"{running}/{nodes} worker(s) running")
        stuck = hung(s, pods)
        if stuck is not None:  # no pod will exit on its own: stop this attempt, then decide as for a failure
            count_hang(s)
            tear_down(s)
            handle_failure(s, stuck)
        return
    stalled(s, blocker(pods, s.observed.worker_events, nodes))
    startup_deadline_exceeded(s, worker)
