"""TrainMetrics: the /metrics endpoint itself, and a real Prometheus server scraping it."""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from deformable_detr.errors import UsageError
from deformable_detr.runtime.metrics import TrainMetrics, metrics_port


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _simulate_short_run(metrics: TrainMetrics, steps: int = 4) -> None:
    """What the training loop reports: two epochs of a few steps, a validation and a checkpoint each."""
    step = 0
    for epoch in range(2):
        metrics.set_epoch(epoch, 2)
        for _ in range(steps // 2):
            step += 1
            metrics.observe_step(epoch=epoch, step=step, losses={"loss_ce": 1.0 / step, "loss_bbox": 0.5,
                                                                 "loss_giou": 0.25},
                                 lr=2e-4, images=4, step_seconds=0.5, data_wait_seconds=0.125)
        metrics.observe_validation({"mAP": 0.25 * (epoch + 1), "mAP50": 0.5, "val_loss": 3.0, "per_class": [1, 2]})
        metrics.observe_checkpoint(f"model_epoch_{epoch:03d}.pth")


def _scrape(port: int) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def test_endpoint_serves_training_metrics_with_job_label(monkeypatch):
    monkeypatch.setenv("DDETR_JOB_NAME", "coco-r50")
    port = _free_port()
    metrics = TrainMetrics(port, addr="127.0.0.1").start()
    try:
        before = _scrape(port)
        assert before[("ddetr_train_checkpoints_total", (("job", "coco-r50"),))] == 0
        _simulate_short_run(metrics)
        samples = _scrape(port)
    finally:
        metrics.close()
    job = ("job", "coco-r50")
    assert samples[("ddetr_train_epoch", (job,))] == 1
    assert samples[("ddetr_train_num_epochs", (job,))] == 2
    assert samples[("ddetr_train_step", (job,))] == 4
    assert samples[("ddetr_train_loss", (job, ("term", "loss_ce")))] == 0.25
    assert samples[("ddetr_train_loss", (job, ("term", "total")))] == 1.0
    assert samples[("ddetr_train_learning_rate", (job,))] == 2e-4
    assert samples[("ddetr_train_images_per_second", (job,))] == 8.0
    assert samples[("ddetr_train_images_total", (job,))] == 16
    assert samples[("ddetr_train_data_wait_seconds", (job,))] == 0.125
    assert samples[("ddetr_train_step_duration_seconds_count", (job,))] == 4
    assert samples[("ddetr_train_step_duration_seconds_bucket", (job, ("le", "0.5")))] == 4
    assert samples[("ddetr_train_step_duration_seconds_bucket", (job, ("le", "0.25")))] == 0
    assert samples[("ddetr_train_validation_map", (job, ("metric", "mAP")))] == 0.5
    assert samples[("ddetr_train_validation_loss", (job, ("metric", "val_loss")))] == 3.0
    assert not any(name == "ddetr_train_validation_map" and ("metric", "per_class") in labels
                   for name, labels in samples)
    assert samples[("ddetr_train_checkpoints_total", (job,))] == 2
    assert abs(samples[("ddetr_train_last_checkpoint_timestamp_seconds", (job,))] - time.time()) < 60
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)  # closed: nothing listens


def test_port_zero_or_other_ranks_serve_nothing(monkeypatch):
    for port, rank in ((0, "0"), (_free_port(), "1")):
        monkeypatch.setenv("RANK", rank)
        metrics = TrainMetrics(port).start()
        assert not metrics.enabled
        _simulate_short_run(metrics)
        metrics.close()
        if port:
            with pytest.raises(OSError):
                urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_port_from_spec_and_environment(monkeypatch):
    spec = SimpleNamespace(train=SimpleNamespace(metrics_port=9400))
    monkeypatch.delenv("DDETR_METRICS_PORT", raising=False)
    assert metrics_port(spec) == 9400
    monkeypatch.setenv("DDETR_METRICS_PORT", "0")
    assert metrics_port(spec) == 0
    monkeypatch.setenv("DDETR_METRICS_PORT", "9500")
    assert metrics_port(spec) == 9500
    for bad in ("http", "70000", "-1"):
        monkeypatch.setenv("DDETR_METRICS_PORT", bad)
        with pytest.raises(UsageError, match=r"DDETR_METRICS_PORT: .* is not a port; accepted: 0 \(off\) or 1..65535"):
            metrics_port(spec)


def test_port_in_use_is_one_clear_line():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(UsageError, match=f"port {port} is already in use"):
            TrainMetrics(port, job="x", addr="127.0.0.1").start()


# ---------------------------------------------------------------- a real Prometheus server


def _query(prometheus_url: str, expression: str) -> list[dict]:
    url = f"{prometheus_url}/api/v1/query?" + urllib.parse.urlencode({"query": expression})
    reply = json.loads(urllib.request.urlopen(url, timeout=10).read())
    assert reply["status"] == "success", reply
    return reply["data"]["result"]


def _wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            result = condition()
            if result:
                return result
        except OSError:
            pass
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def prometheus_binary() -> str:
    binary = shutil.which("prometheus") or (shutil.which("prometheus", path="/usr/bin"))
    if not binary:
        pytest.skip("the Debian package 'prometheus' is not installed (scripts/test-deps.d/prometheus.sh installs it)")
    return binary


def test_prometheus_scrapes_a_training_run(prometheus_binary, tmp_path, monkeypatch):
    monkeypatch.setenv("DDETR_JOB_NAME", "scrape-test")
    metrics_port_number, prometheus_port = _free_port(), _free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n"
        "  - job_name: ddetr-trainer\n"
        "    honor_labels: true  # keep the trainer's own job label\n"
        f"    static_configs:\n      - targets: ['127.0.0.1:{metrics_port_number}']\n")
    metrics = TrainMetrics(metrics_port_number, addr="127.0.0.1").start()
    server = subprocess.Popen(
        [prometheus_binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{prometheus_port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{prometheus_port}"
    try:
        _wait_for(lambda: server.poll() is None and urllib.request.urlopen(f"{url}/-/ready", timeout=2).status == 200,
                  60, "Prometheus to be ready")
        _simulate_short_run(metrics)
        job = 'job="scrape-test"'
        _wait_for(lambda: _query(url, f"ddetr_train_step{{{job}}} == 4"), 60, "a scrape of the finished run")

        def value(expression: str) -> float:
            result = _query(url, expression)
            assert len(result) == 1, (expression, result)
            return float(result[0]["value"][1])

        assert value(f"ddetr_train_epoch{{{job}}}") == 1
        assert value(f'ddetr_train_loss{{{job},term="loss_bbox"}}') == 0.5
        assert value(f"ddetr_train_learning_rate{{{job}}}") == 2e-4
        assert value(f"ddetr_train_images_per_second{{{job}}}") == 8
        assert value(f"ddetr_train_step_duration_seconds_count{{{job}}}") == 4
        assert value(f'ddetr_train_validation_map{{{job},metric="mAP"}}') == 0.5
        assert value(f"ddetr_train_checkpoints_total{{{job}}}") == 2
        assert value(f"ddetr_train_last_checkpoint_timestamp_seconds{{{job}}}") > 0
        targets = json.loads(urllib.request.urlopen(f"{url}/api/v1/targets", timeout=10).read())
        assert [t["health"] for t in targets["data"]["activeTargets"]] == ["up"]
    finally:
        metrics.close()
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
def test_gpu_memory_is_reported_where_cuda_is_present():
    import torch

    port = _free_port()
    metrics = TrainMetrics(port, job="gpu", addr="127.0.0.1").start()
    try:
        held = torch.empty(64 * 1024 * 1024, dtype=torch.uint8, device="cuda")
        _simulate_short_run(metrics)
        samples = _scrape(port)
        del held
    finally:
        metrics.close()
    device = ("device", str(torch.cuda.current_device()))
    assert samples[("ddetr_train_gpu_memory_allocated_bytes", (device, ("job", "gpu")))] >= 64 * 1024 * 1024
    assert samples[("ddetr_train_gpu_memory_peak_bytes", (device, ("job", "gpu")))] >= 64 * 1024 * 1024
    assert samples[("ddetr_train_gpu_memory_reserved_bytes", (device, ("job", "gpu")))] >= 64 * 1024 * 1024
