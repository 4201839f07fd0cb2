"""Real training in containers: the end-to-end suite's tiny 2-node CPU DeformableDetrJob runs
with the trainer image on the real node. Both rank pods are containerd containers, the ranks
meet through the headless Service's DNS names (CoreDNS), read the dataset from a hostPath
and write checkpoints to S3 (moto on the node's bridge address, which pods reach), and the
job reaches Succeeded with its mAP in status. The operator runs here as a host process
authenticated as the chart's ServiceAccount, as in tests/e2e."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import e2e_manifests as m  # noqa: E402
from kube_target import CHART, LocalTarget, _free_port  # noqa: E402
from toolbox import find_tool  # noqa: E402

from ddetr_localcluster import realnode_net  # noqa: E402
from ddetr_localcluster.realnode import NODE_LABEL  # noqa: E402

pytestmark = pytest.mark.real_node
OPERATOR_SA = "ddetr-operator"
JOB_TIMEOUT_S = 900


class RealNodeTarget(LocalTarget):
    """LocalTarget with its pods on the real node and S3 on the node's bridge address."""

    RUNNER_SELECTOR = {NODE_LABEL: "true"}

    def runner_address(self) -> str:
        return realnode_net.NODE_IP


@pytest.fixture(scope="module")
def trained(real_cluster, tmp_path_factory):
    helm = find_tool("helm")
    if helm is None:
        pytest.skip("no helm binary (scripts/test-deps.d/helm.sh installs one)")
    from moto.server import ThreadedMotoServer
    namespace = "ddetr-rn-train"
    real_cluster.kubectl("create", "namespace", namespace)
    real_cluster._wait("the namespace's default ServiceAccount", lambda: real_cluster.kubectl(
        "get", "sa", "default", "-n", namespace, check=False).returncode == 0, 60)
    target = RealNodeTarget(namespace, real_cluster, helm)
    target.helm("upgrade", "--install", "ddetr", str(CHART), "--namespace", namespace,
                "--set", f"fullnameOverride={OPERATOR_SA}", "--set", "operator.reconcileIntervalSeconds=3",
                "--set", "watch.namespaces={" + namespace + "}")
    data = tmp_path_factory.mktemp("real-node-data")
    subprocess.run([sys.executable, str(m.DATASET_SCRIPT), str(data)], check=True)
    data.chmod(0o755)  # the trainer runs as the image's user (10001): the mount's root must be readable
    target.data_dir = str(data)
    port = _free_port()
    server = ThreadedMotoServer(ip_address=realnode_net.NODE_IP, port=port, verbose=False)
    server.start()
    target.s3_url = f"http://{realnode_net.NODE_IP}:{port}"
    try:
        target.apply([m.credentials_secret(namespace)])
        assert "bucket ready" in target.run_python("make-bucket", m.MAKE_BUCKET)
        target.start_operator(OPERATOR_SA, namespace, [namespace], {"DDETR_ALLOWED_HOST_PATHS": str(data)})
        job = target.training_job("rn-train", num_epochs=2)
        job["spec"]["image"] = real_cluster.images["trainer"]
        target.apply([job])

        def finished():
            status = target.get("deformabledetrjobs", "rn-train").get("status") or {}
            return status if status.get("phase") in ("Succeeded", "Failed") else None
        status = target.wait_until("rn-train to finish", finished, JOB_TIMEOUT_S)
        pods = json.loads(target.kubectl("get", "pods", "-l", "ddetr.dev/job-name=rn-train", "-o", "json"))["items"]
        keys = json.loads(target.run_python("list", m.list_objects_code("rn-train/train/")).strip().splitlines()[-1])
        yield target, status, pods, keys
    finally:
        target.stop_operators()
        server.stop()


def test_two_rank_pods_train_in_containers_to_succeeded_with_map(trained):
    target, status, pods, keys = trained
    ended = {p["metadata"]["name"]: [c.get("state", {}).get("terminated", {}).get("message", "")[-1500:]
                                     for c in p["status"].get("containerStatuses", [])] for p in pods}
    assert status["phase"] == "Succeeded", (json.dumps(status.get("conditions"), indent=1), ended)
    assert status["restarts"] == 0
    assert len(pods) == 2
    for pod in pods:
        assert pod["spec"]["nodeName"] == target.control_plane.node.name
        assert pod["status"]["containerStatuses"][0]["containerID"].startswith("containerd://")
    progress = status["progress"]
    assert isinstance(progress["lastMap"], (int, float))
    assert progress["lastCheckpoint"].removeprefix(f"s3://{m.BUCKET}/") in keys
    assert "rn-train/train/status.json" in keys
