"""Talking to the Kubernetes API: observe a job's children, apply reconcile actions.

Every call tolerates the races a level-triggered operator meets: "already exists" on
create and "not found" on delete count as done, so a repeated pass is harmless. Any
other refusal of a child request comes back as a `ChildError` (the API server's own
message), which `reconcile.settle` turns into status and an event: never a silent Pending.
"""
from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import os
import socket
from typing import Any, Mapping

import kubernetes
from kubernetes.client.exceptions import ApiException

from . import API_VERSION, GROUP, KIND, LABEL_ATTEMPT, LABEL_JOB, PLURAL, VERSION
from .progress import S3Access
from .reconcile import Action, ChildError, Create, DeleteSelf, DeleteWorkerJob, Event, Observed, SetSuspend
from .render import PODGROUP_API, configmap_name, network_policy_name, podgroup_name, service_name, worker_job_name

logger = logging.getLogger(__name__)
MERGE_PATCH = "application/merge-patch+json"
REPORTING_COMPONENT = "ddetr-operator"
MAX_EVENT_MESSAGE = 1024
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


def describe(action: Action, job_name: str) -> str:
    """The request an action makes, for messages: "create Job demo-a0"."""
    if isinstance(action, Create):
        # PodGroups come from three APIs: the version says which one a 404 is missing.
        api = f" ({action.manifest['apiVersion']})" if action.manifest["kind"] == "PodGroup" else ""
        return f"create {action.manifest['kind']} {action.manifest['metadata']['name']}{api}"
    if isinstance(action, DeleteWorkerJob):
        return f"delete Job {action.name}"
    if isinstance(action, SetSuspend):
        return f"patch Job {action.name} (suspend={str(action.suspend).lower()})"
    return f"delete {KIND} {job_name}"


def child_error(what: str, status: int | None, reason: str | None, body: Any) -> ChildError:
    """A refused request as a ChildError, with the message of the API server's Status body."""
    try:
        parsed = json.loads(body) if isinstance(body, (str, bytes)) and body else {}
    except ValueError:
        parsed = {}
    parsed = parsed if isinstance(parsed, dict) else {}
    message = parsed.get("message") or (body.decode(errors="replace") if isinstance(body, bytes) else body) or reason
    return ChildError(what=what, code=int(status or 0), reason=str(parsed.get("reason") or reason or ""),
                      message=str(message or "no message"))


def _owned_by(obj: Mapping[str, Any], job_name: str) -> bool:
    # Filter on the client too: the label selector is a request, not a guarantee (KMock ignores it).
    return (obj["metadata"].get("labels") or {}).get(LABEL_JOB) == job_name


class Cluster:
    def __init__(self, api_client: kubernetes.client.ApiClient):
        self.api_client = api_client
        self.core = kubernetes.client.CoreV1Api(api_client)
        self.batch = kubernetes.client.BatchV1Api(api_client)
        self.custom = kubernetes.client.CustomObjectsApi(api_client)
        self.networking = kubernetes.client.NetworkingV1Api(api_client)

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
        network_policy = False
        if (job.get("spec") or {}).get("networkPolicy"):
            network_policy = self._exists(self.networking.read_namespaced_network_policy, network_policy_name(name),
                                          namespace)
        observed = Observed(
            service=self._exists(self.core.read_namespaced_service, service_name(name), namespace),
            configmap=self._exists(self.core.read_namespaced_config_map, configmap_name(name), namespace),
            podgroup=podgroup, network_policy=network_policy,
            worker_jobs=[j for j in jobs if _owned_by(j, name)],
            pods=[p for p in pods if _owned_by(p, name) and LABEL_ATTEMPT in p["metadata"]["labels"]],
        )
        observed.worker_events = self._worker_events(job, observed)
        return observed

    def _worker_events(self, job: Mapping[str, Any], observed: Observed) -> list[dict]:
        """Warning events on the current worker Job, only while it lacks pods (FailedCreate: the Job
        controller records a refused pod, Pod Security or quota, only as an event)."""
        status = job.get("status") or {}
        name = job["metadata"]["name"]
        attempt = status.get("attempt", status.get("restarts", 0))
        current = worker_job_name(name, int(attempt or 0))
        worker = next((j for j in observed.worker_jobs if j["metadata"]["name"] == current), None)
        if worker is None or (worker.get("spec") or {}).get("suspend"):
            return []
        pods = [p for p in observed.pods if (p["metadata"].get("labels") or {}).get(LABEL_ATTEMPT) == str(attempt)]
        if len(pods) >= (job.get("spec") or {}).get("nodes", 1):
            return []
        selector = f"involvedObject.kind=Job,involvedObject.name={current},type=Warning"
        try:
            events = self._items(self.core.list_namespaced_event(job["metadata"]["namespace"],
                                                                 field_selector=selector, **RAW))
            return [e for e in events if (e.get("involvedObject") or {}).get("name") == current]
        except ApiException as err:
            if err.status in (401, 403):  # no RBAC for events list: no FailedCreate detail
                return []
            raise

    def s3_access(self, namespace: str, artifacts: Mapping[str, Any], read_secret: bool = True) -> S3Access:
        """How to reach the job's S3 store: its endpoint and region, and the keys from its Secret.

        Without `read_secret` (the chart grants no Secret access, the default cluster-wide) or
        when the read is forbidden, no keys: boto3 then uses the operator's own credentials
        (IRSA, AWS_* in its environment), or reads nothing and the status has no progress.
        """
        secret_ref = artifacts.get("credentialsSecret")
        key_id = secret_key = None
        if secret_ref and read_secret:
            try:
                secret = json.loads(self.core.read_namespaced_secret(secret_ref["name"], namespace, **RAW).data)
            except ApiException as err:
                if err.status not in (401, 403, 404):
                    raise
                if err.status != 404:
                    logger.debug("may not read Secret %s/%s (%s): no progress from S3 with the job's credentials",
                                namespace, secret_ref["name"], err.status)
                secret = {}  # not there (yet), or not ours to read: progress waits
            data = secret.get("data") or {}
            decode = lambda key: base64.b64decode(data[key]).decode() if key in data else None  # noqa: E731
            key_id = decode(secret_ref.get("accessKeyIdKey", "AWS_ACCESS_KEY_ID"))
            secret_key = decode(secret_ref.get("secretAccessKeyKey", "AWS_SECRET_ACCESS_KEY"))
        return S3Access(artifacts.get("endpoint"), artifacts.get("region"), key_id, secret_key)

    def apply(self, job: Mapping[str, Any], action: Action, observed: Observed) -> ChildError | None:
        """Make one action's request; None when done, else the API server's refusal."""
        namespace, name = job["metadata"]["namespace"], job["metadata"]["name"]
        try:
            if isinstance(action, Create):
                self._create(namespace, action.manifest)
            elif isinstance(action, DeleteWorkerJob):
                self._ignore_missing(self.batch.delete_namespaced_job, action.name, namespace,
                                     propagation_policy="Background")
                # Delete the gang's pods now rather than waiting for the garbage collector.
                for pod in observed.pods:
                    labels = pod["metadata"].get("labels") or {}
                    if action.name in (labels.get("batch.kubernetes.io/job-name"), labels.get("job-name")):
                        self._ignore_missing(self.core.delete_namespaced_pod, pod["metadata"]["name"], namespace)
            elif isinstance(action, SetSuspend):
                self._ignore_missing(self.batch.patch_namespaced_job, action.name, namespace,
                                     {"spec": {"suspend": action.suspend}}, _content_type=MERGE_PATCH)
            elif isinstance(action, DeleteSelf):
                self._ignore_missing(self.custom.delete_namespaced_custom_object, GROUP, VERSION, namespace,
                                     PLURAL, name, propagation_policy="Background")
        except ApiException as err:
            if err.status == 409 and isinstance(action, Create):
                return None  # created by an earlier pass
            return child_error(describe(action, name), err.status, err.reason, err.body)
        return None

    @staticmethod
    def _ignore_missing(call, *args, **kwargs) -> None:
        try:
            call(*args, **kwargs, **RAW)
        except ApiException as err:
            if err.status != 404:  # already gone counts as done
                raise

    def _create(self, namespace: str, manifest: dict) -> None:
        kind = manifest["kind"]
        if kind == "Service":
            self.core.create_namespaced_service(namespace, manifest, **RAW)
        elif kind == "ConfigMap":
            self.core.create_namespaced_config_map(namespace, manifest, **RAW)
        elif kind == "Job":
            self.batch.create_namespaced_job(namespace, manifest, **RAW)
        elif kind == "NetworkPolicy":
            self.networking.create_namespaced_network_policy(namespace, manifest, **RAW)
        elif kind == "PodGroup":
            group, version = manifest["apiVersion"].split("/")
            self.custom.create_namespaced_custom_object(group, version, namespace, "podgroups", manifest, **RAW)
        else:
            raise ValueError(f"cannot create {kind}")

    def patch_status(self, job: Mapping[str, Any], status: dict) -> None:
        meta = job["metadata"]
        try:
            self.custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, meta["namespace"], PLURAL, meta["name"], {"status": status},
                _content_type=MERGE_PATCH, **RAW)
        except ApiException as err:
            if err.status != 404:
                raise  # 404: the job was deleted during the pass; there is no status to keep

    def post_event(self, job: Mapping[str, Any], event: Event, now: dt.datetime) -> None:
        """A core/v1 Event on the job (what `kubectl describe ddj` shows)."""
        meta = job["metadata"]
        stamp = now.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {"apiVersion": API_VERSION, "kind": KIND, "name": meta["name"],
                               "namespace": meta["namespace"], "uid": meta.get("uid")},
            "type": event.type, "reason": event.reason, "message": event.message[-MAX_EVENT_MESSAGE:],
            "source": {"component": REPORTING_COMPONENT}, "reportingComponent": REPORTING_COMPONENT,
            "reportingInstance": socket.gethostname()[:128],
            "firstTimestamp": stamp, "lastTimestamp": stamp, "count": 1,
        }
        try:
            self.core.create_namespaced_event(meta["namespace"], body, **RAW)
        except ApiException as err:  # an event is a courtesy: never fail a pass over it
            logger.warning("could not post event %s on %s/%s: %s %s", event.reason, meta["namespace"], meta["name"],
                           err.status, err.reason)
