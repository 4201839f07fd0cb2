"""The Kubernetes client wrapper: observe a job's children (fresh, or from the watched index without a
request), apply a pass's actions, patch status, post events. "Already exists" on create and "not
found" on delete count as done, so a repeated pass is harmless; any other refusal of a child request
comes back as a `ChildError` with the API server's message (decide.settle turns it into status).
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
import threading
from typing import Any, Mapping

import kubernetes
from kubernetes.client.exceptions import ApiException

from deformable_detr.runtime import storage

from . import API_VERSION, GROUP, KIND, LABEL_ATTEMPT, LABEL_JOB, PLURAL, VERSION, api
from .decide import (Action, ChildError, Create, DeleteSelf, DeleteWorkerJob, Event, Observed, SetSuspend, attempt_of,
                     current_attempt)
from .children import ChildIndex
from .credentials import SECRET_TTL, SecretKeys
from .progress import s3_access
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


SUPPORT_KINDS = {"Service": "service", "ConfigMap": "configmap", "PodGroup": "podgroup",
                 "NetworkPolicy": "network_policy"}


def job_key(job: Mapping[str, Any]) -> str:
    meta = job["metadata"]
    return meta.get("uid") or f"{meta['namespace']}/{meta['name']}"


def resolved(job: Mapping[str, Any]) -> api.Job | None:
    """The job with its spec resolved, or None when the spec is not accepted (its pass fails it)."""
    try:
        return api.resolve(job)
    except api.JobSpecError:
        return None


def _short_of_pods(job: Mapping[str, Any], observed: Observed) -> str | None:
    """The current attempt's worker Job's name while it runs (not suspended) with fewer pods than
    the gang, else None: then only a LIST of its Warning events tells why (FailedCreate)."""
    typed = resolved(job)
    attempt = current_attempt(job.get("status") or {}, [*observed.worker_jobs, *observed.pods])
    current = worker_job_name(job["metadata"]["name"], attempt)
    worker = next((j for j in observed.worker_jobs if j["metadata"]["name"] == current), None)
    if typed is None or worker is None or (worker.get("spec") or {}).get("suspend"):
        return None
    if sum(1 for p in observed.pods if attempt_of(p) == attempt) >= typed.spec.nodes:
        return None
    return current


class Cluster:
    def __init__(self, api_client: kubernetes.client.ApiClient, secret_ttl: float = SECRET_TTL):
        self.api_client = api_client
        self.core = kubernetes.client.CoreV1Api(api_client)
        self.batch = kubernetes.client.BatchV1Api(api_client)
        self.custom = kubernetes.client.CustomObjectsApi(api_client)
        self.networking = kubernetes.client.NetworkingV1Api(api_client)
        self.children = ChildIndex()
        self.secret_keys = SecretKeys(lambda name, namespace: self._read_secret(name, namespace), secret_ttl)
        self._lock = threading.Lock()
        # job uid -> whether its Service, ConfigMap, PodGroup, NetworkPolicy were there at the last
        # fresh observation (or created since)
        self._support: dict[str, dict[str, bool]] = {}

    def forget(self, job: Mapping[str, Any]) -> None:
        """The job is gone: drop what is kept about it."""
        with self._lock:
            self._support.pop(job_key(job), None)
        self.children.forget(job["metadata"]["namespace"], job["metadata"]["name"])

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

    def _listed(self, namespace: str, name: str, kind: str, response: Any) -> list[dict]:
        data = json.loads(response.data)
        items = data.get("items") or []
        self.children.merge_list(namespace, name, kind, items, (data.get("metadata") or {}).get("resourceVersion"))
        return items

    def observe(self, job: Mapping[str, Any]) -> Observed:
        """The job's children as the API server has them now (and the index brought up to date)."""
        name, namespace = job["metadata"]["name"], job["metadata"]["namespace"]
        selector = f"{LABEL_JOB}={name}"
        jobs = self._listed(namespace, name, "jobs",
                            self.batch.list_namespaced_job(namespace, label_selector=selector, **RAW))
        pods = self._listed(namespace, name, "pods",
                            self.core.list_namespaced_pod(namespace, label_selector=selector, **RAW))
        podgroup = False
        typed = resolved(job)
        gang = typed.spec.gang_scheduling if typed is not None else None
        if gang is not None:
            group, version = PODGROUP_API[gang.scheduler].split("/")
            podgroup = self._exists(self.custom.get_namespaced_custom_object, group, version, namespace,
                                    "podgroups", podgroup_name(name))
        network_policy = False
        if typed is not None and typed.spec.network_policy:
            network_policy = self._exists(self.networking.read_namespaced_network_policy, network_policy_name(name),
                                          namespace)
        observed = Observed(
            service=self._exists(self.core.read_namespaced_service, service_name(name), namespace),
            configmap=self._exists(self.core.read_namespaced_config_map, configmap_name(name), namespace),
            podgroup=podgroup, network_policy=network_policy,
            worker_jobs=jobs,
            pods=[p for p in pods if LABEL_ATTEMPT in p["metadata"]["labels"]],
        )
        with self._lock:
            self._support[job_key(job)] = {field: getattr(observed, field) for field in SUPPORT_KINDS.values()}
        observed.worker_events = self._worker_events(job, observed)
        return observed

    def observe_cached(self, job: Mapping[str, Any]) -> Observed | None:
        """The job's children as the watch events and earlier passes showed them, with no request;
        None when that cannot decide the pass (see the module's docstring)."""
        name, namespace = job["metadata"]["name"], job["metadata"]["namespace"]
        with self._lock:
            support = self._support.get(job_key(job))
        if support is None:
            return None
        jobs, pods = self.children.children(namespace, name)
        observed = Observed(worker_jobs=jobs, pods=[p for p in pods if LABEL_ATTEMPT in p["metadata"]["labels"]],
                            **support)
        if _short_of_pods(job, observed) is not None:
            return None
        return observed

    def _worker_events(self, job: Mapping[str, Any], observed: Observed) -> list[dict]:
        """Warning events on the current worker Job, only while it lacks pods (FailedCreate: the Job
        controller records a refused pod, Pod Security or quota, only as an event)."""
        current = _short_of_pods(job, observed)
        if current is None:
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

    def s3_access(self, namespace: str, artifacts: api.Artifacts | None, read_secret: bool = True) -> storage.S3Access:
        """How to reach the job's S3 store: its endpoint and region, and the keys from its Secret.

        Without `read_secret` (the chart grants no Secret access, the default cluster-wide) or
        when the read is forbidden, no keys: boto3 then uses the operator's own credentials
        (IRSA, AWS_* in its environment), or reads nothing and the status has no progress.
        The keys are kept for `secret_ttl` seconds (SECRET_MISS_TTL at most when there were none).
        """
        if artifacts is None:  # results_dir on S3 from the experiment itself: the operator's own credentials
            return s3_access()
        secret_ref = artifacts.credentials_secret
        key_id = secret_key = None
        if secret_ref is not None and read_secret:
            key_id, secret_key = self.secret_keys.get(namespace, secret_ref)
        return s3_access(artifacts.endpoint, artifacts.region, key_id, secret_key)

    def _read_secret(self, name: str, namespace: str) -> dict:
        try:
            return json.loads(self.core.read_namespaced_secret(name, namespace, **RAW).data)
        except ApiException as err:
            if err.status not in (401, 403, 404):
                raise
            if err.status != 404:
                logger.debug("may not read Secret %s/%s (%s): no progress from S3 with the job's credentials",
                             namespace, name, err.status)
            return {}  # not there (yet), or not ours to read: progress waits

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
                self._created(job, action)
                return None  # created by an earlier pass
            return child_error(describe(action, name), err.status, err.reason, err.body)
        if isinstance(action, Create):
            self._created(job, action)
        return None

    def _created(self, job: Mapping[str, Any], action: Create) -> None:
        """A support child is there now: passes from the cache need not look for it again."""
        field = SUPPORT_KINDS.get(action.manifest.get("kind"))
        if field is not None:
            with self._lock:
                support = self._support.get(job_key(job))
                if support is not None:
                    support[field] = True

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

    def patch_status(self, job: Mapping[str, Any], status: dict) -> dict | None:
        """Merge `status` into the job's status; the job as the API server has it after the patch."""
        meta = job["metadata"]
        try:
            response = self.custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, meta["namespace"], PLURAL, meta["name"], {"status": status},
                _content_type=MERGE_PATCH, **RAW)
        except ApiException as err:
            if err.status != 404:
                raise  # 404: the job was deleted during the pass; there is no status to keep
            return None
        try:
            body = json.loads(response.data)
        except (TypeError, ValueError):
            return None
        return body if isinstance(body, dict) and (body.get("metadata") or {}).get("name") == meta["name"] else None

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
