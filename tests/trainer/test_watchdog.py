"""The step watchdog (train.step_timeout_s): no step within the limit -> every thread's stack in the
log and under hangs/, a termination message of class Hung, exit 200 (retryable); a real torchrun
gang with one rank SIGSTOPped ends so, and within the limit plus one check."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from deformable_detr import exit_codes
from deformable_detr.runtime import distributed, termination, watchdog
from test_train import tiny_train_spec
from test_train_distributed import _env, _records, _worker_pids, _write


class Exited(Exception):
    pass


def _stuck_here(release: threading.Event) -> None:
    release.wait(30)  # a frame the dump must show


def test_no_step_within_the_limit_dumps_every_stack_and_exits_200(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(termination.PATH_ENV, str(tmp_path / "termination-log"))
    monkeypatch.delenv(distributed.EXIT_CODE_DIR_ENV, raising=False)
    codes: list[int] = []
    exited = threading.Event()

    def fake_exit(code: int) -> None:
        codes.append(code)
        exited.set()

    release = threading.Event()
    blocker = threading.Thread(target=_stuck_here, args=(release,), name="data-reader")
    blocker.start()
    dog = watchdog.StepWatchdog(0.5, str(tmp_path / "results"), rank=3, exit=fake_exit).start()
    started = time.monotonic()
    try:
        dog.beat(7)
        assert exited.wait(10)
    finally:
        release.set()
        blocker.join()
        dog.stop()
    assert codes == [exit_codes.PEER_LOST.code]
    assert 0.5 <= time.monotonic() - started < 3
    (dump,) = (tmp_path / "results" / watchdog.HANGS_FOLDER).iterdir()
    assert dump.name.startswith("rank3-step7-")
    text = dump.read_text()
    assert "Thread data-reader" in text and "_stuck_here" in text and "Thread step-watchdog" in text
    assert "no training step finished in" in caplog.text and "after step 7" in caplog.text
    assert "_stuck_here" in caplog.text  # the stacks are in the log too
    head = json.loads((tmp_path / "termination-log").read_text().split("\n", 1)[0])
    assert (head["class"], head["exitCode"], head["step"]) == ("Hung", 200, 7)
    assert str(dump) in head["reason"]


def test_steps_within_the_limit_keep_it_quiet_and_none_turns_it_off(tmp_path):
    codes: list[int] = []
    dog = watchdog.StepWatchdog(0.6, str(tmp_path), rank=0, exit=codes.append).start()
    for step in range(10):
        time.sleep(0.15)
        dog.beat(step)
    dog.stop()
    assert codes == [] and not (tmp_path / watchdog.HANGS_FOLDER).exists()
    with watchdog.guard(None, str(tmp_path), 0) as off:
        assert off is None
        watchdog.beat(1)  # no watchdog: only the step for the termination message


def test_the_collective_timeout_follows_the_step_timeout_unless_set(monkeypatch):
    monkeypatch.delenv(distributed.TIMEOUT_ENV, raising=False)
    watchdog.collective_timeout_from(None)
    assert distributed.TIMEOUT_ENV not in os.environ
    watchdog.collective_timeout_from(90)
    assert distributed.timeout_seconds() == 180  # the watchdog (with its stacks) acts first
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "600")
    watchdog.collective_timeout_from(90)
    assert distributed.timeout_seconds() == 600


def test_a_sigstopped_rank_ends_the_gang_as_hung_within_the_limit(tiny_coco, tmp_path):
    limit = 20
    spec = tiny_train_spec(tiny_coco, tmp_path / "r", batch_size=1, num_epochs=4, step_timeout_s=limit)
    spec["dataset"]["val_data_sources"] = []
    path = _write(tmp_path, spec, "spec.yaml")
    folder = tmp_path / "r" / "train"
    message = tmp_path / "termination-log"
    marker = str(tmp_path)
    # The collective timeout far above the step limit: the watchdog acts, not gloo.
    env = dict(_env(), DDETR_TEST_RUN=marker, DDETR_DIST_TIMEOUT_S="600", **{termination.PATH_ENV: str(message)})
    run = subprocess.Popen([sys.executable, "-m", "deformable_detr", "train", "-e", path, "--gpus", "2"], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    victims: list[int] = []
    try:
        deadline = time.monotonic() + 300
        while not (folder / "train_log.jsonl").exists() or len(_records(folder, "step")) < 3:
            assert run.poll() is None, run.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "training did not reach step 3"
            time.sleep(0.1)
        victims = _worker_pids(marker, rank=1)
        assert victims, "rank 1 worker not found"
        for pid in victims:
            os.kill(pid, signal.SIGSTOP)
        stopped_at, stopped_wall = time.monotonic(), time.time()
        out, _ = run.communicate(timeout=limit + 120)
        took = time.monotonic() - stopped_at
    finally:
        for pid in victims:
            for signum in (signal.SIGKILL, signal.SIGCONT):
                try:
                    os.kill(pid, signum)
                except ProcessLookupError:
                    pass
        if run.poll() is None:
            run.kill()
    assert run.returncode == exit_codes.PEER_LOST.code, out[-3000:]
    head = json.loads(message.read_text().split("\n", 1)[0])
    assert head["class"] == "Hung" and head["rank"] == 0 and head["step"] >= 3
    dumps = sorted((folder / watchdog.HANGS_FOLDER).iterdir())
    assert dumps and dumps[0].name.startswith("rank0-") and "Thread MainThread" in dumps[0].read_text()
    fired = dumps[0].stat().st_mtime - stopped_wall
    # The watchdog acts one limit after rank 0's last step (a check every limit/10); the launcher
    # ends after torchrun's grace for the stopped peer (SIGTERM, 30 s, SIGKILL).
    print(f"step watchdog: rank 1 SIGSTOPped -> rank 0's stacks dumped after {fired:.1f} s, launcher exit "
          f"{run.returncode} after {took:.1f} s (train.step_timeout_s {limit})")
    assert fired < limit + 15
    assert took < limit + 90
    assert "no training step finished in" in out
