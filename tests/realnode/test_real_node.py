"""What only a real kubelet shows: the trainer image runs as a container on the real node
(containerd), as the image's non-root user under runAsNonRoot, with a memory-backed /dev/shm;
`kubectl logs` and the exit code come from the runtime; Service names and
kubernetes.default.svc resolve through CoreDNS and route through kube-proxy; nothing a pod
sends leaves the machine. The session fixture checks that stopping the node leaves nothing."""
from __future__ import annotations

import json
import subprocess
import time

import pytest
import yaml

from ddetr_localcluster import realnode_net
from ddetr_localcluster.realnode import NODE_LABEL
from ddetr_localcluster.realnode_image import image_rows, run_ctr

pytestmark = pytest.mark.real_node


def pod(name: str, image: str, script: str, **spec) -> dict:
    """A pod on the real node running `python -c script`, as the restricted Pod Security level wants."""
    container = {"name": "main", "image": image, "imagePullPolicy": "Never",
                 "command": ["python", "-c", script],
                 "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
                 **spec.pop("container", {})}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"app": name}},
            "spec": {"nodeSelector": {NODE_LABEL: "true"}, "restartPolicy": "Never",
                     "terminationGracePeriodSeconds": 1,
                     "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
                     "containers": [container], **spec}}


def get_pod(cluster, namespace: str, name: str) -> dict:
    return json.loads(cluster.kubectl("get", "pod", name, "-n", namespace, "-o", "json").stdout)


def wait_phase(cluster, namespace: str, name: str, phases: tuple[str, ...], timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        current = get_pod(cluster, namespace, name)
        if current["status"].get("phase") in phases:
            return current
        if time.monotonic() > deadline:
            raise AssertionError(f"pod {name} not {phases} after {timeout:.0f} s: {json.dumps(current['status'])}")
        time.sleep(0.5)


SHM_AND_USER = """
import os, sys
shm = [line.split() for line in open('/proc/mounts') if line.split()[1] == '/dev/shm']
print('uid', os.getuid(), 'gid', os.getgid())
print('shm', shm[-1][2] if shm else 'none')
print('cpu.max', open('/sys/fs/cgroup/cpu/cpu.cfs_quota_us').read().strip()
      if os.path.exists('/sys/fs/cgroup/cpu/cpu.cfs_quota_us') else open('/sys/fs/cgroup/cpu.max').read().strip())
sys.exit(3)
"""


def test_trainer_image_runs_as_its_non_root_user_with_memory_shm_and_logs(real_cluster, namespace):
    """The kubelet admits the image's user (10001) under runAsNonRoot, mounts the memory
    emptyDir at /dev/shm as tmpfs, applies the CPU limit as a CFS quota, and reports the
    container's exit code and log."""
    manifest = pod("shm-user", real_cluster.images["trainer"], SHM_AND_USER,
                   volumes=[{"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "64Mi"}}],
                   container={"volumeMounts": [{"name": "shm", "mountPath": "/dev/shm"}],
                              "resources": {"limits": {"cpu": "500m", "memory": "512Mi"}}})
    real_cluster.kubectl("apply", "-n", namespace, "-f", "-", stdin=yaml.safe_dump(manifest))
    done = wait_phase(real_cluster, namespace, "shm-user", ("Failed", "Succeeded"))
    status = done["status"]["containerStatuses"][0]
    assert done["status"]["phase"] == "Failed"
    assert status["state"]["terminated"]["exitCode"] == 3
    assert status["containerID"].startswith("containerd://")
    logs = real_cluster.kubectl("logs", "-n", namespace, "shm-user").stdout.splitlines()
    assert "uid 10001 gid 10001" in logs
    assert "shm tmpfs" in logs
    assert any(line in ("cpu.max 50000", "cpu.max 50000 100000") for line in logs), logs


def test_root_image_user_is_refused_under_run_as_non_root(real_cluster, namespace):
    """runAsNonRoot is the kubelet's check, against the user the container would run as."""
    manifest = pod("as-root", real_cluster.images["trainer"], "print('ran')",
                   container={"securityContext": {"runAsUser": 0}})
    real_cluster.kubectl("apply", "-n", namespace, "-f", "-", stdin=yaml.safe_dump(manifest))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        waiting = (get_pod(real_cluster, namespace, "as-root")["status"].get("containerStatuses") or [{}])[0] \
            .get("state", {}).get("waiting", {})
        if waiting.get("reason") == "CreateContainerConfigError":
            assert "non-root" in waiting["message"], waiting
            return
        time.sleep(0.5)
    raise AssertionError("the kubelet started a root container under runAsNonRoot")


RESOLVE = """
import json, os, socket, ssl, sys, time, urllib.error, urllib.request
ns = open('/var/run/secrets/kubernetes.io/serviceaccount/namespace').read()
print('echo', socket.gethostbyname(f'echo.{ns}.svc.cluster.local'))
print('short', socket.gethostbyname('echo'))
print('kubernetes', socket.gethostbyname('kubernetes.default.svc'))
# The echo pod's endpoint reaches kube-proxy a moment after the pod is Ready; until then the
# ClusterIP refuses connections, so a client retries for a while, as any should.
deadline = time.monotonic() + 30
while True:
    try:
        print('body', urllib.request.urlopen('http://echo:8080/', timeout=10).read().decode().strip())
        break
    except urllib.error.URLError as err:
        if time.monotonic() > deadline:
            raise
        print('retry', err.reason, file=sys.stderr)
        time.sleep(0.5)
token = open('/var/run/secrets/kubernetes.io/serviceaccount/token').read()
context = ssl.create_default_context(cafile='/var/run/secrets/kubernetes.io/serviceaccount/ca.crt')
request = urllib.request.Request('https://kubernetes.default.svc/version', headers={'Authorization': 'Bearer ' + token})
print('api', json.load(urllib.request.urlopen(request, context=context, timeout=10))['major'])
try:  # an address off this machine: the node's packet filter drops what is routed there
    socket.create_connection(('192.0.2.1', 80), timeout=2)
    print('off-machine reached')
except OSError as err:
    print('off-machine', type(err).__name__)
"""
SERVE = ("import http.server, os\n"
         "class H(http.server.BaseHTTPRequestHandler):\n"
         "    def do_GET(self):\n"
         "        self.send_response(200); self.end_headers(); self.wfile.write(b'hello from ' + os.uname()[1].encode())\n"
         "http.server.HTTPServer(('', 8080), H).serve_forever()\n")


def test_service_names_and_kubernetes_default_resolve_and_route_from_a_pod(real_cluster, namespace):
    """CoreDNS answers the Service's names from its EndpointSlices; kube-proxy routes the
    ClusterIPs (the echo pod, and the API server behind kubernetes.default.svc, which the pod
    logs in to with its ServiceAccount token); a packet to an address off the machine is dropped."""
    dropped_before = dropped_packets()
    image = real_cluster.images["operator"]
    server = pod("echo", image, SERVE, restartPolicy="Always")
    server["spec"]["containers"][0]["readinessProbe"] = {"tcpSocket": {"port": 8080}, "periodSeconds": 1}
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "echo"},
               "spec": {"selector": {"app": "echo"}, "ports": [{"port": 8080}]}}
    real_cluster.kubectl("apply", "-n", namespace, "-f", "-", stdin=yaml.safe_dump_all([server, service]))
    real_cluster._wait("the echo pod Ready", lambda: any(
        c["type"] == "Ready" and c["status"] == "True"
        for c in get_pod(real_cluster, namespace, "echo")["status"].get("conditions", [])), 90)
    real_cluster.kubectl("apply", "-n", namespace, "-f", "-", stdin=yaml.safe_dump(pod("client", image, RESOLVE)))
    done = wait_phase(real_cluster, namespace, "client", ("Failed", "Succeeded"))
    logs = real_cluster.kubectl("logs", "-n", namespace, "client").stdout
    assert done["status"]["phase"] == "Succeeded", logs
    lines = dict(line.split(" ", 1) for line in logs.splitlines())
    cluster_ip = json.loads(real_cluster.kubectl("get", "svc", "echo", "-n", namespace, "-o", "json").stdout)[
        "spec"]["clusterIP"]
    assert lines["echo"] == lines["short"] == cluster_ip
    assert lines["kubernetes"] == "10.96.0.1"
    assert lines["body"] == "hello from echo"
    assert lines["api"] == "1"
    assert lines["off-machine"] in ("timeout", "TimeoutError"), lines
    assert dropped_packets() > dropped_before, "the packet filter did not see the off-machine packets"


def dropped_packets() -> int:
    """Packets the real node's FORWARD chain dropped so far (pods to anywhere off the bridge)."""
    rules = subprocess.run(["iptables", "-w", "-L", realnode_net.CHAIN, "-v", "-x", "-n"],
                           capture_output=True, text=True, check=True).stdout.splitlines()
    return sum(int(line.split()[0]) for line in rules if " DROP " in f" {line} ")


def test_the_node_keeps_only_the_images_a_name_points_to(real_cluster):
    """An image replaced by a newer import under the same name is removed at node start (the CRI
    plugin keeps every image under its id too, so each trainer rebuild would otherwise leave
    gigabytes behind in the cache); the current images are all there."""
    rows = image_rows(real_cluster.node.ctr)
    named = {row[0]: row[2] for row in rows if not row[0].startswith("sha256:")}
    assert set(real_cluster.images.values()) <= set(named), named
    orphans = [row[0] for row in rows if row[0].startswith("sha256:") and row[2] not in named.values()]
    assert not orphans, orphans


def test_the_node_keeps_no_layer_blobs_once_the_images_are_unpacked(real_cluster):
    """Once the images are unpacked into snapshots the node lets containerd collect their layers'
    blobs: the trainer image is not held twice (its layers, ~6 GB, and their snapshots) on a disk
    the builds share. The config blob, which the CRI plugin reads, stays."""
    ctr = real_cluster.node.ctr
    manifest_of = {row[0]: row[2] for row in image_rows(ctr)}  # REF TYPE DIGEST ...
    blobs = set(run_ctr(ctr, "content ls", "content", "ls", "--quiet").split())
    manifest = json.loads(run_ctr(ctr, "content get", "content", "get", manifest_of[real_cluster.images["trainer"]]))
    layers = {layer["digest"] for layer in manifest["layers"]}
    assert len(layers) > 1 and manifest["config"]["digest"] in blobs
    assert not layers & blobs, sorted(layers & blobs)
