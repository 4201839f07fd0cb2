"""The local cluster's stand-in for a kubelet: it registers one Node (`ddetr-runner`,
label `ddetr.dev/pod-runner=true`) and runs the pods the real scheduler binds to it as
local processes, with the project's own Python environment instead of the image.

What is real: the pod objects, scheduling, the container's command, args and env (with
$(VAR) expansion, fieldRef, secretKeyRef, configMapKeyRef, envFrom), configMap, secret,
emptyDir and hostPath volumes bind-mounted at their mountPath, a private TMPDIR, one
network namespace (and UTS namespace: its own hostname) per pod with its own address on a bridge, an /etc/hosts in which every pod's
`<hostname>.<subdomain>.<namespace>.svc` name resolves (what cluster DNS gives a headless
Service), real exit codes, the termination message (the file DDETR_TERMINATION_LOG names, else
the log's tail: FallbackToLogsOnError), and deletion as SIGTERM, then SIGKILL after the grace period.
What is simulated or ignored: images (the command runs from this machine's PATH),
securityContext (processes run as the runner's user), resource limits, probes, init
containers, and `kubectl logs` (each container's log is under --state).

    python3 -m ddetr_localcluster.pod_runner --kubeconfig K --state DIR
"""
from __future__ import annotations

import argparse
import base64
import datetime as dt
import ipaddress
import json
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import kubernetes
from kubernetes.client.exceptions import ApiException

NODE_NAME = "ddetr-runner"
NODE_LABEL = "ddetr.dev/pod-runner"
RAW = {"_preload_content": False}
LOG_TAIL_BYTES, LOG_TAIL_LINES = 2048, 80
logger = logging.getLogger("pod-runner")


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {result.stderr.strip()}")
    return result


class PodConfigError(Exception):
    """The pod cannot start as written (kubelet's CreateContainerConfigError)."""


@dataclass
class RunningPod:
    uid: str
    namespace: str
    name: str
    ip: str
    netns: str
    veth: str
    root: Path
    process: subprocess.Popen | None = None
    terminating_since: float | None = None
    killed: bool = False
    exit_reported: bool = False
    pod: dict = field(default_factory=dict)


class Network:
    """A bridge on the host and one network namespace per pod, attached to it by a veth pair."""

    def __init__(self) -> None:
        for index in range(10):
            self.bridge = f"ddetr-br{index}"
            if sh("ip", "link", "show", self.bridge, check=False).returncode != 0:
                break
        else:
            raise RuntimeError("ten ddetr-br* bridges exist already: another pod runner is running")
        self.subnet = ipaddress.ip_network(f"10.213.{index}.0/24")
        self.gateway = str(self.subnet.network_address + 1)
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        sh("ip", "addr", "add", f"{self.gateway}/{self.subnet.prefixlen}", "dev", self.bridge)
        sh("ip", "link", "set", self.bridge, "up")
        self.used: set[str] = set()

    def allocate(self) -> str:
        for host in list(self.subnet.hosts())[1:]:
            if str(host) not in self.used:
                self.used.add(str(host))
                return str(host)
        raise RuntimeError("no free address for another pod")

    def attach(self, netns: str, veth: str, ip: str) -> None:
        sh("ip", "netns", "add", netns)
        sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns)
        sh("ip", "link", "set", veth, "master", self.bridge, "up")
        inside = ("ip", "netns", "exec", netns)
        sh(*inside, "ip", "addr", "add", f"{ip}/{self.subnet.prefixlen}", "dev", "eth0")
        sh(*inside, "ip", "link", "set", "eth0", "up")
        sh(*inside, "ip", "link", "set", "lo", "up")
        sh(*inside, "ip", "route", "add", "default", "via", self.gateway)

    def detach(self, netns: str, veth: str, ip: str) -> None:
        sh("ip", "link", "del", veth, check=False)
        sh("ip", "netns", "del", netns, check=False)
        shutil.rmtree(Path("/etc/netns") / netns, ignore_errors=True)
        self.used.discard(ip)

    def close(self) -> None:
        sh("ip", "link", "del", self.bridge, check=False)


class PodRunner:
    def __init__(self, api: kubernetes.client.ApiClient, state: Path, python_bin: Path):
        self.core = kubernetes.client.CoreV1Api(api)
        self.state = state
        self.python_bin = python_bin
        self.network = Network()
        self.pods: dict[str, RunningPod] = {}
        self.stopping = False

    # -- the node --------------------------------------------------------------

    def register_node(self) -> None:
        cpus = str(os.cpu_count() or 2)
        capacity = {"cpu": cpus, "memory": "64Gi", "pods": "32", "ephemeral-storage": "100Gi"}
        node = {"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": NODE_NAME, "labels": {NODE_LABEL: "true", "kubernetes.io/hostname": NODE_NAME,
                                                           "kubernetes.io/os": "linux"}}}
        try:
            self.core.create_node(node, **RAW)
        except ApiException as err:
            if err.status != 409:
                raise
        self.heartbeat(capacity)
        # The API server taints new nodes not-ready; no node-lifecycle controller runs here to lift it.
        self.core.patch_node(NODE_NAME, {"spec": {"taints": None}}, **RAW)

    def heartbeat(self, capacity: dict | None = None) -> None:
        status: dict = {"conditions": [{"type": "Ready", "status": "True", "reason": "PodRunnerReady",
                                        "message": "the local pod runner runs this node's pods as processes",
                                        "lastHeartbeatTime": now(), "lastTransitionTime": now()}],
                        "addresses": [{"type": "InternalIP", "address": self.network.gateway},
                                      {"type": "Hostname", "address": NODE_NAME}]}
        if capacity:
            status.update(capacity=capacity, allocatable=capacity,
                          nodeInfo={"architecture": "amd64", "operatingSystem": "linux",
                                    "kubeletVersion": "pod-runner", "kubeProxyVersion": "pod-runner"})
        self.core.patch_node_status(NODE_NAME, {"status": status}, **RAW)

    # -- the loop --------------------------------------------------------------

    def run(self) -> None:
        self.register_node()
        last_heartbeat = time.monotonic()
        while not self.stopping:
            try:
                pods = json.loads(self.core.list_pod_for_all_namespaces(
                    field_selector=f"spec.nodeName={NODE_NAME}", **RAW).data)["items"]
                self.sync(pods)
                if time.monotonic() - last_heartbeat > 20:
                    self.heartbeat()
                    last_heartbeat = time.monotonic()
            except Exception:  # a failed pass is retried on the next tick
                logger.exception("sync failed")
            time.sleep(0.5)

    def sync(self, pods: list[dict]) -> None:
        seen = set()
        for pod in pods:
            uid = pod["metadata"]["uid"]
            seen.add(uid)
            running = self.pods.get(uid)
            if running is not None:
                running.pod = pod
            if pod["metadata"].get("deletionTimestamp"):
                self.terminate(pod, running)
            elif running is None and (pod.get("status") or {}).get("phase") in (None, "Pending"):
                self.start(pod)
            elif running is not None:
                self.check_exit(running)
        for uid in [u for u in self.pods if u not in seen]:  # force-deleted: nothing left to report to
            running = self.pods.pop(uid)
            self.kill(running, signal.SIGKILL)
            self.cleanup(running)
        self.write_hosts()

    # -- one pod ---------------------------------------------------------------

    def start(self, pod: dict) -> None:
        meta = pod["metadata"]
        uid = meta["uid"]
        container = pod["spec"]["containers"][0]
        root = self.state / f"{meta['namespace']}_{meta['name']}_{uid[:8]}"
        root.mkdir(parents=True, exist_ok=True)
        try:
            env = self.environment(pod, container)
            mounts = self.volumes(pod, container, root)
            argv = [expand(part, env) for part in (container.get("command") or []) + (container.get("args") or [])]
            if not argv:
                raise PodConfigError("the pod runner needs an explicit command (there is no image to take it from)")
        except PodConfigError as err:
            self.patch_status(pod, {"phase": "Pending", "containerStatuses": [{
                "name": container["name"], "image": container.get("image", ""), "ready": False, "restartCount": 0,
                "state": {"waiting": {"reason": "CreateContainerConfigError", "message": str(err)}}}]})
            return
        ip = self.network.allocate()
        running = RunningPod(uid, meta["namespace"], meta["name"], ip, f"ddetr-{uid[:8]}", f"vd{uid[:8]}", root,
                             pod=pod)
        self.pods[uid] = running
        self.network.attach(running.netns, running.veth, ip)
        hosts_dir = Path("/etc/netns") / running.netns
        hosts_dir.mkdir(parents=True, exist_ok=True)
        (hosts_dir / "hosts").write_text("127.0.0.1 localhost\n")
        self.write_hosts()
        env.setdefault("HOSTNAME", (pod["spec"].get("hostname") or meta["name"])[:63])
        # A temporary folder of its own, as a container's own root filesystem gives it. Through
        # TMPDIR, not a mount over /tmp: the project's environment may itself live under /tmp.
        private_tmp = root / "tmp"
        private_tmp.mkdir(exist_ok=True)
        env.setdefault("TMPDIR", str(private_tmp))
        # The kubelet's terminationMessagePath file, named by the trainer's variable for it instead of
        # a bind mount over /dev (a file made there would land in the host's /dev).
        env.setdefault("DDETR_TERMINATION_LOG", str(root / "termination-log"))
        # Bind-mount the volumes in the pod's own mount namespace (ip netns exec makes one), then exec.
        # Its own UTS namespace too: the pod's hostname resolves to its own address (gloo and
        # NCCL pick their interface from it), as in a real pod.
        script = ["set -e", f"hostname {shlex.quote(env['HOSTNAME'])}"]
        for source, target, read_only in mounts:
            kind = "-f" if Path(source).is_file() else "-d"
            make = f"touch {shlex.quote(target)}" if kind == "-f" else f"mkdir -p {shlex.quote(target)}"
            script.append(f"[ -e {shlex.quote(target)} ] || {make}")
            script.append(f"mount --bind {shlex.quote(source)} {shlex.quote(target)}")
            if read_only:
                script.append(f"mount -o remount,bind,ro {shlex.quote(target)}")
        script.append(f"cd {shlex.quote(container.get('workingDir') or '/')}")
        script.append('exec "$@"')
        log = open(root / "container.log", "ab")
        running.process = subprocess.Popen(
            ["ip", "netns", "exec", running.netns, "unshare", "--uts", "sh", "-c", "\n".join(script), "pod", *argv],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        log.close()
        (root / "pid").write_text(str(running.process.pid))
        (root / "netns").write_text(running.netns)
        started = now()
        self.patch_status(pod, {
            "phase": "Running", "hostIP": self.network.gateway, "podIP": ip, "podIPs": [{"ip": ip}],
            "startTime": started,
            "conditions": [{"type": t, "status": "True", "lastTransitionTime": started}
                           for t in ("Initialized", "Ready", "ContainersReady")],
            "containerStatuses": [{"name": container["name"], "image": container.get("image", ""), "ready": True,
                                   "started": True, "restartCount": 0, "state": {"running": {"startedAt": started}}}]})
        logger.info("started %s/%s at %s: %s", meta["namespace"], meta["name"], ip, shlex.join(argv)[:200])

    def check_exit(self, running: RunningPod) -> None:
        if running.process is None or running.exit_reported or running.process.poll() is None:
            return
        code = running.process.returncode
        code = 128 - code if code < 0 else code  # killed by signal N -> 128 + N, as a container runtime says
        container = running.pod["spec"]["containers"][0]
        written = running.root / "termination-log"  # as kubelet: the file's message first, 4096 bytes
        message = written.read_bytes()[:4096].decode(errors="replace") if written.exists() else ""
        if not message and code != 0 and container.get("terminationMessagePolicy") == "FallbackToLogsOnError":
            message = log_tail(running.root / "container.log")
        finished = now()
        started = ((running.pod.get("status") or {}).get("startTime")) or finished
        phase = "Succeeded" if code == 0 else "Failed"
        terminated = {"exitCode": code, "reason": "Completed" if code == 0 else "Error",
                      "startedAt": started, "finishedAt": finished}
        if message:
            terminated["message"] = message
        self.patch_status(running.pod, {
            "phase": phase,
            "conditions": [{"type": t, "status": "False", "reason": "PodCompleted", "lastTransitionTime": finished}
                           for t in ("Ready", "ContainersReady")],
            "containerStatuses": [{"name": container["name"], "image": container.get("image", ""), "ready": False,
                                   "started": False, "restartCount": 0, "state": {"terminated": terminated}}]})
        running.exit_reported = True
        logger.info("%s/%s exited with %d", running.namespace, running.name, code)

    def terminate(self, pod: dict, running: RunningPod | None) -> None:
        """The API server marked the pod for deletion: SIGTERM, SIGKILL after the grace period, then remove it."""
        if running is not None and running.process is not None and running.process.poll() is None:
            grace = pod["metadata"].get("deletionGracePeriodSeconds")
            grace = 30 if grace is None else int(grace)
            if running.terminating_since is None:
                running.terminating_since = time.monotonic()
                self.kill(running, signal.SIGTERM)
            if time.monotonic() - running.terminating_since >= grace and not running.killed:
                self.kill(running, signal.SIGKILL)
                running.killed = True
            return
        if running is not None:
            self.check_exit(running)
            self.cleanup(self.pods.pop(running.uid))
        try:
            self.core.delete_namespaced_pod(pod["metadata"]["name"], pod["metadata"]["namespace"],
                                            grace_period_seconds=0,
                                            body={"preconditions": {"uid": pod["metadata"]["uid"]}}, **RAW)
        except ApiException as err:
            if err.status not in (404, 409):
                raise

    def kill(self, running: RunningPod, sig: int) -> None:
        if running.process is not None and running.process.poll() is None:
            try:
                os.killpg(running.process.pid, sig)
            except ProcessLookupError:
                pass

    def cleanup(self, running: RunningPod) -> None:
        if running.process is not None:
            try:
                running.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.kill(running, signal.SIGKILL)
        # Processes that left the group but live in the pod's network namespace go with it.
        for pid in sh("ip", "netns", "pids", running.netns, check=False).stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        self.network.detach(running.netns, running.veth, running.ip)

    def patch_status(self, pod: dict, status: dict) -> None:
        try:
            self.core.patch_namespaced_pod_status(pod["metadata"]["name"], pod["metadata"]["namespace"],
                                                  {"status": status}, **RAW)
        except ApiException as err:
            if err.status != 404:
                raise

    # -- what a pod sees ---------------------------------------------------------

    def write_hosts(self) -> None:
        """Every pod's hosts file names every pod here (DNS for the headless Services)."""
        lines = ["127.0.0.1 localhost"]
        for running in self.pods.values():
            spec, meta = running.pod.get("spec") or {}, running.pod["metadata"]
            names = [spec.get("hostname") or meta["name"]]
            if spec.get("hostname") and spec.get("subdomain"):
                fqdn = f"{spec['hostname']}.{spec['subdomain']}.{meta['namespace']}.svc"
                names = [f"{fqdn}.cluster.local", fqdn, f"{spec['hostname']}.{spec['subdomain']}"] + names
            lines.append(f"{running.ip} {' '.join(names)}")
        text = "\n".join(lines) + "\n"
        for running in self.pods.values():
            path = Path("/etc/netns") / running.netns / "hosts"
            if path.exists() and path.read_text() != text:
                with open(path, "r+") as handle:  # in place: the pod's /etc/hosts is a bind mount of this inode
                    handle.write(text)
                    handle.truncate()

    def environment(self, pod: dict, container: dict) -> dict[str, str]:
        env = {"PATH": f"{self.python_bin}:{os.environ.get('PATH', '/usr/bin:/bin')}", "HOME": "/root",
               "LANG": os.environ.get("LANG", "C.UTF-8"), "KUBERNETES_SERVICE_HOST": "",
               "PYTHONUNBUFFERED": "1"}
        if os.environ.get("PYTHONPATH"):  # the project's environment, as the runner itself has it
            env["PYTHONPATH"] = os.environ["PYTHONPATH"]
        namespace = pod["metadata"]["namespace"]
        for source in container.get("envFrom") or []:
            prefix = source.get("prefix", "")
            if "configMapRef" in source:
                data = self.read_config(namespace, "configmap", source["configMapRef"]["name"],
                                        source["configMapRef"].get("optional", False))
            else:
                data = self.read_config(namespace, "secret", source["secretRef"]["name"],
                                        source["secretRef"].get("optional", False))
            env.update({prefix + k: v for k, v in data.items()})
        for var in container.get("env") or []:
            if "value" in var or "valueFrom" not in var:
                env[var["name"]] = expand(var.get("value", ""), env)
                continue
            value = self.value_from(pod, var["name"], var["valueFrom"])
            if value is not None:
                env[var["name"]] = value
        return env

    def value_from(self, pod: dict, name: str, source: dict) -> str | None:
        namespace = pod["metadata"]["namespace"]
        if "fieldRef" in source:
            return field_value(pod, source["fieldRef"]["fieldPath"])
        for kind, key in (("secret", "secretKeyRef"), ("configmap", "configMapKeyRef")):
            if key in source:
                ref = source[key]
                data = self.read_config(namespace, kind, ref["name"], ref.get("optional", False))
                if ref["key"] not in data:
                    if ref.get("optional"):
                        return None
                    raise PodConfigError(f"couldn't find key {ref['key']} in {kind} {namespace}/{ref['name']} "
                                         f"(env {name})")
                return data[ref["key"]]
        if "resourceFieldRef" in source:
            return "0"
        raise PodConfigError(f"env {name}: unsupported valueFrom {sorted(source)}")

    def read_config(self, namespace: str, kind: str, name: str, optional: bool) -> dict[str, str]:
        try:
            if kind == "secret":
                obj = json.loads(self.core.read_namespaced_secret(name, namespace, **RAW).data)
                return {k: base64.b64decode(v).decode() for k, v in (obj.get("data") or {}).items()}
            obj = json.loads(self.core.read_namespaced_config_map(name, namespace, **RAW).data)
            return dict(obj.get("data") or {})
        except ApiException as err:
            if err.status == 404:
                if optional:
                    return {}
                raise PodConfigError(f'{kind} "{name}" not found') from None
            raise

    def volumes(self, pod: dict, container: dict, root: Path) -> list[tuple[str, str, bool]]:
        namespace, sources = pod["metadata"]["namespace"], {}
        for volume in pod["spec"].get("volumes") or []:
            name, path = volume["name"], root / "volumes" / volume["name"]
            if "configMap" in volume or "secret" in volume:
                kind = "configmap" if "configMap" in volume else "secret"
                ref = volume.get("configMap") or volume.get("secret")
                data = self.read_config(namespace, kind, ref.get("name") or ref.get("secretName"),
                                        ref.get("optional", False))
                path.mkdir(parents=True, exist_ok=True)
                items = ref.get("items") or [{"key": k, "path": k} for k in data]
                for item in items:
                    if item["key"] in data:
                        (path / item["path"]).parent.mkdir(parents=True, exist_ok=True)
                        (path / item["path"]).write_text(data[item["key"]])
                sources[name] = str(path)
            elif "emptyDir" in volume:
                path.mkdir(parents=True, exist_ok=True)
                sources[name] = str(path)
            elif "hostPath" in volume:
                sources[name] = volume["hostPath"]["path"]
            elif "projected" in volume or "downwardAPI" in volume:
                path.mkdir(parents=True, exist_ok=True)  # service-account tokens etc.: not simulated
                sources[name] = str(path)
            else:
                raise PodConfigError(f"volume {name}: the pod runner supports configMap, secret, emptyDir and "
                                     f"hostPath volumes")
        mounts = []
        for mount in container.get("volumeMounts") or []:
            if mount["name"] not in sources:
                raise PodConfigError(f"volumeMount {mount['name']}: no such volume")
            if mount["mountPath"].startswith("/var/run/secrets/kubernetes.io"):
                continue
            source = sources[mount["name"]]
            if mount.get("subPath"):
                source = os.path.join(source, mount["subPath"])
            mounts.append((source, mount["mountPath"], bool(mount.get("readOnly"))))
        return mounts

    def shutdown(self) -> None:
        for running in self.pods.values():
            self.kill(running, signal.SIGTERM)
        deadline = time.monotonic() + 5
        for running in list(self.pods.values()):
            if running.process is not None:
                try:
                    running.process.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    self.kill(running, signal.SIGKILL)
            self.cleanup(running)
        self.pods.clear()
        self.network.close()


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: known variables are replaced, $$(VAR) escapes, unknown stay."""
    def replace(match: re.Match) -> str:
        if match.group(0).startswith("$$"):
            return match.group(0)[1:]
        return env.get(match.group(1), match.group(0))
    return re.sub(r"\$?\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)", replace, text)


def field_value(pod: dict, path: str) -> str:
    meta, spec, status = pod["metadata"], pod.get("spec") or {}, pod.get("status") or {}
    match = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
    if match:
        return (meta.get(match.group(1)) or {}).get(match.group(2), "")
    simple = {"metadata.name": meta.get("name"), "metadata.namespace": meta.get("namespace"),
              "metadata.uid": meta.get("uid"), "spec.nodeName": spec.get("nodeName"),
              "spec.serviceAccountName": spec.get("serviceAccountName"), "status.hostIP": status.get("hostIP"),
              "status.podIP": status.get("podIP")}
    if path not in simple:
        raise PodConfigError(f"fieldRef {path} is not supported by the pod runner")
    return simple[path] or ""


def log_tail(path: Path) -> str:
    """What kubelet keeps for FallbackToLogsOnError: the last 80 lines, at most 2048 bytes."""
    data = path.read_bytes()[-LOG_TAIL_BYTES:] if path.exists() else b""
    return "\n".join(data.decode(errors="replace").splitlines()[-LOG_TAIL_LINES:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--state", required=True, type=Path, help="pods' logs, volumes and pid files go here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if os.geteuid() != 0:
        print("pod_runner.py: needs root (network namespaces and bind mounts)", file=sys.stderr)
        return 2
    kubernetes.config.load_kube_config(config_file=args.kubeconfig)
    args.state.mkdir(parents=True, exist_ok=True)
    runner = PodRunner(kubernetes.client.ApiClient(), args.state, Path(sys.executable).parent)

    def stop(*_):
        runner.stopping = True
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        runner.run()
    finally:
        runner.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
