"""How the operator's cost grows with the number of jobs, on the local control plane.

    bash scripts/local-cluster.sh up        # prints KUBECONFIG=...
    KUBECONFIG=... python3 bench/operator_scale.py [--jobs 10 100 1000] [--poll-jobs 10 100] [--window 60]

For each N: N one-pod DeformableDetrJobs on KWOK's fake nodes (the bench adds KWOK nodes until
they hold every pod: 110 pods a node), the operator (this process, on its own thread, resync every
--interval s) and a real S3 endpoint (moto's server, in its own process) for the progress reads.
Once every job runs, a window of --window seconds measures the operator's Kubernetes API
requests/s (its client's calls and kopf's, counted at the HTTP clients), the latency of its
reconcile passes (p50/p99, and how many were cached, progress-only or full) and its resident
memory; then every pod ends (exit 0), and a second window measures what the finished jobs cost
(nothing is expected).

Two modes of the same operator, in the same run: "watch", the operator as it is (cached passes
from the watched children, a full pass per job every --full-pass-every s), and "poll", the
reference: every pass a full one with the Secret read each time (Options(full_pass_every=0,
secret_ttl=0)), which is what the operator did before the cache (~40 requests per running job
per minute; at 1000 jobs ~700 requests/s, more than this machine serves, hence --poll-jobs).
--full-pass-every defaults to --window, so that each window holds one full pass of every job
(the operator's default is 300 s: its cost per job is then a fifth of the full-pass part).
Prints a table and the growth from the smallest to each larger N, and writes
bench/results/operator_scale.json.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "e2e"))
sys.path.insert(0, str(REPO / "bench"))


class Counter:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests = 0
        self.passes: list[tuple[float, float, str]] = []  # (end time, seconds, kind)

    def request(self) -> None:
        with self.lock:
            self.requests += 1


COUNTER = Counter()


def instrument() -> None:
    """Count every request of the operator's two HTTP clients, and time every reconcile pass."""
    import aiohttp
    import kubernetes.client.rest as rest
    from ddetr_operator import passes

    original_request = rest.RESTClientObject.request

    def counted(self, *args, **kwargs):
        COUNTER.request()
        return original_request(self, *args, **kwargs)
    rest.RESTClientObject.request = counted

    original_aiohttp = aiohttp.ClientSession._request

    async def counted_aiohttp(self, *args, **kwargs):
        COUNTER.request()
        return await original_aiohttp(self, *args, **kwargs)
    aiohttp.ClientSession._request = counted_aiohttp

    original_pass = passes.reconcile_once

    def timed(*args, **kwargs):
        started, kind = time.monotonic(), "error"
        try:
            result = original_pass(*args, **kwargs)
            kind = getattr(result, "kind", "full")
            return result
        finally:
            end = time.monotonic()
            with COUNTER.lock:
                COUNTER.passes.append((end, end - started, kind))
    passes.reconcile_once = timed


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def kubectl_path() -> str:
    import glob
    import shutil
    found = shutil.which("kubectl") or next(iter(sorted(glob.glob(
        str(Path.home() / ".cache" / "ddetr-control-plane" / "*" / "bin" / "kubectl")))), None)
    if not found:
        raise SystemExit("no kubectl (scripts/local-cluster.sh builds one)")
    return found


def kubectl(*args: str, stdin: str | None = None, check: bool = True) -> str:
    result = subprocess.run([KUBECTL, *args], input=stdin, capture_output=True, text=True, timeout=300)
    if check and result.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout if result.returncode == 0 else ""


def phases(namespace: str) -> list[str]:
    items = json.loads(kubectl("get", "ddj", "-n", namespace, "-o", "json"))["items"]
    return [(i.get("status") or {}).get("phase", "") for i in items]


def wait_all(namespace: str, phase: str, count: int, timeout: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if phases(namespace).count(phase) == count:
            return time.monotonic() - started
        time.sleep(2)
    raise RuntimeError(f"not all {count} jobs in {namespace} reached {phase} in {timeout:.0f} s: "
                       f"{sorted(phases(namespace))[:10]}...")


def window(seconds: float) -> dict:
    with COUNTER.lock:
        requests_before, passes_before = COUNTER.requests, len(COUNTER.passes)
    start = time.monotonic()
    time.sleep(seconds)
    with COUNTER.lock:
        requests = COUNTER.requests - requests_before
        passes = COUNTER.passes[passes_before:]
    durations = [d for _, d, _ in passes]
    elapsed = time.monotonic() - start
    quantiles = statistics.quantiles(durations, n=100) if len(durations) >= 2 else None
    kinds = {kind: sum(1 for *_, k in passes if k == kind) for kind in ("cached", "progress", "full", "error")}
    return {"seconds": round(elapsed, 1), "requests": requests, "requests_per_s": round(requests / elapsed, 2),
            "passes": len(durations), "pass_kinds": kinds,
            "pass_p50_ms": round(quantiles[49] * 1000, 1) if quantiles else None,
            "pass_p99_ms": round(quantiles[98] * 1000, 1) if quantiles else None, "rss_mib": round(rss_mib(), 1)}


PODS_PER_KWOK_NODE = 110  # the capacity localcluster's kwok_node gives


def ensure_kwok_nodes(pods: int) -> list[str]:
    """Enough KWOK nodes for `pods` more pods (plus one spare): the ones the bench adds, by name."""
    import yaml
    from ddetr_localcluster.controlplane import KWOK_NODE_LABEL, KWOK_NODE_VALUE, clear_not_ready_taint, kwok_node
    nodes = json.loads(kubectl("get", "nodes", "-l", f"{KWOK_NODE_LABEL}={KWOK_NODE_VALUE}", "-o", "json"))["items"]
    have = sum(int((node.get("status") or {}).get("allocatable", {}).get("pods", PODS_PER_KWOK_NODE))
               for node in nodes)
    added = []
    index = 0
    while have < pods + PODS_PER_KWOK_NODE:
        name = f"bench-kwok-{index}"
        index += 1
        if any(node["metadata"]["name"] == name for node in nodes):
            continue
        kubectl("apply", "-f", "-", stdin=yaml.safe_dump(kwok_node(name)))
        clear_not_ready_taint(kubectl, name)
        added.append(name)
        have += PODS_PER_KWOK_NODE
    for name in added:
        for _ in range(60):
            if kubectl("get", "node", name, "-o", "jsonpath={.status.conditions[?(@.type=='Ready')].status}",
                       check=False).strip() == "True":
                break
            time.sleep(1)
    return added


def run_size(n: int, mode: str, endpoint: str, window_s: float, timeout: float) -> dict:
    import yaml
    import e2e_manifests as m
    namespace = f"bench-{mode}-{n}-{uuid.uuid4().hex[:4]}"
    kubectl("create", "namespace", namespace)
    # The credentials Secret the jobs name (the operator reads it for the progress reads from S3).
    kubectl("apply", "-n", namespace, "-f", "-", stdin=yaml.safe_dump(m.credentials_secret(namespace)))
    from ddetr_operator import handlers  # noqa: F401
    jobs = []
    for i in range(n):
        job = m.kwok_job(namespace, f"scale-{i}", endpoint, nodes=1, gpusPerNode=0, resources={})
        job["spec"].pop("resources", None)
        job["spec"].pop("serviceAccountName", None)
        jobs.append(job)
    OPERATOR_NAMESPACES[:] = [namespace]
    operator = start_operator(namespace, mode)
    try:
        created = time.monotonic()
        for start in range(0, n, 200):  # (one kubectl call per 200 jobs: a bounded request body)
            kubectl("apply", "-n", namespace, "-f", "-", stdin=yaml.safe_dump_all(jobs[start:start + 200]))
        to_running = wait_all(namespace, "Running", n, timeout)
        running = window(window_s)
        kubectl("annotate", "pods", "--all", "-n", namespace, "--overwrite", "ddetr.dev/simulated-exit-code=0")
        wait_all(namespace, "Succeeded", n, timeout)
        time.sleep(3)  # the last status patches and their events settle
        finished = window(window_s / 2)
        return {"jobs": n, "mode": mode, "seconds_to_all_running": round(to_running, 1), "running": running, "finished": finished,
                "requests_per_job_minute_running": round(running["requests"] / n / (running["seconds"] / 60), 1),
                "setup_seconds": round(time.monotonic() - created, 1)}
    finally:
        stop_operator(operator)
        kubectl("delete", "namespace", namespace, "--wait=false", check=False)


OPERATOR_NAMESPACES: list[str] = []


def operator_options(mode: str):
    from ddetr_operator.options import Options
    if mode == "poll":  # the reference: the operator before the cache
        return Options(interval=ARGS.interval, full_pass_every=0, secret_ttl=0)
    return Options(interval=ARGS.interval, full_pass_every=ARGS.full_pass_every)


def start_operator(namespace: str, mode: str):
    import kopf
    from ddetr_operator import handlers
    registry = handlers.register(kopf.OperatorRegistry(), options=operator_options(mode))
    stop, ready = threading.Event(), threading.Event()
    coroutine = kopf.operator(registry=registry, clusterwide=False, namespaces=[namespace], standalone=True,
                              stop_flag=stop, ready_flag=ready, memo=kopf.Memo(metrics_port=0))
    thread = threading.Thread(target=asyncio.run, args=(coroutine,), daemon=True)
    thread.start()
    if not ready.wait(60):
        raise RuntimeError("the operator did not start")
    return stop, thread


def stop_operator(operator) -> None:
    stop, thread = operator
    stop.set()
    thread.join(60)


def main() -> int:
    global ARGS, KUBECTL
    KUBECTL = kubectl_path()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, nargs="+", default=[10, 100, 1000], help="sizes run in watch mode")
    parser.add_argument("--poll-jobs", type=int, nargs="*", default=[10, 100],
                        help="sizes also run in poll mode (the reference: every pass a full one)")
    parser.add_argument("--window", type=float, default=60, help="seconds measured while the jobs run")
    parser.add_argument("--interval", type=float, default=10, help="the operator's resync interval")
    parser.add_argument("--full-pass-every", type=float, default=None,
                        help="watch mode: seconds between full passes of a job (default: --window)")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--output", default=str(REPO / "bench" / "results" / "operator_scale.json"))
    ARGS = parser.parse_args()
    if ARGS.full_pass_every is None:
        ARGS.full_pass_every = ARGS.window
    if not os.environ.get("KUBECONFIG"):
        parser.error("set KUBECONFIG (bash scripts/local-cluster.sh up prints it)")
    import logging
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's access log
    instrument()
    kubectl("apply", "--server-side", "--force-conflicts", "-f", str(REPO / "crds" / "deformabledetrjobs.yaml"))
    for _ in range(60):
        if "True" in kubectl("get", "crd", "deformabledetrjobs.ddetr.dev", "-o",
                             "jsonpath={.status.conditions[?(@.type=='Established')].status}", check=False):
            break
        time.sleep(1)
    from kube_target import _free_port
    port = _free_port()
    # In its own process: in this one its request handling would compete with the operator for the GIL.
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    import socket
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.2)
    results = []
    added_nodes = ensure_kwok_nodes(max([*ARGS.jobs, *ARGS.poll_jobs]))
    runs = [("poll", n) for n in sorted(ARGS.poll_jobs)] + [("watch", n) for n in sorted(ARGS.jobs)]
    try:
        for mode, n in runs:
            try:
                results.append(run_size(n, mode, endpoint, ARGS.window, ARGS.timeout))
            except RuntimeError as err:  # (a size this machine cannot bring up in --timeout: say so, go on)
                results.append({"jobs": n, "mode": mode, "error": str(err)[:2000]})
            print(json.dumps(results[-1]), flush=True)
    finally:
        server.terminate()
        server.wait(10)
        for name in added_nodes:
            kubectl("delete", "node", name, "--wait=false", check=False)
    header = (f"{'mode':>5} {'jobs':>5} {'to Running s':>12} {'API req/s':>10} {'req/job/min':>11} {'pass p50 ms':>11} "
              f"{'pass p99 ms':>11} {'passes c/p/f':>14} {'RSS MiB':>8} {'finished req/s':>14}")
    print(header)
    for r in results:
        if "error" in r:
            print(f"{r['mode']:>5} {r['jobs']:>5} error: {r['error'][:200]}")
            continue
        run = r["running"]
        kinds = run["pass_kinds"]
        print(f"{r['mode']:>5} {r['jobs']:>5} {r['seconds_to_all_running']:>12} {run['requests_per_s']:>10} "
              f"{r['requests_per_job_minute_running']:>11} {run['pass_p50_ms']:>11} {run['pass_p99_ms']:>11} "
              f"{kinds['cached']:>4}/{kinds['progress']}/{kinds['full']:<5} "
              f"{run['rss_mib']:>8} {r['finished']['requests_per_s']:>14}")
    growth = growth_lines(results)
    print("\n".join(growth))
    from ddetr_operator.options import DEFAULT_FULL_PASS_EVERY
    record = {"benchmark": "operator_scale", "interval_s": ARGS.interval, "window_s": ARGS.window,
              "full_pass_every_s": ARGS.full_pass_every, "operator_default_full_pass_every_s": DEFAULT_FULL_PASS_EVERY,
              "cores": os.cpu_count(), "load_at_start": os.getloadavg()[0], "results": results,
              "reference": "mode poll: the same operator with every pass a full one (full_pass_every 0, secret_ttl 0), "
                           "as it was before watching its children",
              "growth": growth}
    Path(ARGS.output).parent.mkdir(parents=True, exist_ok=True)
    Path(ARGS.output).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {ARGS.output}")
    return 0


def growth_lines(results: list[dict]) -> list[str]:
    """From the smallest N of each mode to each larger one: how requests/s, the per-job rate, pass
    latency and RSS grew against N; and watch against poll at the same N."""
    lines = []
    done = [r for r in results if "error" not in r]
    for mode in ("watch", "poll"):
        runs = sorted((r for r in done if r["mode"] == mode), key=lambda r: r["jobs"])
        for base, r in zip(runs[:1] * len(runs), runs[1:]):
            b, c = base["running"], r["running"]
            ratio = lambda new, old: f"x{new / old:.2f}" if old else "n/a"  # noqa: E731
            per_job = (f"{r['requests_per_job_minute_running']} vs {base['requests_per_job_minute_running']} "
                       f"req/job/min")
            lines.append(
                f"{mode}: {base['jobs']} -> {r['jobs']} jobs (x{r['jobs'] / base['jobs']:.0f}): API req/s "
                f"{ratio(c['requests_per_s'], b['requests_per_s'])} ({per_job}); pass p50 "
                f"{ratio(c['pass_p50_ms'] or 0, b['pass_p50_ms'] or 0)}, p99 {ratio(c['pass_p99_ms'] or 0, b['pass_p99_ms'] or 0)}; "
                f"RSS +{c['rss_mib'] - b['rss_mib']:.1f} MiB "
                f"({(c['rss_mib'] - b['rss_mib']) * 1024 / (r['jobs'] - base['jobs']):.1f} KiB/job)")
    for r in (r for r in done if r["mode"] == "watch"):
        poll = next((p for p in done if p["mode"] == "poll" and p["jobs"] == r["jobs"]), None)
        if poll:
            lines.append(f"at {r['jobs']} jobs: watch {r['requests_per_job_minute_running']} vs poll "
                         f"{poll['requests_per_job_minute_running']} req/job/min "
                         f"(x{poll['requests_per_job_minute_running'] / max(r['requests_per_job_minute_running'], 0.01):.1f} "
                         f"fewer); pass p50 {r['running']['pass_p50_ms']} vs {poll['running']['pass_p50_ms']} ms")
    return lines


ARGS: argparse.Namespace
KUBECTL = ""


if __name__ == "__main__":
    raise SystemExit(main())
