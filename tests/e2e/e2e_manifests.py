"""Manifests of the end-to-end suite (pure functions): an in-cluster S3 store (moto server),
its credentials, a DaemonSet that draws the same tiny dataset onto every node, one-shot
helper Jobs, and tiny CPU DeformableDetrJobs."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

TRAINER_IMAGE = os.environ.get("DDETR_E2E_TRAINER_IMAGE", "deformable-detr-trainer:0.1.0")
OPERATOR_IMAGE = os.environ.get("DDETR_E2E_OPERATOR_IMAGE", "deformable-detr-operator:0.1.0")
S3_IMAGE = os.environ.get("DDETR_E2E_S3_IMAGE", "motoserver/moto:latest")
# Never/IfNotPresent: images come from `kind load docker-image` (or a registry the cluster reaches).
PULL_POLICY = os.environ.get("DDETR_E2E_PULL_POLICY", "IfNotPresent")

S3_SERVICE, S3_PORT = "s3", 5000
BUCKET = "ddetr-e2e"
CREDENTIALS_SECRET = "s3-credentials"
ACCESS_KEY, SECRET_KEY = "e2e-access-key", "e2e-secret-key"
DATA_HOST_PATH = "/var/tmp/ddetr-e2e-data"
DATA_MOUNT = "/data"
DATASET_SCRIPT = Path(__file__).with_name("make_dataset.py")
TRAINER_SERVICE_ACCOUNT = "deformable-detr-trainer"

TINY_MODEL = {"backbone": "resnet_18", "num_queries": 10, "num_feature_levels": 1, "return_interm_indices": [3],
              "hidden_dim": 32, "nheads": 2, "enc_layers": 1, "dec_layers": 1, "dim_feedforward": 64,
              "enc_n_points": 2, "dec_n_points": 2, "num_select": 10}
TINY_AUGMENTATION = {"scales": [64], "train_random_resize": [64], "train_random_crop_min": 64,
                     "train_random_crop_max": 64, "random_resize_max_size": 64, "test_random_resize": 64,
                     "fixed_padding": True}


def s3_endpoint(namespace: str) -> str:
    return f"http://{S3_SERVICE}.{namespace}.svc:{S3_PORT}"


def _labels(component: str) -> dict[str, str]:
    return {"app.kubernetes.io/part-of": "ddetr-e2e", "app.kubernetes.io/component": component}


def s3_store(namespace: str) -> list[dict]:
    """moto's S3 server as a Deployment + Service, and the Secret the jobs reference."""
    labels = _labels("s3")
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": S3_SERVICE, "namespace": namespace, "labels": labels},
        "spec": {"replicas": 1, "selector": {"matchLabels": labels}, "template": {
            "metadata": {"labels": labels},
            "spec": {"containers": [{
                "name": "moto", "image": S3_IMAGE, "imagePullPolicy": PULL_POLICY,
                "ports": [{"name": "s3", "containerPort": S3_PORT}],
                "readinessProbe": {"tcpSocket": {"port": S3_PORT}, "periodSeconds": 2},
                "resources": {"requests": {"cpu": "50m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}},
            }]}}},
    }
    service = {"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": S3_SERVICE, "namespace": namespace, "labels": labels},
               "spec": {"selector": labels, "ports": [{"name": "s3", "port": S3_PORT, "targetPort": S3_PORT}]}}
    return [deployment, service, credentials_secret(namespace)]


def credentials_secret(namespace: str) -> dict:
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": CREDENTIALS_SECRET, "namespace": namespace, "labels": _labels("s3")},
            "stringData": {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}}


def _s3_env(namespace: str) -> list[dict]:
    return [{"name": "AWS_ENDPOINT_URL", "value": s3_endpoint(namespace)},
            {"name": "AWS_DEFAULT_REGION", "value": "us-east-1"},
            *({"name": key, "valueFrom": {"secretKeyRef": {"name": CREDENTIALS_SECRET, "key": key}}}
              for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"))]


def dataset_daemonset(namespace: str) -> list[dict]:
    """Draw the (seeded, so identical) tiny dataset onto every node's hostPath; Ready when done."""
    labels = _labels("dataset")
    configmap = {"apiVersion": "v1", "kind": "ConfigMap",
                 "metadata": {"name": "make-dataset", "namespace": namespace, "labels": labels},
                 "data": {"make_dataset.py": DATASET_SCRIPT.read_text()}}
    script = (f"python /scripts/make_dataset.py {DATA_MOUNT} && touch {DATA_MOUNT}/.done && "
              "exec python -c 'import time\nwhile True: time.sleep(3600)'")
    daemonset = {
        "apiVersion": "apps/v1", "kind": "DaemonSet",
        "metadata": {"name": "dataset", "namespace": namespace, "labels": labels},
        "spec": {"selector": {"matchLabels": labels}, "template": {
            "metadata": {"labels": labels},
            "spec": {
                "tolerations": [{"operator": "Exists"}],
                "containers": [{
                    "name": "draw", "image": TRAINER_IMAGE, "imagePullPolicy": PULL_POLICY,
                    "command": ["/bin/sh", "-c", script],
                    # Root only to write the node's folder (kubelet creates it root-owned).
                    "securityContext": {"runAsUser": 0},
                    "readinessProbe": {"exec": {"command": ["test", "-f", f"{DATA_MOUNT}/.done"]},
                                       "periodSeconds": 2},
                    "volumeMounts": [{"name": "data", "mountPath": DATA_MOUNT},
                                     {"name": "scripts", "mountPath": "/scripts", "readOnly": True}],
                    "resources": {"requests": {"cpu": "50m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}},
                }],
                "volumes": [{"name": "data", "hostPath": {"path": DATA_HOST_PATH, "type": "DirectoryOrCreate"}},
                            {"name": "scripts", "configMap": {"name": "make-dataset"}}],
            }}},
    }
    return [configmap, daemonset]


def helper_job(namespace: str, name: str, code: str) -> dict:
    """A one-shot Job running `python -c code` in the trainer image with S3 access."""
    return {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": name, "namespace": namespace, "labels": _labels("helper")},
        "spec": {"backoffLimit": 2, "ttlSecondsAfterFinished": 600, "template": {
            "metadata": {"labels": _labels("helper")},
            "spec": {"restartPolicy": "Never", "serviceAccountName": TRAINER_SERVICE_ACCOUNT,
                     "containers": [{"name": "python", "image": TRAINER_IMAGE, "imagePullPolicy": PULL_POLICY,
                                     "command": ["python", "-c", code], "env": _s3_env(namespace),
                                     "resources": {"requests": {"cpu": "50m", "memory": "128Mi"}}}]}}},
    }


MAKE_BUCKET = f"import boto3\nboto3.client('s3').create_bucket(Bucket='{BUCKET}')\nprint('bucket ready')"


def list_objects_code(prefix: str) -> str:
    return ("import boto3, json\n"
            f"pages = boto3.client('s3').get_paginator('list_objects_v2').paginate(Bucket='{BUCKET}', Prefix='{prefix}')\n"
            "print(json.dumps([o['Key'] for p in pages for o in p.get('Contents', [])]))")


def training_job(namespace: str, name: str, num_epochs: int, nodes: int = 2, endpoint: str | None = None,
                 data_host_path: str = DATA_HOST_PATH) -> dict[str, Any]:
    """A tiny CPU DeformableDetrJob: 2 nodes x 1 process, checkpoints every epoch to S3."""
    endpoint = endpoint or s3_endpoint(namespace)
    train_source = {"image_dir": f"{DATA_MOUNT}/train/images", "json_file": f"{DATA_MOUNT}/train/annotations.json"}
    val_source = {"image_dir": f"{DATA_MOUNT}/val/images", "json_file": f"{DATA_MOUNT}/val/annotations.json"}
    return {
        "apiVersion": "ddetr.dev/v1alpha1", "kind": "DeformableDetrJob",
        "metadata": {"name": name, "namespace": namespace, "labels": _labels("job")},
        "spec": {
            "task": "train", "image": TRAINER_IMAGE, "imagePullPolicy": PULL_POLICY,
            "serviceAccountName": TRAINER_SERVICE_ACCOUNT,
            "nodes": nodes, "gpusPerNode": 0, "metricsPort": 9090, "shmSize": "256Mi",
            "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "3Gi"}},
            "env": [{"name": "OMP_NUM_THREADS", "value": "1"}],
            "volumes": [{"name": "data", "mountPath": DATA_MOUNT, "readOnly": True,
                         "hostPath": {"path": data_host_path, "type": "Directory"}}],
            "artifacts": {"uri": f"s3://{BUCKET}/{name}", "endpoint": endpoint, "region": "us-east-1",
                          "credentialsSecret": {"name": CREDENTIALS_SECRET}},
            "runPolicy": {"backoffLimit": 2, "activeDeadlineSeconds": 1800, "cleanPodPolicy": "None"},
            "experiment": {
                "model": dict(TINY_MODEL),
                "dataset": {"num_classes": 4, "batch_size": 2, "workers": 0, "pin_memory": False,
                            "train_data_sources": [train_source], "val_data_sources": [val_source],
                            "augmentation": dict(TINY_AUGMENTATION)},
                "train": {"num_epochs": num_epochs, "checkpoint_interval": 1, "validation_interval": 1,
                          "seed": 5, "activation_checkpoint": False,
                          "optim": {"lr": 1e-3, "lr_backbone": 1e-4, "lr_steps": [num_epochs], "lr_decay": 0.5}},
            },
        },
    }


KWOK_NODE_SELECTOR = {"type": "kwok"}


def kwok_job(namespace: str, name: str, endpoint: str, nodes: int = 2, **spec: Any) -> dict[str, Any]:
    """A DeformableDetrJob for KWOK's fake GPU nodes: its pods run only in the API server's eyes,
    and end when a test annotates them (ddetr.dev/simulated-exit-code, -disruption)."""
    job = training_job(namespace, name, num_epochs=2, nodes=nodes, endpoint=endpoint)
    job["spec"].update(image="example.invalid/deformable-detr-trainer:kwok", gpusPerNode=1,
                       nodeSelector=dict(KWOK_NODE_SELECTOR), resources={"requests": {"cpu": "1", "memory": "1Gi"}},
                       terminationGracePeriodSeconds=30)
    job["spec"].pop("volumes")
    job["spec"].update(spec)
    return job
