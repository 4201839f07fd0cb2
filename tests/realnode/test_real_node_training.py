"""Real training in containers: the end-to-end suite's tiny 2-node CPU DeformableDetrJob runs
with the trainer image on the real node, in a namespace that enforces Pod Security's
`restricted` level (so the dataset comes through a PersistentVolumeClaim, not a hostPath).
Both rank pods are containerd containers, the ranks meet through the headless Service's DNS
names (CoreDNS), read the dataset with a DataLoader worker process (shared memory from the
memory emptyDir), and write checkpoints to S3 (moto on the node's bridge address).

One gang run serves several checks: after its first checkpoint, rank 1's container is
SIGKILLed (a counted restart that resumes from the newest checkpoint); then `kubectl drain`
evicts the resumed gang (a disruption, restarted without counting); the job still reaches
Succeeded with its mAP. A second job, over its memory limit, is OOM-killed by the kernel and
fails, and `kubectl logs` of its failed rank still works; a third asks for a GPU, which the
node's fake device plugin gives, and trains on the CPU. The operator runs here as a host
process authenticated as the chart's ServiceAccount, as in tests/e2e."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import e2e_manifests as m  # noqa: E402
from kube_target import CHART, LocalTarget, _free_port  # noqa: E402
from toolbox import find_tool  # noqa: E402

from ddetr_localcluster import realnode_net  # noqa: E402
from ddetr_localcluster.realnode import FAKE_GPUS, NODE_LABEL  # noqa: E402
from ddetr_localcluster.realnode_image import NAMESPACE as CONTAINERD_NAMESPACE  # noqa: E402
from ddetr_operator.render import CONTAINER  # noqa: E402

pytestmark = pytest.mark.real_node
OPERATOR_SA = "ddetr-operator"
NAMESPACE = "ddetr-rn-train"
DATA_CLAIM = "train-data"
JOB_TIMEOUT_S = 900
LABEL_JOB, LABEL_ATTEMPT = "ddetr.dev/job-name", "ddetr.dev/attempt"
INDEX = "batch.kubernetes.io/job-completion-index"
IMAGE_UID = 10001  # the trainer image's USER (Dockerfile.trainer)
EPOCHS = 6


class RealNodeTarget(LocalTarget):
    """LocalTarget with its pods on the real node, S3 on the node's bridge address and the
    dataset from a claim bound to a hostPath PersistentVolume (a hostPath in the pod itself is
    refused under the restricted level)."""

    RUNNER_SELECTOR = {NODE_LABEL: "true"}

    def runner_address(self) -> str:
        return realnode_net.NODE_IP

    def training_job(self, name: str, num_epochs: int, nodes: int = 2) -> dict:
        job = super().training_job(name, num_epochs, nodes)
        job["spec"]["image"] = self.control_plane.images["trainer"]
        (volume,) = job["spec"]["volumes"]
        del volume["hostPath"]
        volume["persistentVolumeClaim"] = {"claimName": DATA_CLAIM}
        return job

    def pods(self, name: str, attempt: int | None = None, index: int | None = None) -> list[dict]:
        selector = f"{LABEL_JOB}={name}" + (f",{LABEL_ATTEMPT}={attempt}" if attempt is not None else "")
        pods = json.loads(self.kubectl("get", "pods", "-l", selector, "-o", "json"))["items"]
        return [p for p in pods if index is None or p["metadata"]["annotations"].get(INDEX) == str(index)]

    def status(self, name: str) -> dict:
        return self.get("deformabledetrjobs", name).get("status") or {}

    def logs(self, pod: dict) -> str:
        return self.kubectl("logs", pod["metadata"]["name"], "-c", CONTAINER)


def data_volume(data: Path) -> list[dict]:
    """A hostPath PersistentVolume pre-bound to the namespace's claim (no provisioner here)."""
    pv_name = f"{NAMESPACE}-data"
    return [{"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": pv_name},
             "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadOnlyMany"], "storageClassName": "",
                      "persistentVolumeReclaimPolicy": "Retain", "hostPath": {"path": str(data), "type": "Directory"},
                      "claimRef": {"namespace": NAMESPACE, "name": DATA_CLAIM}}},
            {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": DATA_CLAIM, "namespace": NAMESPACE},
             "spec": {"accessModes": ["ReadOnlyMany"], "storageClassName": "", "volumeName": pv_name,
                      "resources": {"requests": {"storage": "1Gi"}}}}]


@pytest.fixture(scope="module")
def gang(real_cluster, tmp_path_factory):
    """The namespace (restricted), the chart's RBAC, the dataset claim, S3 and the operator."""
    helm = find_tool("helm")
    if helm is None:
        pytest.skip("no helm binary (scripts/test-deps.d/helm.sh installs one)")
    from moto.server import ThreadedMotoServer
    real_cluster.create_namespace(NAMESPACE, pod_security="restricted")
    target = RealNodeTarget(NAMESPACE, real_cluster, helm)
    # The chart's RBAC and ServiceAccounts; its Deployment's pod is kept off every node, since the
    # operator runs here from the source (test_real_node_operator.py runs the chart's in-cluster).
    target.helm("upgrade", "--install", "ddetr", str(CHART), "--namespace", NAMESPACE,
                "--set", f"fullnameOverride={OPERATOR_SA}", "--set", "operator.reconcileIntervalSeconds=3",
                "--set", "watch.namespaces={" + NAMESPACE + "}",
                "--set-string", "nodeSelector.ddetr\\.dev/operator-runs-on-the-host=true")
    data = tmp_path_factory.mktemp("real-node-data")
    subprocess.run([sys.executable, str(m.DATASET_SCRIPT), str(data)], check=True)
    data.chmod(0o755)  # the trainer runs as the image's user: the volume's root must be readable
    target.data_dir = str(data)
    target.apply(data_volume(data))
    target.wait_until("the dataset claim Bound", lambda: target.get("pvc", DATA_CLAIM)["status"].get(
        "phase") == "Bound", 60, every=1)
    port = _free_port()
    server = ThreadedMotoServer(ip_address=realnode_net.NODE_IP, port=port, verbose=False)
    server.start()
    target.s3_url = f"http://{realnode_net.NODE_IP}:{port}"
    try:
        target.apply([m.credentials_secret(NAMESPACE)])
        assert "bucket ready" in target.run_python("make-bucket", m.MAKE_BUCKET)
        target.start_operator(OPERATOR_SA, NAMESPACE, [NAMESPACE])
        yield target
    finally:
        target.stop_operators()
        server.stop()


def test_restricted_namespace_refuses_a_host_path_pod(gang):
    """The namespace really enforces `restricted`: the same pod with a hostPath volume is refused,
    so the gang below was admitted on its own merits."""
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "host-path"},
           "spec": {"containers": [{"name": "main", "image": gang.control_plane.images["trainer"]}],
                    "volumes": [{"name": "data", "hostPath": {"path": gang.data_dir}}]}}
    refused = gang.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(pod), check=False)
    assert refused.returncode != 0
    assert 'violates PodSecurity "restricted:latest"' in refused.stderr and "hostPath" in refused.stderr, \
        refused.stderr


def _running_checkpoint(target: RealNodeTarget, name: str, attempt: int) -> str | None:
    status = target.status(name)
    if status.get("phase") in ("Failed", "Succeeded"):
        raise AssertionError(f"{name} ended ({status['phase']}) early: {json.dumps(status, indent=1)[-3000:]}")
    if status.get("phase") != "Running" or int(status.get("attempt", 0)) != attempt:
        return None
    return (status.get("progress") or {}).get("lastCheckpoint")


def _resumed_log(target: RealNodeTarget, name: str, attempt: int) -> str | None:
    """Rank 0's log of the attempt (kubectl logs) once it says it resumed."""
    _running_checkpoint(target, name, attempt)  # raises if the job ended
    pods = [p for p in target.pods(name, attempt=attempt, index=0) if p["status"].get("phase") == "Running"]
    if not pods:
        return None
    log = target.kubectl("logs", pods[0]["metadata"]["name"], "-c", CONTAINER, check=False)
    return log.stdout if log.returncode == 0 and "resuming from" in log.stdout else None


@pytest.fixture(scope="module")
def resilient_run(gang):
    """The gang's run: SIGKILL of rank 1's container after the first checkpoint, then a drain
    once the new attempt has resumed, then Succeeded. What each step saw is kept for the tests."""
    target, name = gang, "rn-train"
    node = target.control_plane.node
    job = target.training_job(name, num_epochs=EPOCHS)
    job["spec"]["experiment"]["dataset"]["workers"] = 1  # a loader process: its batches pass through /dev/shm
    target.apply([job])
    seen: dict = {}
    seen["checkpoint_at_kill"] = target.wait_until(
        "attempt 0's first checkpoint", lambda: _running_checkpoint(target, name, 0), JOB_TIMEOUT_S, every=2)
    (victim,) = target.pods(name, attempt=0, index=1)
    seen["ids"] = target.kubectl("exec", victim["metadata"]["name"], "-c", CONTAINER, "--",
                                 "python3", "-c", "import os; print(os.getuid(), os.getgid())").split()
    (container,) = [c for c in victim["status"]["containerStatuses"] if c["name"] == CONTAINER]
    subprocess.run([*node.ctr, "-n", CONTAINERD_NAMESPACE, "tasks", "kill", "-s", "SIGKILL",
                    container["containerID"].removeprefix("containerd://")], check=True, capture_output=True)
    seen["victim"] = victim["metadata"]["name"]
    seen["resumed_log"] = target.wait_until("attempt 1 resumed", lambda: _resumed_log(target, name, 1),
                                            JOB_TIMEOUT_S, every=2)
    seen["after_kill"] = target.status(name)
    try:
        drained = target.kubectl("drain", node.name, "--pod-selector", f"{LABEL_JOB}={name}",
                                 "--delete-emptydir-data", "--ignore-daemonsets", "--timeout=300s",
                                 namespaced=False, timeout=330)
        seen["drained"] = drained
        seen["after_drain"] = target.wait_until(
            "the operator to see the eviction", lambda: (s := target.status(name)).get("disruptions") and s, 300,
            every=1)
    finally:
        target.kubectl("uncordon", node.name, namespaced=False)

    def finished():
        status = target.status(name)
        return status if status.get("phase") in ("Succeeded", "Failed") else None
    seen["final"] = target.wait_until(f"{name} to finish", finished, JOB_TIMEOUT_S)
    seen["pods"] = target.pods(name)
    seen["keys"] = json.loads(target.run_python("list", m.list_objects_code(f"{name}/train/")).strip().splitlines()[-1])
    return seen


def _ended(pods: list[dict]) -> dict:
    return {p["metadata"]["name"]: [c.get("state", {}).get("terminated", {}).get("message", "")[-1500:]
                                    for c in p["status"].get("containerStatuses", [])] for p in pods}


def test_gang_in_restricted_namespace_trains_in_containers_to_succeeded_with_map(gang, resilient_run):
    """Admitted under `restricted`, run as the image's user, a loader worker per rank; Succeeded with mAP."""
    status = resilient_run["final"]
    assert status["phase"] == "Succeeded", (json.dumps(status.get("conditions"), indent=1), _ended(resilient_run["pods"]))
    assert resilient_run["ids"] == [str(IMAGE_UID), str(IMAGE_UID)]
    final_attempt = int(status["attempt"])
    pods = [p for p in resilient_run["pods"] if p["metadata"]["labels"][LABEL_ATTEMPT] == str(final_attempt)]
    assert len(pods) == 2
    for pod in pods:
        assert pod["spec"]["nodeName"] == gang.control_plane.node.name
        assert pod["status"]["containerStatuses"][0]["containerID"].startswith("containerd://")
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    progress = status["progress"]
    assert progress["numEpochs"] == EPOCHS and progress["epoch"] >= EPOCHS - 1
    assert isinstance(progress["lastMap"], (int, float))
    assert progress["lastCheckpoint"].removeprefix(f"s3://{m.BUCKET}/") in resilient_run["keys"]
    assert "rn-train/train/status.json" in resilient_run["keys"]
    # The image carries TensorBoard's writer: the event files went up with the results.
    events = [k for k in resilient_run["keys"] if k.startswith("rn-train/train/tensorboard/events.out.tfevents.")]
    assert events, resilient_run["keys"]


def test_sigkilled_rank_container_restarts_the_gang_once_from_the_newest_checkpoint(resilient_run):
    """SIGKILL of rank 1's container: exit 137 on rank 1, one counted restart, and the new
    attempt's rank 0 resumes from a checkpoint at least as new as the one before the kill."""
    after = resilient_run["after_kill"]
    failure = after["lastFailure"]
    assert (failure["attempt"], failure["rank"], failure["exitCode"]) == (0, 1, 137), failure
    assert failure["pod"] == resilient_run["victim"]
    assert after["restarts"] == 1 and int(after["attempt"]) == 1
    resumed = [line for line in resilient_run["resumed_log"].splitlines() if "resuming from" in line]
    assert resumed, resilient_run["resumed_log"][-2000:]
    path = resumed[0].split("resuming from ", 1)[1].split(":", 1)[0]
    at_kill = resilient_run["checkpoint_at_kill"].rsplit("/", 1)[1]
    assert Path(path).name >= at_kill, (path, at_kill)  # model_epoch_EEE_step_SSSSS.pth sorts by time
    assert resilient_run["final"]["restarts"] == 1


def test_drain_evicts_the_gang_and_the_restart_is_not_counted(resilient_run):
    """kubectl drain evicts the resumed gang (DisruptionTarget): a restart outside backoffLimit."""
    after = resilient_run["after_drain"]
    assert "evicted" in resilient_run["drained"], resilient_run["drained"]
    assert after["disruptions"] == 1 and after["restarts"] == 1, after
    assert after["lastFailure"]["attempt"] == 1 and after["lastFailure"]["reason"] == "EvictionByEvictionAPI", after
    final = resilient_run["final"]
    assert (final["restarts"], final["disruptions"], int(final["attempt"])) == (1, 1, 2)


OOM_LIMIT = "600Mi"  # one process that imports torch, builds the model and trains: about 1.2 GB here


@pytest.fixture(scope="module")
def short_runs(gang):
    """Two 1-node jobs at once. rn-oom's container is limited below what training takes, so the
    kernel's OOM killer ends it; backoffLimit 0, so the rules' verdict on it (builtin:retryable,
    exit 137) is its last. rn-gpu asks for a GPU, which the real node's fake device plugin gives."""
    target = gang
    oom = target.training_job("rn-oom", num_epochs=1, nodes=1)
    oom["spec"]["resources"] = {"requests": {"cpu": "500m", "memory": OOM_LIMIT}, "limits": {"memory": OOM_LIMIT}}
    oom["spec"]["runPolicy"]["backoffLimit"] = 0
    gpu = target.training_job("rn-gpu", num_epochs=1, nodes=1)
    gpu["spec"]["gpusPerNode"] = 1
    target.apply([oom, gpu])
    runs = {}
    for name in ("rn-oom", "rn-gpu"):
        def finished():
            status = target.status(name)
            return status if status.get("phase") in ("Succeeded", "Failed") else None
        status = target.wait_until(f"{name} to finish", finished, JOB_TIMEOUT_S)
        (pod,) = target.pods(name)
        runs[name] = status, pod, target.kubectl("logs", pod["metadata"]["name"], "-c", CONTAINER, check=False)
    return runs


def test_pod_over_its_memory_limit_is_oom_killed_and_the_job_says_so_with_the_rank(short_runs):
    status, pod, _ = short_runs["rn-oom"]
    (container,) = [c for c in pod["status"]["containerStatuses"] if c["name"] == CONTAINER]
    terminated = container["state"]["terminated"]
    assert (terminated["reason"], terminated["exitCode"]) == ("OOMKilled", 137), terminated
    assert status["phase"] == "Failed"
    failure = status["lastFailure"]
    assert (failure["reason"], failure["rank"], failure["exitCode"]) == ("OOMKilled", 0, 137), failure
    assert (failure["rule"], failure["action"]) == ("builtin:retryable", "RestartJob"), failure
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "BackoffLimitExceeded" and "(OOMKilled)" in failed["message"], failed


def test_kubectl_logs_of_the_failed_rank_work_after_the_job_failed(short_runs):
    status, _, logs = short_runs["rn-oom"]
    assert status["phase"] == "Failed"
    assert logs.returncode == 0, logs.stderr
    assert "INFO CPU threads:" in logs.stdout, logs.stdout[-2000:]


def test_a_gpu_pod_gets_a_fake_device_and_the_trainer_says_it_runs_on_the_cpu(short_runs, real_cluster):
    """The fake device plugin (localcluster/gpuplugin) speaks the kubelet's device-plugin API: the
    node advertises nvidia.com/gpu, the pod asking for one is admitted and gets
    NVIDIA_VISIBLE_DEVICES, and the trainer says in one line that CUDA sees no device and trains
    on the CPU. A real GPU node (NVIDIA's plugin, container toolkit, driver) was not tried here."""
    status, pod, logs = short_runs["rn-gpu"]
    assert status["phase"] == "Succeeded", (status.get("conditions"), logs.stdout[-2000:])
    (container,) = [c for c in pod["spec"]["containers"] if c["name"] == CONTAINER]
    assert container["resources"]["limits"]["nvidia.com/gpu"] in (1, "1")
    node = json.loads(real_cluster.kubectl("get", "node", pod["spec"]["nodeName"], "-o", "json").stdout)
    assert node["status"]["capacity"]["nvidia.com/gpu"] == str(FAKE_GPUS)
    said = [line for line in logs.stdout.splitlines() if "no CUDA device is visible" in line]
    assert len(said) == 1 and "NVIDIA_VISIBLE_DEVICES=fake-gpu-" in said[0], logs.stdout[-2000:]
    assert said[0].endswith("running on the CPU")
