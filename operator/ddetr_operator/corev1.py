"""Schemas of the core/v1 types a DeformableDetrJob passes through to its pods (resources, env,
tolerations, security contexts), as the Kubernetes API states them, for the fields of api.py."""
from __future__ import annotations

from typing import Any

ANY_OBJECT = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
# resource.Quantity's own pattern, as the Kubernetes API's OpenAPI schema states it.
K8S_QUANTITY_RE = (r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|"
                   r"([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$")


def _obj(properties: dict, required: list[str] | None = None, description: str = "") -> dict:
    out: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        out["required"] = required
    if description:
        out["description"] = description
    return out


def _str(description: str, **extra: Any) -> dict:
    return {"type": "string", "description": description, **extra}


def _int(description: str, **extra: Any) -> dict:
    return {"type": "integer", "description": description, **extra}


def _quantity(description: str = "a quantity: 8, 500m, 64Gi") -> dict:
    return {"x-kubernetes-int-or-string": True, "pattern": K8S_QUANTITY_RE, "description": description}


def _int64(description: str, **extra: Any) -> dict:
    return _int(description, format="int64", **extra)


def _bool(description: str) -> dict:
    return {"type": "boolean", "description": description}


def resources_schema() -> dict:
    """core/v1 ResourceRequirements."""
    quantities = {"type": "object", "additionalProperties": _quantity()}
    return _obj({
        "limits": {**quantities, "description": "most of each resource the container may use"},
        "requests": {**quantities, "description": "resources the scheduler reserves"},
        "claims": {"type": "array", "description": "dynamic resource claims (DRA) the container uses",
                   "items": _obj({"name": _str("a claim of the pod"), "request": _str("one request of that claim")},
                                 ["name"])},
    }, description="container resources (core/v1 ResourceRequirements); nvidia.com/gpu is set from gpusPerNode")


def env_schema() -> dict:
    """core/v1 EnvVar."""
    key_ref = _obj({"name": _str("ConfigMap or Secret in the job's namespace"), "key": _str("the key to take"),
                    "optional": _bool("no error when it is missing")}, ["key"])
    value_from = _obj({
        "fieldRef": _obj({"apiVersion": _str("version of fieldPath's schema"),
                          "fieldPath": _str("a field of the pod, e.g. metadata.name")}, ["fieldPath"]),
        "resourceFieldRef": _obj({"containerName": _str("container"), "divisor": _quantity("output unit"),
                                  "resource": _str("limits.cpu, requests.memory, ...")}, ["resource"]),
        "configMapKeyRef": key_ref, "secretKeyRef": key_ref,
    }, description="where the value comes from")
    return {"type": "array", "description": "extra environment variables of the trainer (core/v1 EnvVar)",
            "items": _obj({"name": _str("variable name", minLength=1), "value": _str("the value"),
                           "valueFrom": value_from}, ["name"])}


def tolerations_schema() -> dict:
    """core/v1 Toleration."""
    return {"type": "array", "description": "tolerations of the trainer pods (core/v1 Toleration)",
            "items": _obj({
                "key": _str("taint key; empty with operator Exists: every taint"),
                "operator": _str("Equal (default) or Exists", enum=["Exists", "Equal"]),
                "value": _str("taint value (Equal)"),
                "effect": _str("taint effect; empty: every effect", enum=["NoSchedule", "PreferNoSchedule", "NoExecute"]),
                "tolerationSeconds": _int64("NoExecute: seconds the pod stays bound after the taint appears"),
            })}


def _seccomp_schema() -> dict:
    return _obj({"type": _str("the profile kind", enum=["RuntimeDefault", "Localhost", "Unconfined"]),
                 "localhostProfile": _str("profile file on the node (Localhost)")}, ["type"])


def pod_security_context_schema() -> dict:
    """The common subset of core/v1 PodSecurityContext (other fields are pruned)."""
    return _obj({
        "runAsUser": _int64("uid of the containers' processes"), "runAsGroup": _int64("their gid"),
        "runAsNonRoot": _bool("refuse to start a container as root"),
        "fsGroup": _int64("group owning the pod's volumes"),
        "fsGroupChangePolicy": _str("when to change volume ownership", enum=["OnRootMismatch", "Always"]),
        "supplementalGroups": {"type": "array", "items": _int64("gid")},
        "seccompProfile": _seccomp_schema(),
    }, description="overrides the trainer pods' security context key by key (default: the restricted Pod "
                   "Security level as uid/gid 10001, the trainer image's user)")


def container_security_context_schema() -> dict:
    """The common subset of core/v1 SecurityContext (other fields are pruned)."""
    return _obj({
        "allowPrivilegeEscalation": _bool("let a process gain more privileges than its parent"),
        "privileged": _bool("run privileged"), "readOnlyRootFilesystem": _bool("read-only root filesystem"),
        "runAsUser": _int64("uid"), "runAsGroup": _int64("gid"), "runAsNonRoot": _bool("refuse root"),
        "capabilities": _obj({"add": {"type": "array", "items": {"type": "string"}},
                              "drop": {"type": "array", "items": {"type": "string"}}}),
        "seccompProfile": _seccomp_schema(),
    }, description="overrides the trainer container's security context key by key (default: no privilege "
                   "escalation, every capability dropped)")
