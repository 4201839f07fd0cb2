"""Observed children -> next status and actions (pure: no I/O, `now` is passed in).

One level-triggered pass: the handler observes the job's children, calls `reconcile`,
applies the actions and patches the status. Running the same pass twice (an operator
restart mid-reconcile) creates nothing twice: child names are deterministic and
"already exists" counts as success.

Exit codes decide restarts as in Kubeflow's ExitCode policy (deformable_detr.exit_codes):
1-127 (the CLI's 2 for a bad spec or data included) are permanent; 128-255 (signals:
OOM-kill, preemption, SIGTERM after a checkpoint) and pods lost without an exit code are
retryable.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any, Mapping, Sequence

from deformable_detr import exit_codes

from . import LABEL_ATTEMPT
from .render import (CONTAINER, KUEUE_QUEUE_LABEL, render_configmap, render_network_policy, render_podgroup,
                     render_service, render_worker_job, worker_job_name)
from .validate import JobSpecError, Policy, validate_job

TERMINAL = ("Succeeded", "Failed")
# The condition type that records each phase (Pending is recorded as "Created").
PHASE_CONDITION = {"Pending": "Created", "Running": "Running", "Restarting": "Restarting",
                   "Suspended": "Suspended", "Succeeded": "Succeeded", "Failed": "Failed"}
ACTIVE_CONDITIONS = ("Running", "Restarting", "Suspended")
MAX_MESSAGE = 1500
# Failed attempts whose worker Jobs (and so their pods and `kubectl logs`) are kept besides the current one.
KEEP_FAILED_ATTEMPTS = 3
# Entries of status.attempts kept (the newest).
MAX_ATTEMPT_HISTORY = 10
# Container waiting reasons that keep a gang from starting whatever time passes, until someone acts.
BLOCKING_WAIT_REASONS = ("ErrImagePull", "ImagePullBackOff", "InvalidImageName", "CreateContainerConfigError",
                         "CreateContainerError", "ErrImageNeverPull")
STALLED = "Stalled"  # condition type: the current attempt's pods cannot start (reason says why)
INDEX_LABEL = "batch.kubernetes.io/job-completion-index"


@dataclasses.dataclass
class Observed:
    """What the handler saw of a job's children."""

    service: bool = False
    configmap: bool = False
    podgroup: bool = False
    network_policy: bool = False
    worker_jobs: list[dict] = dataclasses.field(default_factory=list)  # every attempt's Job still present
    pods: list[dict] = dataclasses.field(default_factory=list)  # every attempt's pods still present
    progress: Mapping[str, Any] | None = None  # rank 0's status.json, when readable
    # Warning events on the current worker Job (FailedCreate: Pod Security, quota), read only while
    # it has fewer pods than the gang.
    worker_events: list[dict] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class Create:
    manifest: dict


@dataclasses.dataclass(frozen=True)
class DeleteWorkerJob:
    name: str


@dataclasses.dataclass(frozen=True)
class SetSuspend:
    name: str
    suspend: bool


@dataclasses.dataclass(frozen=True)
class DeleteSelf:
    """ttlSecondsAfterFinished ran out: delete the DeformableDetrJob (children go with it)."""


Action = Create | DeleteWorkerJob | SetSuspend | DeleteSelf


@dataclasses.dataclass(frozen=True)
class Event:
    type: str  # Normal or Warning
    reason: str
    message: str


@dataclasses.dataclass
class Decision:
    status: dict
    actions: list[Action] = dataclasses.field(default_factory=list)
    events: list[Event] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class Failure:
    retryable: bool
    reason: str
    message: str
    disruption: bool = False  # preempted, evicted, node drained: restarted without using backoffLimit
    pod: str | None = None
    rank: int | None = None
    exit_code: int | None = None


def _rank(pod: Mapping[str, Any]) -> int | None:
    meta = pod.get("metadata") or {}
    value = (meta.get("labels") or {}).get(INDEX_LABEL) or (meta.get("annotations") or {}).get(INDEX_LABEL)
    return int(value) if value is not None and str(value).isdigit() else None


def _alive(pod: Mapping[str, Any]) -> bool:
    """A pod whose containers may still run: not Succeeded/Failed (a Terminating pod is alive)."""
    return (pod.get("status") or {}).get("phase") not in TERMINAL


def _running(pod: Mapping[str, Any]) -> bool:
    """Running and not being deleted: a Terminating pod never counts as a ready worker."""
    return (pod.get("status") or {}).get("phase") == "Running" and not pod["metadata"].get("deletionTimestamp")


def timestamp(now: dt.datetime) -> str:
    return now.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str | None) -> dt.datetime | None:
    if not text:
        return None
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


is_retryable_exit = exit_codes.is_retryable


def _terminated(pod: Mapping[str, Any]) -> Mapping[str, Any] | None:
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        if status.get("name") == CONTAINER:
            return (status.get("state") or {}).get("terminated")
    return None


def pod_failure(pod: Mapping[str, Any]) -> Failure:
    """Why one failed pod failed, with the last log lines kubelet kept as its termination message."""
    name = pod["metadata"]["name"]
    terminated = _terminated(pod)
    if terminated is None or terminated.get("exitCode") is None:
        status = pod.get("status") or {}
        reason = status.get("reason") or "PodFailed"
        return Failure(True, reason, f"pod {name}: {reason}: {status.get('message', 'lost before it exited')}",
                       pod=name, rank=_rank(pod))
    code = int(terminated["exitCode"])
    detail = (terminated.get("message") or "").strip()
    what = terminated.get("reason") or "Error"
    message = f"pod {name} exited with code {code} ({what})" + (f"; last log lines:\n{detail}" if detail else "")
    return Failure(is_retryable_exit(code), "OOMKilled" if what == "OOMKilled" else f"ExitCode{code}", message,
                   pod=name, rank=_rank(pod), exit_code=code)


def _disruption(pod: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """Kubernetes marks pods it evicts, preempts or takes off a lost node with DisruptionTarget."""
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "DisruptionTarget" and cond.get("status") == "True":
            return cond
    return None


def first_failure(pods: Sequence[Mapping[str, Any]]) -> Failure | None:
    """The failure that broke the gang: the earliest failed pod (the others follow it).

    A disrupted pod anywhere in the gang makes the failure retryable whatever the exit
    codes: its peers exit 1 when it vanishes, which must not read as a permanent error.
    """
    failed = [p for p in pods if (p.get("status") or {}).get("phase") == "Failed"]
    if not failed:
        return None
    for pod in pods:
        disruption = _disruption(pod)
        if disruption is not None:
            reason = disruption.get("reason") or "DisruptionTarget"
            terminated = _terminated(pod) or {}
            return Failure(True, reason, f"pod {pod['metadata']['name']} was disrupted: {reason}: "
                                         f"{disruption.get('message', '')}", disruption=True,
                           pod=pod["metadata"]["name"], rank=_rank(pod), exit_code=terminated.get("exitCode"))

    def finished(pod: Mapping[str, Any]) -> tuple[str, str]:
        terminated = _terminated(pod) or {}
        return (terminated.get("finishedAt") or "9999", pod["metadata"]["name"])
    return pod_failure(min(failed, key=finished))


def set_condition(conditions: Sequence[Mapping[str, Any]], type_: str, status: str, reason: str,
                  message: str, now: dt.datetime) -> list[dict]:
    """Kubernetes-style: lastTransitionTime moves only when status changes."""
    out, found = [], False
    for cond in conditions:
        cond = dict(cond)
        if cond["type"] == type_:
            found = True
            if cond.get("status") != status:
                cond["lastTransitionTime"] = timestamp(now)
            cond.update(status=status, reason=reason, message=message)
        out.append(cond)
    if not found:
        out.append({"type": type_, "status": status, "reason": reason, "message": message,
                    "lastTransitionTime": timestamp(now)})
    return out


def _job_condition(worker_job: Mapping[str, Any], type_: str) -> Mapping[str, Any] | None:
    for cond in (worker_job.get("status") or {}).get("conditions") or []:
        if cond.get("type") == type_ and cond.get("status") == "True":
            return cond
    return None


# status.json field -> (status.progress field, accepted types). Values of another type are
# dropped: one odd field must never make the API server reject the whole status patch.
PROGRESS_FIELDS = {"epoch": ("epoch", (int,)), "num_epochs": ("numEpochs", (int,)), "step": ("step", (int,)),
                   "last_loss": ("lastLoss", (int, float)), "last_map": ("lastMap", (int, float)),
                   "last_checkpoint": ("lastCheckpoint", (str,)), "state": ("state", (str,))}


def _progress_status(progress: Mapping[str, Any], previous: Mapping[str, Any] | None, now: dt.datetime) -> dict:
    """status.progress from status.json; updateTime moves only when the progress does."""
    out: dict[str, Any] = {}
    for key, (name, types) in PROGRESS_FIELDS.items():
        value = progress.get(key)
        if isinstance(value, types) and not isinstance(value, bool):
            out[name] = value
    previous = dict(previous or {})
    since = previous.pop("updateTime", None)
    out["updateTime"] = since if previous == out and since else timestamp(now)
    return out


class _Pass:
    """State of one reconcile pass; helpers append to `actions`/`events` and edit `status`."""

    def __init__(self, job: Mapping[str, Any], observed: Observed, now: dt.datetime, policy: Policy = Policy()):
        self.job, self.observed, self.now, self.policy = job, observed, now, policy
        self.spec = _as_mapping(job.get("spec"))
        self.run_policy = _as_mapping(self.spec.get("runPolicy"))
        self.queued = bool((job["metadata"].get("labels") or {}).get(KUEUE_QUEUE_LABEL))
        old = dict(_as_mapping(job.get("status")))
        self.status: dict[str, Any] = {k: old[k] for k in (
            "phase", "conditions", "startTime", "completionTime", "attempt", "restarts", "disruptions",
            "restartTime", "workersReady", "workerJob", "epochs", "progress", "lastFailure", "attempts") if k in old}
        self.status.setdefault("restarts", 0)
        self.status.setdefault("conditions", [])
        # The attempt number: the status's, or (status written by an older operator) its restarts, and
        # never below the highest attempt label seen: a status lost between creating attempt n's Job and
        # recording it cannot make a later pass reuse a name.
        seen = [a for a in (self.attempt_of(o) for o in [*observed.worker_jobs, *observed.pods]) if a is not None]
        self.status["attempt"] = max([int(self.status.get("attempt", self.status["restarts"])), *seen])
        self.actions: list[Action] = []
        self.events: list[Event] = []

    @property
    def attempt(self) -> int:
        return int(self.status["attempt"])

    def transition(self, phase: str, reason: str, message: str) -> None:
        message = message[-MAX_MESSAGE:]
        conditions = self.status["conditions"]
        was_true = any(c["type"] == PHASE_CONDITION[phase] and c.get("status") == "True" for c in conditions)
        for other in ACTIVE_CONDITIONS:
            previous = next((c for c in conditions if c["type"] == other), None)
            if other != PHASE_CONDITION[phase] and previous is not None:
                # Only the status flips: the reason and message keep saying why it last held (the
                # preemption behind the last restart stays readable once the new gang runs).
                conditions = set_condition(conditions, other, "False", previous.get("reason") or reason,
                                           previous.get("message") or message, self.now)
        self.status["conditions"] = set_condition(conditions, PHASE_CONDITION[phase], "True", reason, message,
                                                  self.now)
        if self.status.get("phase") != phase or not was_true:
            self.events.append(Event("Warning" if phase in ("Failed", "Restarting") else "Normal", reason, message))
        self.status["phase"] = phase
        if phase in TERMINAL:
            self.status.setdefault("completionTime", timestamp(self.now))
            self.stalled(None)

    def stalled(self, blocker: tuple[str, str] | None) -> None:
        """Condition Stalled: True (reason, message) while the attempt's pods cannot start; a Warning
        event each time the reason or message changes."""
        conditions = self.status["conditions"]
        previous = next((c for c in conditions if c.get("type") == STALLED), None)
        if blocker is None:
            if previous is not None and previous.get("status") == "True":
                self.status["conditions"] = set_condition(conditions, STALLED, "False", "WorkersStarted",
                                                          "the gang's pods are no longer blocked", self.now)
            return
        reason, message = blocker[0], blocker[1][-MAX_MESSAGE:]
        if previous is None or previous.get("status") != "True" or previous.get("reason") != reason \
                or previous.get("message") != message:
            self.events.append(Event("Warning", reason, message))
        self.status["conditions"] = set_condition(conditions, STALLED, "True", reason, message, self.now)

    def attempt_of(self, obj: Mapping[str, Any]) -> int | None:
        value = (obj["metadata"].get("labels") or {}).get(LABEL_ATTEMPT)
        return int(value) if value is not None and str(value).isdigit() else None

    def current_worker_job(self) -> dict | None:
        name = worker_job_name(self.job["metadata"]["name"], self.attempt)
        return next((j for j in self.observed.worker_jobs if j["metadata"]["name"] == name), None)

    def current_pods(self) -> list[dict]:
        return [p for p in self.observed.pods if self.attempt_of(p) == self.attempt]

    def old_pods_alive(self) -> bool:
        """Pods of an earlier attempt (or of a deleted Job of this one) still running or terminating.

        Unbounded, as JobSet's BlockingRecreate: a new gang starts only once the old one is gone,
        however long its pods' own termination grace (checkpoint upload) takes. A pod stuck
        Terminating on a lost node is the pod garbage collector's (or the admin's) to remove.
        """
        return any(_alive(p) for p in self.observed.pods if self.attempt_of(p) != self.attempt)

    def tear_down(self) -> None:
        worker = self.current_worker_job()
        if worker is not None:
            self.actions.append(DeleteWorkerJob(worker["metadata"]["name"]))

    def record_attempt(self, **fields: Any) -> None:
        """Start or update the current attempt's entry in the bounded status.attempts history."""
        history = [dict(a) for a in self.status.get("attempts") or [] if isinstance(a, Mapping)]
        entry = next((a for a in history if a.get("attempt") == self.attempt), None)
        if entry is None:
            entry = {"attempt": self.attempt, "startTime": timestamp(self.now)}
            history.append(entry)
        entry.update({k: v for k, v in fields.items() if v is not None})
        self.status["attempts"] = history[-MAX_ATTEMPT_HISTORY:]

    # -- the pass ---------------------------------------------------------------

    def run(self) -> Decision:
        if self.status.get("phase") in TERMINAL:
            self.finished()
        else:
            self.active()
        return Decision(self.status, self.actions, self.events)

    def finished(self) -> None:
        """cleanPodPolicy applies here, once the job is finished, never to a failed attempt of a live job.

        All: every worker Job (and so every pod) goes. Running (the default) and None keep the Jobs
        and their finished pods for `kubectl logs`: after a failure the Job controller has already
        stopped the rest of the gang (backoffLimit 0), so no pod is left running.
        """
        if self.run_policy.get("cleanPodPolicy", "Running") == "All":
            for worker in self.observed.worker_jobs:
                self.actions.append(DeleteWorkerJob(worker["metadata"]["name"]))
        if ttl_expired(self.job, self.now):
            self.actions.append(DeleteSelf())

    def active(self) -> None:
        try:
            experiment = validate_job(self.job["metadata"]["name"], self.job.get("spec"), self.policy)
        except JobSpecError as err:
            self.tear_down()  # an edit can make a running job's spec invalid
            self.transition("Failed", "InvalidSpec", str(err))
            return
        self.ensure_support_children(experiment)
        self.stop_stale_attempts()
        if self.observed.progress:
            self.status["progress"] = _progress_status(self.observed.progress, self.status.get("progress"), self.now)
            epoch, total = self.status["progress"].get("epoch"), self.status["progress"].get("numEpochs")
            if epoch is not None and total is not None:
                self.status["epochs"] = f"{epoch}/{total}"
        worker = self.current_worker_job()
        if self.deadline_exceeded(worker):
            return
        if self.run_policy.get("suspend", False):
            self.suspend(worker)
            return
        if worker is None:
            self.start_attempt()
            return
        self.follow(worker)

    def ensure_support_children(self, experiment) -> None:
        if not self.observed.service:
            self.actions.append(Create(render_service(self.job)))
        if not self.observed.configmap:
            self.actions.append(Create(render_configmap(self.job, experiment)))
        podgroup = render_podgroup(self.job)
        if podgroup is not None and not self.observed.podgroup:
            self.actions.append(Create(podgroup))
        policy = render_network_policy(self.job)
        if policy is not None and not self.observed.network_policy:
            self.actions.append(Create(policy))

    def stop_stale_attempts(self) -> None:
        """Worker Jobs of earlier attempts: stop any that may still run pods; keep the last failed ones.

        A failed attempt's Job stays (its pods hold the logs) for the last KEEP_FAILED_ATTEMPTS
        attempts; older ones are deleted. An earlier attempt's Job that did not fail (a Kueue-managed
        gang suspended by deleting it, a pass that crashed after recording the next attempt) is
        deleted: its intent was recorded in the status by an earlier pass, so this never races it.
        """
        for worker in self.observed.worker_jobs:
            number = self.attempt_of(worker)
            if number is None or number >= self.attempt or worker["metadata"].get("deletionTimestamp"):
                continue
            pods = [p for p in self.observed.pods if self.attempt_of(p) == number]
            failed = (_job_condition(worker, "Failed") or _job_condition(worker, "FailureTarget")
                      or any((p.get("status") or {}).get("phase") == "Failed" for p in pods))
            if not failed or number < self.attempt - KEEP_FAILED_ATTEMPTS:
                self.actions.append(DeleteWorkerJob(worker["metadata"]["name"]))

    def deadline_exceeded(self, worker: dict | None) -> bool:
        deadline = self.run_policy.get("activeDeadlineSeconds")
        started = parse_time(self.status.get("startTime"))
        if deadline is None or started is None or self.status.get("phase") == "Suspended":
            return False
        if self.now < started + dt.timedelta(seconds=deadline):
            return self.startup_deadline_exceeded(worker)
        self.tear_down()
        self.transition("Failed", "DeadlineExceeded", f"the job ran longer than activeDeadlineSeconds ({deadline})")
        return True

    def startup_deadline_exceeded(self, worker: dict | None) -> bool:
        """runPolicy.startupDeadlineSeconds: the attempt's gang must be all running within this."""
        limit = self.run_policy.get("startupDeadlineSeconds")
        if not limit or worker is None or (worker.get("spec") or {}).get("suspend") or \
                self.status.get("phase") == "Running":
            return False
        since = parse_time((worker.get("status") or {}).get("startTime")) or \
            parse_time(worker["metadata"].get("creationTimestamp"))
        if since is None or self.now < since + dt.timedelta(seconds=limit):
            return False
        blocked = next((c for c in self.status["conditions"] if c.get("type") == STALLED and c.get("status") == "True"),
                       None)
        why = f"; {blocked['reason']}: {blocked['message']}" if blocked else ""
        self.tear_down()
        self.transition("Failed", "StartupDeadlineExceeded",
                        f"the gang of {worker['metadata']['name']} was not all running within "
                        f"runPolicy.startupDeadlineSeconds ({limit}){why}")
        return True

    def suspend(self, worker: dict | None) -> None:
        if worker is not None and self.queued:
            # Kueue owns the worker Job's suspend switch: stopping by flipping it would fight Kueue.
            # Stop by deleting the attempt instead; resuming starts the next attempt (recorded here
            # first, deleted by the next pass), so the deleted Job's name is never reused.
            self.status["attempt"] = self.attempt + 1
            self.status["workerJob"] = worker_job_name(self.job["metadata"]["name"], self.attempt)
        elif worker is not None and not (worker.get("spec") or {}).get("suspend"):
            self.actions.append(SetSuspend(worker["metadata"]["name"], True))
        self.status["workersReady"] = 0
        self.stalled(None)
        self.transition("Suspended", "SuspendedByUser",
                        "runPolicy.suspend is true: the gang is stopped; unsuspend to resume from the checkpoint")

    def start_attempt(self) -> None:
        if self.old_pods_alive():
            return  # wait until the previous gang is gone, so two gangs never share the results
        name = worker_job_name(self.job["metadata"]["name"], self.attempt)
        self.actions.append(Create(render_worker_job(self.job, self.attempt)))
        self.status["workerJob"] = name
        self.status["workersReady"] = 0
        self.record_attempt()
        if not self.queued:  # with Kueue, the job starts when the Job is admitted (see follow)
            self.status.setdefault("startTime", timestamp(self.now))
        never_created = not any(c.get("type") == "Created" for c in self.status["conditions"])
        if self.status.get("phase") in (None, "Suspended") or never_created:  # (Pending after a refused create)
            resumed = self.status.get("phase") == "Suspended"
            self.transition("Pending", "Resumed" if resumed else "GangCreated",
                            f"created worker Job {name} with {self.spec.get('nodes', 1)} pod(s)")

    def follow(self, worker: dict) -> None:
        name = worker["metadata"]["name"]
        self.status["workerJob"] = name
        pods = self.current_pods()
        if (worker.get("spec") or {}).get("suspend"):
            if not self.queued:
                if any(_alive(p) for p in pods):
                    return  # the suspended gang's pods are still terminating: resume once they are gone
                self.actions.append(SetSuspend(name, False))
                self.status["startTime"] = timestamp(self.now)  # as the Job controller does on resume
                self.transition("Pending", "Resumed", f"resuming worker Job {name} from the newest checkpoint")
            else:
                self.transition("Pending", "Queued", f"worker Job {name} waits for admission by Kueue")
            return
        if self.queued and not self.status.get("startTime"):
            # activeDeadlineSeconds counts from admission (Kueue unsuspending the Job), not from creation.
            self.status["startTime"] = (worker.get("status") or {}).get("startTime") or timestamp(self.now)
        running = sum(1 for p in pods if _running(p))
        self.status["workersReady"] = running
        complete = _job_condition(worker, "Complete") or _job_condition(worker, "SuccessCriteriaMet")
        if complete:
            self.status["workersReady"] = 0
            self.record_attempt(finishTime=timestamp(self.now), outcome="Succeeded")
            self.transition("Succeeded", "Completed", f"all {self.spec.get('nodes', 1)} worker(s) finished")
            return
        failure = first_failure(pods)
        job_failed = _job_condition(worker, "Failed") or _job_condition(worker, "FailureTarget")
        if failure is None and job_failed:
            failure = Failure(True, job_failed.get("reason") or "WorkerJobFailed",
                              f"worker Job {name} failed: {job_failed.get('message', '')}")
        if failure is not None:
            self.handle_failure(failure)
            return
        nodes = self.spec.get("nodes", 1)
        if running >= nodes:
            self.stalled(None)
            if self.status.get("phase") != "Running":
                self.transition("Running", "AllWorkersRunning", f"{running}/{nodes} worker(s) running")
            return
        self.stalled(blocker(pods, self.observed.worker_events, nodes))
        self.startup_deadline_exceeded(worker)

    def handle_failure(self, failure: Failure) -> None:
        """Record the failure and what comes next; delete nothing.

        The Job controller has already stopped the rest of the gang (the worker Job's backoffLimit
        is 0), and the failed attempt's Job and pods stay for `kubectl logs`. A restart only moves
        the attempt number on; the next pass starts it once every pod of this one is gone.
        """
        self.status["workersReady"] = 0
        last = {"attempt": self.attempt, "rank": failure.rank, "pod": failure.pod, "exitCode": failure.exit_code,
                "reason": failure.reason, "message": failure.message[-MAX_MESSAGE:], "time": timestamp(self.now)}
        self.status["lastFailure"] = {k: v for k, v in last.items() if v is not None}
        self.record_attempt(finishTime=timestamp(self.now), outcome="Disrupted" if failure.disruption else "Failed",
                            reason=failure.reason, rank=failure.rank, exitCode=failure.exit_code)
        backoff_limit = self.run_policy.get("backoffLimit", 3)
        restarts = int(self.status.get("restarts", 0))
        if not failure.retryable:
            self.transition("Failed", failure.reason, f"permanent failure, not retried: {failure.message}")
            return
        if failure.disruption:
            # Preemption, eviction, a drained node: not the job's fault, so not counted in backoffLimit.
            self.status["disruptions"] = int(self.status.get("disruptions", 0)) + 1
            detail = f"restart after disruption {self.status['disruptions']} (not counted in backoffLimit)"
        elif restarts >= backoff_limit:
            self.transition("Failed", "BackoffLimitExceeded",
                            f"{restarts} restart(s) used (backoffLimit {backoff_limit}); last failure: "
                            f"{failure.message}")
            return
        else:
            self.status["restarts"] = restarts + 1
            detail = f"restart {restarts + 1}/{backoff_limit}"
        self.status["attempt"] = self.attempt + 1
        self.status["restartTime"] = timestamp(self.now)
        self.status["workerJob"] = worker_job_name(self.job["metadata"]["name"], self.attempt)
        self.transition("Restarting", failure.reason, f"{detail} from the newest checkpoint after: {failure.message}")


def blocker(pods: Sequence[Mapping[str, Any]], events: Sequence[Mapping[str, Any]],
            nodes: int) -> tuple[str, str] | None:
    """Why the gang's pods do not run, in words a user can act on: (reason, message), or None.

    A pod the scheduler cannot place (PodScheduled False, Unschedulable), a container kubelet
    cannot start (image pull, a missing Secret or key: CreateContainerConfigError), or pods the
    Job controller could not create (FailedCreate events: Pod Security, quota, a webhook).
    """
    for pod in pods:
        name = pod["metadata"]["name"]
        status = pod.get("status") or {}
        for container in status.get("containerStatuses") or status.get("initContainerStatuses") or []:
            waiting = (container.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") in BLOCKING_WAIT_REASONS:
                return waiting["reason"], f"pod {name}: {waiting['reason']}: {waiting.get('message', '')}".strip()
        for cond in status.get("conditions") or []:
            if cond.get("type") == "PodScheduled" and cond.get("status") == "False" \
                    and cond.get("reason") == "Unschedulable":
                return "Unschedulable", f"pod {name} cannot be scheduled: {cond.get('message', '')}"
    if len(pods) < nodes:
        failed_create = [e for e in events if e.get("reason") == "FailedCreate"]
        if failed_create:
            newest = max(failed_create, key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "")
            return "FailedCreate", f"{len(pods)}/{nodes} pod(s) created: {newest.get('message', '')}"
    return None


def reconcile(job: Mapping[str, Any], observed: Observed, now: dt.datetime, policy: Policy = Policy()) -> Decision:
    """The next status of `job` and the actions that move its children towards it."""
    return _Pass(job, observed, now, policy).run()


def _as_mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def ttl_expired(job: Mapping[str, Any], now: dt.datetime) -> bool:
    """A finished job whose runPolicy.ttlSecondsAfterFinished has run out (it is to be deleted)."""
    ttl = _as_mapping(_as_mapping(job.get("spec")).get("runPolicy")).get("ttlSecondsAfterFinished")
    status = _as_mapping(job.get("status"))
    if status.get("phase") not in TERMINAL or not isinstance(ttl, int) or isinstance(ttl, bool):
        return False
    try:
        done = parse_time(status.get("completionTime"))
    except (TypeError, ValueError):
        return False
    return done is not None and now >= done + dt.timedelta(seconds=ttl)


def wants_pass(job: Mapping[str, Any], now: dt.datetime, resync: bool) -> bool:
    """Whether a reconcile pass has anything to do for `job` (as last seen on the watch).

    Active jobs always do (status, progress, deadlines, restarts). A finished job has work
    only when its TTL has run out, or, on an event (its own or a child's), when
    cleanPodPolicy All may still have a gang to delete: the periodic resync never lists a
    finished job's children again.
    """
    if _as_mapping(job.get("status")).get("phase") not in TERMINAL:
        return True
    if ttl_expired(job, now):
        return True
    clean_all = _as_mapping(_as_mapping(job.get("spec")).get("runPolicy")).get("cleanPodPolicy") == "All"
    return clean_all and not resync


# --- the API server refusing a child ----------------------------------------------------

CHILD_REJECTED = "ChildRejected"  # reason of the Failed condition: the request will never be accepted
CHILD_CREATE_FAILED = "ChildCreateFailed"  # condition type: a request failed, and is retried


@dataclasses.dataclass(frozen=True)
class ChildError:
    """The API server refused one of a pass's requests (create, patch or delete of a child)."""

    what: str  # "create Job demo-a0"
    code: int  # HTTP status
    reason: str  # the Status body's reason (Invalid, Forbidden, NotFound, ...)
    message: str  # the Status body's message: what the API server says is wrong

    @property
    def permanent(self) -> bool:
        """Will the same request fail again whatever the cluster does meanwhile?

        400/422: the object itself is bad (a toleration the API refuses). 404 on a create: the
        kind does not exist (a PodGroup without Volcano's CRD). Those need a new job. 401/403
        (RBAC, a quota exceeded), 409 (conflict), 429 and 5xx can pass later: retried.
        """
        return self.code in (400, 422) or (self.code == 404 and self.what.startswith("create "))

    def describe(self) -> str:
        return f"{self.what} was refused by the API server ({self.code} {self.reason}): {self.message}"


def settle(job: Mapping[str, Any], decision: Decision, error: ChildError | None, now: dt.datetime) -> Decision:
    """The pass's final status once its actions ran: `decision` when they all went through.

    When the API server refused one, the decided transitions did not happen (a "created"
    gang that was not created), so the status starts again from the job's own: a permanent
    refusal fails the job (reason ChildRejected, the server's message); a transient one sets
    the condition ChildCreateFailed and the next pass tries again. Either way a Warning event
    carries the message (once per distinct message for retries, not every pass).
    """
    if error is None:
        conditions = decision.status.get("conditions") or []
        if any(c.get("type") == CHILD_CREATE_FAILED and c.get("status") == "True" for c in conditions):
            decision.status["conditions"] = set_condition(conditions, CHILD_CREATE_FAILED, "False", "Accepted",
                                                          "the API server accepted the operator's requests", now)
        return decision
    again = _Pass(job, Observed(), now)
    message = error.describe()[-MAX_MESSAGE:]
    if error.permanent and again.status.get("phase") not in TERMINAL:
        again.transition("Failed", CHILD_REJECTED, message)
        return Decision(again.status, [], again.events)
    previous = next((c for c in again.status["conditions"] if c.get("type") == CHILD_CREATE_FAILED), None)
    events = [] if previous and previous.get("status") == "True" and previous.get("message") == message else [
        Event("Warning", CHILD_CREATE_FAILED, message)]
    again.status["conditions"] = set_condition(again.status["conditions"], CHILD_CREATE_FAILED, "True",
                                               error.reason or f"HTTP{error.code}", message, now)
    again.status.setdefault("phase", "Pending")
    return Decision(again.status, [], events)
