"""A resolved DeformableDetrJob (api.Job) -> child manifests (pure functions, no I/O).

The gang is a batch/v1 Indexed Job, one pod per node, named `<job>-a<attempt>`, with backoffLimit 0:
a restart recreates the whole gang as the next attempt (why an Indexed Job: operator/README.md, "How a job runs").
"""
from __future__ import annotations

import copy
from typing import Any

import yaml

from deformable_detr import exit_codes
from deformable_detr.config.loader import spec_to_dict
from deformable_detr.config.schema import ExperimentConfig
from deformable_detr.runtime.quality_gates import MAX_NON_FINITE_STEPS_ENV, TARGET_MAP_ENV
from deformable_detr.runtime.object_cache import CACHE_DIR_ENV, CACHE_SIZE_ENV
from deformable_detr.tasks import DEFAULT_TASK

from . import API_VERSION, KIND, LABEL_ATTEMPT, LABEL_JOB, LABEL_ROLE
from .api import Job
from .validate import OWNED_POD_FIELDS

SPEC_DIR = "/etc/ddetr"
SPEC_FILE = f"{SPEC_DIR}/spec.yaml"
CACHE_DIR = "/var/cache/deformable-detr"  # spec.cache's volume: the node cache of s3:// objects
CONTAINER = "trainer"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
MASTER_WAIT_SECONDS = 300
KEY_ENV = "DDETR_ENCRYPTION_KEY"
# Exit code of the wait below when pod 0 never answers: retryable, so the gang is retried.
MASTER_UNRESOLVABLE_EXIT = exit_codes.MASTER_UNRESOLVABLE.code

# Workers other than rank 0 wait (bounded) until pod 0's torchrun port accepts a connection (its
# name resolving is not enough: pod 0 may still be pulling its image or loading the dataset), instead
# of letting torchrun fail and the pod crash while pod 0 is still being scheduled.
WAIT_FOR_MASTER = f"""
import os, socket, sys, time
host, port = os.environ["PET_MASTER_ADDR"], int(os.environ["PET_MASTER_PORT"])
deadline = time.monotonic() + float(os.environ.get("DDETR_MASTER_WAIT_SECONDS", "{MASTER_WAIT_SECONDS}"))
while True:
    try:
        socket.create_connection((host, port), timeout=5).close()
        break
    except OSError as err:
        if time.monotonic() > deadline:
            print(f"torchrun master {{host}}:{{port}} did not accept connections in time: {{err}}", file=sys.stderr)
            sys.exit({MASTER_UNRESOLVABLE_EXIT})
        time.sleep(2)
""".strip()

# Keep service-mesh sidecars out: they break the torchrun/NCCL ports and keep Jobs from completing.
NO_SIDECAR_ANNOTATIONS = {"sidecar.istio.io/inject": "false", "linkerd.io/inject": "disabled"}

# The trainer image's user (Dockerfile.trainer: uid/gid 10001). Trainer pods meet the `restricted`
# Pod Security level by default; spec.podSecurityContext / spec.securityContext override keys.
TRAINER_UID = 10001
DEFAULT_POD_SECURITY_CONTEXT = {
    "runAsNonRoot": True, "runAsUser": TRAINER_UID, "runAsGroup": TRAINER_UID, "fsGroup": TRAINER_UID,
    # Without it kubelet chowns every file of a writable volume at each pod start (a dataset: minutes).
    "fsGroupChangePolicy": "OnRootMismatch",
    "seccompProfile": {"type": "RuntimeDefault"},
}
DEFAULT_CONTAINER_SECURITY_CONTEXT = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}

PODGROUP_API = {"kubernetes": "scheduling.k8s.io/v1beta1", "volcano": "scheduling.volcano.sh/v1beta1",
                "scheduler-plugins": "scheduling.x-k8s.io/v1alpha1"}
DEFAULT_GANG_SCHEDULER_NAME = {"volcano": "volcano", "scheduler-plugins": "scheduler-plugins-scheduler"}


def service_name(job_name: str) -> str:
    return f"{job_name}-workers"


def configmap_name(job_name: str) -> str:
    return f"{job_name}-spec"


def worker_job_name(job_name: str, attempt: int) -> str:
    return f"{job_name}-a{attempt}"


def network_policy_name(job_name: str) -> str:
    return f"{job_name}-gang"


def podgroup_name(job_name: str) -> str:
    return job_name


def master_address(job_name: str, namespace: str, attempt: int) -> str:
    return f"{worker_job_name(job_name, attempt)}-0.{service_name(job_name)}.{namespace}.svc"


def owner_reference(job: Job) -> dict:
    return {"apiVersion": API_VERSION, "kind": KIND, "name": job.name, "uid": job.uid,
            "controller": True, "blockOwnerDeletion": True}


def _metadata(job: Job, name: str, role: str, extra_labels: dict[str, str] | None = None) -> dict:
    return {"name": name, "namespace": job.namespace,
            "labels": {LABEL_JOB: job.name, LABEL_ROLE: role, "app.kubernetes.io/name": "deformable-detr",
                       "app.kubernetes.io/managed-by": "ddetr-operator", **(extra_labels or {})},
            "ownerReferences": [owner_reference(job)]}


def _ports(job: Job, key: str) -> list[dict]:
    """The torchrun port, and the metrics port unless it is 0 (off)."""
    spec = job.spec
    ports = [{"name": "torchrun", key: spec.master_port, "protocol": "TCP"}]
    if spec.metrics_port:
        ports.append({"name": "metrics", key: spec.metrics_port, "protocol": "TCP"})
    return ports


def render_service(job: Job) -> dict:
    """Headless Service: gives pod 0 a DNS name (published before it is ready, for rendezvous)."""
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": _metadata(job, service_name(job.name), "service"),
            "spec": {"clusterIP": "None", "publishNotReadyAddresses": True,
                     "selector": {LABEL_JOB: job.name, LABEL_ROLE: "worker"}, "ports": _ports(job, "port")}}


def render_configmap(job: Job, experiment: ExperimentConfig) -> dict:
    """The effective spec the pods read (validated, defaults filled in, results_dir from artifacts)."""
    text = yaml.safe_dump(spec_to_dict(experiment), sort_keys=False)
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": _metadata(job, configmap_name(job.name), "spec"),
            "data": {"spec.yaml": text}}


def render_network_policy(job: Job) -> dict | None:
    """spec.networkPolicy: the gang's pods accept traffic only from each other, on the torchrun and
    metrics ports (and metrics from anywhere in the namespace's allowed scrapers: any pod, same ports)."""
    spec = job.spec
    if not spec.network_policy:
        return None
    gang = {"matchLabels": {LABEL_JOB: job.name, LABEL_ROLE: "worker"}}
    ingress: list[dict[str, Any]] = [{"from": [{"podSelector": gang}],
                                      "ports": [{"protocol": "TCP", "port": spec.master_port}]}]
    if spec.metrics_port:
        # Prometheus lives in another namespace: the metrics port is open to the cluster, nothing else is.
        ingress.append({"ports": [{"protocol": "TCP", "port": spec.metrics_port}]})
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": _metadata(job, network_policy_name(job.name), "network-policy"),
            "spec": {"podSelector": gang, "policyTypes": ["Ingress"], "ingress": ingress}}


def render_podgroup(job: Job) -> dict | None:
    gang = job.spec.gang_scheduling
    if gang is None:
        return None
    # The whole gang or nothing: torchrun cannot start with part of it (api.JobSpec refuses another minAvailable).
    nodes, priority = job.spec.nodes, job.spec.priority_class_name
    if gang.scheduler == "kubernetes":
        # A standalone PodGroup (no Workload): the pods name it in spec.schedulingGroup.
        spec: dict[str, Any] = {"schedulingPolicy": {"gang": {"minCount": nodes}}}
    else:
        spec = {"minMember": nodes}
    if priority and gang.scheduler in ("kubernetes", "volcano"):
        spec["priorityClassName"] = priority
    if gang.scheduler == "scheduler-plugins" and gang.schedule_timeout_seconds:
        spec["scheduleTimeoutSeconds"] = gang.schedule_timeout_seconds
    return {"apiVersion": PODGROUP_API[gang.scheduler], "kind": "PodGroup",
            "metadata": _metadata(job, podgroup_name(job.name), "podgroup"), "spec": spec}


def _env(job: Job, attempt: int) -> list[dict]:
    spec = job.spec
    env = [
        {"name": "PET_NNODES", "value": str(spec.nodes)},
        {"name": "PET_NPROC_PER_NODE", "value": str(max(spec.gpus_per_node, 1))},
        {"name": "PET_NODE_RANK",
         "valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{INDEX_ANNOTATION}']"}}},
        {"name": "PET_MASTER_ADDR", "value": master_address(job.name, job.namespace, attempt)},
        {"name": "PET_MASTER_PORT", "value": str(spec.master_port)},
        {"name": "DDETR_JOB_NAME", "value": job.name},
        {"name": "DDETR_METRICS_PORT", "value": str(spec.metrics_port)},
        {"name": "DDETR_MASTER_WAIT_SECONDS", "value": str(MASTER_WAIT_SECONDS)},
        {"name": "DDETR_WAIT_FOR_MASTER", "value": WAIT_FOR_MASTER},
        {"name": "NCCL_DEBUG", "value": "WARN"},
        {"name": "NCCL_SOCKET_IFNAME", "value": "^lo,docker"},
        {"name": "TORCH_NCCL_ASYNC_ERROR_HANDLING", "value": "1"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        {"name": CACHE_DIR_ENV, "value": CACHE_DIR},
        {"name": CACHE_SIZE_ENV, "value": spec.cache.size},
    ]
    artifacts = spec.artifacts
    if artifacts is not None and artifacts.endpoint:
        env += [{"name": "AWS_ENDPOINT_URL", "value": artifacts.endpoint},
                {"name": "S3_ENDPOINT_URL", "value": artifacts.endpoint}]
    if artifacts is not None and artifacts.region:
        env.append({"name": "AWS_DEFAULT_REGION", "value": artifacts.region})
    secret = artifacts.credentials_secret if artifacts is not None else None
    if secret is not None:
        for var, key in (("AWS_ACCESS_KEY_ID", secret.access_key_id_key),
                         ("AWS_SECRET_ACCESS_KEY", secret.secret_access_key_key)):
            env.append({"name": var, "valueFrom": {"secretKeyRef": {"name": secret.name, "key": key}}})
    gates = spec.run_policy
    if gates.target_map is not None:
        env.append({"name": TARGET_MAP_ENV, "value": repr(float(gates.target_map))})
    if gates.max_non_finite_loss_steps is not None:
        env.append({"name": MAX_NON_FINITE_STEPS_ENV, "value": str(gates.max_non_finite_loss_steps)})
    key_ref = spec.encryption_key_secret
    if key_ref is not None:
        env.append({"name": KEY_ENV, "valueFrom": {"secretKeyRef": {"name": key_ref.name, "key": key_ref.key}}})
    return env + copy.deepcopy(list(spec.env or []))


def _command(job: Job) -> list[str]:
    task = job.spec.task
    with_key = job.spec.encryption_key_secret is not None
    if task != DEFAULT_TASK:
        # Kubernetes expands $(VAR) in the command from the container's environment.
        return ["deformable-detr", task, "-e", SPEC_FILE] + (["-k", f"$({KEY_ENV})"] if with_key else [])
    # Through the CLI's own launcher (not torchrun directly): it starts torchrun with these settings and
    # exits with the workers' own code (deformable_detr.exit_codes) instead of torchrun's blanket 1, so
    # the restart policy can tell retryable from permanent.
    launch = ('export MASTER_ADDR="$PET_MASTER_ADDR" MASTER_PORT="$PET_MASTER_PORT" NODE_RANK="$PET_NODE_RANK"\n'
              f'exec deformable-detr train -e {SPEC_FILE} --num_nodes "$PET_NNODES" --gpus "$PET_NPROC_PER_NODE"'
              + (f' -k "${KEY_ENV}"' if with_key else ""))
    wait = 'if [ "$PET_NODE_RANK" != "0" ]; then python3 -c "$DDETR_WAIT_FOR_MASTER" || exit $?; fi'
    return ["/bin/sh", "-c", f"{wait}\n{launch}"]


def _resources(job: Job) -> dict:
    resources: dict[str, Any] = {k: list(v or []) if k == "claims" else dict(v or {})
                                 for k, v in (job.spec.resources or {}).items()}
    if job.spec.gpus_per_node:
        resources.setdefault("limits", {})["nvidia.com/gpu"] = job.spec.gpus_per_node
    return resources


def _volumes(job: Job) -> tuple[list[dict], list[dict]]:
    volumes = [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": job.spec.shm_size}},
               {"name": "spec", "configMap": {"name": configmap_name(job.name)}}]
    mounts = [{"name": "dshm", "mountPath": "/dev/shm"}, {"name": "spec", "mountPath": SPEC_DIR, "readOnly": True},
              {"name": "object-cache", "mountPath": CACHE_DIR}]
    cache = job.spec.cache
    if cache.persistent_volume_claim is not None:
        volumes.append({"name": "object-cache",
                        "persistentVolumeClaim": {"claimName": cache.persistent_volume_claim.claim_name}})
    else:
        volumes.append({"name": "object-cache", "emptyDir": {"sizeLimit": cache.size,
                                                             **({"medium": cache.medium} if cache.medium else {})}})
    for volume in job.spec.volumes or ():
        if volume.persistent_volume_claim is not None:
            source: dict[str, Any] = {"persistentVolumeClaim": {"claimName": volume.persistent_volume_claim.claim_name,
                                                                "readOnly": volume.read_only}}
        else:
            host_path = {"path": volume.host_path.path}
            if volume.host_path.type_ is not None:
                host_path["type"] = volume.host_path.type_
            source = {"hostPath": host_path}
        volumes.append({"name": volume.name, **source})
        mount = {"name": volume.name, "mountPath": volume.mount_path, "readOnly": volume.read_only}
        if volume.sub_path:
            mount["subPath"] = volume.sub_path
        mounts.append(mount)
    return volumes, mounts


def render_worker_job(job: Job, attempt: int, suspend: bool = False) -> dict:
    """The gang of one attempt: an Indexed Job with one pod per node."""
    spec = job.spec
    name = worker_job_name(job.name, attempt)
    labels = {LABEL_ATTEMPT: str(attempt)}
    queue = job.labels.get(KUEUE_QUEUE_LABEL)
    job_labels = {**labels, KUEUE_QUEUE_LABEL: queue} if queue else labels
    pod_labels = {LABEL_JOB: job.name, LABEL_ROLE: "worker", **labels}
    annotations = dict(NO_SIDECAR_ANNOTATIONS)
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never", "subdomain": service_name(job.name),
        # Trainers talk to S3 and to each other, never to the Kubernetes API: no token in the pod.
        "automountServiceAccountToken": False,
        "securityContext": {**copy.deepcopy(DEFAULT_POD_SECURITY_CONTEXT), **copy.deepcopy(spec.pod_security_context or {})},
        "terminationGracePeriodSeconds": spec.termination_grace_period_seconds}
    gang = spec.gang_scheduling
    if gang is not None:
        if gang.scheduler == "kubernetes":
            pod_spec["schedulingGroup"] = {"podGroupName": podgroup_name(job.name)}  # default scheduler
        elif gang.scheduler == "volcano":
            annotations["scheduling.k8s.io/group-name"] = podgroup_name(job.name)
            pod_spec["schedulerName"] = DEFAULT_GANG_SCHEDULER_NAME["volcano"]
        else:
            pod_labels["scheduling.x-k8s.io/pod-group"] = podgroup_name(job.name)
            pod_spec["schedulerName"] = DEFAULT_GANG_SCHEDULER_NAME["scheduler-plugins"]
    for field, value in (("schedulerName", spec.scheduler_name), ("priorityClassName", spec.priority_class_name),
                         ("serviceAccountName", spec.service_account_name), ("nodeSelector", spec.node_selector),
                         ("tolerations", spec.tolerations), ("affinity", spec.affinity),
                         ("imagePullSecrets", [{"name": s.name} for s in spec.image_pull_secrets or ()])):
        if value:
            pod_spec[field] = copy.deepcopy(value)
    volumes, mounts = _volumes(job)
    container: dict[str, Any] = {
        "name": CONTAINER, "image": spec.image, "command": _command(job), "env": _env(job, attempt),
        "ports": _ports(job, "containerPort"), "volumeMounts": mounts, "resources": _resources(job),
        # On failure the last log lines become the termination message the operator reports.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {**copy.deepcopy(DEFAULT_CONTAINER_SECURITY_CONTEXT),
                            **copy.deepcopy(spec.security_context or {})},
    }
    if spec.image_pull_policy:
        container["imagePullPolicy"] = spec.image_pull_policy
    pod_spec.update(containers=[container], volumes=volumes)
    template_meta = {"labels": pod_labels, "annotations": annotations}
    _apply_pod_template(job, template_meta, pod_spec)
    return {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": _metadata(job, name, "workers", job_labels),
        "spec": {
            "completionMode": "Indexed", "completions": spec.nodes, "parallelism": spec.nodes,
            "backoffLimit": 0, "suspend": bool(suspend or queue),
            # A replacement pod only once the old one is fully gone (after a suspend/resume): never
            # two ranks with one index alive at once.
            "podReplacementPolicy": "Failed",
            "template": {"metadata": template_meta, "spec": pod_spec},
        },
    }


def _apply_pod_template(job: Job, meta: dict, pod_spec: dict) -> None:
    """spec.podTemplate: what the curated fields miss, merged over the rendered pod.

    metadata.labels/annotations are added (the operator's own labels win: it finds its pods by
    them); spec fields replace the rendered ones (hostNetwork, initContainers, dnsPolicy, ...),
    except the operator-owned containers, restartPolicy, subdomain and volumes, which validate refuses.
    """
    template = job.spec.pod_template
    if template is None:
        return
    template_meta = template.metadata
    if template_meta is not None:
        meta["labels"] = {**(template_meta.labels or {}), **meta["labels"]}
        meta["annotations"] = {**(template_meta.annotations or {}), **meta["annotations"]}
    for key, value in (template.spec or {}).items():
        if key not in OWNED_POD_FIELDS:
            pod_spec[key] = copy.deepcopy(value)
    if pod_spec.get("hostNetwork"):
        # Pod hostnames still resolve through the headless Service; DNS must stay the cluster's.
        pod_spec.setdefault("dnsPolicy", "ClusterFirstWithHostNet")
