"""Start and stop a real Kubernetes control plane on 127.0.0.1 from the binaries that
scripts/build-control-plane.sh builds: etcd, kube-apiserver, kube-controller-manager,
kube-scheduler and KWOK (fake GPU nodes), plus the pod runner that runs the pods bound to
its own node as local processes (pod_runner.py), and with `real_node=True` one real node
(realnode.py: kubelet, containerd, kube-proxy, CoreDNS) whose address the API server binds.

Nothing is installed into the cluster: no CRD, no chart. Every component logs to a file
under `<state>/logs`, which the pytest fixture shows for a failed test.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from . import realnode_net
from .pki import write_pki

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
BUILD_SCRIPT = REPO / "scripts" / "build-control-plane.sh"
SERVICE_CIDR = "10.96.0.0/16"
SERVICE_IP = "10.96.0.1"
KWOK_POD_CIDR = "10.214.0.0/16"
KWOK_NODE_IP = "10.215.0.1"
CONTROLLERS = ("job-controller", "garbage-collector-controller", "namespace-controller",
               "serviceaccount-controller", "ttl-after-finished-controller", "pod-garbage-collector-controller",
               "root-ca-certificate-publisher-controller", "resourcequota-controller", "disruption-controller",
               "taint-eviction-controller", "podgroup-protection-controller")
# What a kubelet's pods need: Services' endpoints (for kube-proxy and CoreDNS), claims bound to
# volumes (the PersistentVolumeClaims that Pod Security's restricted level allows, not hostPath),
# and Deployments' pods (the chart's operator in-cluster).
REAL_NODE_CONTROLLERS = ("endpoints-controller", "endpointslice-controller", "persistentvolume-binder-controller",
                         "deployment-controller", "replicaset-controller")
# Kubernetes' own gang scheduling (scheduling.k8s.io/v1beta1 Workload/PodGroup, the scheduler's
# GangScheduling plugin, pods' spec.schedulingGroup) is beta in 1.37 but off by default.
FEATURE_GATES = "--feature-gates=GenericWorkload=true"
KWOK_NODE_LABEL = "type"
KWOK_NODE_VALUE = "kwok"
GPUS_PER_KWOK_NODE = 8


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def control_plane_bin(real_node: bool = False) -> tuple[Path | None, str]:
    """The folder with the built binaries (with `real_node`, kubelet and kube-proxy too), or
    None and the reason they cannot be had.

    DDETR_CONTROL_PLANE_BIN names a folder built elsewhere; otherwise the build script
    runs (a no-op when its cache is warm)."""
    given = os.environ.get("DDETR_CONTROL_PLANE_BIN")
    if given:
        return (Path(given), "") if Path(given, "kube-apiserver").exists() else (
            None, f"DDETR_CONTROL_PLANE_BIN={given} has no kube-apiserver")
    if shutil.which("go") is None:
        return None, "Go is not installed: the local control plane is built from Go modules (Go 1.26+)"
    result = subprocess.run(["bash", str(BUILD_SCRIPT), *(["--real-node"] if real_node else [])],
                            capture_output=True, text=True)
    if result.returncode != 0:
        tail = " | ".join(result.stderr.strip().splitlines()[-3:])
        return None, f"building the control plane failed (module proxy unreachable?): {tail}"
    return Path(result.stdout.strip().splitlines()[-1]), ""


@dataclass
class Component:
    name: str
    argv: list[str]
    log: Path
    process: subprocess.Popen | None = None


@dataclass
class LocalCluster:
    """One control plane. `start()` brings it up; `stop()` ends every process it started."""

    state: Path
    bin_dir: Path
    kwok_nodes: int = 2
    pod_runner: bool = True
    pod_runner_python: str = sys.executable
    real_node: bool = False
    runtime_bin: Path | None = None  # realnode.runtime_bin(): containerd, ctr, CoreDNS, pause
    image_archives: list[Path] = field(default_factory=list)  # imported into the real node
    components: list[Component] = field(default_factory=list)
    node: object | None = None  # the started realnode.RealNode
    _network_open: bool = False

    @property
    def kubeconfig(self) -> Path:
        return self.state / "kubeconfig"

    @property
    def log_dir(self) -> Path:
        return self.state / "logs"

    @property
    def etcd_dir(self) -> Path:
        # etcd's data in memory: the cluster lives as long as the test session.
        shm = Path("/dev/shm")
        base = shm if shm.is_dir() and os.access(shm, os.W_OK) else self.state
        return base / f"ddetr-etcd-{hashlib.sha256(str(self.state).encode()).hexdigest()[:12]}"

    def _spawn(self, name: str, argv: list[str], env: dict | None = None) -> Component:
        log = self.log_dir / f"{name}.log"
        handle = open(log, "ab")
        process = subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True, env=env, preexec_fn=_die_with_parent)
        handle.close()
        component = Component(name, argv, log, process)
        self.components.append(component)
        return component

    def all_components(self) -> list[Component]:
        return self.components + (self.node.components if self.node else [])

    def _check_alive(self) -> None:
        for component in self.all_components():
            if component.process.poll() is not None:
                tail = component.log.read_text(errors="replace").strip().splitlines()[-15:]
                raise RuntimeError(f"{component.name} exited with {component.process.returncode}; "
                                   f"last lines of {component.log}:\n" + "\n".join(tail))

    def _wait(self, what: str, ready, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            self._check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what} (logs in {self.log_dir})")
            time.sleep(0.3)

    def start(self) -> "LocalCluster":
        self.state.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(exist_ok=True)
        b = lambda tool: str(self.bin_dir / tool)  # noqa: E731
        try:
            address = "127.0.0.1"
            if self.real_node:
                # Pods reach the API server (kubernetes.default.svc) on the node's bridge address.
                realnode_net.open_network()
                self._network_open = True
                address = realnode_net.NODE_IP
            pki = write_pki(self.state / "pki", SERVICE_IP, (address,))
            etcd_port, peer_port, api_port = free_port(), free_port(), free_port()
            etcd_url = f"http://127.0.0.1:{etcd_port}"
            shutil.rmtree(self.etcd_dir, ignore_errors=True)
            self._spawn("etcd", [
                b("etcd"), "--name", "ddetr", "--data-dir", str(self.etcd_dir), "--unsafe-no-fsync",
                "--listen-client-urls", etcd_url, "--advertise-client-urls", etcd_url,
                "--listen-peer-urls", f"http://127.0.0.1:{peer_port}",
                "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer_port}",
                "--initial-cluster", f"ddetr=http://127.0.0.1:{peer_port}",
                "--listen-metrics-urls", f"http://127.0.0.1:{free_port()}", "--log-level", "warn"])
            self._wait("etcd", lambda: _http_ok(f"{etcd_url}/health"), 60)

            self._spawn("kube-apiserver", [
                b("kube-apiserver"), "--etcd-servers", etcd_url,
                "--bind-address", address, "--advertise-address", address, "--secure-port", str(api_port),
                "--tls-cert-file", str(pki["server_cert"]), "--tls-private-key-file", str(pki["server_key"]),
                "--client-ca-file", str(pki["ca_cert"]),
                "--service-account-issuer", "https://kubernetes.default.svc.cluster.local",
                "--service-account-key-file", str(pki["sa_pub"]),
                "--service-account-signing-key-file", str(pki["sa_key"]),
                "--service-cluster-ip-range", SERVICE_CIDR,
                # PodSecurity is on by default; OwnerReferencesPermissionEnforcement is what real
                # clusters (OpenShift, many hardened ones) add: blockOwnerDeletion needs finalizers RBAC.
                "--enable-admission-plugins", "NamespaceLifecycle,ServiceAccount,PodSecurity,"
                                              "OwnerReferencesPermissionEnforcement,ResourceQuota,LimitRanger,"
                                              "DefaultTolerationSeconds,Priority"
                                              + (",NodeRestriction" if self.real_node else ""),
                "--allow-privileged=true", "--profiling=false", "--v", "1",
                FEATURE_GATES, "--runtime-config=scheduling.k8s.io/v1beta1=true",
                *(self._real_node_api_flags(pki) if self.real_node else [
                    "--authorization-mode", "RBAC",
                    # 127.0.0.1 cannot be the kubernetes Service's endpoint; nothing in-cluster needs it.
                    "--endpoint-reconciler-type", "none"])])
            server = f"https://{address}:{api_port}"
            context = _client_context(pki)
            self._wait("kube-apiserver /readyz", lambda: _http_ok(f"{server}/readyz", context), 120)
            self._write_kubeconfig(server, pki)

            kubeconfig = str(self.kubeconfig)
            common = ["--kubeconfig", kubeconfig, "--bind-address", "127.0.0.1", "--leader-elect=false", "--v", "1",
                      FEATURE_GATES]
            self._spawn("kube-controller-manager", [
                b("kube-controller-manager"), *common, "--secure-port", str(free_port()),
                "--controllers", ",".join(CONTROLLERS + (REAL_NODE_CONTROLLERS if self.real_node else ())),
                "--root-ca-file", str(pki["ca_cert"]),
                "--service-account-private-key-file", str(pki["sa_key"]),
                "--use-service-account-credentials=false",
                # Orphaned pods (their node deleted) are collected at once, not after 40 s.
                "--terminated-pod-gc-threshold", "100"])
            self._spawn("kube-scheduler", [b("kube-scheduler"), *common, "--secure-port", str(free_port())])
            stages = HERE / "kwok-stages.yaml"
            self._spawn("kwok", [
                b("kwok"), "--kubeconfig", kubeconfig, "--config", str(stages),
                "--manage-nodes-with-label-selector", f"{KWOK_NODE_LABEL}={KWOK_NODE_VALUE}",
                "--cidr", KWOK_POD_CIDR, "--node-ip", KWOK_NODE_IP,
                "--server-address", f"127.0.0.1:{free_port()}"])
            self._wait("the default namespace's service account", self._default_service_account, 60)
            for index in range(self.kwok_nodes):
                self.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(kwok_node(f"kwok-gpu-{index}")))
                clear_not_ready_taint(self.kubectl, f"kwok-gpu-{index}")
            if self.pod_runner:
                self._spawn("pod-runner", [self.pod_runner_python, "-m", "ddetr_localcluster.pod_runner",
                                           "--kubeconfig", kubeconfig, "--state", str(self.state / "pods")],
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
                self._wait("the pod runner's node", lambda: self._node_ready("ddetr-runner"), 60)
            self._wait("the KWOK nodes", lambda: all(self._node_ready(f"kwok-gpu-{i}")
                                                     for i in range(self.kwok_nodes)), 60)
            if self.real_node:
                from .realnode import RealNode
                self.node = RealNode(self, self.runtime_bin, self.image_archives)
                self.node.start()
        except BaseException:
            self.stop()
            raise
        return self

    @staticmethod
    def _real_node_api_flags(pki: dict[str, Path]) -> list[str]:
        """The kubelet's identity is checked as a node's (Node authorizer); the API server
        logs in to the kubelet (logs, exec) as the admin."""
        return ["--authorization-mode", "Node,RBAC",
                "--kubelet-client-certificate", str(pki["admin_cert"]),
                "--kubelet-client-key", str(pki["admin_key"]),
                "--kubelet-preferred-address-types", "InternalIP"]

    def _write_kubeconfig(self, server: str, pki: dict[str, Path]) -> None:
        data = lambda path: base64.b64encode(path.read_bytes()).decode()  # noqa: E731
        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": "ddetr-local",
            "clusters": [{"name": "ddetr-local", "cluster": {
                "server": server, "certificate-authority-data": data(pki["ca_cert"])}}],
            "users": [{"name": "ddetr-admin", "user": {
                "client-certificate-data": data(pki["admin_cert"]), "client-key-data": data(pki["admin_key"])}}],
            "contexts": [{"name": "ddetr-local", "context": {"cluster": "ddetr-local", "user": "ddetr-admin"}}],
        }
        self.kubeconfig.write_text(yaml.safe_dump(config))
        self.kubeconfig.chmod(0o600)

    def kubectl(self, *args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run([str(self.bin_dir / "kubectl"), "--kubeconfig", str(self.kubeconfig), *args],
                                input=stdin, capture_output=True, text=True, timeout=120)
        if check and result.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)}: {result.stderr.strip()}")
        return result

    def create_namespace(self, name: str, pod_security: str | None = None) -> None:
        """A namespace, enforcing the Pod Security level `pod_security` when given, once its default
        ServiceAccount exists (pods are refused before that)."""
        self.kubectl("create", "namespace", name)
        if pod_security:
            self.kubectl("label", "namespace", name, f"pod-security.kubernetes.io/enforce={pod_security}",
                         "pod-security.kubernetes.io/enforce-version=latest")
        self._wait(f"namespace {name}'s default ServiceAccount", lambda: self.kubectl(
            "get", "sa", "default", "-n", name, check=False).returncode == 0, 60)

    def _default_service_account(self) -> bool:
        return self.kubectl("get", "serviceaccount", "default", "-n", "default", check=False).returncode == 0

    def _node_ready(self, name: str) -> bool:
        result = self.kubectl("get", "node", name, "-o", "json", check=False)
        if result.returncode != 0:
            return False
        conditions = json.loads(result.stdout).get("status", {}).get("conditions") or []
        return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)

    def stop(self) -> None:
        """Stop the real node (it removes what it made), then SIGTERM every component (newest
        first), SIGKILL what is left after 10 s."""
        if self.node is not None:
            self.node.stop()
            self.node = None
        elif self._network_open:
            realnode_net.close_network()
        self._network_open = False
        for component in reversed(self.components):
            if component.process.poll() is None:
                _signal_group(component.process, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for component in reversed(self.components):
            try:
                component.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(component.process, signal.SIGKILL)
                component.process.wait(timeout=10)
        self.components.clear()
        shutil.rmtree(self.etcd_dir, ignore_errors=True)

    def log_tails(self, lines: int = 40) -> str:
        out = []
        for log in sorted(self.log_dir.glob("*.log")):
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"----- {log.name} (last {len(tail)} lines) -----\n" + "\n".join(tail))
        return "\n".join(out)


def kwok_node(name: str) -> dict:
    """A fake GPU node that KWOK keeps Ready and whose pods it runs through kwok-stages.yaml."""
    capacity = {"cpu": "64", "memory": "512Gi", "pods": "110", "nvidia.com/gpu": str(GPUS_PER_KWOK_NODE)}
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {KWOK_NODE_LABEL: KWOK_NODE_VALUE, "kubernetes.io/hostname": name,
                                                  "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
                                                  "nvidia.com/gpu.present": "true"},
                         "annotations": {"kwok.x-k8s.io/node": "fake"}},
            "status": {"capacity": capacity, "allocatable": capacity}}


def clear_not_ready_taint(kubectl, node: str) -> None:
    """The API server taints every new node not-ready; the node-lifecycle controller (not run
    here: nothing renews node leases) would lift it once the node reports Ready."""
    kubectl("patch", "node", node, "--type=merge", "-p", '{"spec": {"taints": null}}')


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when the process that started it dies (a killed
    pytest or `local-cluster.sh` never leaves a control plane behind)."""
    import ctypes
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass


def _client_context(pki: dict[str, Path]) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki["ca_cert"]))
    context.load_cert_chain(str(pki["admin_cert"]), str(pki["admin_key"]))
    return context


def _http_ok(url: str, context: ssl.SSLContext | None = None) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2, context=context) as response:
            return response.status == 200
    except OSError:
        return False
