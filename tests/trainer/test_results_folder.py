"""A task's results folder (issue 35 items 1 and 2): one that cannot be written is one line naming the path
and why, exit 2, before any work; one writer per folder (see the lock tests below)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import yaml

from deformable_detr import exit_codes
from deformable_detr.cli import main
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
