"""The DeformableDetrJob API: typed spec and status, the one source of the CRD schema (crd.py), its
defaults, CEL rules and printer columns, the operator's checks of a spec and the renderer's inputs.

`resolve(body)` reads a job as the operator uses it: spec checked and defaulted (`JobSpec`), never
a `.get(field, default)` elsewhere. Adding a spec field is one `prop` here and its use in render.py.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

from deformable_detr import exit_codes
from deformable_detr.config.jsonschema import experiment_schema
from deformable_detr.runtime.status_file import STATUS_FIELDS as STATUS_FIELDS_OF_FILE
from deformable_detr.tasks import DEFAULT_TASK, TASKS

from . import corev1
from .apischema import JobSpecError, Rule, fields, json_name, object_schema, parse, prop

__all__ = ["JobSpecError", "JobSpec", "JobStatus", "Job", "resolve", "run_policy_of"]

# Pod hostnames are "<name>-a<attempt>-<index>" and must fit a 63-character DNS label.
MAX_NAME_LENGTH = 40
NAME_RULE = Rule(f"self.metadata.name.size() <= {MAX_NAME_LENGTH}",
                 f"metadata.name: at most {MAX_NAME_LENGTH} characters (it names the pods, "
                 "<name>-a<attempt>-<index>, which must fit a 63-character DNS label)",
                 lambda name: len(name) <= MAX_NAME_LENGTH)
CLEAN_POD_POLICIES = ["None", "Running", "All"]
# "kubernetes": the cluster's own scheduler with the GenericWorkload feature (scheduling.k8s.io/v1beta1 PodGroup).
GANG_SCHEDULERS = ["kubernetes", "volcano", "scheduler-plugins"]
MAX_ATTEMPT_HISTORY = 10  # entries of status.attempts kept (the newest)
PHASES = ["Pending", "Running", "Restarting", "Succeeded", "Failed", "Suspended"]
# Time between SIGTERM and SIGKILL: torchrun forwards SIGTERM, rank 0 finishes its step, writes
# a checkpoint and uploads it to S3 (hundreds of MB, tens of seconds); Kubernetes' 30 s is too short,
# and less than Kubernetes' own 30 s is refused.
DEFAULT_TERMINATION_GRACE_SECONDS = 180
MIN_TERMINATION_GRACE_SECONDS = 30
# What may change in a job after it is created: the suspend switch (the user's and Kueue's), and the
# TTL (as for a batch/v1 Job). Everything else shapes the gang: a new job, not an edit.
MUTABLE_RUN_POLICY = ("suspend", "ttlSecondsAfterFinished")
# The gang's size may change while the job is suspended: the next attempt resumes at the new world size
# (decide/resize.py). Kueue never changes these: it admits the worker Job whole or not at all.
RESIZABLE_WHILE_SUSPENDED = ("nodes", "gpusPerNode")
_QUANTITY_RE = r"^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$"
_STRING_MAP = dict[str, str]
_frozen = dataclasses.dataclass(frozen=True, kw_only=True)


@_frozen
class Named:
    name: str = prop("Secret name", required=True)


@_frozen
class ClaimRef:
    claim_name: str = prop("PVC name", required=True)


@_frozen
class HostPath:
    path: str = prop("path on the node", required=True)
    type_: str | None = prop("hostPath type check", default=None)


@_frozen
class Volume:
    DESCRIPTION = "a dataset volume: exactly one of persistentVolumeClaim or hostPath"
    RULES = (Rule("has(self.persistentVolumeClaim) != has(self.hostPath)",
                  "give exactly one of persistentVolumeClaim or hostPath",
                  lambda v: (v.persistent_volume_claim is None) != (v.host_path is None)),)
    name: str = prop("volume name (DNS label)", required=True, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
                     maxLength=63)
    mount_path: str = prop("where the volume appears in the trainer container", required=True, pattern=r"^/")
    read_only: bool = prop("mount read-only (datasets)", default=True)
    sub_path: str | None = prop("mount only this sub-path of the volume", default=None)
    persistent_volume_claim: ClaimRef | None = prop(default=None)
    host_path: HostPath | None = prop(default=None)


@_frozen
class CredentialsSecret:
    name: str = prop("Secret in the job's namespace", required=True)
    access_key_id_key: str = prop("key holding the access key id", default="AWS_ACCESS_KEY_ID")
    secret_access_key_key: str = prop("key holding the secret key", default="AWS_SECRET_ACCESS_KEY")


@_frozen
class Artifacts:
    uri: str = prop("results root (s3://bucket/prefix); becomes the spec's results_dir", required=True,
                    pattern=r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?$")
    endpoint: str | None = prop("S3 endpoint URL for S3-compatible stores (MinIO, Ceph)", default=None)
    region: str | None = prop("S3 region", default=None)
    credentials_secret: CredentialsSecret | None = prop("credentials by reference; never put keys in the resource",
                                                        default=None)


@_frozen
class Cache:
    DESCRIPTION = ("the node-local cache of s3:// datasets, checkpoints and weights the trainer reads (keyed by bucket, "
                   "key and ETag; shared by the node's ranks, the next attempt and later tasks on a PVC): an emptyDir "
                   "by default, or a PVC")
    RULES = (Rule("!(has(self.medium) && has(self.persistentVolumeClaim))",
                  "give medium (of the emptyDir) or persistentVolumeClaim, not both",
                  lambda c: c.medium is None or c.persistent_volume_claim is None),)
    size: str = prop("most bytes the cache holds: the emptyDir's sizeLimit; the trainer keeps to 90% of it, evicting "
                     "the least recently used objects", pattern=_QUANTITY_RE, default="50Gi")
    medium: str | None = prop("emptyDir medium: Memory (tmpfs, counted against the pod's memory) or unset (node disk)",
                              enum=["Memory"], default=None)
    persistent_volume_claim: ClaimRef | None = prop(
        "a PVC instead of an emptyDir: kept across jobs (ReadWriteMany to share it between nodes)", default=None)


@_frozen
class EncryptionKeySecret:
    name: str = prop("Secret in the job's namespace", required=True)
    key: str = prop("key holding the checkpoint encryption key", default="DDETR_ENCRYPTION_KEY")


FAILURE_ACTIONS = ["FailJob", "RestartJob", "RestartJobAndIgnoreBackoff"]
MAX_FAILURE_RULES = 32


def _valid_regex(pattern: str | None) -> bool:
    try:
        re.compile(pattern or "")
        return True
    except re.error:
        return False


@_frozen
class FailureRule:
    DESCRIPTION = ("a failure rule: matches when every matcher given matches (each list: any of its items); "
                   "the first rule that matches decides")
    RULES = (Rule("has(self.exitCodes) || has(self.terminationReasons) || has(self.podConditions) || "
                  "has(self.failureClasses) || has(self.logPattern)",
                  "a failure rule needs at least one of exitCodes, terminationReasons, podConditions, failureClasses "
                  "or logPattern",
                  lambda r: any(v is not None for v in (r.exit_codes, r.termination_reasons, r.pod_conditions,
                                                        r.failure_classes, r.log_pattern))),
             # An invalid pattern makes matches() fail to evaluate: the API server refuses the object.
             Rule("!has(self.logPattern) || ''.matches(self.logPattern) || !''.matches(self.logPattern)",
                  "logPattern: not a valid RE2 regular expression",
                  lambda r: _valid_regex(r.log_pattern),
                  lambda r: f"logPattern: {r.log_pattern!r} is not a valid regular expression"),)
    name: str = prop("names the rule in status.lastFailure.rule and the event", required=True,
                     pattern=r"^[a-zA-Z0-9]([-a-zA-Z0-9_.]*[a-zA-Z0-9])?$", maxLength=63)
    action: str = prop("FailJob: the job fails; RestartJob: restart counted against backoffLimit; "
                       "RestartJobAndIgnoreBackoff: restart not counted", required=True, enum=FAILURE_ACTIONS)
    exit_codes: list[int] | None = prop("the failed trainer container's exit code is one of these",
                                        schema=lambda: {"type": "array", "maxItems": 64,
                                                        "items": {"type": "integer", "minimum": 0, "maximum": 255}},
                                        default=None)
    termination_reasons: list[str] | None = prop(
        "the failed container's termination reason is one of these (OOMKilled, Error, ContainerCannotRun)",
        schema=lambda: {"type": "array", "maxItems": 16, "items": {"type": "string", "maxLength": 63}}, default=None)
    pod_conditions: list[str] | None = prop(
        "a pod of the gang has one of these conditions True (DisruptionTarget)",
        schema=lambda: {"type": "array", "maxItems": 16, "items": {"type": "string", "maxLength": 63}}, default=None)
    failure_classes: list[str] | None = prop(
        "the trainer's failure class (its termination message; Hung for a progress deadline) is one of these",
        schema=lambda: {"type": "array", "maxItems": 16,
                        "items": {"type": "string", "enum": list(exit_codes.FAILURE_CLASSES)}}, default=None)
    log_pattern: str | None = prop("RE2 regular expression found in the failed rank's last log lines (its "
                                   "termination message)", maxLength=256, default=None)


@_frozen
class FailurePolicy:
    rules: list[FailureRule] | None = prop("ordered; the first match decides, the built-in rules apply after "
                                           "these", maxItems=MAX_FAILURE_RULES, default=None)


@_frozen
class RunPolicy:
    backoff_limit: int = prop("gang restarts after retryable failures before Failed", minimum=0, default=3)
    active_deadline_seconds: int | None = prop("fail the job when it runs longer than this", minimum=1, default=None)
    ttl_seconds_after_finished: int | None = prop("delete the finished job (and its children) after this",
                                                  minimum=0, default=None)
    clean_pod_policy: str = prop("which pods to delete when the job finishes", enum=CLEAN_POD_POLICIES,
                                 default="Running")
    suspend: bool = prop("stop the gang but keep the job; unsuspending resumes from the checkpoint", default=False)
    startup_deadline_seconds: int | None = prop(
        "fail the job when an attempt's gang is not all running this long after its Job started (image pulls, "
        "scheduling, missing Secrets)", minimum=1, default=None)
    progress_deadline_seconds: int | None = prop(
        "end the attempt as Hung (retryable) when rank 0's heartbeat (status.json) has not advanced for this "
        "long while all pods run", minimum=30, default=None)
    failure_policy: FailurePolicy | None = prop("which failures fail the job and which restart it", default=None)
    target_map: float | None = prop(
        "end training as Succeeded once a validation mAP reaches this (0..1); the epoch's checkpoint is saved first",
        minimum=0, maximum=1, default=None)
    max_non_finite_loss_steps: int | None = prop(
        "fail the job (no restart) once the training loss is NaN or infinite this many steps in a row, naming the "
        "step and loss terms; the updates of those steps are skipped (the trainer's default: 1)", minimum=1,
        default=None)


@_frozen
class PodTemplateMeta:
    labels: _STRING_MAP | None = prop(default=None)
    annotations: _STRING_MAP | None = prop(default=None)


@_frozen
class PodTemplate:
    metadata: PodTemplateMeta | None = prop("added to the trainer pods (e.g. Multus network annotations)",
                                            default=None)
    spec: dict | None = prop("core/v1 PodSpec fields set on the trainer pods (hostNetwork, initContainers, "
                             "dnsConfig, ...); containers, restartPolicy, subdomain and volumes are the operator's",
                             schema=lambda: corev1.ANY_OBJECT, default=None)


@_frozen
class GangScheduling:
    scheduler: str = prop("gang scheduler whose PodGroup to create: kubernetes (the cluster's own scheduler, "
                          "scheduling.k8s.io/v1beta1, 1.37+ with the GenericWorkload feature gate), volcano or "
                          "scheduler-plugins", required=True, enum=GANG_SCHEDULERS)
    min_available: int | None = prop("pods that must be schedulable together: must equal nodes (a torchrun gang "
                                     "starts only whole); leave it out", minimum=1, default=None)
    schedule_timeout_seconds: int | None = prop("scheduler-plugins: give up co-scheduling after this", minimum=1,
                                                default=None)


def _affinity_schema() -> dict:
    # Its three kinds declared (the rest of core/v1 Affinity is passed through): CEL compares objects
    # without declared fields loosely, and the immutability rule should see a kind added or removed.
    kinds = {kind: {**corev1.ANY_OBJECT, "description": f"core/v1 {kind[0].upper()}{kind[1:]}"}
             for kind in ("nodeAffinity", "podAffinity", "podAntiAffinity")}
    return {"type": "object", "properties": kinds}


def _whole_gang(spec: "JobSpec") -> bool:
    return spec.gang_scheduling is None or spec.gang_scheduling.min_available in (None, spec.nodes)


@_frozen
class JobSpec:
    """`spec` of a DeformableDetrJob: the experiment plus how to run it on the cluster."""

    RULES = (Rule("!has(self.gangScheduling) || !has(self.gangScheduling.minAvailable) || "
                  "self.gangScheduling.minAvailable == self.nodes",
                  "gangScheduling.minAvailable must equal nodes: a torchrun gang starts only whole (leave it out)",
                  _whole_gang,
                  # A torchrun gang rendezvouses only when every node is there: a PodGroup that lets fewer
                  # pods start would hold GPUs for a gang that can never begin.
                  lambda s: f"gangScheduling.minAvailable: {s.gang_scheduling.min_available} is not accepted; it "
                            f"must equal spec.nodes ({s.nodes}): a torchrun gang starts only when all its pods run, "
                            "so a partial gang would hold GPUs without ever starting (leave minAvailable out)"),
             # The heartbeat is rank 0's status.json in the artifacts: without them the operator sees none.
             Rule("!has(self.runPolicy) || !has(self.runPolicy.progressDeadlineSeconds) || has(self.artifacts)",
                  "runPolicy.progressDeadlineSeconds needs artifacts: the operator reads rank 0's heartbeat "
                  "(status.json) there",
                  lambda s: s.run_policy.progress_deadline_seconds is None or s.artifacts is not None),)

    # Required by the CRD; a job that reaches the operator without it (no CRD) runs the defaults.
    experiment: dict = prop("the TAO deformable_detr spec, exactly as the deformable-detr CLI takes it",
                            required=True, schema=experiment_schema, opaque=True, factory=dict)
    task: str = prop("which task to run; train runs a multi-node gang, the others one pod", enum=list(TASKS),
                     default=DEFAULT_TASK)
    image: str = prop("trainer container image", required=True, minLength=1)
    image_pull_policy: str | None = prop("image pull policy", enum=["Always", "IfNotPresent", "Never"], default=None)
    image_pull_secrets: list[Named] | None = prop(default=None)
    service_account_name: str | None = prop("service account of the trainer pods", default=None)
    nodes: int = prop("nodes (pods) in the gang; evaluate/inference/export/convert use 1", minimum=1, default=1)
    gpus_per_node: int = prop("GPUs per node = torchrun processes per node; 0 runs one CPU process", minimum=0,
                              default=1)
    master_port: int = prop("torchrun rendezvous port on pod 0", minimum=1024, maximum=65535, default=29500)
    metrics_port: int = prop("rank 0's Prometheus /metrics port; 0 = off", minimum=0, maximum=65535, default=9090)
    termination_grace_period_seconds: int = prop(
        "seconds a trainer pod gets after SIGTERM (preemption, suspend, gang restart) to finish its step, write its "
        "checkpoint and upload it before it is killed", minimum=MIN_TERMINATION_GRACE_SECONDS,
        default=DEFAULT_TERMINATION_GRACE_SECONDS)
    shm_size: str = prop("size of /dev/shm (memory-backed) for data-loader workers", pattern=_QUANTITY_RE,
                         default="8Gi")
    resources: dict | None = prop(schema=corev1.resources_schema, default=None)
    env: list | None = prop(schema=corev1.env_schema, default=None)
    node_selector: _STRING_MAP | None = prop(default=None)
    tolerations: list | None = prop(schema=corev1.tolerations_schema, default=None)
    affinity: dict | None = prop("core/v1 Affinity of the trainer pods", schema=_affinity_schema, default=None)
    pod_security_context: dict | None = prop(schema=corev1.pod_security_context_schema, default=None)
    security_context: dict | None = prop(schema=corev1.container_security_context_schema, default=None)
    # maxItems bounds the CEL rule's cost estimate, as the API server requires.
    volumes: list[Volume] | None = prop("dataset volumes (PVC or hostPath)", maxItems=64, default=None)
    artifacts: Artifacts | None = prop("where checkpoints and results go", default=None)
    cache: Cache = prop(factory=Cache)
    encryption_key_secret: EncryptionKeySecret | None = prop(
        "checkpoint encryption key by reference (passed as -k), instead of experiment.encryption_key in the "
        "resource", default=None)
    run_policy: RunPolicy = prop(factory=RunPolicy)
    network_policy: bool | None = prop("create a NetworkPolicy: the gang's pods accept connections only from each "
                                       "other on masterPort, and on metricsPort", default=None)
    pod_template: PodTemplate | None = prop("what the curated fields miss, merged over the rendered pod template",
                                            default=None)
    scheduler_name: str | None = prop("scheduler of the trainer pods", default=None)
    priority_class_name: str | None = prop("priority class of the trainer pods", default=None)
    gang_scheduling: GangScheduling | None = prop("all-or-nothing scheduling through a PodGroup", default=None)


# --- status ------------------------------------------------------------------------------

@_frozen
class Condition:
    type_: str = prop("condition type", required=True)
    status: str = prop("True, False or Unknown", required=True)
    reason: str | None = prop("CamelCase reason", default=None)
    message: str | None = prop("human-readable detail", default=None)
    last_transition_time: str | None = prop("when status last changed", format="date-time", default=None)


@_frozen
class BatchPlanStatus:
    global_batch: int | None = prop("images per optimizer step, all processes together: fixed when the run started "
                                    "(dataset.batch_size x its first world size), kept across resizes", default=None)
    per_rank_batch: int | None = prop("images per forward pass of one process at the current world size",
                                      default=None)
    gradient_accumulation: int | None = prop("micro-batches per optimizer step at the current world size",
                                             default=None)


@_frozen
class Resize:
    from_world_size: int | None = prop("processes before the resize", default=None)
    to_world_size: int | None = prop("processes after it", default=None)
    time: str | None = prop("when the resized attempt was created", format="date-time", default=None)


@_frozen
class LastFailure:
    attempt: int | None = prop("attempt that failed", default=None)
    rank: int | None = prop("node rank (completion index) of the pod", default=None)
    pod: str | None = prop("the pod that failed first", default=None)
    exit_code: int | None = prop("the trainer container's exit code", default=None)
    reason: str | None = prop("CamelCase reason", default=None)
    message: str | None = prop("what the pod said (last log lines)", default=None)
    failure_class: str | None = prop("the trainer's failure class (OOM, NCCL, Hung, NaN, Data, Storage, ...)",
                                     default=None)
    step: int | None = prop("the last training step the failed rank finished", default=None)
    rule: str | None = prop("the failure rule that decided (a runPolicy.failurePolicy rule's name, or builtin:...)",
                            default=None)
    action: str | None = prop("what the rule decided", enum=FAILURE_ACTIONS, default=None)
    time: str | None = prop("when the operator saw it", format="date-time", default=None)


@_frozen
class AttemptRecord:
    attempt: int | None = prop("attempt number", default=None)
    start_time: str | None = prop("created", format="date-time", default=None)
    finish_time: str | None = prop("ended", format="date-time", default=None)
    outcome: str | None = prop("Succeeded, Failed or Disrupted", default=None)
    reason: str | None = prop("why it ended", default=None)
    rank: int | None = prop("rank that failed", default=None)
    exit_code: int | None = prop("its exit code", default=None)


# The status.json fields shown in status.progress; their types and descriptions are status_file's
# (the format's one home), their names camelCased.
PROGRESS_SHOWN = ("epoch", "num_epochs", "step", "last_loss", "last_map", "last_checkpoint", "state",
                  "skipped_samples", "percent", "images_per_second", "estimated_finish_time",
                  "stop_reason")


def _progress_schema() -> dict:
    def one(types: tuple[type, ...], description: str) -> dict:
        kind = "number" if float in types else {int: "integer", str: "string"}[types[0]]
        return {"type": kind, "description": description}
    properties = {json_name(name): one(*STATUS_FIELDS_OF_FILE[name]) for name in PROGRESS_SHOWN}
    properties["updateTime"] = {"type": "string", "format": "date-time",
                                "description": "when this progress was read (patched when an epoch, validation, checkpoint, "
                                               "state or the finish estimate changes; the rest rides along)"}
    return {"type": "object", "properties": properties}


@_frozen
class BestCheckpoint:
    uri: str | None = prop("the checkpoint with the best validation mAP so far (never rotated away)", default=None)
    epoch: int | None = prop("its 0-based epoch", default=None)
    map_: float | None = prop("its validation mAP", default=None)


@_frozen
class Goodput:
    DESCRIPTION = ("where the job's time went since it was created, in seconds (refreshed with status.progress); "
                   "ratio = trainingSeconds / totalSeconds")
    ratio: float | None = prop("goodput: training time that counted over the total", default=None)
    total_seconds: float | None = prop("since the job was created (to the last progress read)", default=None)
    training_seconds: float | None = prop("training steps that counted", default=None)
    recomputed_seconds: float | None = prop("steps trained again after failures (since their last checkpoint)",
                                            default=None)
    recomputed_steps: int | None = prop("steps trained again after failures", default=None)
    eval_seconds: float | None = prop("validation", default=None)
    checkpoint_seconds: float | None = prop("writing checkpoints", default=None)
    startup_seconds: float | None = prop("each launch's start-up to its first step (model, data, resume)",
                                         default=None)
    hang_seconds: float | None = prop("hangs: at least progressDeadlineSeconds each", default=None)
    waiting_seconds: float | None = prop("the rest: queueing and admission, scheduling, image pulls, restarts' "
                                         "teardown and pod start", default=None)


@_frozen
class JobStatus:
    PRESERVE_UNKNOWN = True  # kopf keeps its own bookkeeping here
    phase: str | None = prop("lifecycle phase", enum=PHASES, default=None)
    conditions: list[Condition] | None = prop(default=None)
    start_time: str | None = prop("when the first gang was created", format="date-time", default=None)
    completion_time: str | None = prop("when the job reached Succeeded or Failed", format="date-time", default=None)
    attempt: int | None = prop("the current attempt (worker Job <name>-a<attempt>)", default=None)
    restarts: int | None = prop("gang restarts after failures so far (counted against backoffLimit)", default=None)
    disruptions: int | None = prop("gang restarts after preemptions, evictions and node drains (not counted)",
                                   default=None)
    hangs: int | None = prop("attempts ended as Hung (no progress within progressDeadlineSeconds)", default=None)
    world_size: int | None = prop("processes of the current attempt: nodes x GPUs per node", default=None)
    batch_plan: BatchPlanStatus | None = prop("how the run's global batch is taken at the current world size",
                                              default=None)
    last_resize: Resize | None = prop("the last change of spec.nodes or spec.gpusPerNode while suspended",
                                      default=None)
    last_failure: LastFailure | None = prop("the failure that ended the last failed attempt", default=None)
    attempts: list[AttemptRecord] | None = prop("the last attempts, oldest first", maxItems=MAX_ATTEMPT_HISTORY, default=None)
    restart_time: str | None = prop("when the last restart began", format="date-time", default=None)
    workers_ready: int | None = prop("worker pods running", default=None)
    worker_job: str | None = prop("the current worker Job (one per attempt)", default=None)
    epochs: str | None = prop("epoch/total, for the printer column", default=None)
    progress: dict | None = prop(schema=_progress_schema, default=None)
    best_checkpoint: BestCheckpoint | None = prop("the best validation result so far, from rank 0's status.json",
                                                  default=None)
    goodput: Goodput | None = prop(default=None)


# Status fields a pass writes (the rest of status is kopf's).
STATUS_FIELDS = tuple(name for _, name, _ in fields(JobStatus))
# status.json field -> (status.progress field, accepted JSON types); other types are dropped: one odd
# field must never make the API server reject the whole status patch.
PROGRESS_FIELDS = {name: (json_name(name), STATUS_FIELDS_OF_FILE[name][0]) for name in PROGRESS_SHOWN}
PRINTER_COLUMNS = [("Phase", ".status.phase"), ("Nodes", ".spec.nodes"), ("Epoch", ".status.epochs"),
                   ("Done%", ".status.progress.percent"), ("ETA", ".status.progress.estimatedFinishTime"),
                   ("Goodput", ".status.goodput.ratio"),
                   ("Loss", ".status.progress.lastLoss"), ("mAP", ".status.progress.lastMap"),
                   ("Restarts", ".status.restarts"), ("Disruptions", ".status.disruptions"),
                   ("Age", ".metadata.creationTimestamp")]


def spec_schema() -> dict:
    return object_schema(JobSpec)


def status_schema() -> dict:
    return object_schema(JobStatus)


# --- a job as the operator reads it ----------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Job:
    """A DeformableDetrJob with its spec resolved: what render and decide read."""

    name: str
    namespace: str
    uid: str | None
    labels: Mapping[str, str]
    spec: JobSpec


def resolve(body: Mapping[str, Any]) -> Job:
    """The job with its spec checked and defaulted; JobSpecError names the first field not accepted."""
    meta = body.get("metadata") or {}
    return Job(name=meta.get("name"), namespace=meta.get("namespace"), uid=meta.get("uid"),
               labels=dict(meta.get("labels") or {}), spec=parse(JobSpec, body.get("spec"), "spec"))


def run_policy_of(body: Mapping[str, Any]) -> RunPolicy:
    """The job's run policy, even when the rest of its spec is not accepted (a failed job keeps its TTL
    and cleanPodPolicy); the defaults when the run policy itself is not accepted."""
    spec = body.get("spec")
    raw = spec.get("runPolicy") if isinstance(spec, Mapping) else None
    try:
        return parse(RunPolicy, raw or {}, "spec.runPolicy")
    except JobSpecError:
        return RunPolicy()
