"""Rendered manifests: valid Kubernetes objects, and the pod contract the trainer relies on."""
from __future__ import annotations

import os
import socket
import stat
import subprocess
import time
import sys

import kubernetes_validate
import pytest
import yaml

from ddetr_operator import render
from ddetr_operator.api import resolve
from ddetr_operator.validate import Policy, validate_job
from deformable_detr.config.loader import spec_from_dict

K8S_VERSION = "1.30"

VARIANTS = {
    "train-2-nodes": {},
    "evaluate": {"task": "evaluate", "nodes": 1, "gpusPerNode": 1},
    "cpu-export": {"task": "export", "nodes": 1, "gpusPerNode": 0, "metricsPort": 0},
    "volumes-and-placement": {
        "volumes": [{"name": "coco", "mountPath": "/data", "persistentVolumeClaim": {"claimName": "coco"}},
                    {"name": "kitti", "mountPath": "/kitti", "readOnly": False, "subPath": "v1",
                     "hostPath": {"path": "/mnt/kitti", "type": "Directory"}}],
        "nodeSelector": {"gpu": "h100"}, "tolerations": [{"key": "gpu", "operator": "Exists"}],
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}]}}},
        "resources": {"requests": {"cpu": "8", "memory": "64Gi"}}, "priorityClassName": "high",
        "schedulerName": "custom", "serviceAccountName": "trainer", "imagePullPolicy": "Always",
        "imagePullSecrets": [{"name": "registry"}], "env": [{"name": "EXTRA", "value": "1"}], "shmSize": "16Gi",
        "terminationGracePeriodSeconds": 600,
        "encryptionKeySecret": {"name": "ckpt-key"}},
    "volcano-gang": {"gangScheduling": {"scheduler": "volcano", "minAvailable": 2}, "priorityClassName": "high"},
    "plugins-gang": {"gangScheduling": {"scheduler": "scheduler-plugins", "scheduleTimeoutSeconds": 60}},
    "kubernetes-gang": {"gangScheduling": {"scheduler": "kubernetes"}, "priorityClassName": "high"},
}


def all_manifests(job: dict) -> list[dict]:
    experiment = validate_job(job["metadata"]["name"], job["spec"], Policy(allowed_host_paths=("/mnt",)))
    out = [render.render_service(resolve(job)), render.render_configmap(resolve(job), experiment),
           render.render_worker_job(resolve(job), 0), render.render_worker_job(resolve(job), 3, suspend=True)]
    podgroup = render.render_podgroup(resolve(job))
    return out + ([podgroup] if podgroup else [])


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_rendered_manifest_is_a_valid_kubernetes_object(make_job, variant):
    for manifest in all_manifests(make_job(**VARIANTS[variant])):
        if manifest["kind"] == "PodGroup":
            # Volcano's and scheduler-plugins' are CRDs, Kubernetes' own a beta API: none is in
            # kubernetes-validate's schemas, so check the shape (the e2e tests create them for real).
            assert (manifest["spec"].get("minMember") or manifest["spec"]["schedulingPolicy"]["gang"]["minCount"]) >= 1
            continue
        template = manifest.get("spec", {}).get("template", {}).get("spec", {})
        if template.pop("schedulingGroup", None) is not None:
            # A 1.37 beta field, newer than kubernetes-validate's schemas (the e2e tests create it for real).
            assert variant == "kubernetes-gang"
        kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)


def container(manifest: dict) -> dict:
    (only,) = manifest["spec"]["template"]["spec"]["containers"]
    return only


def env_of(manifest: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(manifest)["env"]}


def test_worker_job_is_an_indexed_gang_with_torchrun_settings(make_job):
    manifest = render.render_worker_job(resolve(make_job()), 1)
    spec = manifest["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"], spec["backoffLimit"]) == ("Indexed", 2, 2, 0)
    assert spec["template"]["spec"]["subdomain"] == "demo-workers"
    assert spec["template"]["spec"]["restartPolicy"] == "Never"
    env = env_of(manifest)
    assert env["PET_NNODES"] == "2" and env["PET_NPROC_PER_NODE"] == "4" and env["PET_MASTER_PORT"] == "29500"
    assert env["PET_NODE_RANK"] == {"fieldRef": {
        "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}
    assert env["PET_MASTER_ADDR"] == "demo-a1-0.demo-workers.ml.svc"
    assert env["DDETR_JOB_NAME"] == "demo" and env["DDETR_METRICS_PORT"] == "9090"
    assert env["AWS_ENDPOINT_URL"] == "http://s3.local:9000"
    assert env["AWS_ACCESS_KEY_ID"] == {"secretKeyRef": {"name": "s3-creds", "key": "AWS_ACCESS_KEY_ID"}}
    assert env["AWS_SECRET_ACCESS_KEY"] == {"secretKeyRef": {"name": "s3-creds", "key": "AWS_SECRET_ACCESS_KEY"}}
    assert "NCCL_DEBUG" in env
    annotations = spec["template"]["metadata"]["annotations"]
    assert annotations["sidecar.istio.io/inject"] == "false"
    assert container(manifest)["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert container(manifest)["terminationMessagePolicy"] == "FallbackToLogsOnError"
    volumes = {v["name"]: v for v in spec["template"]["spec"]["volumes"]}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"}
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container(manifest)["volumeMounts"]
    owner = manifest["metadata"]["ownerReferences"][0]
    assert owner["uid"] == "0000-1111" and owner["controller"] is True


def test_pods_get_time_to_checkpoint_and_upload_after_sigterm(make_job):
    """Kubernetes' default 30 s grace is too short for rank 0 to write and upload a checkpoint."""
    default = render.render_worker_job(resolve(make_job()), 0)["spec"]["template"]["spec"]
    assert default["terminationGracePeriodSeconds"] == 180
    configured = render.render_worker_job(resolve(make_job(terminationGracePeriodSeconds=900)), 0)
    assert configured["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 900


def test_headless_service_publishes_pods_before_they_are_ready(make_job):
    service = render.render_service(resolve(make_job()))
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"] == {"ddetr.dev/job-name": "demo", "ddetr.dev/role": "worker"}


def test_configmap_holds_the_effective_spec(make_job):
    job = make_job()
    configmap = render.render_configmap(resolve(job), validate_job("demo", job["spec"]))
    spec = spec_from_dict(yaml.safe_load(configmap["data"]["spec.yaml"]))
    assert spec.results_dir == "s3://bucket/runs/demo"
    assert spec.train.num_epochs == 3 and spec.dataset.num_classes == 4


def test_single_pod_tasks_run_the_cli(make_job):
    manifest = render.render_worker_job(resolve(make_job(task="inference", nodes=1, gpusPerNode=0)), 0)
    assert container(manifest)["command"] == ["deformable-detr", "inference", "-e", "/etc/ddetr/spec.yaml"]
    assert "nvidia.com/gpu" not in container(manifest)["resources"].get("limits", {})


def test_encryption_key_comes_from_a_secret(make_job, fake_torchrun):
    key_ref = {"name": "ckpt-key", "key": "key"}
    train = render.render_worker_job(resolve(make_job(encryptionKeySecret=key_ref)), 0)
    assert env_of(train)["DDETR_ENCRYPTION_KEY"] == {"secretKeyRef": {"name": "ckpt-key", "key": "key"}}
    done = run_worker_command(train, fake_torchrun, PET_NODE_RANK="0", DDETR_ENCRYPTION_KEY="s3cr3t words")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-2:] == ["-k", "s3cr3t words"]  # one argument
    evaluate = render.render_worker_job(resolve(make_job(task="evaluate", nodes=1, encryptionKeySecret=key_ref)), 0)
    assert container(evaluate)["command"][-2:] == ["-k", "$(DDETR_ENCRYPTION_KEY)"]
    assert "secret" not in yaml.safe_dump(render.render_configmap(resolve(make_job()), validate_job("demo", make_job()["spec"])))


def test_gang_scheduling_wires_pods_to_the_podgroup(make_job):
    volcano = render.render_worker_job(resolve(make_job(gangScheduling={"scheduler": "volcano"})), 0)["spec"]["template"]
    assert volcano["metadata"]["annotations"]["scheduling.k8s.io/group-name"] == "demo"
    assert volcano["spec"]["schedulerName"] == "volcano"
    plugins = render.render_worker_job(resolve(make_job(gangScheduling={"scheduler": "scheduler-plugins"})), 0)["spec"]["template"]
    assert plugins["metadata"]["labels"]["scheduling.x-k8s.io/pod-group"] == "demo"
    podgroup = render.render_podgroup(resolve(make_job(gangScheduling={"scheduler": "scheduler-plugins"})))
    assert podgroup["apiVersion"] == "scheduling.x-k8s.io/v1alpha1" and podgroup["spec"]["minMember"] == 2


def test_kubernetes_gang_scheduling_uses_a_standalone_podgroup_and_the_default_scheduler(make_job):
    job = make_job(nodes=3, gangScheduling={"scheduler": "kubernetes"}, priorityClassName="high")
    template = render.render_worker_job(resolve(job), 0)["spec"]["template"]
    assert template["spec"]["schedulingGroup"] == {"podGroupName": "demo"}
    assert "schedulerName" not in template["spec"]  # kube-scheduler's GangScheduling plugin
    assert not any(key.startswith("scheduling.") for key in template["metadata"]["labels"])
    podgroup = render.render_podgroup(resolve(job))
    assert podgroup["apiVersion"] == "scheduling.k8s.io/v1beta1"
    assert podgroup["spec"] == {"schedulingPolicy": {"gang": {"minCount": 3}}, "priorityClassName": "high"}
    assert podgroup["metadata"]["ownerReferences"][0]["kind"] == "DeformableDetrJob"


@pytest.fixture
def fake_torchrun(tmp_path):
    """A `deformable-detr` on PATH that prints its rendezvous settings and arguments, one a line."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "deformable-detr"
    script.write_text("#!/bin/sh\nprintf '%s\\n' \"MASTER_ADDR=$MASTER_ADDR\" \"MASTER_PORT=$MASTER_PORT\" "
                      "\"NODE_RANK=$NODE_RANK\" deformable-detr \"$@\"\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    # `python3` in the pod command must be this interpreter.
    (bin_dir / "python3").symlink_to(sys.executable)
    return bin_dir


def run_worker_command(manifest: dict, bin_dir, **overrides: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in env_of(manifest).items() if isinstance(v, str)}
    env.update({"PET_NODE_RANK": "1", "PATH": f"{bin_dir}:{os.environ['PATH']}", **overrides})
    return subprocess.run(container(manifest)["command"], env=env, capture_output=True, text=True, timeout=60)


def test_worker_waits_for_the_master_then_launches_the_gang(make_job, fake_torchrun):
    manifest = render.render_worker_job(resolve(make_job()), 0)
    with socket.socket() as master:  # pod 0's torchrun port, listening
        master.bind(("127.0.0.1", 0))
        master.listen()
        port = str(master.getsockname()[1])
        done = run_worker_command(manifest, fake_torchrun, PET_MASTER_ADDR="localhost", PET_MASTER_PORT=port)
    assert done.returncode == 0, done.stderr
    # The CLI's launcher turns these into torchrun's --nnodes/--node_rank/--master_addr/--master_port.
    assert done.stdout.split() == [
        "MASTER_ADDR=localhost", f"MASTER_PORT={port}", "NODE_RANK=1",
        "deformable-detr", "train", "-e", "/etc/ddetr/spec.yaml", "--num_nodes", "2", "--gpus", "4"]


def test_worker_gives_up_on_an_unresolvable_master_with_a_retryable_code(make_job, fake_torchrun):
    manifest = render.render_worker_job(resolve(make_job()), 0)
    done = run_worker_command(manifest, fake_torchrun, PET_MASTER_ADDR="pod-0.does-not-exist.invalid",
                              DDETR_MASTER_WAIT_SECONDS="0")
    assert done.returncode == render.MASTER_UNRESOLVABLE_EXIT >= 128
    assert "did not accept connections" in done.stderr and "deformable-detr" not in done.stdout


def test_worker_waits_for_the_master_port_not_just_its_name(make_job, fake_torchrun):
    """The name resolves (localhost) but nothing listens yet: the worker waits, bounded, then gives up."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = str(closed.getsockname()[1])  # bound, not listening: connections are refused
        manifest = render.render_worker_job(resolve(make_job()), 0)
        started = time.monotonic()
        done = run_worker_command(manifest, fake_torchrun, PET_MASTER_ADDR="localhost", PET_MASTER_PORT=port,
                                  DDETR_MASTER_WAIT_SECONDS="3")
    assert done.returncode == render.MASTER_UNRESOLVABLE_EXIT
    assert time.monotonic() - started >= 3 and "deformable-detr" not in done.stdout
    assert f"localhost:{port} did not accept connections" in done.stderr


def meets_restricted_pod_security(pod_spec: dict) -> list[str]:
    """The `restricted` Pod Security Standard's checks that a rendered pod can fail (kubernetes.io/docs)."""
    problems = []
    pod_context = pod_spec.get("securityContext") or {}
    for volume in pod_spec.get("volumes") or []:
        kinds = set(volume) - {"name"}
        if not kinds <= {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                         "projected", "secret"}:
            problems.append(f"volume {volume['name']}: {kinds}")
    for container in pod_spec["containers"]:
        context = container.get("securityContext") or {}
        if context.get("allowPrivilegeEscalation") is not False:
            problems.append("allowPrivilegeEscalation must be false")
        if "ALL" not in ((context.get("capabilities") or {}).get("drop") or []):
            problems.append("capabilities must drop ALL")
        if not context.get("runAsNonRoot", pod_context.get("runAsNonRoot")):
            problems.append("runAsNonRoot must be true")
        if context.get("runAsUser", pod_context.get("runAsUser")) == 0:
            problems.append("runAsUser must not be 0")
        seccomp = (context.get("seccompProfile") or pod_context.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            problems.append("seccompProfile must be RuntimeDefault or Localhost")
        if context.get("privileged"):
            problems.append("privileged")
    return problems


@pytest.mark.parametrize("variant", ["train-2-nodes", "evaluate", "volcano-gang", "kubernetes-gang"])
def test_trainer_pods_meet_the_restricted_pod_security_level_by_default(make_job, variant):
    pod_spec = render.render_worker_job(resolve(make_job(**VARIANTS[variant])), 0)["spec"]["template"]["spec"]
    assert meets_restricted_pod_security(pod_spec) == []
    assert pod_spec["securityContext"] == {
        "runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001,
        "fsGroupChangePolicy": "OnRootMismatch", "seccompProfile": {"type": "RuntimeDefault"}}
    assert container({"spec": {"template": {"spec": pod_spec}}})["securityContext"] == {
        "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
    assert pod_spec["automountServiceAccountToken"] is False  # trainers never call the Kubernetes API


def test_the_security_context_defaults_can_be_overridden_key_by_key(make_job):
    job = make_job(podSecurityContext={"runAsUser": 2000, "supplementalGroups": [3000]},
                   securityContext={"readOnlyRootFilesystem": True})
    pod_spec = render.render_worker_job(resolve(job), 0)["spec"]["template"]["spec"]
    assert pod_spec["securityContext"]["runAsUser"] == 2000 and pod_spec["securityContext"]["runAsGroup"] == 10001
    assert pod_spec["securityContext"]["supplementalGroups"] == [3000]
    context = pod_spec["containers"][0]["securityContext"]
    assert context["readOnlyRootFilesystem"] is True and context["capabilities"] == {"drop": ["ALL"]}
    kubernetes_validate.validate(render.render_worker_job(resolve(job), 0), K8S_VERSION, strict=True)
    assert meets_restricted_pod_security(pod_spec) == []
