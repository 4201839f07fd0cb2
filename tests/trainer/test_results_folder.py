"""A task's results folder (issue 35 items 1 and 2): one that cannot be written is one line naming the path
and why, exit 2, before any work; one writer per folder (see the lock tests below)."""
from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml

from deformable_detr import exit_codes
from deformable_detr.cli import main
from deformable_detr.errors import UsageError
from deformable_detr.tasks import export as export_task
from test_train import tiny_train_spec

ACCEPTED = "accepted: a folder this process can write"


def _err_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.strip().splitlines() if "error" in line]


@pytest.fixture
def spec_file(tiny_coco, tmp_path, write_spec):
    return write_spec(tiny_train_spec(tiny_coco, tmp_path / "unused"))


@pytest.mark.parametrize("task", ["train", "evaluate", "inference", "convert"])
def test_a_regular_file_as_results_dir_is_one_line_exit_2(tmp_path, spec_file, capsys, task):
    afile = tmp_path / "notes.txt"
    afile.write_text("kept")
    assert main([task, "-e", spec_file, "-r", str(afile)]) == exit_codes.BAD_INPUT.code
    assert _err_lines(capsys) == [f"deformable-detr {task}: error: results_dir: {afile}/{task} cannot be written: "
                                  f"{afile} is a file, so the folder cannot be made in it; {ACCEPTED}"]
    assert afile.read_text() == "kept" and sorted(os.listdir(tmp_path)) == ["notes.txt", "spec.yaml"]


def test_a_task_results_dir_that_is_a_file_names_its_own_field(tmp_path, spec_file, capsys):
    afile = tmp_path / "notes.txt"
    afile.write_text("kept")
    assert main(["train", "-e", spec_file, f"train.results_dir={afile}"]) == exit_codes.BAD_INPUT.code
    assert _err_lines(capsys) == [f"deformable-detr train: error: train.results_dir: {afile} cannot be written: "
                                  f"{afile} is a file, not a folder; {ACCEPTED}"]


def test_export_checks_where_the_onnx_file_goes_before_loading_the_model(tmp_path, spec_file, capsys, monkeypatch):
    def no_work(*_args, **_kwargs):
        raise AssertionError("export loaded the model before checking where it writes")

    monkeypatch.setattr(export_task, "load_model_for_inference", no_work)
    afile = tmp_path / "notes.txt"
    afile.write_text("kept")
    code = main(["export", "-e", spec_file, "-r", str(tmp_path / "results"), "export.checkpoint=model.pth",
                 f"export.onnx_file={afile}/model.onnx"])
    assert code == exit_codes.BAD_INPUT.code
    assert _err_lines(capsys) == [f"deformable-detr export: error: export.onnx_file: {afile} cannot be written: "
                                  f"{afile} is a file, not a folder; {ACCEPTED}"]
    # The refused run took its effective-spec record back: the folder it made is gone again.
    assert not (tmp_path / "results").exists()


def _read_only_mount_available() -> bool:
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode == 0


@pytest.mark.parametrize("task", ["train", "export"])
def test_a_read_only_mount_is_one_line_exit_2(tmp_path, spec_file, task):
    """A read-only mount (a tmpfs mounted ro in a user namespace; without one, a folder without write
    permission, which only a non-root user is refused)."""
    readonly = tmp_path / "ro"
    readonly.mkdir()
    args = [sys.executable, "-m", "deformable_detr", task, "-e", spec_file, "-r", str(readonly / "results"),
            "export.checkpoint=model.pth"]
    if _read_only_mount_available():
        script = f'mount -t tmpfs -o ro tmpfs "{readonly}" && exec "$@"'
        cmd, why = ["unshare", "-rm", "sh", "-c", script, "sh", *args], "read-only file system"
    else:
        assert os.geteuid() != 0, "needs unshare (util-linux) for a read-only mount when run as root"
        readonly.chmod(0o555)
        cmd, why = args, "permission denied"
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    lines = [line for line in done.stderr.strip().splitlines() if "error" in line]
    assert done.returncode == exit_codes.BAD_INPUT.code, done.stderr
    assert lines == [f"deformable-detr {task}: error: results_dir: {readonly}/results/{task} cannot be written: "
                     f"{readonly}: {why}; {ACCEPTED}"], done.stderr
    assert "Traceback" not in done.stderr


# ---------------------------------------------------------------- one writer per results folder (item 1)

from deformable_detr.runtime import storage  # noqa: E402
from deformable_detr.runtime import writer_lock  # noqa: E402
from deformable_detr.runtime.writer_lock import HELD_ENV, LOCK_NAME, Holder, WriterLock, takes_the_lock  # noqa: E402
from test_s3 import bucket  # noqa: E402,F401  (the moto bucket fixture)
from train_records import read_log, read_status  # noqa: E402

REFUSED = "is being written by another"


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in (HELD_ENV, "RANK", "NODE_RANK")}
    return dict(env, DDETR_MSDA_IMPL="reference", OMP_NUM_THREADS="1", **extra)


def _wait_for_lock(path, process, timeout=240) -> Holder:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[0][-3000:]
        if os.path.exists(path):
            holder = Holder.decode(open(path, "rb").read())
            if holder is not None:
                return holder
        time.sleep(0.05)
    raise AssertionError(f"no lock at {path}")


def test_a_second_train_into_the_same_folder_is_refused_and_the_first_keeps_its_files(tiny_coco, tmp_path,
                                                                                     write_spec):
    spec = tiny_train_spec(tiny_coco, tmp_path / "results", batch_size=2, num_epochs=2)
    spec["dataset"]["val_data_sources"] = []
    first_spec = write_spec(spec, "first.yaml")
    spec["train"]["optim"]["lr"] = 5e-3  # the second run differs, as in the issue
    second_spec = write_spec(spec, "second.yaml")
    folder = tmp_path / "results" / "train"
    cmd = [sys.executable, "-m", "deformable_detr", "train", "-e"]
    first = subprocess.Popen(cmd + [first_spec], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    try:
        holder = _wait_for_lock(folder / LOCK_NAME, first)
        assert holder.pid == first.pid and holder.task == "train"
        # Held still while the second starts (its start-up outlasted the first's 8 steps on a loaded machine).
        os.kill(first.pid, signal.SIGSTOP)
        try:
            second = subprocess.run(cmd + [second_spec], env=_env(), capture_output=True, text=True, timeout=300)
        finally:
            os.kill(first.pid, signal.SIGCONT)
        out, _ = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert second.returncode == exit_codes.BAD_INPUT.code, second.stderr[-3000:]
    lines = [line for line in second.stderr.strip().splitlines() if "error" in line]
    assert len(lines) == 1 and lines[0].startswith(
        f"deformable-detr train: error: results_dir: {folder} {REFUSED} train run on host {holder.host}, "
        f"pid {first.pid}, since {holder.since} (last heartbeat "), lines
    assert "Traceback" not in second.stderr
    # The first run's work is whole: it ran to the end alone, one start, its own lr, every step once.
    assert first.returncode == 0, out[-3000:]
    log = read_log(str(folder))
    assert [r["kind"] for r in log].count("start") == 1
    assert [r["step"] for r in log if r["kind"] == "step"] == list(range(1, 9))
    assert all(r["lr"] != 5e-3 for r in log if r["kind"] == "step")
    assert read_status(str(folder))["state"] == "completed"
    assert "lr: 0.001" in (folder / "experiment.yaml").read_text()
    assert not (folder / LOCK_NAME).exists()  # released at the end


def _holder_process(folder, task="train") -> subprocess.Popen:
    code = ("import sys, time\nfrom deformable_detr.runtime.writer_lock import WriterLock\n"
            f"WriterLock({str(folder)!r}, {task!r}, 'results_dir').acquire()\nprint('held', flush=True)\n"
            "time.sleep(600)\n")
    process = subprocess.Popen([sys.executable, "-c", code], env=_env(), stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    return process


@pytest.mark.parametrize("task", ["evaluate", "inference", "export", "convert"])
def test_other_tasks_are_refused_while_their_folder_is_written(tmp_path, spec_file, capsys, task):
    folder = tmp_path / "results" / task
    holder = _holder_process(folder, task)
    try:
        code = main([task, "-e", spec_file, "-r", str(tmp_path / "results"), "export.checkpoint=model.pth"])
    finally:
        holder.kill()
        holder.wait()
    assert code == exit_codes.BAD_INPUT.code
    lines = _err_lines(capsys)
    assert len(lines) == 1 and f"results_dir: {folder} {REFUSED} {task} run on host" in lines[0], lines
    assert f"pid {holder.pid}, since " in lines[0]
    assert sorted(os.listdir(folder)) == [LOCK_NAME]  # no experiment.yaml of the refused run


def test_a_killed_holder_leaves_a_lock_the_next_run_takes_at_once(tmp_path):
    """An auto-resumed run after a crash (SIGKILL: no clean-up) gets the lock: the OS lock died with it."""
    folder = tmp_path / "results" / "train"
    holder = _holder_process(folder)
    with pytest.raises(UsageError, match=REFUSED):
        WriterLock(str(folder), "train", "results_dir").acquire()
    holder.kill()
    holder.wait()
    assert (folder / LOCK_NAME).exists()  # left behind
    lock = WriterLock(str(folder), "train", "results_dir").acquire()
    try:
        assert Holder.decode((folder / LOCK_NAME).read_bytes()).pid == os.getpid()
    finally:
        lock.release()
    assert not (folder / LOCK_NAME).exists()


def _record(folder, **fields) -> None:
    me = Holder.me("train")
    holder = dataclasses.replace(me, **fields)
    path = f"{folder}/{LOCK_NAME}"
    storage.write_bytes(path, holder.encode())


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@pytest.mark.parametrize("remote", [False, True], ids=["local", "s3"])
def test_stale_locks_are_taken_over_and_live_ones_refused(tmp_path, request, monkeypatch, remote):
    folder = request.getfixturevalue("bucket") + "/results/train" if remote else str(tmp_path / "train")
    monkeypatch.setenv("DDETR_JOB_NAME", "job-a")
    monkeypatch.setenv("HOSTNAME", "job-a-attempt2-0")
    monkeypatch.setenv(writer_lock.STALE_ENV, "60")
    now = time.time()
    cases = [  # (record left, taken over?)
        (dict(pid=_dead_pid()), True),                                        # this host, process gone
        (dict(host="node-7", pod="other-0", job="job-b", heartbeat=now), False),  # another host, fresh heartbeat
        (dict(host="node-7", pod="other-0", job="job-b", heartbeat=now - 61), True),  # ... stale heartbeat
        (dict(host="job-a-attempt1-0", pod="job-a-attempt1-0", job="job-a", heartbeat=now), True),  # earlier attempt
    ]
    for fields, taken in cases:
        _record(folder, **fields)
        lock = WriterLock(folder, "train", "results_dir")
        if not taken:
            with pytest.raises(UsageError) as refused:
                lock.acquire()
            assert str(refused.value).startswith(f"results_dir: {folder} {REFUSED} train run on pod other-0 "
                                                 f"(host node-7), pid ")
            assert ", job job-b, since " in str(refused.value)
            continue
        lock.acquire()
        try:
            assert Holder.decode(storage.read_bytes(f"{folder}/{LOCK_NAME}")).token == lock.me.token
            with pytest.raises(UsageError, match=REFUSED):  # and now it is held again
                _refused_by_other_process(folder)
        finally:
            lock.release()
        assert not storage.exists(f"{folder}/{LOCK_NAME}")


def _refused_by_other_process(folder) -> None:
    code = ("from deformable_detr.runtime.writer_lock import WriterLock\n"
            f"WriterLock({folder!r}, 'train', 'results_dir').acquire()\n")
    done = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=120)
    raise UsageError(done.stderr.strip().splitlines()[-1])


def test_the_s3_holder_refreshes_its_heartbeat_and_a_second_run_is_refused(bucket, monkeypatch):
    monkeypatch.setenv(writer_lock.STALE_ENV, "2")  # heartbeat every 0.5 s
    folder = f"{bucket}/results/train"
    lock = WriterLock(folder, "train", "results_dir").acquire()
    try:
        first = Holder.decode(storage.read_bytes(f"{folder}/{LOCK_NAME}")).heartbeat
        time.sleep(3)  # past the stale limit: only the heartbeat keeps it held
        assert Holder.decode(storage.read_bytes(f"{folder}/{LOCK_NAME}")).heartbeat > first
        other = WriterLock(folder, "train", "results_dir")
        other.me = dataclasses.replace(other.me, host="node-9", pod="node-9")
        with pytest.raises(UsageError, match=f"{REFUSED} train run on host "):
            other.acquire()
    finally:
        lock.release()
    assert not storage.exists(f"{folder}/{LOCK_NAME}")


def test_one_lock_per_run_peers_take_none(monkeypatch):
    for name in (HELD_ENV, "RANK", "NODE_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert takes_the_lock()
    monkeypatch.setenv("NODE_RANK", "1")  # the launcher of another node of the gang
    assert not takes_the_lock()
    monkeypatch.setenv("RANK", "0")  # torchrun's rank 0
    assert takes_the_lock()
    monkeypatch.setenv("RANK", "3")
    assert not takes_the_lock()
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv(HELD_ENV, "token")  # a worker of the launcher that holds the lock
    assert not takes_the_lock()
