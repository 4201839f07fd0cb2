"""TAO 6.26's quantize task: its section loads and is checked, and running it is one clear line, exit 2."""
from __future__ import annotations

import subprocess
import sys

import pytest

from deformable_detr.cli import build_parser, main
from deformable_detr.config.loader import SpecError, load_spec
from deformable_detr.tasks import NOT_PROVIDED, TASKS

QUANTIZE_SECTION = {"quantize": {"backend": "modelopt.pytorch", "mode": "static_ptq", "algorithm": "max",
                                 "layers": [{"module_name": "backbone.*",
                                             "weights": {"dtype": "int8"}, "activations": {"dtype": "int8"}}],
                                 "skip_names": ["class_embed.*"], "device": "cuda:0"}}


@pytest.mark.parametrize("argv", [["quantize"], ["quantize", "-e", "spec.yaml", "quantize.device=cpu"],
                                  ["quantize", "--help"]])
def test_running_quantize_is_one_line(argv, tmp_path):
    run = subprocess.run([sys.executable, "-m", "deformable_detr", *argv], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert lines == [f"deformable-detr quantize: error: {NOT_PROVIDED['quantize']}"]
    assert "TAO 6's quantize task is not part of deformable-detr" in lines[0]
    assert "gen_trt_engine.tensorrt.data_type: INT8" in lines[0] and ", ".join(TASKS) in lines[0]
    assert run.stdout == ""


def test_quantize_is_not_offered_as_a_task(capsys):
    assert "quantize" not in TASKS  # the operator's spec.task and default-spec read TASKS
    help_text = build_parser().format_help()
    assert "quantize" not in help_text
    assert main(["default-spec", "quantize"]) == 2
    assert "'quantize' is not a task" in capsys.readouterr().err


def test_quantize_section_loads_and_is_checked(write_spec):
    spec = load_spec(write_spec(QUANTIZE_SECTION))
    assert spec.quantize.backend == "modelopt.pytorch" and spec.quantize.layers[0].weights.dtype == "int8"
    with pytest.raises(SpecError, match="quantize.device"):
        load_spec(write_spec({"quantize": {"device": "tpu"}}))
