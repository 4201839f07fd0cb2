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

TASKS = ["train", "evaluate", "inference", "export", "convert", "gen_trt_engine"]
PHASES = ["Pending", "Running", "Restarting", "Succeeded", "Failed", "Suspended"]
CLEAN_POD_POLICIES = ["None", "Running", "All"]
GANG_SCHEDULERS = ["volcano", "scheduler-plugins"]

_ANY_OBJECT = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
_QUANTITY_RE = r"^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$"


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
    return _obj({
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
        "resources": {**_ANY_OBJECT, "description": "container resources (requests/limits); "
                      "nvidia.com/gpu is set from gpusPerNode"},
        "env": {"type": "array", "description": "extra environment variables (core/v1 EnvVar)",
                "items": _ANY_OBJECT},
        "nodeSelector": {"type": "object", "additionalProperties": {"type": "string"}},
        "tolerations": {"type": "array", "items": _ANY_OBJECT},
        "affinity": _ANY_OBJECT,
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
        }),
        "schedulerName": _str("scheduler of the trainer pods"),
        "priorityClassName": _str("priority class of the trainer pods"),
        "gangScheduling": _obj({
            "scheduler": _str("gang scheduler whose PodGroup to create", enum=GANG_SCHEDULERS),
            "minAvailable": _int("pods that must be schedulable together; default all nodes", minimum=1),
            "scheduleTimeoutSeconds": _int("scheduler-plugins: give up co-scheduling after this", minimum=1),
        }, ["scheduler"], "all-or-nothing scheduling through a PodGroup"),
    }, ["experiment", "image"])


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
        "restarts": _int("gang restarts so far"),
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
        ("Epoch", "string", ".status.epochs"), ("mAP", "number", ".status.progress.lastMap"),
        ("Restarts", "integer", ".status.restarts"), ("Age", "date", ".metadata.creationTimestamp"),
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
                "schema": {"openAPIV3Schema": _obj({
                    "apiVersion": {"type": "string"}, "kind": {"type": "string"},
                    "metadata": {"type": "object"},
                    "spec": job_spec_schema(), "status": job_status_schema(),
                }, ["spec"])},
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
