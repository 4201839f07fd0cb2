"""The command line: TAO's calling convention, default-spec, and exit code 2 with one clear line."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from deformable_detr.cli import main
from deformable_detr.config import spec_from_dict


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "deformable_detr", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


@pytest.mark.parametrize("task", ["convert", "train", "evaluate", "inference", "export", "gen_trt_engine"])
def test_each_task_has_help(task, capsys):
    with pytest.raises(SystemExit) as info:
        main([task, "-h"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "-e" in out and "--results_dir" in out and "section.field=value" in out


def test_console_script_is_installed():
    # The script pip installed beside the interpreter running the tests (a venv need not be activated).
    script = os.path.join(os.path.dirname(sys.executable), "deformable-detr")
    result = subprocess.run([script, "-h"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    for task in ("convert", "train", "evaluate", "inference", "export"):
        assert task in result.stdout


def test_default_spec_is_complete_and_loads(capsys, tmp_path):
    assert main(["default-spec"]) == 0
    text = capsys.readouterr().out
    assert "# " in text and "num_feature_levels: 4" in text and "opset_version: 17" in text
    loaded = yaml.safe_load(text)
    spec_from_dict(loaded)  # the printed defaults are a valid spec
    assert set(loaded) >= {"model", "dataset", "train", "evaluate", "inference", "export", "convert",
                           "results_dir", "encryption_key"}


def test_default_spec_for_one_task(capsys):
    assert main(["default-spec", "convert"]) == 0
    loaded = yaml.safe_load(capsys.readouterr().out)
    assert "convert" in loaded and "model" not in loaded


def test_bad_override_exits_2_with_one_line(write_spec, tmp_path):
    path = write_spec({"results_dir": str(tmp_path / "r")})
    result = run_cli("train", "-e", path, "model.num_feature_levels=7")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == ["deformable-detr train: error: model.num_feature_levels: 7 is out of range; accepted: 1..4"]


def test_missing_spec_exits_2(tmp_path):
    result = run_cli("evaluate", "-e", str(tmp_path / "missing.yaml"))
    assert result.returncode == 2
    assert "spec file not found" in result.stderr and "Traceback" not in result.stderr


def test_unknown_key_suggests(write_spec):
    result = run_cli("export", "-e", write_spec({"export": {"onnx_fle": "x.onnx"}}))
    assert result.returncode == 2
    assert "did you mean 'export.onnx_file'" in result.stderr


def test_num_nodes_only_for_train(write_spec):
    result = run_cli("export", "-e", write_spec({}), "--num_nodes", "2")
    assert result.returncode == 2 and "--num_nodes" in result.stderr


def test_results_dir_required(write_spec):
    result = run_cli("convert", "-e", write_spec({}))
    assert result.returncode == 2 and "results_dir: not set" in result.stderr
