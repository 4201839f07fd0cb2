"""`wandb.enable`: training logs to Weights & Biases with the real wandb package, offline where it cannot
reach W&B (one line says so), and one line when the package is missing (runtime/wandb_log.py)."""
from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from deformable_detr.config.loader import spec_from_dict
from deformable_detr.runtime.logging import setup_logging
from deformable_detr.runtime.tensorboard_log import EVENTS_DIR
from deformable_detr.runtime.wandb_log import open_run
from test_curves import read_events
from test_train import tiny_train_spec, train_cli
from train_records import read_log

wandb_pb2 = pytest.importorskip("wandb.proto.wandb_internal_pb2", reason="the wandb extra is part of the test set-up")

WANDB_SECTION = {"enable": True, "project": "ddetr-test", "name": "tiny", "tags": ["a", "b"]}


def wandb_records(path: Path):
    """The records of a run's .wandb file: W&B's 7-byte header, then LevelDB's log format (32 KiB blocks of
    chunks, each crc32 + length + type before its bytes), each record a wandb_internal Record message."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    position, pending = 7, b""
    while position + 7 <= len(data):
        left = 32768 - position % 32768
        if left < 7:  # a block's tail too short for a chunk header is padding
            position += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if kind == 0:
            break
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a whole record, or the last chunk of one
            record = wandb_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def history(path: Path) -> list[dict]:
    return [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            for r in wandb_records(path) if r.WhichOneof("record_type") == "history"]


def offline_env(tmp_path, **extra) -> dict:
    """No API key, no netrc (HOME is empty), no user-set mode."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    home = tmp_path / "home"
    home.mkdir()
    return dict(env, HOME=str(home), **extra)


def wandb_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "wandb" in line.lower()]


def test_training_logs_offline_without_an_api_key(tiny_coco, tmp_path):
    spec = dict(tiny_train_spec(tiny_coco, tmp_path / "results", num_epochs=1), wandb=WANDB_SECTION)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    run = subprocess.run([sys.executable, "-m", "deformable_detr", "train", "-e", str(path), "-k", "s3cret-key"],
                         env=offline_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = wandb_lines(run.stderr)
    assert len(lines) == 1, lines  # wandb's own banner and warnings are silenced
    assert "wandb.enable: logging to Weights & Biases offline (WANDB_MODE=offline: no API key (WANDB_API_KEY" in lines[0]
    folder = tmp_path / "results" / "train"
    (offline_run,) = (folder / "wandb").glob("offline-run-*")
    assert f"wandb sync {offline_run}" in lines[0]
    (data,) = offline_run.glob("run-*.wandb")
    rows = history(data)
    steps = [r for r in read_log(str(folder)) if r["kind"] == "step"]
    logged = {row["_step"]: row for row in rows if "train/loss" in row}
    assert sorted(logged) == [r["step"] for r in steps]
    for record in steps:
        row = logged[record["step"]]
        assert row["train/loss"] == pytest.approx(record["loss"], rel=1e-6)
        assert row["train/lr"] == pytest.approx(record["lr"]) and row["train/epoch"] == record["epoch"]
        assert {f"train/{k}" for k in record if k.startswith("loss_")} <= set(row)
    validation = [r for r in read_log(str(folder)) if r["kind"] == "validation"][-1]
    assert any(row.get("val/mAP") == pytest.approx(validation["mAP"]) for row in rows)
    # The same scalars as the TensorBoard event files beside the log (one feed, runtime/scalars.py).
    for tag, points in read_events(folder / EVENTS_DIR).items():
        wandb_points = [(row["_step"], row[tag]) for row in rows if tag in row]
        assert [step for step, _ in points] == [step for step, _ in wandb_points], tag
        assert [value for _, value in points] == pytest.approx([value for _, value in wandb_points], rel=1e-6), tag
    kinds = [r.WhichOneof("record_type") for r in wandb_records(data)]
    assert kinds.count("exit") == 1
    (run_record,) = [r.run for r in wandb_records(data) if r.WhichOneof("record_type") == "run"]
    assert (run_record.project, run_record.display_name, list(run_record.tags)) == ("ddetr-test", "tiny", ["a", "b"])
    config = {item.key: json.loads(item.value_json) for item in run_record.config.update}
    assert config["model"]["hidden_dim"] == 32 and config["encryption_key"] is None
    assert b"s3cret-key" not in data.read_bytes()


def test_offline_when_the_host_does_not_answer(tmp_path, monkeypatch, logged):
    """An API key, but the W&B host (WANDB_BASE_URL) refuses the connection: offline, saying why."""
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for name, value in offline_env(tmp_path, WANDB_API_KEY="k" * 40, WANDB_BASE_URL=f"http://127.0.0.1:{port}").items():
        monkeypatch.setenv(name, value)
    for name in [n for n in os.environ if n.startswith("WANDB_") and n not in ("WANDB_API_KEY", "WANDB_BASE_URL")]:
        monkeypatch.delenv(name)
    monkeypatch.setattr(sys, "argv", ["deformable-detr", "train", "-e", "spec.yaml", "-k", "s3cret-key"])
    setup_logging()
    run = open_run(spec_from_dict({"wandb": WANDB_SECTION, "encryption_key": "s3cret-key"}), str(tmp_path / "results"))
    run.log_step(1, 0, {"loss_ce": 1.0}, 1e-4)
    run.finish("completed")
    (line,) = [m for m in logged if m.startswith("wandb.enable:")]
    assert f"offline (WANDB_MODE=offline: http://127.0.0.1:{port} is not reachable (ConnectionRefusedError" in line
    (data,) = (tmp_path / "results" / "wandb").glob("offline-run-*/run-*.wandb")
    assert [row["train/loss"] for row in history(data)] == [1.0]  # on disk once the run has finished
    assert b"s3cret-key" not in data.read_bytes() and b"-k" in data.read_bytes()  # W&B records the command line
    assert sys.argv[-1] == "s3cret-key"  # given back as it was


def test_a_mode_the_user_set_wins_and_disabled_logs_nothing(tmp_path, monkeypatch, logged):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    setup_logging()
    assert open_run(spec_from_dict({"wandb": WANDB_SECTION}), str(tmp_path)) is None
    assert [m for m in logged if "wandb" in m] == ["wandb.enable: WANDB_MODE=disabled is set: not logging to "
                                                   "Weights & Biases"]
    assert open_run(spec_from_dict({"wandb": {"enable": False}}), str(tmp_path)) is None
    assert len([m for m in logged if "wandb" in m]) == 1 and not (tmp_path / "wandb").exists()


def test_missing_package_is_one_line_and_training_goes_on(tiny_coco, tmp_path, write_spec, monkeypatch, logged):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError, as when not installed
    spec = dict(tiny_train_spec(tiny_coco, tmp_path / "results", num_epochs=1), wandb=WANDB_SECTION)
    assert train_cli(write_spec, spec) == 0
    assert [m for m in logged if "wandb" in m] == [
        "wandb.enable: the wandb package is not installed (pip install './trainer[wandb]'); training goes on "
        "without Weights & Biases logging"]
    assert read_log(str(tmp_path / "results" / "train"))[-1]["kind"] == "epoch"
    assert not (tmp_path / "results" / "train" / "wandb").exists()


def test_without_a_local_results_folder_the_run_goes_to_wandb_dir(tmp_path, monkeypatch, logged):
    """An s3:// results folder's staging copy is removed at the end: W&B's files go to WANDB_DIR."""
    for name, value in offline_env(tmp_path, WANDB_DIR=str(tmp_path / "wandb-dir")).items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    (tmp_path / "wandb-dir").mkdir()
    setup_logging()
    open_run(spec_from_dict({"wandb": WANDB_SECTION}), None).finish("completed")
    (offline_run,) = (tmp_path / "wandb-dir" / "wandb").glob("offline-run-*")
    assert any(f"wandb sync {offline_run}" in m for m in logged)
