"""One real node in the local cluster: containerd 2.x (runc, the CNI bridge plugin), a
kubelet named by this machine's hostname and authorized as a node (client certificate
CN system:node:<hostname>, O system:nodes; the API server runs the Node authorizer and
NodeRestriction), kube-proxy in iptables mode, CoreDNS (a host process on the node
address, the pods' nameserver) and a device plugin advertising fake nvidia.com/gpu devices. The project's images are imported from their archives.

containerd's content store and snapshots live in a cache (DDETR_REAL_NODE_CACHE, default
~/.cache/ddetr-real-node/containerd) so a warm start does not import the images again;
everything else (sockets, network namespaces, pod volumes, logs) is under the cluster's
state folder and `stop()` removes it: processes, mounts, interfaces, packet-filter rules
and the kubelet's cgroups.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import yaml

from . import realnode_net as net
from .pki import client_cert
from .realnode_cleanup import remove_leftovers
from .realnode_image import (NAMESPACE, PAUSE_IMAGE, discard_layer_blobs, import_archive, remove_replaced,
                             write_pause_archive)

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "localcluster" / "realnode" / "build.sh"
NODE_LABEL = "ddetr.dev/real-node"
CLUSTER_DOMAIN = "cluster.local"
CNI_BIN = "/usr/lib/cni"  # Debian's containernetworking-plugins
COREDNS_USER = "ddetr-coredns"
GPU_RESOURCE = "nvidia.com/gpu"
FAKE_GPUS = 2  # advertised by localcluster/gpuplugin: no driver, no device behind them
DEVICE_PLUGIN_DIR = "/var/lib/kubelet/device-plugins"  # the kubelet's registration socket is here


def node_name() -> str:
    """The API server reaches the kubelet under the node's name: the machine's hostname."""
    return socket.gethostname().split(".")[0].lower()


def runtime_bin() -> tuple[Path | None, str]:
    """containerd, ctr, the runc shim, CoreDNS and pause (localcluster/realnode/build.sh,
    a no-op when cached), or None and why they cannot be had."""
    missing = [tool for tool in ("runc", "iptables") if shutil.which(tool) is None]
    missing += [f"{CNI_BIN}/{p}" for p in ("bridge", "host-local", "loopback") if not Path(CNI_BIN, p).exists()]
    if missing:
        return None, f"missing {', '.join(missing)} (scripts/test-deps.d/real-node.sh installs them)"
    result = subprocess.run(["bash", str(BUILD_SCRIPT)], capture_output=True, text=True)
    if result.returncode != 0:
        tail = " | ".join(result.stderr.strip().splitlines()[-3:])
        return None, f"building containerd/CoreDNS failed (module proxy unreachable?): {tail}"
    return Path(result.stdout.strip().splitlines()[-1]), ""


class RealNode:
    """Started by LocalCluster after its control plane; `stop()` before the control plane's."""

    def __init__(self, cluster, runtime: Path, archives: list[Path]):
        self.cluster = cluster
        self.runtime = runtime
        self.archives = archives
        self.name = node_name()
        self.dir = cluster.state / "real-node"
        cache = Path(os.environ.get("DDETR_REAL_NODE_CACHE", Path.home() / ".cache" / "ddetr-real-node"))
        self.containerd_root = cache / "containerd"  # realnode_cleanup names it too
        self.socket = self.dir / "containerd" / "containerd.sock"
        self.components: list = []
        self.timings: dict[str, float] = {}

    @property
    def ctr(self) -> list[str]:
        return [str(self.runtime / "ctr"), "--address", str(self.socket)]

    def _spawn(self, name: str, argv: list[str], env: dict | None = None):
        component = self.cluster._spawn(name, argv, env=env)
        self.cluster.components.remove(component)  # this node stops its own, in its own order
        self.components.append(component)
        return component

    def _timed(self, what: str, step) -> None:
        start = time.monotonic()
        step()
        self.timings[what] = round(time.monotonic() - start, 1)

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._timed("containerd", self._start_containerd)
        self._timed("images", self._import_images)
        self._timed("kubelet", self._start_kubelet)
        self._timed("GPU device plugin", self._start_gpu_plugin)
        self._timed("kube-proxy and CoreDNS", self._start_services)

    # -- containerd --------------------------------------------------------------

    def _start_containerd(self) -> None:
        state = self.dir / "containerd"
        cni_conf = self.dir / "cni"
        cni_conf.mkdir(parents=True, exist_ok=True)
        (cni_conf / "10-ddetr.conflist").write_text(json.dumps({
            "cniVersion": "1.0.0", "name": "ddetr-real-node", "plugins": [{
                "type": "bridge", "bridge": net.BRIDGE, "isGateway": True, "ipMasq": False, "hairpinMode": True,
                "ipam": {"type": "host-local", "dataDir": str(self.dir / "ipam"),
                         "ranges": [[{"subnet": str(net.POD_CIDR), "gateway": net.NODE_IP}]],
                         "routes": [{"dst": "0.0.0.0/0"}]}}]}))
        runtime = 'plugins."io.containerd.cri.v1.runtime"'
        config = f"""version = 4
root = "{self.containerd_root}"
state = "{state}"
imports = []
# What would write outside our folders (/var/run/nri, /opt/containerd) and nothing here uses.
disabled_plugins = ["io.containerd.nri.v1.nri", "io.containerd.internal.v1.opt",
                    "io.containerd.image-verifier.v1.bindir"]
[plugins."io.containerd.server.v1.grpc"]
  address = "{self.socket}"
[plugins."io.containerd.server.v1.ttrpc"]
  address = "{state}/containerd.sock.ttrpc"
[{runtime}]
  # the pod runner's `ip netns add` would otherwise hide mounts under /run/netns
  netns_mounts_under_state_dir = true
  enable_selinux = false
  # The kubelet asks for -998 (the sandbox) and lower scores than ours; without CAP_SYS_RESOURCE
  # (this machine's root lacks it) runc cannot set them: keep them no lower than containerd's.
  restrict_oom_score_adj = true
[{runtime}.cni]
  bin_dirs = ["{CNI_BIN}"]
  conf_dir = "{cni_conf}"
[{runtime}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
[{runtime}.containerd.runtimes.runc.options]
  BinaryName = "{shutil.which('runc')}"
  Root = "{state}/runc"
  SystemdCgroup = false
[plugins."io.containerd.cri.v1.images".pinned_images]
  sandbox = "{PAUSE_IMAGE}"
[plugins."io.containerd.grpc.v1.cri"]
  stream_server_address = "127.0.0.1"
"""
        (self.dir / "containerd.toml").write_text(config)
        env = {**os.environ, "PATH": f"{self.runtime}:{os.environ.get('PATH', '')}"}
        self._spawn("containerd", [str(self.runtime / "containerd"), "--config", str(self.dir / "containerd.toml")],
                    env=env)
        self.cluster._wait("containerd", lambda: subprocess.run(
            [*self.ctr, "version"], capture_output=True).returncode == 0, 60)
        self._remove_containers()  # a node stopped without `down` left them in the store

    def _import_images(self) -> None:
        stamps = self.containerd_root / "ddetr-imported"
        pause = write_pause_archive(self.runtime / "pause", self.dir / "pause.tar")
        for archive in [pause, *self.archives]:
            import_archive(self.ctr, archive, stamps)
        remove_replaced(self.ctr)
        discard_layer_blobs(self.ctr)

    # -- kubelet -----------------------------------------------------------------

    def _kubeconfig(self, name: str, cert: Path, key: Path) -> Path:
        path = self.dir / f"{name}.kubeconfig"
        config = yaml.safe_load(self.cluster.kubeconfig.read_text())
        config["users"] = [{"name": name, "user": {"client-certificate": str(cert), "client-key": str(key)}}]
        config["contexts"][0]["context"]["user"] = name
        path.write_text(yaml.safe_dump(config))
        path.chmod(0o600)
        return path

    def _start_kubelet(self) -> None:
        pki = self.cluster.state / "pki"
        kubeconfig = self._kubeconfig("kubelet", *client_cert(pki, "kubelet", f"system:node:{self.name}",
                                                              "system:nodes"))
        (self.dir / "resolv.conf").write_text("")  # pods get cluster DNS only: no host search domains
        from .controlplane import free_port
        self.kubelet_port = free_port()
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
            "failCgroupV1": False, "cgroupDriver": "cgroupfs", "failSwapOn": False,
            "address": net.NODE_IP, "port": self.kubelet_port, "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1", "healthzPort": free_port(),
            "containerRuntimeEndpoint": f"unix://{self.socket}",
            "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": True},
                               "x509": {"clientCAFile": str(pki / "ca.crt")}},
            "authorization": {"mode": "Webhook"},
            "clusterDNS": [net.NODE_IP], "clusterDomain": CLUSTER_DOMAIN,
            "resolvConf": str(self.dir / "resolv.conf"), "podLogsDir": str(self.dir / "pod-logs"),
            "maxPods": 32, "serializeImagePulls": False, "rotateCertificates": False,
            # The images are imported, never pulled: keep them whatever the disk use. Under disk
            # pressure the kubelet deletes every image no container runs, and these cannot come back,
            # so the disk signals fire only when the disk is all but full: this machine's disk is
            # shared with the image builds, and 1% of a large one is gigabytes still free.
            "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
            "evictionHard": {"memory.available": "100Mi", "nodefs.available": "512Mi", "imagefs.available": "512Mi",
                             "nodefs.inodesFree": "1%"},
            "nodeStatusUpdateFrequency": "5s", "syncFrequency": "10s"}
        (self.dir / "kubelet.yaml").write_text(yaml.safe_dump(config))
        self._spawn("kubelet", [
            str(self.cluster.bin_dir / "kubelet"), "--config", str(self.dir / "kubelet.yaml"),
            "--kubeconfig", str(kubeconfig), "--root-dir", str(self.dir / "kubelet"),
            "--cert-dir", str(self.dir / "kubelet-pki"), "--volume-plugin-dir", str(self.dir / "volume-plugins"),
            "--hostname-override", self.name, "--node-ip", net.NODE_IP,
            "--node-labels", f"{NODE_LABEL}=true", "--v", "1"])
        self.cluster._wait(f"the real node {self.name}", lambda: self.cluster._node_ready(self.name), 120)
        # No node-lifecycle controller runs here to lift the not-ready taint the API server added.
        self.cluster.kubectl("patch", "node", self.name, "--type=merge", "-p", '{"spec": {"taints": null}}')

    # -- GPUs: fake devices through the kubelet's device-plugin API --------------

    def _start_gpu_plugin(self) -> None:
        """localcluster/gpuplugin registers FAKE_GPUS nvidia.com/gpu devices with the kubelet (no
        driver: pods asking for GPUs are admitted and get NVIDIA_VISIBLE_DEVICES, nothing more)."""
        # The kubelet's device-plugin folder is fixed (/var/lib/kubelet/device-plugins, whatever its
        # root-dir); the plugin is given it through a link in the node's state, which names its process.
        plugins = self.dir / "device-plugins"
        if not plugins.is_symlink():
            plugins.symlink_to(DEVICE_PLUGIN_DIR)
        self._spawn("gpu-plugin", [str(self.cluster.bin_dir / "ddetr-gpu-plugin"), "--count", str(FAKE_GPUS),
                                   "--dir", str(plugins)])

        def advertised() -> bool:
            node = json.loads(self.cluster.kubectl("get", "node", self.name, "-o", "json").stdout)
            return node["status"].get("allocatable", {}).get(GPU_RESOURCE) == str(FAKE_GPUS)
        self.cluster._wait(f"{FAKE_GPUS} {GPU_RESOURCE} on {self.name}", advertised, 60)

    # -- Services: kube-proxy and cluster DNS ------------------------------------

    def _start_services(self) -> None:
        from .controlplane import free_port
        pki = self.cluster.state / "pki"
        # system:kube-proxy is bound to system:node-proxier by the API server's default policy.
        proxy_kubeconfig = self._kubeconfig("kube-proxy", *client_cert(pki, "kube-proxy", "system:kube-proxy"))
        self._spawn("kube-proxy", [
            str(self.cluster.bin_dir / "kube-proxy"), "--kubeconfig", str(proxy_kubeconfig),
            "--proxy-mode", "iptables", "--hostname-override", self.name, "--cluster-cidr", str(net.POD_CIDR),
            "--healthz-bind-address", f"127.0.0.1:{free_port()}",
            "--metrics-bind-address", f"127.0.0.1:{free_port()}",
            "--conntrack-max-per-core", "0", "--iptables-localhost-nodeports=false", "--v", "1"])
        self.cluster.kubectl("apply", "-f", "-", stdin=COREDNS_RBAC)
        dns_kubeconfig = self._kubeconfig("coredns", *client_cert(pki, "coredns", COREDNS_USER))
        ready_port = free_port()
        (self.dir / "Corefile").write_text(f""".:53 {{
    bind {net.NODE_IP}
    errors
    ready 127.0.0.1:{ready_port}
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        kubeconfig {dns_kubeconfig} ddetr-local
        pods insecure
        ttl 5
    }}
}}
""")
        self._spawn("coredns", [str(self.runtime / "coredns"), "-conf", str(self.dir / "Corefile")])
        self.cluster._wait("CoreDNS", lambda: _http_ok(f"http://127.0.0.1:{ready_port}/ready"), 60)

    # -- stop --------------------------------------------------------------------

    def _remove_containers(self) -> None:
        """Kill and delete every container of the k8s.io namespace; their shims exit with them."""
        listed = subprocess.run([*self.ctr, "-n", NAMESPACE, "containers", "ls", "-q"], capture_output=True, text=True)
        for container in listed.stdout.split():
            subprocess.run([*self.ctr, "-n", NAMESPACE, "tasks", "kill", "-s", "SIGKILL", container],
                           capture_output=True)
        for container in listed.stdout.split():
            subprocess.run([*self.ctr, "-n", NAMESPACE, "tasks", "rm", "-f", container], capture_output=True)
            subprocess.run([*self.ctr, "-n", NAMESPACE, "containers", "rm", container], capture_output=True)

    def stop(self) -> None:
        by_name = {c.name: c for c in self.components}
        for name in ("coredns", "kube-proxy", "gpu-plugin", "kubelet"):
            if name in by_name:
                _stop(by_name[name])
        if "containerd" in by_name and by_name["containerd"].process.poll() is None:
            self._remove_containers()
            _stop(by_name["containerd"])
        self.components.clear()
        if "kube-proxy" in by_name:
            subprocess.run([str(self.cluster.bin_dir / "kube-proxy"), "--cleanup"], capture_output=True)
        remove_leftovers(self.cluster.state)


COREDNS_RBAC = f"""apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {{name: "ddetr:coredns"}}
rules:
- {{apiGroups: [""], resources: [endpoints, services, pods, namespaces], verbs: [list, watch]}}
- {{apiGroups: [discovery.k8s.io], resources: [endpointslices], verbs: [list, watch]}}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {{name: "ddetr:coredns"}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "ddetr:coredns"}}
subjects: [{{apiGroup: rbac.authorization.k8s.io, kind: User, name: {COREDNS_USER}}}]
"""


def _stop(component, grace: float = 10) -> None:
    from .controlplane import _signal_group
    if component.process.poll() is None:
        _signal_group(component.process, signal.SIGTERM)
        try:
            component.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            _signal_group(component.process, signal.SIGKILL)
            component.process.wait(timeout=10)


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False
