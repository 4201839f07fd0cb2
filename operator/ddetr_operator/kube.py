"""Talking to the Kubernetes API: observe a job's children, apply reconcile actions.

Every call tolerates the races a level-triggered operator meets: "already exists" on
create and "not found" on delete count as done, so a repeated pass is harmless.
"""
from __future__ import annotations

import base64
import json
import logging
import os
from typing import Any, Mapping

import kubernetes
from kubernetes.client.exceptions import ApiException

from . import GROUP, LABEL_ATTEMPT, LABEL_JOB, PLURAL, VERSION
from .progress import S3Access
from .reconcile import Action, Create, DeleteSelf, DeleteWorkerJob, Observed, SetSuspend
from .render import PODGROUP_API, configmap_name, podgroup_name, service_name

logger = logging.getLogger(__name__)
MERGE_PATCH = "application/merge-patch+json"
# Take responses as raw JSON, not the client's models: those reject objects with fields
# (or missing fields) they do not expect, and the operator needs only a few fields.
RAW = {"_preload_content": False}


def load_api_client() -> kubernetes.client.ApiClient:
    """In-cluster credentials when running in a pod, else the kubeconfig (KUBECONFIG)."""
    try:
        kubernetes.config.load_incluster_config()
    except kubernetes.config.ConfigException:
        # Read KUBECONFIG now: the client library captures it once, at its import.
        kubernetes.config.load_kube_config(config_file=os.environ.get("KUBECONFIG") or None)
    return kubernetes.client.ApiClient()


def _owned_by(obj: Mapping[str, Any], job_name: str) -> bool:
    # Filter on the client too: the label selector is a request, not a guarantee (KMock ignores it).
    return (obj["metadata"].get("labels") or {}).get(LABEL_JOB) == job_name


class Cluster:
    def __init__(self, api_client: kubernetes.client.ApiClient):
        self.api_client = api_client
        self.core = kubernetes.client.CoreV1Api(api_client)
        self.batch = kubernetes.client.BatchV1Api(api_client)
        self.custom = kubernetes.client.CustomObjectsApi(api_client)

    @staticmethod
    def _items(response: Any) -> list[dict]:
        return json.loads(response.data).get("items") or []

    def get_job(self, namespace: str, name: str) -> dict | None:
        try:
            return json.loads(self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name,
                                                                       **RAW).data)
        except ApiException as err:
            if err.status == 404:
                return None
            raise

    def _exists(self, read, *args) -> bool:
        try:
            read(*args, **RAW)
            return True
        except ApiException as err:
            if err.status == 404:
                return False
            raise

    def observe(self, job: Mapping[str, Any]) -> Observed:
        name, namespace = job["metadata"]["name"], job["metadata"]["namespace"]
        selector = f"{LABEL_JOB}={name}"
        jobs = self._items(self.batch.list_namespaced_job(namespace, label_selector=selector, **RAW))
        pods = self._items(self.core.list_namespaced_pod(namespace, label_selector=selector, **RAW))
        podgroup = False
        gang = (job.get("spec") or {}).get("gangScheduling")
        if gang:
            group, version = PODGROUP_API[gang["scheduler"]].split("/")
            podgroup = self._exists(self.custom.get_namespaced_custom_object, group, version, namespace,
                                    "podgroups", podgroup_name(name))
        return Observed(
            service=self._exists(self.core.read_namespaced_service, service_name(name), namespace),
            configmap=self._exists(self.core.read_namespaced_config_map, configmap_name(name), namespace),
            podgroup=podgroup,
            worker_jobs=[j for j in jobs if _owned_by(j, name)],
            pods=[p for p in pods if _owned_by(p, name) and LABEL_ATTEMPT in p["metadata"]["labels"]],
        )

    def s3_access(self, namespace: str, artifacts: Mapping[str, Any]) -> S3Access:
        secret_ref = artifacts.get("credentialsSecret")
        key_id = secret_key = None
        if secret_ref:
            try:
                secret = json.loads(self.core.read_namespaced_secret(secret_ref["name"], namespace, **RAW).data)
            except ApiException as err:
                if err.status != 404:
                    raise
                secret = {}  # not there (yet): the pods will not start either; progress waits
            data = secret.get("data") or {}
            decode = lambda key: base64.b64decode(data[key]).decode() if key in data else None  # noqa: E731
            key_id = decode(secret_ref.get("accessKeyIdKey", "AWS_ACCESS_KEY_ID"))
            secret_key = decode(secret_ref.get("secretAccessKeyKey", "AWS_SECRET_ACCESS_KEY"))
        return S3Access(artifacts.get("endpoint"), artifacts.get("region"), key_id, secret_key)

    def apply(self, job: Mapping[str, Any], action: Action, observed: Observed) -> None:
        namespace, name = job["metadata"]["namespace"], job["metadata"]["name"]
        try:
            if isinstance(action, Create):
                self._create(namespace, action.manifest)
            elif isinstance(action, DeleteWorkerJob):
                self.batch.delete_namespaced_job(action.name, namespace, propagation_policy="Background", **RAW)
                # Delete the gang's pods now rather than waiting for the garbage collector.
                for pod in observed.pods:
                    labels = pod["metadata"].get("labels") or {}
                    if action.name in (labels.get("batch.kubernetes.io/job-name"), labels.get("job-name")):
                        self._delete_pod(namespace, pod["metadata"]["name"])
            elif isinstance(action, SetSuspend):
                self.batch.patch_namespaced_job(action.name, namespace, {"spec": {"suspend": action.suspend}},
                                                _content_type=MERGE_PATCH, **RAW)
            elif isinstance(action, DeleteSelf):
                self.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name,
                                                            propagation_policy="Background", **RAW)
        except ApiException as err:
            if err.status == 409 and isinstance(action, Create):
                return  # created by an earlier pass
            if err.status == 404 and not isinstance(action, Create):
                return  # already gone
            raise

    def _delete_pod(self, namespace: str, name: str) -> None:
        try:
            self.core.delete_namespaced_pod(name, namespace, **RAW)
        except ApiException as err:
            if err.status != 404:
                raise

    def _create(self, namespace: str, manifest: dict) -> None:
        kind = manifest["kind"]
        if kind == "Service":
            self.core.create_namespaced_service(namespace, manifest, **RAW)
        elif kind == "ConfigMap":
            self.core.create_namespaced_config_map(namespace, manifest, **RAW)
        elif kind == "Job":
            self.batch.create_namespaced_job(namespace, manifest, **RAW)
        elif kind == "PodGroup":
            group, version = manifest["apiVersion"].split("/")
            self.custom.create_namespaced_custom_object(group, version, namespace, "podgroups", manifest, **RAW)
        else:
            raise ValueError(f"cannot create {kind}")

    def patch_status(self, job: Mapping[str, Any], status: dict) -> None:
        meta = job["metadata"]
        self.custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, meta["namespace"], PLURAL, meta["name"], {"status": status},
            _content_type=MERGE_PATCH, **RAW)
