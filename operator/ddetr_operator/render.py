"""DeformableDetrJob -> child manifests (pure functions, no I/O).

The gang is a batch/v1 Indexed Job, one pod per node, named after the attempt
(`<job>-a<attempt>`). Why an Indexed Job rather than bare pods: every pod gets a stable
hostname `<worker-job>-<index>` under the headless Service (so pod 0 is the torchrun
master by DNS), its index arrives as the node rank, `suspend` stops and restarts the
pods (the switch Kueue uses), and kubelet/Job-controller semantics need no re-inventing.
The Job's own `backoffLimit` is 0: a restart always recreates the whole gang, under
the operator's exit-code policy, as the next attempt.
"""
from __future__ import annotations

import copy
from typing import Any, Mapping

import yaml

from deformable_detr import exit_codes
from deformable_detr.config.loader import spec_to_dict
from deformable_detr.config.schema import ExperimentConfig

from . import API_VERSION, KIND, LABEL_ATTEMPT, LABEL_JOB, LABEL_ROLE

SPEC_DIR = "/etc/ddetr"
SPEC_FILE = f"{SPEC_DIR}/spec.yaml"
CONTAINER = "trainer"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
MASTER_WAIT_SECONDS = 300
KEY_ENV = "DDETR_ENCRYPTION_KEY"
# Exit code of the wait below when pod 0 never answers: retryable, so the gang is retried.
MASTER_UNRESOLVABLE_EXIT = exit_codes.MASTER_UNRESOLVABLE.code
# Time between SIGTERM and SIGKILL: torchrun forwards SIGTERM, rank 0 finishes its step, writes
# a checkpoint and uploads it to S3 (hundreds of MB, tens of seconds); Kubernetes' 30 s is too short.
DEFAULT_TERMINATION_GRACE_SECONDS = 180

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


def owner_reference(job: Mapping[str, Any]) -> dict:
    meta = job["metadata"]
    return {"apiVersion": API_VERSION, "kind": KIND, "name": meta["name"], "uid": meta["uid"],
            "controller": True, "blockOwnerDeletion": True}


def _metadata(job: Mapping[str, Any], name: str, role: str, extra_labels: Mapping[str, str] = ()) -> dict:
    meta = job["metadata"]
    return {"name": name, "namespace": meta["namespace"],
            "labels": {LABEL_JOB: meta["name"], LABEL_ROLE: role, "app.kubernetes.io/name": "deformable-detr",
                       "app.kubernetes.io/managed-by": "ddetr-operator", **dict(extra_labels)},
            "ownerReferences": [owner_reference(job)]}


def render_service(job: Mapping[str, Any]) -> dict:
    """Headless Service: gives pod 0 a DNS name (published before it is ready, for rendezvous)."""
    spec = job["spec"]
    ports = [{"name": "torchrun", "port": spec.get("masterPort", 29500), "protocol": "TCP"}]
    if spec.get("metricsPort", 9090):
        ports.append({"name": "metrics", "port": spec.get("metricsPort", 9090), "protocol": "TCP"})
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": _metadata(job, service_name(job["metadata"]["name"]), "service"),
            "spec": {"clusterIP": "None", "publishNotReadyAddresses": True,
                     "selector": {LABEL_JOB: job["metadata"]["name"], LABEL_ROLE: "worker"}, "ports": ports}}


def render_configmap(job: Mapping[str, Any], experiment: ExperimentConfig) -> dict:
    """The effective spec the pods read (validated, defaults filled in, results_dir from artifacts)."""
    text = yaml.safe_dump(spec_to_dict(experiment), sort_keys=False)
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": _metadata(job, configmap_name(job["metadata"]["name"]), "spec"),
            "data": {"spec.yaml": text}}


def render_network_policy(job: Mapping[str, Any]) -> dict | None:
    """spec.networkPolicy: the gang's pods accept traffic only from each other, on the torchrun and
    metrics ports (and metrics from anywhere in the namespace's allowed scrapers: any pod, same ports)."""
    spec = job["spec"]
    if not spec.get("networkPolicy"):
        return None
    name = job["metadata"]["name"]
    gang = {"matchLabels": {LABEL_JOB: name, LABEL_ROLE: "worker"}}
    ports = [{"protocol": "TCP", "port": spec.get("masterPort", 29500)}]
    ingress: list[dict[str, Any]] = [{"from": [{"podSelector": gang}], "ports": ports}]
    if spec.get("metricsPort", 9090):
        # Prometheus lives in another namespace: the metrics port is open to the cluster, nothing else is.
        ingress.append({"ports": [{"protocol": "TCP", "port": spec.get("metricsPort", 9090)}]})
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": _metadata(job, network_policy_name(name), "network-policy"),
            "spec": {"podSelector": gang, "policyTypes": ["Ingress"], "ingress": ingress}}


def render_podgroup(job: Mapping[str, Any]) -> dict | None:
    gang = job["spec"].get("gangScheduling")
    if not gang:
        return None
    scheduler = gang["scheduler"]
    # The whole gang or nothing: torchrun cannot start with part of it (validate refuses another minAvailable).
    nodes = job["spec"].get("nodes", 1)
    if scheduler == "kubernetes":
        # A standalone PodGroup (no Workload): the pods name it in spec.schedulingGroup.
        spec: dict[str, Any] = {"schedulingPolicy": {"gang": {"minCount": nodes}}}
        if job["spec"].get("priorityClassName"):
            spec["priorityClassName"] = job["spec"]["priorityClassName"]
        return {"apiVersion": PODGROUP_API[scheduler], "kind": "PodGroup",
                "metadata": _metadata(job, podgroup_name(job["metadata"]["name"]), "podgroup"), "spec": spec}
    spec = {"minMember": nodes}
    if scheduler == "volcano" and job["spec"].get("priorityClassName"):
        spec["priorityClassName"] = job["spec"]["priorityClassName"]
    if scheduler == "scheduler-plugins" and gang.get("scheduleTimeoutSeconds"):
        spec["scheduleTimeoutSeconds"] = gang["scheduleTimeoutSeconds"]
    return {"apiVersion": PODGROUP_API[scheduler], "kind": "PodGroup",
            "metadata": _metadata(job, podgroup_name(job["metadata"]["name"]), "podgroup"), "spec": spec}


def _env(job: Mapping[str, Any], attempt: int) -> list[dict]:
    meta, spec = job["metadata"], job["spec"]
    gpus = spec.get("gpusPerNode", 1)
    env = [
        {"name": "PET_NNODES", "value": str(spec.get("nodes", 1))},
        {"name": "PET_NPROC_PER_NODE", "value": str(max(gpus, 1))},
        {"name": "PET_NODE_RANK",
         "valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{INDEX_ANNOTATION}']"}}},
        {"name": "PET_MASTER_ADDR", "value": master_address(meta["name"], meta["namespace"], attempt)},
        {"name": "PET_MASTER_PORT", "value": str(spec.get("masterPort", 29500))},
        {"name": "DDETR_JOB_NAME", "value": meta["name"]},
        {"name": "DDETR_METRICS_PORT", "value": str(spec.get("metricsPort", 9090))},
        {"name": "DDETR_MASTER_WAIT_SECONDS", "value": str(MASTER_WAIT_SECONDS)},
        {"name": "DDETR_WAIT_FOR_MASTER", "value": WAIT_FOR_MASTER},
        {"name": "NCCL_DEBUG", "value": "WARN"},
        {"name": "NCCL_SOCKET_IFNAME", "value": "^lo,docker"},
        {"name": "TORCH_NCCL_ASYNC_ERROR_HANDLING", "value": "1"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    artifacts = spec.get("artifacts") or {}
    if artifacts.get("endpoint"):
        env += [{"name": "AWS_ENDPOINT_URL", "value": artifacts["endpoint"]},
                {"name": "S3_ENDPOINT_URL", "value": artifacts["endpoint"]}]
    if artifacts.get("region"):
        env.append({"name": "AWS_DEFAULT_REGION", "value": artifacts["region"]})
    secret = artifacts.get("credentialsSecret")
    if secret:
        for var, key_field in (("AWS_ACCESS_KEY_ID", "accessKeyIdKey"), ("AWS_SECRET_ACCESS_KEY", "secretAccessKeyKey")):
            env.append({"name": var, "valueFrom": {"secretKeyRef": {
                "name": secret["name"], "key": secret.get(key_field, var)}}})
    key_ref = spec.get("encryptionKeySecret")
    if key_ref:
        env.append({"name": KEY_ENV, "valueFrom": {"secretKeyRef": {
            "name": key_ref["name"], "key": key_ref.get("key", KEY_ENV)}}})
    return env + list(spec.get("env") or [])


def _command(spec: Mapping[str, Any]) -> list[str]:
    task = spec.get("task", "train")
    with_key = bool(spec.get("encryptionKeySecret"))
    if task != "train":
        # Kubernetes expands $(VAR) in the command from the container's environment.
        return ["deformable-detr", task, "-e", SPEC_FILE] + (["-k", f"$({KEY_ENV})"] if with_key else [])
    # Through the CLI's own launcher (not torchrun directly): it starts torchrun with these settings and
    # exits with the workers' own code (143 after SIGTERM, 200 when a peer was lost, 2 for a bad spec)
    # instead of torchrun's blanket 1, so the restart policy can tell retryable from permanent.
    launch = ('export MASTER_ADDR="$PET_MASTER_ADDR" MASTER_PORT="$PET_MASTER_PORT" NODE_RANK="$PET_NODE_RANK"\n'
              f'exec deformable-detr train -e {SPEC_FILE} --num_nodes "$PET_NNODES" --gpus "$PET_NPROC_PER_NODE"'
              + (f' -k "${KEY_ENV}"' if with_key else ""))
    wait = 'if [ "$PET_NODE_RANK" != "0" ]; then python3 -c "$DDETR_WAIT_FOR_MASTER" || exit $?; fi'
    return ["/bin/sh", "-c", f"{wait}\n{launch}"]


def _resources(spec: Mapping[str, Any]) -> dict:
    resources: dict[str, Any] = {k: list(v or []) if k == "claims" else dict(v or {})
                                 for k, v in (spec.get("resources") or {}).items()}
    gpus = spec.get("gpusPerNode", 1)
    if gpus:
        resources.setdefault("limits", {})["nvidia.com/gpu"] = gpus
    return resources


def _volumes(job: Mapping[str, Any]) -> tuple[list[dict], list[dict]]:
    spec = job["spec"]
    volumes = [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.get("shmSize", "8Gi")}},
               {"name": "spec", "configMap": {"name": configmap_name(job["metadata"]["name"])}}]
    mounts = [{"name": "dshm", "mountPath": "/dev/shm"}, {"name": "spec", "mountPath": SPEC_DIR, "readOnly": True}]
    for volume in spec.get("volumes") or []:
        source = ({"persistentVolumeClaim": {"claimName": volume["persistentVolumeClaim"]["claimName"],
                                             "readOnly": volume.get("readOnly", True)}}
                  if "persistentVolumeClaim" in volume else {"hostPath": dict(volume["hostPath"])})
        volumes.append({"name": volume["name"], **source})
        mount = {"name": volume["name"], "mountPath": volume["mountPath"], "readOnly": volume.get("readOnly", True)}
        if volume.get("subPath"):
            mount["subPath"] = volume["subPath"]
        mounts.append(mount)
    return volumes, mounts


def render_worker_job(job: Mapping[str, Any], attempt: int, suspend: bool = False) -> dict:
    """The gang of one attempt: an Indexed Job with one pod per node."""
    meta, spec = job["metadata"], job["spec"]
    nodes = spec.get("nodes", 1)
    name = worker_job_name(meta["name"], attempt)
    labels = {LABEL_ATTEMPT: str(attempt)}
    queue = (meta.get("labels") or {}).get(KUEUE_QUEUE_LABEL)
    job_labels = {**labels, KUEUE_QUEUE_LABEL: queue} if queue else labels
    pod_labels = {LABEL_JOB: meta["name"], LABEL_ROLE: "worker", **labels}
    annotations = dict(NO_SIDECAR_ANNOTATIONS)
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never", "subdomain": service_name(meta["name"]),
        # Trainers talk to S3 and to each other, never to the Kubernetes API: no token in the pod.
        "automountServiceAccountToken": False,
        "securityContext": {**copy.deepcopy(DEFAULT_POD_SECURITY_CONTEXT), **dict(spec.get("podSecurityContext") or {})},
        "terminationGracePeriodSeconds": spec.get("terminationGracePeriodSeconds",
                                                  DEFAULT_TERMINATION_GRACE_SECONDS)}
    gang = spec.get("gangScheduling")
    if gang:
        if gang["scheduler"] == "kubernetes":
            pod_spec["schedulingGroup"] = {"podGroupName": podgroup_name(meta["name"])}  # default scheduler
        elif gang["scheduler"] == "volcano":
            annotations["scheduling.k8s.io/group-name"] = podgroup_name(meta["name"])
            pod_spec["schedulerName"] = DEFAULT_GANG_SCHEDULER_NAME["volcano"]
        else:
            pod_labels["scheduling.x-k8s.io/pod-group"] = podgroup_name(meta["name"])
            pod_spec["schedulerName"] = DEFAULT_GANG_SCHEDULER_NAME["scheduler-plugins"]
    for field in ("schedulerName", "priorityClassName", "serviceAccountName", "nodeSelector", "tolerations",
                  "affinity", "imagePullSecrets"):
        if spec.get(field):
            pod_spec[field] = spec[field]
    volumes, mounts = _volumes(job)
    ports = [{"name": "torchrun", "containerPort": spec.get("masterPort", 29500), "protocol": "TCP"}]
    if spec.get("metricsPort", 9090):
        ports.append({"name": "metrics", "containerPort": spec.get("metricsPort", 9090), "protocol": "TCP"})
    container: dict[str, Any] = {
        "name": CONTAINER, "image": spec["image"], "command": _command(spec), "env": _env(job, attempt),
        "ports": ports, "volumeMounts": mounts, "resources": _resources(spec),
        # On failure the last log lines become the termination message the operator reports.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {**copy.deepcopy(DEFAULT_CONTAINER_SECURITY_CONTEXT),
                            **dict(spec.get("securityContext") or {})},
    }
    if spec.get("imagePullPolicy"):
        container["imagePullPolicy"] = spec["imagePullPolicy"]
    pod_spec.update(containers=[container], volumes=volumes)
    template_meta = {"labels": pod_labels, "annotations": annotations}
    _apply_pod_template(spec.get("podTemplate") or {}, template_meta, pod_spec)
    return {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": _metadata(job, name, "workers", job_labels),
        "spec": {
            "completionMode": "Indexed", "completions": nodes, "parallelism": nodes,
            "backoffLimit": 0, "suspend": bool(suspend or queue),
            # A replacement pod only once the old one is fully gone (after a suspend/resume): never
            # two ranks with one index alive at once.
            "podReplacementPolicy": "Failed",
            "template": {"metadata": template_meta, "spec": pod_spec},
        },
    }


# podTemplate.spec fields that the operator owns: overriding them would break the gang.
OWNED_POD_FIELDS = ("containers", "restartPolicy", "subdomain", "volumes")


def _apply_pod_template(template: Mapping[str, Any], meta: dict, pod_spec: dict) -> None:
    """spec.podTemplate: what the curated fields miss, merged over the rendered pod.

    metadata.labels/annotations are added (the operator's own labels win: it finds its pods by
    them); spec fields replace the rendered ones (hostNetwork, initContainers, dnsPolicy, ...),
    except the operator-owned containers, restartPolicy, subdomain and volumes (spec.volumes, under the
    hostPath allow-list), which validate refuses.
    """
    template_meta = template.get("metadata") or {}
    meta["labels"] = {**dict(template_meta.get("labels") or {}), **meta["labels"]}
    meta["annotations"] = {**dict(template_meta.get("annotations") or {}), **meta["annotations"]}
    for key, value in (template.get("spec") or {}).items():
        if key not in OWNED_POD_FIELDS:
            pod_spec[key] = copy.deepcopy(value)
    if pod_spec.get("hostNetwork"):
        # Pod hostnames still resolve through the headless Service; DNS must stay the cluster's.
        pod_spec.setdefault("dnsPolicy", "ClusterFirstWithHostNet")
