"""The Grafana dashboards: they load as Grafana dashboard models, their panels are well
formed, their PromQL parses, and every metric they query is one that the trainer, the
operator or NVIDIA's DCGM exporter really exports (read from the code's own registries)."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DASHBOARDS = sorted((REPO / "dashboards").glob("*.json"))

# dcgm-exporter's default counters (etc/default-counters.csv) plus the profiling field the
# training dashboard uses. DCGM is NVIDIA's binary with no Python package to import, so its
# field names are listed here; the trainer's and operator's come from their registries.
DCGM_FIELDS = {
    "DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_FB_FREE", "DCGM_FI_DEV_MEM_COPY_UTIL",
    "DCGM_FI_DEV_SM_CLOCK", "DCGM_FI_DEV_MEM_CLOCK", "DCGM_FI_DEV_GPU_TEMP", "DCGM_FI_DEV_MEMORY_TEMP",
    "DCGM_FI_DEV_POWER_USAGE", "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", "DCGM_FI_DEV_PCIE_REPLAY_COUNTER",
    "DCGM_FI_DEV_ENC_UTIL", "DCGM_FI_DEV_DEC_UTIL", "DCGM_FI_DEV_XID_ERRORS",
    "DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL", "DCGM_FI_PROF_GR_ENGINE_ACTIVE", "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE",
    "DCGM_FI_PROF_DRAM_ACTIVE", "DCGM_FI_PROF_PCIE_TX_BYTES", "DCGM_FI_PROF_PCIE_RX_BYTES",
}
# Labels dcgm-exporter puts on its series (pod/namespace with Kubernetes pod mapping on).
DCGM_LABELS = {"gpu", "UUID", "device", "modelName", "Hostname", "pod", "namespace", "container"}
# Labels Prometheus adds to trainer series (the chart's PodMonitor relabelings).
SCRAPE_LABELS = {"namespace", "pod", "instance", "le"}
GRAFANA_BUILTINS = {"__rate_interval", "__interval", "__range", "__range_s", "__interval_ms"}
PANEL_TYPES = {"timeseries", "stat", "bargauge", "gauge", "table", "row", "text", "heatmap"}
PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset",
                   "and", "or", "unless", "inf", "nan"}


def _samples_of(registry) -> dict[str, set[str]]:
    """Series names a prometheus_client registry exposes, with their label names."""
    suffixes = {"counter": ["_total", "_created"], "gauge": [""], "histogram": ["_bucket", "_sum", "_count", "_created"],
                "summary": ["", "_sum", "_count", "_created"], "info": ["_info"]}
    names: dict[str, set[str]] = {}
    for collector in list(registry._collector_to_names):  # the registered collectors
        for family in collector.describe() or collector.collect():
            labels = set(getattr(collector, "_labelnames", ()))
            for suffix in suffixes.get(family.type, [""]):
                names[family.name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return names


@pytest.fixture(scope="module")
def exported_metrics() -> dict[str, set[str]]:
    from deformable_detr.runtime.metrics import TrainMetrics

    operator_metrics = pytest.importorskip("ddetr_operator.metrics", reason="the operator package is not installed")
    # A port > 0 builds the registry; start() is never called, so nothing listens.
    trainer = TrainMetrics(port=1, job="dashboard-test")
    assert trainer.enabled
    metrics = {**_samples_of(trainer.registry), **_samples_of(operator_metrics.registry)}
    metrics.update({field: DCGM_LABELS for field in DCGM_FIELDS})
    return metrics


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def _targets(board: dict) -> list[tuple[dict, dict]]:
    return [(panel, target) for panel in board["panels"] for target in panel.get("targets", [])]


def _strip_promql(expr: str) -> str:
    """The expression with strings, label matchers, ranges and grouping clauses removed."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    return re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)


def metric_names(expr: str) -> set[str]:
    stripped = _strip_promql(expr)
    names = set()
    for match in re.finditer(r"(?<![\w$.])([A-Za-z_:][\w:]*)\b(\s*\()?", stripped):
        name, is_call = match.group(1), match.group(2)
        if is_call or name.lower() in PROMQL_KEYWORDS or re.fullmatch(r"\d.*", name):
            continue
        names.add(name)
    return names


def label_names(expr: str) -> set[str]:
    """Label names used in matchers and grouping clauses."""
    names = set()
    for block in re.findall(r"\{([^}]*)\}", re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)):
        names |= set(re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)", block))
    for block in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr):
        names |= {label.strip() for label in block.split(",") if label.strip()}
    return names


def test_metric_name_parser_reads_promql():
    expr = ('histogram_quantile(0.9, sum by (le) (rate(foo_seconds_bucket{job="$job", a=~"x.*"}[$__rate_interval])))'
            ' / on(job) group_left bar_total + time() - max(baz{metric="mAP"} offset 5m) and 1e3')
    assert metric_names(expr) == {"foo_seconds_bucket", "bar_total", "baz"}
    assert label_names(expr) == {"le", "job", "a", "metric"}


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_loads_as_a_grafana_model(path):
    """Round trip through Grafana's own dashboard types: nothing we wrote is unknown to them."""
    pytest.importorskip("grafana_foundation_sdk", reason="grafana-foundation-sdk is not installed")
    from grafana_foundation_sdk.cog import encoder, plugins
    from grafana_foundation_sdk.models import dashboard, prometheus

    plugins.register_default_plugins()
    original = _load(path)
    model = dashboard.Dashboard.from_json(original)
    again = json.loads(encoder.JSONEncoder().encode(model))

    def lost(mine, theirs, where: str) -> list[str]:
        if isinstance(mine, dict):
            return [item for key, value in mine.items()
                    for item in ([f"{where}.{key}"] if key not in theirs else lost(value, theirs[key], f"{where}.{key}"))]
        if isinstance(mine, list):
            assert len(mine) == len(theirs), where
            return [item for i, (a, b) in enumerate(zip(mine, theirs)) for item in lost(a, b, f"{where}[{i}]")]
        return [] if mine == theirs else [f"{where}: {mine!r} became {theirs!r}"]

    assert lost(original, again, "") == []
    queries = [target for panel in model.panels if hasattr(panel, "targets") for target in panel.targets or []]
    assert queries and all(isinstance(q, prometheus.Dataquery) and q.expr for q in queries)


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_structure(path):
    board = _load(path)
    assert board["title"] and re.fullmatch(r"[a-z0-9-]{1,40}", board["uid"])
    assert isinstance(board["schemaVersion"], int) and board["schemaVersion"] >= 36
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"

    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells = set()
    for panel in board["panels"]:
        assert panel["type"] in PANEL_TYPES, panel["type"]
        grid = panel["gridPos"]
        assert grid["w"] >= 1 and grid["h"] >= 1 and 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"panel {panel['title']!r} overlaps another"
                cells.add((x, y))
        if panel["type"] in ("row", "text"):
            continue
        assert panel["title"] and panel.get("description"), f"panel {panel['id']} needs a title and description"
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert ref_ids and len(ref_ids) == len(set(ref_ids))
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"] and target["expr"].strip()
            used = set(re.findall(r"\$\{?(\w+)", target["expr"]))
            unknown = used - set(variables) - GRAFANA_BUILTINS
            assert not unknown, f"{panel['title']}: undefined variables {unknown}"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_every_queried_metric_and_label_is_exported(path, exported_metrics):
    board = _load(path)
    # (expression, extra label it reads): panel queries, and variables' label_values(expr, label).
    queries = [(target["expr"], None) for _, target in _targets(board)]
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", variable["query"]["query"])
            assert match, f"variable {variable['name']}: expected label_values(<selector>, <label>)"
            queries.append((match.group(1), match.group(2)))
    for expr, extra_label in queries:
        names = metric_names(expr)
        assert names, f"no metric in {expr!r}"
        for name in names:
            assert name in exported_metrics, f"{path.name}: {name} is exported by neither the trainer, the operator nor DCGM"
        allowed = set().union(*(exported_metrics[name] for name in names)) | SCRAPE_LABELS
        for label in label_names(expr) | ({extra_label} if extra_label else set()):
            assert label in allowed, f"{path.name}: label {label!r} is not on {sorted(names)} (in {expr!r})"


def test_dashboards_cover_what_the_issue_asks_for():
    queried = {name for path in DASHBOARDS for _, target in _targets(_load(path))
               for name in metric_names(target["expr"])}
    wanted = {"ddetr_train_loss", "ddetr_train_learning_rate", "ddetr_train_images_per_second",
              "ddetr_train_data_wait_seconds", "ddetr_train_step_duration_seconds_bucket", "ddetr_train_epoch",
              "ddetr_train_num_epochs", "ddetr_train_validation_map", "ddetr_train_checkpoints_total",
              "ddetr_train_last_checkpoint_timestamp_seconds", "DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED",
              "ddetr_operator_jobs", "ddetr_operator_job_restarts_total", "ddetr_operator_reconcile_errors_total",
              "ddetr_operator_reconcile_duration_seconds_bucket", "ddetr_operator_job_failures_total",
              "ddetr_train_progress_ratio", "ddetr_train_estimated_remaining_seconds",
              "ddetr_operator_job_goodput_ratio", "ddetr_operator_job_time_seconds"}
    assert wanted <= queried, f"not on any dashboard: {sorted(wanted - queried)}"


PROMTOOL = shutil.which("promtool")


@pytest.mark.skipif(PROMTOOL is None, reason="no promtool (Debian package prometheus; scripts/test-deps.d/prometheus.sh)")
def test_every_query_parses_as_promql(tmp_path):
    """promtool parses each expression as a recording rule, with Grafana's variables filled in."""
    substitutions = {"$__rate_interval": "1m", "$__interval": "30s", "$__range": "1h", "$job": "demo",
                     "$namespace": "default"}
    rules = []
    for path in DASHBOARDS:
        for index, (_, target) in enumerate(_targets(_load(path))):
            expr = target["expr"]
            for variable, value in substitutions.items():
                expr = expr.replace(variable, value)
            rules.append({"record": f"dashboard:{path.stem}:{index}", "expr": expr})
    rule_file = tmp_path / "rules.yaml"
    rule_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    result = subprocess.run([PROMTOOL, "check", "rules", str(rule_file)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


# A trainer and an operator at work, in a child process: real metric servers with moving values.
FEEDER = r"""
import sys, time
from deformable_detr.runtime.metrics import TrainMetrics
from ddetr_operator import metrics as operator_metrics

trainer_port, operator_port = int(sys.argv[1]), int(sys.argv[2])
trainer = TrainMetrics(port=trainer_port, job="demo", addr="127.0.0.1").start()
operator_metrics.start_metrics_server(operator_port, addr="127.0.0.1")
operator_metrics.phases.record("uid-1", "Running")
operator_metrics.phases.record("uid-2", "Failed")
operator_metrics.TRANSITIONS.labels(phase="Running").inc()
trainer.set_epoch(1, 4)
trainer.observe_checkpoint("s3://bucket/demo/train/model_epoch_000_step_00002.pth")
trainer.observe_validation({"mAP": 0.25, "mAP50": 0.5, "val_loss": 1.5})
step = 0
while True:
    step += 1
    trainer.observe_step(epoch=1, step=step, losses={"loss_ce": 1.0 / step, "loss_bbox": 0.5, "loss_giou": 0.3},
                         lr=2e-4, images=4, step_seconds=0.05 + (step % 5) * 0.1, data_wait_seconds=0.01)
    trainer.observe_progress(step / 1000, 0.5 * (1000 - step))
    operator_metrics.record_goodput({"namespace": "default", "name": "demo"}, {
        "ratio": 0.8, "trainingSeconds": 0.4 * step, "waitingSeconds": 0.1 * step})
    operator_metrics.RECONCILE_SECONDS.observe(0.02 * (1 + step % 3))
    operator_metrics.RESTARTS.labels(namespace="default").inc()
    operator_metrics.count_resize("default", None, {"fromWorldSize": 2, "toWorldSize": 1, "time": str(step)})
    operator_metrics.count_failure("default", None, {"failureClass": "Hung", "rule": "builtin:retryable",
                                                     "action": "RestartJob"})
    if step % 4 == 0:
        operator_metrics.RECONCILE_ERRORS.inc()
    time.sleep(0.2)
"""
# Series that only exist on a GPU node: DCGM's, and PyTorch's CUDA allocator gauges.
NEEDS_A_GPU = re.compile(r"DCGM_FI_|ddetr_train_gpu_memory_")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _prometheus_query(url: str, expression: str) -> list[dict]:
    import urllib.parse
    import urllib.request

    with urllib.request.urlopen(f"{url}/api/v1/query?" + urllib.parse.urlencode({"query": expression}),
                                timeout=10) as response:
        body = json.loads(response.read())
    assert body["status"] == "success", body
    return body["data"]["result"]


PROMETHEUS = shutil.which("prometheus") or shutil.which("prometheus", path="/usr/bin")


@pytest.mark.skipif(PROMETHEUS is None, reason="no prometheus (Debian package; scripts/test-deps.d/prometheus.sh)")
def test_every_panel_shows_data_from_a_real_trainer_and_operator(tmp_path):
    """A real Prometheus scrapes a training run and the operator (labels as the chart's PodMonitor
    gives them); every panel query that does not need a GPU returns data, with its legend labels."""
    pytest.importorskip("ddetr_operator.metrics", reason="the operator package is not installed")
    import time

    trainer_port, operator_port, prometheus_port = _free_port(), _free_port(), _free_port()
    config = {"global": {"scrape_interval": "1s"}, "scrape_configs": [
        {"job_name": "trainers", "honor_labels": True,
         "static_configs": [{"targets": [f"127.0.0.1:{trainer_port}"],
                             "labels": {"namespace": "default", "pod": "demo-a0-0-x7k2p"}}]},
        {"job_name": "operator", "static_configs": [{"targets": [f"127.0.0.1:{operator_port}"]}]}]}
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    feeder = subprocess.Popen([sys.executable, "-c", FEEDER, str(trainer_port), str(operator_port)])
    prometheus = subprocess.Popen(
        [PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{prometheus_port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{prometheus_port}"
    substitutions = {"$__rate_interval": "20s", "$__range": "1h", "$job": "demo", "$namespace": "default"}
    try:
        deadline = time.monotonic() + 90
        pending: dict[str, tuple[str, str]] = {}
        for path in DASHBOARDS:
            for panel, target in _targets(_load(path)):
                if not NEEDS_A_GPU.search(target["expr"]):
                    expr = target["expr"]
                    for variable, value in substitutions.items():
                        expr = expr.replace(variable, value)
                    pending[expr] = (f"{path.name}: {panel['title']}", target["legendFormat"])
        assert len(pending) >= 20
        while pending and time.monotonic() < deadline:
            time.sleep(2)
            for expr in list(pending):
                try:
                    result = _prometheus_query(url, expr)
                except OSError:
                    break  # Prometheus still starting
                if result:
                    _, legend = pending.pop(expr)
                    for label in re.findall(r"\{\{\s*(\w+)\s*\}\}", legend):
                        assert all(label in series["metric"] for series in result), (
                            f"legend label {label!r} missing from the result of {expr!r}")
        assert not pending, "no data for: " + "; ".join(f"{where} ({expr})" for expr, (where, _) in pending.items())
    finally:
        for process in (prometheus, feeder):
            process.terminate()
            process.wait(timeout=20)
