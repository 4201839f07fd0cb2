"""Faults a run meets: a full disk, storage outages, unreadable checkpoints, failed attempts, and what
files are left. Each case: the exit code, one line naming the cause, and nothing already written lost."""
from __future__ import annotations

import errno
import json
import os
import stat
import subprocess

import pytest

from deformable_detr.cli import main
from deformable_detr.errors import UsageError
from deformable_detr.runtime import checkpoint, files, storage
from deformable_detr.runtime.artifacts import recover_staging, staging_dir
from deformable_detr.runtime.encryption import KeyMismatch
from deformable_detr.runtime.files import EXIT_DISK_FULL, DiskFull, atomic_path, write_text_atomic
from deformable_detr.runtime.progress import RateWindow, progress_line
from deformable_detr.runtime.storage import EXIT_STORAGE_UNAVAILABLE, StorageError
from train_records import read_log, read_status
from test_train import tiny_train_spec, train_cli


def _last_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    return lines[-1] if lines else ""


def _one_epoch_spec(tiny_coco, root) -> dict:
    spec = tiny_train_spec(tiny_coco, root, batch_size=8, num_epochs=1)  # one step
    spec["dataset"]["val_data_sources"] = []
    return spec


@pytest.fixture(autouse=True)
def _reference_attention(monkeypatch):
    monkeypatch.setenv("DDETR_MSDA_IMPL", "reference")


# ---------------------------------------------------------------- modes, fsync, partial writes

def test_atomic_writes_get_the_umask_mode_unless_private(tmp_path):
    old = os.umask(0o022)
    try:
        write_text_atomic(str(tmp_path / "results.json"), "{}")
        storage.write_bytes(str(tmp_path / "model.onnx"), b"onnx")
        path = checkpoint.save_checkpoint({"epoch": 0, "step": 1, "model": {}}, str(tmp_path))
        write_text_atomic(str(tmp_path / "key.txt"), "secret", private=True)
        os.umask(0o077)
        write_text_atomic(str(tmp_path / "strict.txt"), "x")
    finally:
        os.umask(old)
    mode = lambda name: stat.S_IMODE(os.stat(tmp_path / name).st_mode)  # noqa: E731
    assert mode("results.json") == mode("model.onnx") == mode(os.path.basename(path)) == 0o644
    assert mode(checkpoint.LATEST_NAME) == 0o644
    assert mode("key.txt") == mode("strict.txt") == 0o600


def test_atomic_writes_fsync_file_and_folder_before_the_rename(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(files.os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")),
                                                       real_fsync(fd)))
    write_text_atomic(str(tmp_path / "status.json"), "{}")
    assert len(synced) == 2 and synced[0].endswith(".tmp") and synced[1] == str(tmp_path)


# ---------------------------------------------------------------- a full disk

def test_a_full_disk_is_one_line_exit_202_and_the_old_file_stays(tmp_path, monkeypatch):
    target = tmp_path / "status.json"
    target.write_text("old")

    def no_space(_fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", no_space)
    with pytest.raises(DiskFull) as caught:
        storage.write_bytes(str(target), b"x" * 3_000_000)
    message = str(caught.value)
    assert "\n" not in message and str(target) in message and "needs 3.0 MB" in message and "free" in message
    assert caught.value.exit_code == EXIT_DISK_FULL == 202
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["status.json"]


def _disk_full_on_renaming_to(suffix: str, monkeypatch) -> None:
    """The atomic writes' final rename of a file ending in `suffix` fails with ENOSPC."""
    real_replace = os.replace

    def replace(src, dst):
        if str(dst).endswith(suffix):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", replace)


def test_a_full_disk_during_training_exits_202_in_one_line(tiny_coco, tmp_path, write_spec, monkeypatch, capsys):
    _disk_full_on_renaming_to(".pth", monkeypatch)
    spec = _one_epoch_spec(tiny_coco, tmp_path / "r")
    assert train_cli(write_spec, spec) == 202
    line = _last_error_line(capsys)
    assert line.startswith("deformable-detr train: error: no space left on device writing ")
    assert "model_epoch_000_step_00001.pth" in line
    folder = tmp_path / "r" / "train"
    assert not [n for n in os.listdir(folder) if n.endswith(".tmp")]
    assert read_status(str(folder))["state"] == "failed" and (folder / "experiment.yaml").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_a_real_full_tmpfs(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("tmpfs cannot be mounted here")
    try:
        storage.write_text(str(mount / "results.json"), "{\"kept\": true}")
        with pytest.raises(DiskFull) as caught:
            storage.write_bytes(str(mount / "results.json"), b"x" * 2_000_000)
        assert "needs 2.0 MB" in str(caught.value) and str(mount) in str(caught.value)
        assert json.loads((mount / "results.json").read_text()) == {"kept": True}
        assert os.listdir(mount) == ["results.json"]
    finally:
        subprocess.run(["umount", str(mount)], check=False)


# ---------------------------------------------------------------- storage outages

def _client_error(status: int, code: str):
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}},
                       "PutObject")


@pytest.mark.parametrize("status,code,exit_code", [
    (503, "SlowDown", EXIT_STORAGE_UNAVAILABLE), (500, "InternalError", EXIT_STORAGE_UNAVAILABLE),
    (400, "RequestTimeout", EXIT_STORAGE_UNAVAILABLE), (429, "TooManyRequests", EXIT_STORAGE_UNAVAILABLE),
    (403, "AccessDenied", 2), (404, "NoSuchBucket", 2), (403, "InvalidAccessKeyId", 2)])
def test_storage_errors_exit_retryable_only_when_waiting_may_help(status, code, exit_code):
    from botocore.exceptions import ConnectTimeoutError, EndpointConnectionError

    class Client:
        meta = type("Meta", (), {"endpoint_url": "http://s3.test"})

    error = storage._translate(_client_error(status, code), "s3://b/k", Client())
    assert error.exit_code == exit_code and "\n" not in str(error)
    for outage in (EndpointConnectionError(endpoint_url="http://s3.test"), ConnectTimeoutError(endpoint_url="x")):
        assert storage._translate(outage, "s3://b/k", Client()).exit_code == EXIT_STORAGE_UNAVAILABLE


def test_an_unreachable_endpoint_exits_retryable(tiny_coco, tmp_path, write_spec, monkeypatch, capsys):
    from test_train import _unreachable_s3

    spec = _one_epoch_spec(tiny_coco, _unreachable_s3(monkeypatch))
    assert train_cli(write_spec, spec) == EXIT_STORAGE_UNAVAILABLE
    assert "cannot reach the S3 endpoint" in _last_error_line(capsys)


def test_upload_failures_stay_staged_under_a_stable_path_and_the_next_run_uploads_them(
        bucket, tiny_coco, write_spec, monkeypatch, capsys):
    from deformable_detr.runtime import artifacts

    results = f"{bucket}/run"
    folder = f"{results}/train"
    real_upload = storage.upload_file

    def failing_upload(local, uri, part_size=None):
        if uri.endswith(".pth"):
            raise StorageError(f"{uri}: S3 request failed (SlowDown: reduce your request rate)", retryable=True)
        return real_upload(local, uri, part_size=part_size)

    monkeypatch.setattr(artifacts.time, "sleep", lambda _s: None)
    monkeypatch.setattr(artifacts.storage, "upload_file", failing_upload)
    spec = _one_epoch_spec(tiny_coco, results)
    spec["model"]["train_backbone"] = False
    assert train_cli(write_spec, spec) == EXIT_STORAGE_UNAVAILABLE
    staged = staging_dir(folder)
    line = _last_error_line(capsys)
    assert "model_epoch_000_step_00001.pth" in line and f"kept in {staged}" in line
    assert os.path.isfile(os.path.join(staged, "model_epoch_000_step_00001.pth"))
    assert not storage.exists(f"{folder}/model_epoch_000_step_00001.pth")

    # The next run (a restarted pod on this disk) uploads it first, then finds the run complete.
    monkeypatch.setattr(artifacts.storage, "upload_file", real_upload)
    assert train_cli(write_spec, spec) == 0
    assert storage.exists(f"{folder}/model_epoch_000_step_00001.pth")
    assert checkpoint.load_checkpoint(f"{folder}/{checkpoint.LATEST_NAME}")["step"] == 1
    status = json.loads(storage.read_bytes(f"{folder}/status.json"))
    assert status["state"] == "completed" and status["step"] == 1
    assert not os.path.exists(staged)


def test_recovering_a_stale_staging_folder_never_moves_latest_back(bucket, tmp_path):
    folder = f"{bucket}/run/train"
    for step in (4, 8):
        checkpoint.save_checkpoint({"epoch": 0, "step": step, "model": {}}, folder)
    staged = str(tmp_path / "stage")
    checkpoint.save_checkpoint({"epoch": 0, "step": 2, "model": {}}, staged, update_latest=False)
    assert recover_staging(staged, folder) == ["model_epoch_000_step_00002.pth"]
    assert storage.exists(f"{folder}/model_epoch_000_step_00002.pth") and not os.listdir(staged)
    assert checkpoint.load_checkpoint(f"{folder}/{checkpoint.LATEST_NAME}")["step"] == 8


# ---------------------------------------------------------------- unreadable checkpoints

def test_auto_resume_falls_back_to_the_newest_readable_checkpoint(tmp_path):
    folder = str(tmp_path)
    checkpoint.save_checkpoint({"epoch": 0, "step": 4, "model": {}}, folder)
    (tmp_path / "model_epoch_001_step_00008.pth").write_bytes(b"torn by a kill")
    path, state, skipped = checkpoint.load_newest_readable(folder)
    assert path.endswith("model_epoch_000_step_00004.pth") and state["step"] == 4
    assert [os.path.basename(p) for p, _ in skipped] == ["model_epoch_001_step_00008.pth"]
    # A key that does not fit is not damage: it stops, it never falls back past every checkpoint.
    checkpoint.save_checkpoint({"epoch": 2, "step": 12, "model": {}}, folder, key="right")
    with pytest.raises(KeyMismatch):
        checkpoint.load_newest_readable(folder, key="wrong")
    for name in os.listdir(folder):
        (tmp_path / name).write_bytes(b"junk")
    with pytest.raises(UsageError, match="no readable checkpoint"):
        checkpoint.load_newest_readable(folder)


# ---------------------------------------------------------------- failed attempts, fresh logs

def test_a_failed_attempt_keeps_the_completed_runs_status_and_spec(tiny_coco, tmp_path, write_spec, capsys):
    spec = _one_epoch_spec(tiny_coco, tmp_path / "r")
    assert train_cli(write_spec, spec, "-k", "right", name="ok.yaml") == 0
    folder = tmp_path / "r" / "train"
    # A refused attempt (exit 2) adds nothing to the completed run's log either (issue 35 item 6).
    kept = {name: (folder / name).read_bytes() for name in ("status.json", "experiment.yaml", "train_log.jsonl")}

    bad_data = _one_epoch_spec(tiny_coco, tmp_path / "r")
    bad_data["dataset"]["train_data_sources"] = [{"image_dir": str(tmp_path / "nowhere"),
                                                  "json_file": str(tmp_path / "nowhere.json")}]
    assert train_cli(write_spec, bad_data, "-k", "right", name="bad.yaml") == 2
    assert "nowhere" in _last_error_line(capsys)
    assert train_cli(write_spec, spec, "-k", "wrong", name="key.yaml") == 2
    assert "wrong key" in _last_error_line(capsys)
    for name, content in kept.items():
        assert (folder / name).read_bytes() == content, name


def test_a_failed_attempt_keeps_the_remote_spec_of_a_completed_run(tiny_coco, tmp_path, write_spec, bucket, capsys):
    """The same with results in S3: the experiment.yaml there is put back after a refused attempt."""
    kept = b"# the completed run's spec\n"
    storage.write_bytes(f"{bucket}/r/train/experiment.yaml", kept)
    storage.write_bytes(f"{bucket}/r/train/status.json", b'{"state": "finished"}')
    bad_data = _one_epoch_spec(tiny_coco, tmp_path / "unused")
    bad_data["results_dir"] = f"{bucket}/r"
    bad_data["dataset"]["train_data_sources"] = [{"image_dir": str(tmp_path / "nowhere"),
                                                  "json_file": str(tmp_path / "nowhere.json")}]
    assert train_cli(write_spec, bad_data, name="bad.yaml") == 2
    assert "nowhere" in _last_error_line(capsys)
    assert storage.read_bytes(f"{bucket}/r/train/experiment.yaml") == kept
    assert storage.read_bytes(f"{bucket}/r/train/status.json") == b'{"state": "finished"}'
    # A first attempt that is refused leaves no spec behind either.
    bad_data["results_dir"] = f"{bucket}/fresh"
    assert train_cli(write_spec, bad_data, name="bad2.yaml") == 2
    assert not storage.exists(f"{bucket}/fresh/train/experiment.yaml")


def test_a_fresh_run_starts_a_fresh_log(tiny_coco, tmp_path, write_spec):
    spec = _one_epoch_spec(tiny_coco, tmp_path / "r")
    spec["train"]["auto_resume"] = False
    assert train_cli(write_spec, spec) == 0
    folder = tmp_path / "r" / "train"
    (folder / ".model_epoch_000_step_00001.pth.abc.tmp").write_bytes(b"a save that a kill interrupted")
    assert train_cli(write_spec, spec) == 0
    records = read_log(str(folder))
    assert [r["kind"] for r in records].count("start") == 1 and records[0]["resumed_from"] is None
    assert not (folder / ".model_epoch_000_step_00001.pth.abc.tmp").exists()  # removed at the next start


# ---------------------------------------------------------------- progress lines

def test_progress_lines_say_what_they_count_over_a_window_with_an_eta():
    window = RateWindow(window_s=30.0, start=0.0, count=0)
    for second in range(1, 101):
        window.add(float(second), second * (1 if second <= 50 else 2))  # 1 it/s, then 2 it/s
    assert window.rate() == pytest.approx(2.0)
    line = progress_line("epoch 1 of 0..3", 150, 250, "it", window.rate(), 30.0)
    assert line == "epoch 1 of 0..3: 150/250 it, 2.00 it/s (last 30s), ETA 50s"


def test_atomic_path_removes_its_temporary_file_on_error(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_path(str(tmp_path / "x.pth")) as tmp:
            open(tmp, "wb").write(b"half")
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_a_full_disk_during_evaluate_exits_202_in_one_line(tiny_coco, tmp_path, write_spec, monkeypatch, capsys):
    from deformable_detr.config.loader import spec_from_dict
    from deformable_detr.model import build_model
    from deformable_detr.runtime.checkpoint_io import save_object
    from test_evaluate import TINY_MODEL, tiny_spec

    model, _, _ = build_model(spec_from_dict({"model": TINY_MODEL, "dataset": {"num_classes": 4}}))
    weights = str(tmp_path / "model.pth")
    save_object({"model": model.state_dict(), "epoch": 0, "step": 1}, weights)
    _disk_full_on_renaming_to("results.json", monkeypatch)
    assert main(["evaluate", "-e", write_spec(tiny_spec(tiny_coco, tmp_path / "r", weights))]) == 202
    line = _last_error_line(capsys)
    assert line.startswith("deformable-detr evaluate: error: no space left on device writing ")
    assert "results.json" in line
    assert not [n for n in os.listdir(tmp_path / "r" / "evaluate") if n.endswith(".tmp")]


def test_loader_workers_leave_sigterm_and_sigint_to_the_main_process(tiny_coco):
    import multiprocessing
    import signal
    import time

    from deformable_detr.config.loader import spec_from_dict
    from deformable_detr.data.loader import build_dataloader, ignore_stop_signals

    spec = spec_from_dict(tiny_train_spec(tiny_coco, "/unused"))
    spec.dataset.workers = 1
    assert build_dataloader(spec, "train").worker_init_fn is ignore_stop_signals

    def worker() -> None:
        ignore_stop_signals(0)
        time.sleep(30)

    child = multiprocessing.get_context("fork").Process(target=worker)
    child.start()
    try:
        time.sleep(0.5)
        # Out of the training's process group: a group signal (timeout, Slurm, Ctrl-C) misses it.
        assert os.getpgid(child.pid) == child.pid != os.getpgid(0)
        os.kill(child.pid, signal.SIGINT)
        time.sleep(0.3)
        assert child.is_alive()
        # A SIGTERM to the worker itself (the DataLoader's shutdown, multiprocessing's exit) ends it.
        os.kill(child.pid, signal.SIGTERM)
        child.join(timeout=10)
        assert not child.is_alive()
    finally:
        child.kill()
        child.join()
