"""The DeformableDetrJob CustomResourceDefinition, generated from the spec dataclasses.

`python -m ddetr_operator.crd` prints it; `--write PATH` writes it (atomically). The
committed `crds/deformabledetrjobs.yaml` is this output; a test fails when they differ.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

import yaml

from deformable_detr.config.jsonschema import experiment_schema
from deformable_detr.runtime.storage import write_text

from . import GROUP, KIND, PLURAL, SHORT_NAMES, SINGULAR, VERSION
from .render import DEFAULT_TERMINATION_GRACE_SECONDS
from .validate import CLEAN_POD_POLICIES, GANG_SCHEDULERS, MAX_NAME_LENGTH, TASKS

PHASES = ["Pending", "Running", "Restarting", "Succeeded", "Failed", "Suspended"]

_ANY_OBJECT = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
_QUANTITY_RE = r"^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$"
# resource.Quantity's own pattern, as the Kubernetes API's OpenAPI schema states it.
_K8S_QUANTITY_RE = (r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|"
                    r"([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$")
# What may change in a job after it is created: the suspend switch (the user's and Kueue's), and the
# TTL (as for a batch/v1 Job). Everything else shapes the gang: a new job, not an edit.
MUTABLE_RUN_POLICY = ("suspend", "ttlSecondsAfterFinished")


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
    return {"x-kubernetes-int-or-string": True, "pattern": _K8S_QUANTITY_RE, "description": description}


def _int64(description: str, **extra: Any) -> dict:
    return _int(description, format="int64", **extra)


def _bool(description: str) -> dict:
    return {"type": "boolean", "description": description}


def _resources_schema() -> dict:
    """core/v1 ResourceRequirements."""
    quantities = {"type": "object", "additionalProperties": _quantity()}
    return _obj({
        "limits": {**quantities, "description": "most of each resource the container may use"},
        "requests": {**quantities, "description": "resources the scheduler reserves"},
        "claims": {"type": "array", "description": "dynamic resource claims (DRA) the container uses",
                   "items": _obj({"name": _str("a claim of the pod"), "request": _str("one request of that claim")},
                                 ["name"])},
    }, description="container resources (core/v1 ResourceRequirements); nvidia.com/gpu is set from gpusPerNode")


def _env_schema() -> dict:
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


def _tolerations_schema() -> dict:
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


def _pod_security_context_schema() -> dict:
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


def _container_security_context_schema() -> dict:
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


def _cel_literal(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def _unchanged(path: str, default: Any = None) -> str:
    """CEL: the field at `path` (below self/oldSelf) is the same in the old and the new object.

    Absent and present differ, except for a field with a default (the API server fills it in
    whenever its parent exists): there absent reads as the default.
    """
    parts = path.split(".")
    def present(root: str) -> str:
        return " && ".join(f"has({root}.{'.'.join(parts[:i + 1])})" for i in range(len(parts)))
    new, old = f"self.{path}", f"oldSelf.{path}"
    if default is not None:
        literal = _cel_literal(default)
        return f"({present('self')} ? {new} : {literal}) == ({present('oldSelf')} ? {old} : {literal})"
    return f"({present('self')}) == ({present('oldSelf')}) && (!({present('self')}) || {new} == {old})"


def _immutable_spec_rule(spec_schema: dict) -> dict:
    """One transition rule: every spec field but runPolicy.suspend (and the TTL) keeps its value."""
    terms = []
    for name, prop in spec_schema["properties"].items():
        if name == "runPolicy":
            for field, sub in prop["properties"].items():
                if field not in MUTABLE_RUN_POLICY:
                    terms.append(_unchanged(f"runPolicy.{field}", sub.get("default")))
        else:
            terms.append(_unchanged(name))
    return {"rule": " && ".join(terms),
            "message": "spec is immutable once the job exists, except runPolicy.suspend and "
                       "runPolicy.ttlSecondsAfterFinished: create a new job (suspend this one to stop it)"}


def _volume_schema() -> dict:
    return _obj({
        "name": _str("volume name (DNS label)", pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", maxLength=63),
        "mountPath": _str("where the volume appears in the trainer container", pattern=r"^/"),
        "readOnly": {"type": "boolean", "default": True, "description": "mount read-only (datasets)"},
        "subPath": _str("mount only this sub-path of the volume"),
        "persistentVolumeClaim": _obj({"claimName": _str("PVC name")}, ["claimName"]),
        "hostPath": _obj({"path": _str("path on the node"), "type": _str("hostPath type check")}, ["path"]),
    }, ["name", "mountPath"], "a dataset volume: exactly one of persistentVolumeClaim or hostPath")


def job_spec_schema() -> dict:
    """OpenAPI schema of `spec`: the experiment plus how to run it on the cluster."""
    volume = _volume_schema()
    volume["x-kubernetes-validations"] = [{
        "rule": "has(self.persistentVolumeClaim) != has(self.hostPath)",
        "message": "give exactly one of persistentVolumeClaim or hostPath"}]
    spec = _obj({
        "experiment": {**experiment_schema(), "description":
                       "the TAO deformable_detr spec, exactly as the deformable-detr CLI takes it"},
        "task": _str("which task to run; train runs a multi-node gang, the others one pod",
                     enum=TASKS, default="train"),
        "image": _str("trainer container image", minLength=1),
        "imagePullPolicy": _str("image pull policy", enum=["Always", "IfNotPresent", "Never"]),
        "imagePullSecrets": {"type": "array", "items": _obj({"name": _str("Secret name")}, ["name"])},
        "serviceAccountName": _str("service account of the trainer pods"),
        "nodes": _int("nodes (pods) in the gang; evaluate/inference/export/convert use 1",
                      minimum=1, default=1),
        "gpusPerNode": _int("GPUs per node = torchrun processes per node; 0 runs one CPU process",
                            minimum=0, default=1),
        "masterPort": _int("torchrun rendezvous port on pod 0", minimum=1024, maximum=65535, default=29500),
        "metricsPort": _int("rank 0's Prometheus /metrics port; 0 = off", minimum=0, maximum=65535,
                            default=9090),
        "terminationGracePeriodSeconds": _int(
            "seconds a trainer pod gets after SIGTERM (preemption, suspend, gang restart) to finish its "
            "step, write its checkpoint and upload it before it is killed", minimum=30,
            default=DEFAULT_TERMINATION_GRACE_SECONDS),
        "shmSize": _str("size of /dev/shm (memory-backed) for data-loader workers",
                        pattern=_QUANTITY_RE, default="8Gi"),
        "resources": _resources_schema(),
        "env": _env_schema(),
        "nodeSelector": {"type": "object", "additionalProperties": {"type": "string"}},
        "tolerations": _tolerations_schema(),
        # Its three kinds declared (the rest of core/v1 Affinity is passed through): CEL compares objects
        # without declared fields loosely, and the immutability rule should see a kind added or removed.
        "affinity": _obj({kind: {**_ANY_OBJECT, "description": f"core/v1 {kind[0].upper()}{kind[1:]}"}
                          for kind in ("nodeAffinity", "podAffinity", "podAntiAffinity")},
                         description="core/v1 Affinity of the trainer pods"),
        "podSecurityContext": _pod_security_context_schema(),
        "securityContext": _container_security_context_schema(),
        # maxItems bounds the CEL rule's cost estimate, as the API server requires.
        "volumes": {"type": "array", "items": volume, "maxItems": 64, "description": "dataset volumes (PVC or hostPath)"},
        "artifacts": _obj({
            "uri": _str("results root (s3://bucket/prefix); becomes the spec's results_dir",
                        pattern=r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?$"),
            "endpoint": _str("S3 endpoint URL for S3-compatible stores (MinIO, Ceph)"),
            "region": _str("S3 region"),
            "credentialsSecret": _obj({
                "name": _str("Secret in the job's namespace"),
                "accessKeyIdKey": _str("key holding the access key id", default="AWS_ACCESS_KEY_ID"),
                "secretAccessKeyKey": _str("key holding the secret key", default="AWS_SECRET_ACCESS_KEY"),
            }, ["name"], "credentials by reference; never put keys in the resource"),
        }, ["uri"], "where checkpoints and results go"),
        "encryptionKeySecret": _obj({
            "name": _str("Secret in the job's namespace"),
            "key": _str("key holding the checkpoint encryption key", default="DDETR_ENCRYPTION_KEY"),
        }, ["name"], "checkpoint encryption key by reference (passed as -k), instead of "
                     "experiment.encryption_key in the resource"),
        "runPolicy": _obj({
            "backoffLimit": _int("gang restarts after retryable failures before Failed", minimum=0, default=3),
            "activeDeadlineSeconds": _int("fail the job when it runs longer than this", minimum=1),
            "ttlSecondsAfterFinished": _int("delete the finished job (and its children) after this",
                                            minimum=0),
            "cleanPodPolicy": _str("which pods to delete when the job finishes",
                                   enum=CLEAN_POD_POLICIES, default="Running"),
            "suspend": {"type": "boolean", "default": False,
                        "description": "stop the gang but keep the job; unsuspending resumes from the checkpoint"},
            "startupDeadlineSeconds": _int("fail the job when an attempt's gang is not all running this long after "
                                           "its Job started (image pulls, scheduling, missing Secrets)", minimum=1),
        }),
        "networkPolicy": _bool("create a NetworkPolicy: the gang's pods accept connections only from each other "
                               "on masterPort, and on metricsPort"),
        "podTemplate": _obj({
            "metadata": _obj({"labels": {"type": "object", "additionalProperties": {"type": "string"}},
                              "annotations": {"type": "object", "additionalProperties": {"type": "string"}}},
                             description="added to the trainer pods (e.g. Multus network annotations)"),
            "spec": {**_ANY_OBJECT, "description": "core/v1 PodSpec fields set on the trainer pods (hostNetwork, "
                     "initContainers, dnsConfig, ...); containers, restartPolicy, subdomain and volumes are the "
                     "operator's"},
        }, description="what the curated fields miss, merged over the rendered pod template"),
        "schedulerName": _str("scheduler of the trainer pods"),
        "priorityClassName": _str("priority class of the trainer pods"),
        "gangScheduling": _obj({
            "scheduler": _str("gang scheduler whose PodGroup to create: kubernetes (the cluster's own scheduler, "
                              "scheduling.k8s.io/v1beta1, 1.37+ with the GenericWorkload feature gate), volcano or "
                              "scheduler-plugins", enum=GANG_SCHEDULERS),
            "minAvailable": _int("pods that must be schedulable together: must equal nodes (a torchrun gang starts "
                                 "only whole); leave it out", minimum=1),
            "scheduleTimeoutSeconds": _int("scheduler-plugins: give up co-scheduling after this", minimum=1),
        }, ["scheduler"], "all-or-nothing scheduling through a PodGroup"),
    }, ["experiment", "image"])
    spec["x-kubernetes-validations"] = [
        _immutable_spec_rule(spec),
        {"rule": "!has(self.gangScheduling) || !has(self.gangScheduling.minAvailable) || "
                 "self.gangScheduling.minAvailable == self.nodes",
         "message": "gangScheduling.minAvailable must equal nodes: a torchrun gang starts only whole (leave it out)"},
    ]
    return spec


def job_status_schema() -> dict:
    condition = _obj({
        "type": _str("condition type"), "status": _str("True, False or Unknown"),
        "reason": _str("CamelCase reason"), "message": _str("human-readable detail"),
        "lastTransitionTime": _str("when status last changed", format="date-time"),
    }, ["type", "status"])
    return {**_obj({
        "phase": _str("lifecycle phase", enum=PHASES),
        "conditions": {"type": "array", "items": condition},
        "startTime": _str("when the first gang was created", format="date-time"),
        "completionTime": _str("when the job reached Succeeded or Failed", format="date-time"),
        "attempt": _int("the current attempt (worker Job <name>-a<attempt>)"),
        "restarts": _int("gang restarts after failures so far (counted against backoffLimit)"),
        "disruptions": _int("gang restarts after preemptions, evictions and node drains (not counted)"),
        "lastFailure": _obj({
            "attempt": _int("attempt that failed"), "rank": _int("node rank (completion index) of the pod"),
            "pod": _str("the pod that failed first"), "exitCode": _int("the trainer container's exit code"),
            "reason": _str("CamelCase reason"), "message": _str("what the pod said (last log lines)"),
            "time": _str("when the operator saw it", format="date-time"),
        }, description="the failure that ended the last failed attempt"),
        "attempts": {"type": "array", "maxItems": 10, "description": "the last attempts, oldest first",
                     "items": _obj({
                         "attempt": _int("attempt number"), "startTime": _str("created", format="date-time"),
                         "finishTime": _str("ended", format="date-time"),
                         "outcome": _str("Succeeded, Failed or Disrupted"), "reason": _str("why it ended"),
                         "rank": _int("rank that failed"), "exitCode": _int("its exit code")})},
        "restartTime": _str("when the last restart began", format="date-time"),
        "workersReady": _int("worker pods running"),
        "workerJob": _str("the current worker Job (one per attempt)"),
        "epochs": _str("epoch/total, for the printer column"),
        "progress": _obj({
            "epoch": _int("epoch"), "numEpochs": _int("total epochs"), "step": _int("global step"),
            "lastLoss": {"type": "number"}, "lastMap": {"type": "number"},
            "lastCheckpoint": _str("URI of the newest checkpoint"), "state": _str("trainer state"),
            "updateTime": _str("when progress was read", format="date-time"),
        }),
    }), "x-kubernetes-preserve-unknown-fields": True}  # kopf keeps its own bookkeeping here


def build_crd() -> dict:
    columns = [
        ("Phase", "string", ".status.phase"), ("Nodes", "integer", ".spec.nodes"),
        ("Epoch", "string", ".status.epochs"), ("Loss", "number", ".status.progress.lastLoss"),
        ("mAP", "number", ".status.progress.lastMap"),
        ("Restarts", "integer", ".status.restarts"), ("Disruptions", "integer", ".status.disruptions"),
        ("Age", "date", ".metadata.creationTimestamp"),
    ]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {"kind": KIND, "plural": PLURAL, "singular": SINGULAR, "shortNames": SHORT_NAMES,
                      "listKind": f"{KIND}List", "categories": ["all"]},
            "versions": [{
                "name": VERSION, "served": True, "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": [{"name": n, "type": t, "jsonPath": p} for n, t, p in columns],
                "schema": {"openAPIV3Schema": {**_obj({
                    "apiVersion": {"type": "string"}, "kind": {"type": "string"},
                    "metadata": {"type": "object"},
                    "spec": job_spec_schema(), "status": job_status_schema(),
                }, ["spec"]), "x-kubernetes-validations": [{
                    "rule": f"self.metadata.name.size() <= {MAX_NAME_LENGTH}",
                    "message": f"metadata.name: at most {MAX_NAME_LENGTH} characters (it names the pods, "
                               "<name>-a<attempt>-<index>, which must fit a 63-character DNS label)"}]}},
            }],
        },
    }


def render_crd_yaml() -> str:
    header = "# Generated by `python -m ddetr_operator.crd --write crds/deformabledetrjobs.yaml`; do not edit.\n"
    return header + yaml.safe_dump(build_crd(), sort_keys=False, width=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", metavar="PATH", help="write the CRD here instead of printing it")
    args = parser.parse_args(argv)
    text = render_crd_yaml()
    if args.write:
        write_text(args.write, text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
