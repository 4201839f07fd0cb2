"""The operator in-cluster, from the chart, on the real node: `helm install` with the locally
built operator image (pullPolicy Never: nothing is pulled) in a namespace enforcing Pod
Security's `restricted` level; two replicas pass their /healthz probes (Deployment Ready),
log in with the pod's ServiceAccount through kubernetes.default.svc, elect a leader through a
Lease, the leader reconciles a job (its worker Job and status), and each replica serves /metrics. The other real-node
tests run the operator as a host process, as tests/e2e does."""
from __future__ import annotations

import json
import sys
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import e2e_manifests as m  # noqa: E402
from kube_target import CHART, Cluster  # noqa: E402
from toolbox import find_tool  # noqa: E402

from ddetr_operator.leader import DEFAULT_LEASE_NAME  # noqa: E402

pytestmark = pytest.mark.real_node
NAMESPACE = "ddetr-rn-operator"
RELEASE = "ddetr-incluster"
METRICS_PORT = 8000  # the chart's operator.metricsPort default


@pytest.fixture(scope="module")
def deployed(real_cluster):
    helm = find_tool("helm")
    if helm is None:
        pytest.skip("no helm binary (scripts/test-deps.d/helm.sh installs one)")
    real_cluster.create_namespace(NAMESPACE, pod_security="restricted")
    target = Cluster(NAMESPACE, str(real_cluster.bin_dir / "kubectl"), helm, str(real_cluster.kubeconfig))
    repository, _, tag = real_cluster.images["operator"].rpartition(":")
    target.helm("upgrade", "--install", RELEASE, str(CHART), "--namespace", NAMESPACE,
                "--set", f"fullnameOverride={RELEASE}", "--set", f"image.repository={repository}",
                "--set", f"image.tag={tag}", "--set", "image.pullPolicy=Never",
                "--set", "operator.replicas=2", "--set", "operator.leaderElection=true",
                "--set", "operator.reconcileIntervalSeconds=3",
                "--set", "watch.namespaces={" + NAMESPACE + "}", "--wait", "--timeout", "3m")
    return target


IN_CLUSTER = ("import os; print(os.environ.get('KUBERNETES_SERVICE_HOST'), os.environ.get('KUBERNETES_SERVICE_PORT'), "
              "os.environ.get('KUBECONFIG'), os.path.exists('/var/run/secrets/kubernetes.io/serviceaccount/token'))")


def _pods(target: Cluster) -> list[dict]:
    return json.loads(target.kubectl("get", "pods", "-l", f"app.kubernetes.io/instance={RELEASE}",
                                     "-o", "json"))["items"]


def test_chart_deployment_is_ready_with_probes_on_the_real_node(deployed, real_cluster):
    deployment = deployed.get("deployment", RELEASE)
    assert deployment["status"].get("readyReplicas") == 2, deployment["status"]
    pods = _pods(deployed)
    assert len(pods) == 2
    for pod in pods:
        (container,) = pod["spec"]["containers"]
        assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        (status,) = pod["status"]["containerStatuses"]
        assert status["ready"] and status["containerID"].startswith("containerd://"), status
        assert status["restartCount"] == 0, status
        assert pod["spec"]["nodeName"] == real_cluster.node.name


def test_replicas_log_in_with_their_service_account_and_elect_one_leader(deployed):
    """The Lease (created and renewed through the API) is held by one of the two replicas."""
    pods = {p["metadata"]["name"]: p for p in _pods(deployed)}
    for name in pods:
        # No kubeconfig in the pod: the one credential is the ServiceAccount token the kubelet
        # mounted, and the API server is the kubernetes Service's ClusterIP (through kube-proxy).
        seen = deployed.kubectl("exec", name, "--", "python3", "-c", IN_CLUSTER).split()
        assert seen == ["10.96.0.1", "443", "None", "True"], seen
    lease = deployed.get("lease", DEFAULT_LEASE_NAME)
    assert lease["spec"]["holderIdentity"] in pods, (lease["spec"], list(pods))


def test_the_leader_reconciles_a_job_and_every_replica_serves_metrics(deployed):
    """A job the in-cluster operator must act on: it renders the gang's worker Job and writes status."""
    job = m.training_job(NAMESPACE, "probe", num_epochs=1, endpoint="http://127.0.0.1:9")
    job["spec"].pop("volumes")  # no dataset, no S3 credentials: the job only has to be reconciled, not to train
    job["spec"]["artifacts"].pop("credentialsSecret")
    job["spec"]["nodeSelector"] = {"ddetr.dev/no-such-node": "true"}  # its pods stay Pending
    deployed.apply([job])
    status = deployed.wait_until("the operator's status on the job", lambda: (
        deployed.get("deformabledetrjobs", "probe").get("status") or {}).get("workerJob") and
        deployed.get("deformabledetrjobs", "probe")["status"], 90, every=1)
    worker = deployed.get("job.batch", status["workerJob"])
    assert worker["metadata"]["ownerReferences"][0]["name"] == "probe"
    leader = deployed.get("lease", DEFAULT_LEASE_NAME)["spec"]["holderIdentity"]
    for pod in _pods(deployed):
        with urllib.request.urlopen(f"http://{pod['status']['podIP']}:{METRICS_PORT}/metrics", timeout=10) as r:
            text = r.read().decode()
        assert "ddetr_operator_" in text, text[:2000]
        if pod["metadata"]["name"] == leader:
            assert 'ddetr_operator_jobs{phase="' in text, text[:3000]
    deployed.kubectl("delete", "deformabledetrjobs", "probe", "--wait=false")
