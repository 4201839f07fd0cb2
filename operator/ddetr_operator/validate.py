"""Checks on a DeformableDetrJob that its CRD cannot express (pure, no I/O): the name as a DNS label,
one-node tasks, the hostPath allow-list, the operator's own pod fields, and the experiment itself.

Types, ranges, enums, required fields and the CEL rules come from api.py (`api.resolve`). The
experiment goes through the trainer's own `spec_from_dict`, so the operator rejects exactly what the
CLI rejects, with the same message. `check_job` raises nothing but JobSpecError, whatever the spec
holds: a job can reach the operator without the CRD (an older CRD, a schema-less test server), and
one odd value must fail that job, not the pass.
"""
from __future__ import annotations

import dataclasses
import posixpath
import re
from typing import Any, Mapping, Sequence

from deformable_detr.config import loader
from deformable_detr.config.schema import ExperimentConfig
from deformable_detr.errors import UsageError
from deformable_detr.tasks import DEFAULT_TASK

from . import api
from .apischema import JobSpecError

__all__ = ["JobSpecError", "Policy", "Checked", "check_job", "validate_job", "effective_experiment",
           "host_path_allowed", "OWNED_POD_FIELDS"]

_DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
# podTemplate.spec fields that the operator owns: overriding them would break the gang.
OWNED_POD_FIELDS = ("containers", "restartPolicy", "subdomain", "volumes")
# Where the operator's allow-list of hostPath prefixes comes from, for messages.
HOST_PATH_SETTING = ("the chart value trainer.allowedHostPaths (operator option --allowed-host-path, "
                     "environment DDETR_ALLOWED_HOST_PATHS)")


@dataclasses.dataclass(frozen=True)
class Policy:
    """What the operator's configuration allows (the cluster admin's choices, not the job's)."""

    # hostPath volumes are refused unless their path lies under one of these prefixes.
    allowed_host_paths: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Checked:
    """A job that can run: its resolved spec and its effective experiment."""

    job: api.Job
    experiment: ExperimentConfig


def effective_experiment(spec: api.JobSpec) -> ExperimentConfig:
    """The validated experiment with the cluster settings applied (results_dir from artifacts.uri)."""
    raw = dict(spec.experiment)
    if spec.artifacts is not None and spec.artifacts.uri:
        raw["results_dir"] = spec.artifacts.uri
    try:
        return loader.spec_from_dict(raw)
    except UsageError as err:
        raise JobSpecError(f"spec.experiment.{err}") from None
    except (TypeError, ValueError, AttributeError, KeyError) as err:  # a shape the loader did not expect
        raise JobSpecError(f"spec.experiment: not accepted ({type(err).__name__}: {err})") from None


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


def _check_name(name: Any) -> None:
    if not isinstance(name, str) or not api.NAME_RULE.holds(name) or not _DNS_1035.match(name):
        raise JobSpecError(f"metadata.name: {name!r} is not accepted; use at most {api.MAX_NAME_LENGTH} lower-case "
                           "letters, digits and '-', starting with a letter (it names pods and a Service)")


def _check_cluster_fields(spec: api.JobSpec, policy: Policy) -> None:
    if spec.task != DEFAULT_TASK and spec.nodes != 1:
        raise JobSpecError(f"spec.nodes: {spec.nodes} is not accepted for task {spec.task!r}; "
                           f"only {DEFAULT_TASK} runs on several nodes")
    for i, volume in enumerate(spec.volumes or ()):
        if volume.host_path is not None and not host_path_allowed(volume.host_path.path, policy.allowed_host_paths):
            allowed = ", ".join(policy.allowed_host_paths)
            limit = (f"this operator allows hostPath volumes only under {allowed}" if allowed else
                     "this operator allows no hostPath volumes")
            raise JobSpecError(f"spec.volumes[{i}].hostPath.path: {volume.host_path.path!r} is not accepted; {limit} "
                               f"(set by {HOST_PATH_SETTING}); use a persistentVolumeClaim, or ask the cluster admin "
                               "to allow the path")
    for field in OWNED_POD_FIELDS:
        if spec.pod_template is not None and field in (spec.pod_template.spec or {}):
            raise JobSpecError(f"spec.podTemplate.spec.{field}: not accepted; the operator sets it (use spec.image, "
                               "spec.env, spec.resources, spec.securityContext and spec.volumes)")


def check_job(body: Mapping[str, Any], policy: Policy = Policy()) -> Checked:
    """The resolved job and its effective experiment, or JobSpecError naming the field (and nothing else)."""
    try:
        _check_name((body.get("metadata") or {}).get("name"))
        job = api.resolve(body)
        _check_cluster_fields(job.spec, policy)
        experiment = effective_experiment(job.spec)
        if not experiment.results_dir and not getattr(getattr(experiment, job.spec.task, None), "results_dir", None):
            raise JobSpecError("spec.artifacts.uri: required (or spec.experiment.results_dir); "
                               "the pods need a place for results")
        return Checked(job, experiment)
    except JobSpecError:
        raise
    except Exception as err:  # noqa: BLE001 - a shape no check above foresaw still fails only this job
        raise JobSpecError(f"spec: not accepted ({type(err).__name__}: {err})") from None


def validate_job(name: str, spec: Mapping[str, Any], policy: Policy = Policy()) -> ExperimentConfig:
    """Return the effective experiment or raise JobSpecError naming the field (and nothing else)."""
    return check_job({"metadata": {"name": name}, "spec": spec}, policy).experiment
