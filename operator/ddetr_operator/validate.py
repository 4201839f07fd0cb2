"""Checks on a DeformableDetrJob that its CRD schema cannot express (pure, no I/O).

The embedded experiment goes through the trainer's own `spec_from_dict`, so the
operator rejects exactly what the CLI rejects, with the same message.

`validate_job` raises nothing but `JobSpecError`, whatever the spec holds: the CRD
schema guards `kubectl apply`, but a job can reach the operator without it (an older
CRD, a schema-less test server), and one odd value must fail that job, not the pass.
"""
from __future__ import annotations

import dataclasses
import posixpath
import re
from typing import Any, Mapping, Sequence

from deformable_detr.config import loader
from deformable_detr.config.schema import ExperimentConfig
from deformable_detr.errors import UsageError
from deformable_detr.tasks import TASKS as TASK_TABLE

# Pod hostnames are "<name>-a<attempt>-<index>" and must fit a 63-character DNS label.
MAX_NAME_LENGTH = 40
_DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")

TASKS = list(TASK_TABLE)
CLEAN_POD_POLICIES = ["None", "Running", "All"]
# "kubernetes": the cluster's own scheduler with the GenericWorkload feature (scheduling.k8s.io/v1beta1 PodGroup).
GANG_SCHEDULERS = ["kubernetes", "volcano", "scheduler-plugins"]

# Where the operator's allow-list of hostPath prefixes comes from, for messages.
HOST_PATH_SETTING = ("the chart value trainer.allowedHostPaths (operator option --allowed-host-path, "
                     "environment DDETR_ALLOWED_HOST_PATHS)")


class JobSpecError(UsageError):
    """A DeformableDetrJob that cannot run; the message names the field."""


@dataclasses.dataclass(frozen=True)
class Policy:
    """What the operator's configuration allows (the cluster admin's choices, not the job's)."""

    # hostPath volumes are refused unless their path lies under one of these prefixes.
    allowed_host_paths: tuple[str, ...] = ()


def effective_experiment(spec: Mapping[str, Any]) -> ExperimentConfig:
    """The validated experiment with the cluster settings applied (results_dir from artifacts.uri)."""
    experiment = spec.get("experiment")
    if experiment is not None and not isinstance(experiment, Mapping):
        raise JobSpecError(f"spec.experiment: {_kind(experiment)} is not accepted; a mapping (the TAO spec)")
    raw = dict(experiment or {})
    artifacts = spec.get("artifacts") or {}
    if isinstance(artifacts, Mapping) and isinstance(artifacts.get("uri"), str) and artifacts["uri"]:
        raw["results_dir"] = artifacts["uri"]
    try:
        return loader.spec_from_dict(raw)
    except UsageError as err:
        raise JobSpecError(f"spec.experiment.{err}") from None
    except (TypeError, ValueError, AttributeError, KeyError) as err:  # a shape the loader did not expect
        raise JobSpecError(f"spec.experiment: not accepted ({type(err).__name__}: {err})") from None


def _kind(value: Any) -> str:
    return "null" if value is None else f"{type(value).__name__} {value!r}"[:80]


def _int(spec: Mapping[str, Any], field: str, default: int | None, low: int | None = None,
         high: int | None = None, path: str = "spec.") -> int | None:
    value = spec.get(field, default)
    if value is None and default is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise JobSpecError(f"{path}{field}: {_kind(value)} is not accepted; an integer")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"{low if low is not None else ''}..{high if high is not None else ''}"
        raise JobSpecError(f"{path}{field}: {value} is out of range; accepted: {bounds}")
    return value


def _str(spec: Mapping[str, Any], field: str, path: str = "spec.", required: bool = False) -> str | None:
    value = spec.get(field)
    if value is None and not required:
        return None
    if not isinstance(value, str) or (required and not value):
        what = "required" if value is None else f"{_kind(value)} is not accepted"
        raise JobSpecError(f"{path}{field}: {what}; a non-empty string")
    return value


def _mapping(spec: Mapping[str, Any], field: str, path: str = "spec.") -> Mapping[str, Any]:
    value = spec.get(field)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise JobSpecError(f"{path}{field}: {_kind(value)} is not accepted; a mapping")
    return value


def _list_of_mappings(spec: Mapping[str, Any], field: str, path: str = "spec.") -> list[Mapping[str, Any]]:
    value = spec.get(field)
    if value is None:
        return []
    if not isinstance(value, list):
        raise JobSpecError(f"{path}{field}: {_kind(value)} is not accepted; a list")
    for i, item in enumerate(value):
        if not isinstance(item, Mapping):
            raise JobSpecError(f"{path}{field}[{i}]: {_kind(item)} is not accepted; a mapping")
    return value


def host_path_allowed(path: str, allowed: Sequence[str]) -> bool:
    """True when `path` (absolute, no '..') is one of the allowed prefixes or lies under one."""
    if not path.startswith("/") or ".." in path.split("/"):
        return False
    path = posixpath.normpath(path)
    for prefix in allowed:
        prefix = posixpath.normpath(prefix.strip()) if prefix.strip().startswith("/") else None
        if prefix and (prefix == "/" or path == prefix or path.startswith(prefix + "/")):
            return True
    return False


def _check_volumes(spec: Mapping[str, Any], policy: Policy) -> None:
    for i, volume in enumerate(_list_of_mappings(spec, "volumes")):
        where = f"spec.volumes[{i}]."
        _str(volume, "name", where, required=True)
        _str(volume, "mountPath", where, required=True)
        if ("persistentVolumeClaim" in volume) == ("hostPath" in volume):
            raise JobSpecError(f"spec.volumes[{i}]: give exactly one of persistentVolumeClaim or hostPath")
        if "persistentVolumeClaim" in volume:
            _str(_mapping(volume, "persistentVolumeClaim", where), "claimName", where + "persistentVolumeClaim.",
                 required=True)
            continue
        path = _str(_mapping(volume, "hostPath", where), "path", where + "hostPath.", required=True)
        if not host_path_allowed(path, policy.allowed_host_paths):
            allowed = ", ".join(policy.allowed_host_paths)
            limit = (f"this operator allows hostPath volumes only under {allowed}" if allowed else
                     "this operator allows no hostPath volumes")
            raise JobSpecError(f"{where}hostPath.path: {path!r} is not accepted; {limit} (set by {HOST_PATH_SETTING}); "
                               "use a persistentVolumeClaim, or ask the cluster admin to allow the path")


def _check_cluster_fields(name: str, spec: Mapping[str, Any], policy: Policy) -> tuple[str, int]:
    if not isinstance(name, str) or len(name) > MAX_NAME_LENGTH or not _DNS_1035.match(name):
        raise JobSpecError(f"metadata.name: {name!r} is not accepted; use at most {MAX_NAME_LENGTH} lower-case "
                           "letters, digits and '-', starting with a letter (it names pods and a Service)")
    if not isinstance(spec, Mapping):
        raise JobSpecError(f"spec: {_kind(spec)} is not accepted; a mapping with image and experiment")
    if not spec.get("image"):
        raise JobSpecError("spec.image: required; the trainer container image")
    _str(spec, "image", required=True)
    task = spec.get("task", "train")
    if task not in TASKS:
        raise JobSpecError(f"spec.task: {_kind(task)} is not accepted; one of {', '.join(TASKS)}")
    nodes = _int(spec, "nodes", 1, low=1)
    if task != "train" and nodes != 1:
        raise JobSpecError(f"spec.nodes: {nodes} is not accepted for task {task!r}; only train runs on several nodes")
    _int(spec, "gpusPerNode", 1, low=0)
    _int(spec, "masterPort", 29500, low=1024, high=65535)
    _int(spec, "metricsPort", 9090, low=0, high=65535)
    _int(spec, "terminationGracePeriodSeconds", 180, low=0)
    for field in ("shmSize", "imagePullPolicy", "serviceAccountName", "schedulerName", "priorityClassName"):
        _str(spec, field)
    for field, values in _mapping(spec, "resources").items():
        if field not in ("limits", "requests", "claims"):
            raise JobSpecError(f"spec.resources.{field}: not accepted; limits or requests")
        if field == "claims":
            _list_of_mappings(_mapping(spec, "resources"), "claims", "spec.resources.")
        else:
            for resource, quantity in _mapping(_mapping(spec, "resources"), field, "spec.resources.").items():
                if not isinstance(quantity, (str, int, float)) or isinstance(quantity, bool):
                    raise JobSpecError(f"spec.resources.{field}.{resource}: {_kind(quantity)} is not accepted; "
                                       "a quantity such as 8, 500m or 64Gi")
    for i, var in enumerate(_list_of_mappings(spec, "env")):
        _str(var, "name", f"spec.env[{i}].", required=True)
    for key, value in _mapping(spec, "nodeSelector").items():
        if not isinstance(value, str):
            raise JobSpecError(f"spec.nodeSelector.{key}: {_kind(value)} is not accepted; a string")
    _list_of_mappings(spec, "tolerations")
    _list_of_mappings(spec, "imagePullSecrets")
    for field in ("affinity", "podSecurityContext", "securityContext"):
        _mapping(spec, field)
    _check_volumes(spec, policy)
    artifacts = _mapping(spec, "artifacts")
    _str(artifacts, "uri", "spec.artifacts.")
    for field in ("endpoint", "region"):
        _str(artifacts, field, "spec.artifacts.")
    if artifacts.get("credentialsSecret") is not None:
        secret = _mapping(artifacts, "credentialsSecret", "spec.artifacts.")
        _str(secret, "name", "spec.artifacts.credentialsSecret.", required=True)
    if spec.get("encryptionKeySecret") is not None:
        _str(_mapping(spec, "encryptionKeySecret"), "name", "spec.encryptionKeySecret.", required=True)
    run_policy = _mapping(spec, "runPolicy")
    _int(run_policy, "backoffLimit", 3, low=0, path="spec.runPolicy.")
    _int(run_policy, "activeDeadlineSeconds", None, low=1, path="spec.runPolicy.")
    _int(run_policy, "ttlSecondsAfterFinished", None, low=0, path="spec.runPolicy.")
    _int(run_policy, "startupDeadlineSeconds", None, low=1, path="spec.runPolicy.")
    if not isinstance(spec.get("networkPolicy", False), bool):
        raise JobSpecError(f"spec.networkPolicy: {_kind(spec['networkPolicy'])} is not accepted; true or false")
    template = _mapping(spec, "podTemplate")
    for field in ("metadata", "spec"):
        _mapping(template, field, "spec.podTemplate.")
    for field in ("labels", "annotations"):
        for key, value in _mapping(_mapping(template, "metadata", "spec.podTemplate."), field,
                                   "spec.podTemplate.metadata.").items():
            if not isinstance(value, str):
                raise JobSpecError(f"spec.podTemplate.metadata.{field}.{key}: {_kind(value)} is not accepted; a string")
    for field in ("containers", "restartPolicy", "subdomain", "volumes"):
        if field in _mapping(template, "spec", "spec.podTemplate."):
            raise JobSpecError(f"spec.podTemplate.spec.{field}: not accepted; the operator sets it (use spec.image, "
                               "spec.env, spec.resources, spec.securityContext and spec.volumes)")
    if run_policy.get("cleanPodPolicy", "Running") not in CLEAN_POD_POLICIES:
        raise JobSpecError(f"spec.runPolicy.cleanPodPolicy: {_kind(run_policy['cleanPodPolicy'])} is not accepted; "
                           f"one of {', '.join(CLEAN_POD_POLICIES)}")
    if not isinstance(run_policy.get("suspend", False), bool):
        raise JobSpecError(f"spec.runPolicy.suspend: {_kind(run_policy['suspend'])} is not accepted; true or false")
    _check_gang(spec, nodes)
    return task, nodes


def _check_gang(spec: Mapping[str, Any], nodes: int) -> None:
    if spec.get("gangScheduling") is None:
        return
    gang = _mapping(spec, "gangScheduling")
    if gang.get("scheduler") not in GANG_SCHEDULERS:
        raise JobSpecError(f"spec.gangScheduling.scheduler: {_kind(gang.get('scheduler'))} is not accepted; "
                           f"one of {', '.join(GANG_SCHEDULERS)}")
    # A torchrun gang rendezvouses only when every node is there: a PodGroup that lets fewer
    # pods start would hold GPUs for a gang that can never begin. So minAvailable is nodes.
    min_available = _int(gang, "minAvailable", None, low=1, path="spec.gangScheduling.")
    if min_available is not None and min_available != nodes:
        raise JobSpecError(f"spec.gangScheduling.minAvailable: {min_available} is not accepted; it must equal "
                           f"spec.nodes ({nodes}): a torchrun gang starts only when all its pods run, so a partial "
                           "gang would hold GPUs without ever starting (leave minAvailable out)")
    _int(gang, "scheduleTimeoutSeconds", None, low=1, path="spec.gangScheduling.")


def validate_job(name: str, spec: Mapping[str, Any], policy: Policy = Policy()) -> ExperimentConfig:
    """Return the effective experiment or raise JobSpecError naming the field (and nothing else)."""
    try:
        task, _nodes = _check_cluster_fields(name, spec, policy)
        experiment = effective_experiment(spec)
        if not experiment.results_dir and not getattr(getattr(experiment, task, None), "results_dir", None):
            raise JobSpecError("spec.artifacts.uri: required (or spec.experiment.results_dir); "
                               "the pods need a place for results")
        return experiment
    except JobSpecError:
        raise
    except Exception as err:  # noqa: BLE001 - a shape no check above foresaw still fails only this job
        raise JobSpecError(f"spec: not accepted ({type(err).__name__}: {err})") from None
