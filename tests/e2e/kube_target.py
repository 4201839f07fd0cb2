"""The cluster the end-to-end suite talks to, in one of two forms:

- `Cluster`: any cluster KUBECONFIG names (e.g. kind with the real images): the chart's
  operator runs as its Deployment, S3 is an in-cluster moto Deployment, helpers run as Jobs.
- `LocalTarget`: the local control plane (localcluster/ddetr_localcluster), started by the suite when
  no KUBECONFIG is given: the operator runs here as a host process authenticated as the
  chart's ServiceAccount (a TokenRequest token), S3 is moto on the pod runner's bridge
  address (reachable from the host and from every pod), helpers run as local Python, and
  pods are reached at their own addresses.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

import yaml

import e2e_manifests as m

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "deformable-detr-operator"


class Cluster:
    """kubectl and helm against one cluster, in one test namespace."""

    local = False

    def __init__(self, namespace: str, kubectl_path: str, helm_path: str, kubeconfig: str):
        self.namespace = namespace
        self.kubectl_path = kubectl_path
        self.helm_path = helm_path
        self.kubeconfig = kubeconfig

    def kubectl(self, *args: str, stdin: str | None = None, check: bool = True, timeout: float = 120,
                namespaced: bool = True, namespace: str | None = None) -> str:
        ns = namespace or self.namespace
        command = [self.kubectl_path, "--kubeconfig", self.kubeconfig,
                   *(["--namespace", ns] if namespaced else []), *args]
        result = subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {result.stderr.strip()}")
        return result.stdout if check else result

    def helm(self, *args: str, timeout: float = 600) -> str:
        result = subprocess.run([self.helm_path, "--kubeconfig", self.kubeconfig, *args], capture_output=True,
                                text=True, timeout=timeout)
        if result.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed: {result.stderr.strip()}")
        return result.stdout

    def apply(self, manifests: list[dict], namespace: str | None = None) -> None:
        self.kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all(manifests), namespace=namespace)

    def get(self, kind: str, name: str, namespace: str | None = None) -> dict[str, Any]:
        return json.loads(self.kubectl("get", kind, name, "-o", "json", namespace=namespace))

    def wait_until(self, what: str, condition: Callable[[], Any], timeout: float, every: float = 3.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = condition()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(every)

    # -- what differs between a real cluster and the local one ---------------------

    def s3_endpoint(self) -> str:
        return m.s3_endpoint(self.namespace)

    def training_job(self, name: str, num_epochs: int, nodes: int = 2) -> dict:
        return m.training_job(self.namespace, name, num_epochs=num_epochs, nodes=nodes)

    def run_python(self, name: str, code: str, timeout: float = 300) -> str:
        """Run `code` in a one-shot Job (trainer image, S3 credentials) and return its output."""
        self.apply([m.helper_job(self.namespace, name, code)])
        self.kubectl("wait", "--for=condition=complete", f"job/{name}", f"--timeout={int(timeout)}s",
                     timeout=timeout + 30)
        return self.kubectl("logs", f"job/{name}")

    def scrape_pod(self, pod: dict, port: int) -> str:
        return self._scrape_forwarded(f"pod/{pod['metadata']['name']}", port)

    def scrape_operator(self, port: int = 8000) -> str:
        services = json.loads(self.kubectl("get", "services", "-l", "app.kubernetes.io/component=operator",
                                           "-o", "json"))["items"]
        assert len(services) == 1, "expected the chart's one metrics Service"
        return self._scrape_forwarded(f"service/{services[0]['metadata']['name']}", port)

    def pod_log(self, pod: dict) -> str:
        return self.kubectl("logs", pod["metadata"]["name"])

    def break_worker(self, pod: dict) -> None:
        """Lose one worker mid-training (here: force-delete its pod)."""
        self.kubectl("delete", "pod", pod["metadata"]["name"], "--grace-period=0", "--force", "--wait=false")

    def _scrape_forwarded(self, target: str, port: int) -> str:
        process = subprocess.Popen([self.kubectl_path, "--kubeconfig", self.kubeconfig, "--namespace",
                                    self.namespace, "port-forward", target, f":{port}"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            line = process.stdout.readline()
            match = re.search(r"127\.0\.0\.1:(\d+)", line)
            if not match:
                raise AssertionError(f"port-forward {target}: {line or process.stderr.read()}")
            return _get(f"http://127.0.0.1:{match.group(1)}/metrics")
        finally:
            process.terminate()
            process.wait(timeout=10)


class OperatorProcess:
    """`python -m ddetr_operator` on this machine, authenticated as a ServiceAccount of the chart."""

    def __init__(self, target: "LocalTarget", service_account: str, sa_namespace: str,
                 watch_namespaces: list[str], extra_env: dict[str, str] | None = None):
        self.target = target
        self.service_account, self.sa_namespace = service_account, sa_namespace
        self.watch_namespaces = watch_namespaces
        self.extra_env = dict(extra_env or {})
        self.metrics_port = _free_port()
        self.process: subprocess.Popen | None = None
        self.log = target.state / f"operator-{service_account}-{sa_namespace}.log"

    def kubeconfig(self) -> Path:
        """A kubeconfig holding only a TokenRequest token of the ServiceAccount: no admin rights."""
        token = self.target.kubectl("create", "token", self.service_account, "--duration=3h",
                                    namespace=self.sa_namespace).strip()
        admin = yaml.safe_load(Path(self.target.kubeconfig).read_text())
        cluster = admin["clusters"][0]["cluster"]
        config = {"apiVersion": "v1", "kind": "Config", "current-context": "operator",
                  "clusters": [{"name": "local", "cluster": cluster}],
                  "users": [{"name": "operator", "user": {"token": token}}],
                  "contexts": [{"name": "operator", "context": {"cluster": "local", "user": "operator"}}]}
        path = self.target.state / f"operator-{self.service_account}-{self.sa_namespace}.kubeconfig"
        path.write_text(yaml.safe_dump(config))
        path.chmod(0o600)
        return path

    def start(self) -> "OperatorProcess":
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig()),
               "DDETR_WATCH_NAMESPACES": ",".join(self.watch_namespaces),
               "DDETR_OPERATOR_METRICS_PORT": str(self.metrics_port),
               "DDETR_LIVENESS_ENDPOINT": f"http://127.0.0.1:{_free_port()}/healthz",
               "DDETR_RECONCILE_INTERVAL": "2", **self.extra_env}
        handle = open(self.log, "ab")
        from ddetr_localcluster.controlplane import _die_with_parent  # a killed suite leaves no operator
        self.process = subprocess.Popen([sys.executable, "-m", "ddetr_operator"], stdout=handle,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                        start_new_session=True, preexec_fn=_die_with_parent)
        handle.close()
        # Fail here, with its words, rather than later as a job that never moves.
        deadline = time.monotonic() + 60
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"the operator exited with {self.process.returncode}:\n{self.tail()}")
            try:
                _get(f"http://127.0.0.1:{self.metrics_port}/metrics")
                return self
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"the operator's /metrics did not answer in 60 s:\n{self.tail()}") from None
                time.sleep(0.5)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, sig)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        self.process = None

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:]) if self.log.exists() else ""


class LocalTarget(Cluster):
    """The local control plane: pods run on the pod runner's node or on KWOK's fake GPU nodes."""

    local = True
    RUNNER_SELECTOR = {"ddetr.dev/pod-runner": "true"}

    def __init__(self, namespace: str, cluster, helm_path: str):
        super().__init__(namespace, str(cluster.bin_dir / "kubectl"), helm_path, str(cluster.kubeconfig))
        self.control_plane = cluster
        self.state = cluster.state
        self.s3_url: str | None = None
        self.data_dir: str | None = None
        self.operators: list[OperatorProcess] = []

    def runner_address(self) -> str:
        node = self.get("node", "ddetr-runner", namespace=None)
        return next(a["address"] for a in node["status"]["addresses"] if a["type"] == "InternalIP")

    def s3_endpoint(self) -> str:
        assert self.s3_url, "the s3_store fixture starts the S3 server"
        return self.s3_url

    def training_job(self, name: str, num_epochs: int, nodes: int = 2) -> dict:
        job = m.training_job(self.namespace, name, num_epochs=num_epochs, nodes=nodes,
                             endpoint=self.s3_endpoint(), data_host_path=self.data_dir)
        job["spec"]["nodeSelector"] = dict(self.RUNNER_SELECTOR)
        return job

    def run_python(self, name: str, code: str, timeout: float = 300) -> str:
        env = {**os.environ, "AWS_ENDPOINT_URL": self.s3_endpoint(), "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_ACCESS_KEY_ID": m.ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": m.SECRET_KEY}
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                                timeout=timeout)
        assert result.returncode == 0, f"{name}: {result.stderr[-2000:]}"
        return result.stdout

    def scrape_pod(self, pod: dict, port: int) -> str:
        return _get(f"http://{pod['status']['podIP']}:{port}/metrics")

    def scrape_operator(self, port: int | None = None) -> str:
        running = [o for o in self.operators if o.process is not None]
        assert running, "no operator process is running"
        return _get(f"http://127.0.0.1:{running[0].metrics_port}/metrics")

    def pod_dir(self, pod: dict) -> Path:
        meta = pod["metadata"]
        return self.state / "pods" / f"{meta['namespace']}_{meta['name']}_{meta['uid'][:8]}"

    def pod_log(self, pod: dict) -> str:
        log = self.pod_dir(pod) / "container.log"
        return log.read_text(errors="replace") if log.exists() else ""

    def rank_pids(self, pod: dict) -> list[int]:
        """The training processes (torchrun's workers: they carry LOCAL_RANK) in the pod's network namespace."""
        netns = (self.pod_dir(pod) / "netns").read_text().strip()
        pids = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True).stdout.split()
        ranks = []
        for pid in pids:
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(item.startswith(b"LOCAL_RANK=") for item in environ):
                ranks.append(int(pid))
        return ranks

    def break_worker(self, pod: dict) -> None:
        """SIGKILL one rank's process, as the OOM killer or a crashing library would."""
        pids = self.wait_until(f"the training process of {pod['metadata']['name']}", lambda: self.rank_pids(pod),
                               120, every=1)
        os.kill(pids[0], signal.SIGKILL)

    def start_operator(self, service_account: str, sa_namespace: str, watch_namespaces: list[str],
                       extra_env: dict[str, str] | None = None) -> OperatorProcess:
        operator = OperatorProcess(self, service_account, sa_namespace, watch_namespaces, extra_env).start()
        self.operators.append(operator)
        return operator

    def stop_operators(self) -> None:
        for operator in self.operators:
            operator.stop()
        self.operators.clear()


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def _free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
