"""Progress from status.json in S3, the operator's metrics book-keeping, and its command line."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ddetr_operator.__main__ import parse_args
from ddetr_operator.api import resolve
from ddetr_operator.metrics import JOBS, PhaseBook
from ddetr_operator.progress import read_status_json, s3_access, status_json_uri
from ddetr_operator.validate import effective_experiment


def test_status_json_location_follows_the_results_layout(make_job):
    assert status_json_uri(effective_experiment(resolve(make_job()).spec)) == "s3://bucket/runs/demo/train/status.json"
    own = make_job(experiment={"train": {"results_dir": "s3://other/place/"}})
    assert status_json_uri(effective_experiment(resolve(own).spec)) == "s3://other/place/status.json"


def test_reads_status_json_with_the_jobs_credentials(moto_s3):
    endpoint, client = moto_s3
    status = {"epoch": 3, "num_epochs": 10, "step": 120, "last_loss": 2.5, "last_map": None, "state": "running"}
    client.put_object(Bucket="runs", Key="a/train/status.json", Body=json.dumps(status))
    access = s3_access(endpoint=endpoint, region="us-east-1", access_key_id="k", secret_access_key="s")
    assert read_status_json("s3://runs/a/train/status.json", access) == status


def test_missing_or_unreadable_status_is_no_progress(moto_s3, tmp_path):
    endpoint, client = moto_s3
    access = s3_access(endpoint=endpoint, access_key_id="k", secret_access_key="s")
    assert read_status_json("s3://runs/not-yet/status.json", access) is None
    assert read_status_json("s3://no-such-bucket/x/status.json", access) is None
    client.put_object(Bucket="runs", Key="torn/status.json", Body=b"{\"epoch\": 1,")
    assert read_status_json("s3://runs/torn/status.json", access) is None
    # A results folder on a volume the operator does not mount: no progress, no error.
    local = tmp_path / "status.json"
    local.write_text("{}")
    assert read_status_json(str(local), access) is None


def test_one_s3_client_per_endpoint_and_credentials_is_reused(moto_s3):
    """Making a boto3 client costs tens of ms of CPU: a pass must not make one each time."""
    from deformable_detr.runtime import storage
    endpoint, _ = moto_s3
    access = s3_access(endpoint=endpoint, access_key_id="k", secret_access_key="s")
    assert storage.client_for(access) is storage.client_for(s3_access(endpoint=endpoint, access_key_id="k",
                                                                 secret_access_key="s"))
    assert storage.client_for(access) is not storage.client_for(s3_access(endpoint=endpoint, access_key_id="other",
                                                                     secret_access_key="s"))
    for i in range(storage.MAX_CLIENTS + 5):
        storage.client_for(s3_access(endpoint=f"http://127.0.0.1:{i + 1}"))
    assert len(storage._clients) == storage.MAX_CLIENTS


def test_unreachable_store_is_no_progress():
    access = s3_access(endpoint="http://127.0.0.1:9", access_key_id="k", secret_access_key="s")
    assert read_status_json("s3://runs/a/status.json", access) is None


def test_phase_book_counts_jobs_by_phase():
    book = PhaseBook()
    book.record("a", "Running")
    book.record("b", "Running")
    book.record("c", "Failed")
    book.record("a", "Succeeded")
    assert JOBS.labels(phase="Running")._value.get() == 1
    assert JOBS.labels(phase="Succeeded")._value.get() == 1
    book.forget("c")
    assert JOBS.labels(phase="Failed")._value.get() == 0
    assert book.count() == 2


def test_namespaces_from_arguments_or_environment(monkeypatch):
    monkeypatch.setenv("DDETR_WATCH_NAMESPACES", "team-a, team-b")
    assert parse_args([]).namespaces == ["team-a", "team-b"]
    assert parse_args(["-n", "x", "--namespace", "y"]).namespaces == ["x", "y"]
    monkeypatch.setenv("DDETR_WATCH_NAMESPACES", "")
    args = parse_args(["--metrics-port", "9100", "--liveness", "http://0.0.0.0:8081/healthz"])
    assert (args.namespaces, args.metrics_port, args.liveness) == ([], 9100, "http://0.0.0.0:8081/healthz")


def test_host_path_allow_list_and_secret_reads_from_arguments_or_environment(monkeypatch):
    monkeypatch.delenv("DDETR_ALLOWED_HOST_PATHS", raising=False)
    monkeypatch.delenv("DDETR_READ_SECRETS", raising=False)
    args = parse_args([])
    assert args.allowed_host_paths == [] and args.read_secrets is True  # no hostPath by default
    monkeypatch.setenv("DDETR_ALLOWED_HOST_PATHS", "/mnt/datasets, /data")
    monkeypatch.setenv("DDETR_READ_SECRETS", "false")
    args = parse_args([])
    assert args.allowed_host_paths == ["/mnt/datasets", "/data"] and args.read_secrets is False
    args = parse_args(["--allowed-host-path", "/srv", "--read-secrets"])
    assert args.allowed_host_paths == ["/srv"] and args.read_secrets is True
    with pytest.raises(SystemExit):
        parse_args(["--allowed-host-path", "relative/path"])


def test_pass_cost_settings_from_arguments_or_environment(monkeypatch, capsys):
    monkeypatch.delenv("DDETR_FULL_PASS_SECONDS", raising=False)
    monkeypatch.delenv("DDETR_SECRET_CACHE_SECONDS", raising=False)
    args = parse_args([])
    assert (args.full_pass_every, args.secret_cache_seconds) == (300.0, 300.0)
    monkeypatch.setenv("DDETR_FULL_PASS_SECONDS", "0")  # every pass a full one, as before the watch cache
    monkeypatch.setenv("DDETR_SECRET_CACHE_SECONDS", "30")
    assert (parse_args([]).full_pass_every, parse_args([]).secret_cache_seconds) == (0.0, 30.0)
    assert parse_args(["--full-pass-every", "120"]).full_pass_every == 120.0
    with pytest.raises(SystemExit):
        parse_args(["--full-pass-every", "-1"])
    assert "--full-pass-every: -1.0 is not accepted; 0 or more seconds" in capsys.readouterr().err


def test_operator_imports_no_torch():
    # The operator image carries the trainer's schema but not its training stack.
    code = "import sys, ddetr_operator.__main__, ddetr_operator.handlers; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0
