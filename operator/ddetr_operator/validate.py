"""Checks on a DeformableDetrJob that its CRD schema cannot express (pure, no I/O).

The embedded experiment goes through the trainer's own `spec_from_dict`, so the
operator rejects exactly what the CLI rejects, with the same message.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

from deformable_detr.config import loader
from deformable_detr.config.schema import ExperimentConfig
from deformable_detr.errors import UsageError

# Pod hostnames are "<name>-a<attempt>-<index>" and must fit a 63-character DNS label.
MAX_NAME_LENGTH = 40
_DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


class JobSpecError(UsageError):
    """A DeformableDetrJob that cannot run; the message names the field."""


def effective_experiment(spec: Mapping[str, Any]) -> ExperimentConfig:
    """The validated experiment with the cluster settings applied (results_dir from artifacts.uri)."""
    raw = dict(spec.get("experiment") or {})
    artifacts = spec.get("artifacts") or {}
    if artifacts.get("uri"):
        raw["results_dir"] = artifacts["uri"]
    try:
        return loader.spec_from_dict(raw)
    except UsageError as err:
        raise JobSpecError(f"spec.experiment.{err}") from None


def validate_job(name: str, spec: Mapping[str, Any]) -> ExperimentConfig:
    """Return the effective experiment or raise JobSpecError naming the field."""
    if len(name) > MAX_NAME_LENGTH or not _DNS_1035.match(name):
        raise JobSpecError(f"metadata.name: {name!r} is not accepted; use at most {MAX_NAME_LENGTH} lower-case "
                           "letters, digits and '-', starting with a letter (it names pods and a Service)")
    if not spec.get("image"):
        raise JobSpecError("spec.image: required; the trainer container image")
    task = spec.get("task", "train")
    nodes = spec.get("nodes", 1)
    if task != "train" and nodes != 1:
        raise JobSpecError(f"spec.nodes: {nodes} is not accepted for task {task!r}; only train runs on several nodes")
    experiment = effective_experiment(spec)
    if not experiment.results_dir and not getattr(getattr(experiment, task, None), "results_dir", None):
        raise JobSpecError("spec.artifacts.uri: required (or spec.experiment.results_dir); "
                           "the pods need a place for results")
    gang = spec.get("gangScheduling") or {}
    if gang.get("minAvailable", 1) > nodes:
        raise JobSpecError(f"spec.gangScheduling.minAvailable: {gang['minAvailable']} is more than "
                           f"spec.nodes ({nodes})")
    for i, volume in enumerate(spec.get("volumes") or []):
        if ("persistentVolumeClaim" in volume) == ("hostPath" in volume):
            raise JobSpecError(f"spec.volumes[{i}]: give exactly one of persistentVolumeClaim or hostPath")
    return experiment
