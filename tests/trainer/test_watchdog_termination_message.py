"""The termination message a failing trainer leaves for Kubernetes: class, exit code, step, reason
and the last log lines, in 4096 bytes; the first failure of a container wins."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from deformable_detr import exit_codes
from deformable_detr.data.images import UnreadableImageError
from deformable_detr.runtime import termination


@pytest.fixture
def message_file(tmp_path, monkeypatch):
    path = tmp_path / "termination-log"
    monkeypatch.setenv(termination.PATH_ENV, str(path))
    termination._tail.clear()
    return path


def head_of(path) -> dict:
    return json.loads(path.read_text().split("\n", 1)[0])


def test_every_exit_code_has_a_known_failure_class():
    for entry in exit_codes.ALL:
        assert entry.failure_class in exit_codes.FAILURE_CLASSES or entry is exit_codes.OK
    assert exit_codes.failure_class(137) == "Killed" and exit_codes.failure_class(77) == "Bug"


@pytest.mark.parametrize("code, err, expected", [
    (1, RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), "OOM"),
    (2, UnreadableImageError("data/images/000.jpg: cannot identify image file"), "Data"),
    (4, None, "NaN"),
    (200, None, "NCCL"),
    (202, None, "Storage"),
    (2, None, "Input"),
    (1, ValueError("boom"), "Bug"),
])
def test_the_class_comes_from_the_error_where_it_says_more_than_the_code(code, err, expected):
    assert termination.classify(code, err) == expected


def test_the_cli_leaves_the_class_and_the_one_line_reason(message_file, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("model:\n  num_feature_levels: 7\n")
    env = {**os.environ, termination.PATH_ENV: str(message_file)}
    done = subprocess.run([sys.executable, "-m", "deformable_detr", "train", "-e", str(spec), "-r", str(tmp_path / "r")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    head = head_of(message_file)
    assert head["class"] == "Input" and head["exitCode"] == 2 and head["step"] is None
    assert "model.num_feature_levels: 7 is out of range" in head["reason"]


def test_a_crash_leaves_its_traceback_tail(message_file):
    with pytest.raises(ZeroDivisionError):
        with termination.recorded(launcher=True):
            termination.note_step(12)
            termination.logging.getLogger("deformable_detr.train").warning("step 12 done")
            1 / 0
    head, _, tail = message_file.read_text().partition("\n")
    assert json.loads(head)["class"] == "Bug" and json.loads(head)["step"] == 12
    assert "ZeroDivisionError: division by zero" in json.loads(head)["reason"]
    assert "step 12 done" in tail and "1 / 0" in tail


def test_the_first_failure_wins_and_a_launcher_clears_an_old_message(message_file):
    termination.write(202, "Storage", "disk full")
    termination.write(200, "NCCL", "lost a peer")  # a peer failing after the cause
    assert head_of(message_file)["class"] == "Storage"
    with pytest.raises(SystemExit):
        with termination.recorded(launcher=True):  # a new run in the same place
            raise SystemExit(200)
    assert head_of(message_file)["class"] == "NCCL"
    with termination.recorded(launcher=True):
        pass
    assert message_file.read_text() == ""  # a success leaves nothing


def test_the_message_fits_the_kubelets_4096_bytes_keeping_the_newest_lines(message_file):
    for i in range(termination.TAIL_LINES):
        termination._tail.append(f"INFO line {i} " + "x" * 400)
    termination.write(200, "Hung", "no step for 600 s" + " really" * 100, step=5)
    text = message_file.read_text()
    assert len(text.encode()) <= termination.MAX_BYTES
    assert f"line {termination.TAIL_LINES - 1} " in text and "line 0 " not in text
    assert len(head_of(message_file)["reason"]) <= 300


def test_without_the_kubelets_file_nothing_is_written(monkeypatch, tmp_path):
    monkeypatch.delenv(termination.PATH_ENV, raising=False)
    if os.path.exists(termination.KUBELET_PATH):
        pytest.fail("this machine has /dev/termination-log: run the test outside a container with one")
    assert termination.path() is None
    termination.write(1, "Bug", "nothing to write to")  # no error
