"""scripts/gpu_check.sh --dry-run on a CPU: every step that needs no GPU runs at a tiny size, the
rest is reported as skipped or not run, and the JSON it writes has what the GPU run will fill.
Tiny sizes; several minutes on a loaded 2-core machine (10 min at a load of 10-20)."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_check_dry_run_runs_every_cpu_step_and_reports_the_rest(tmp_path):
    out = tmp_path / "gpu-check"
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    env.pop("DDETR_MSDA_IMPL", None)
    result = subprocess.run(["bash", str(REPO / "scripts/gpu_check.sh"), str(out), "--dry-run"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=840)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    steps = summary["steps"]
    assert summary["dry_run"] is True
    assert steps["build"]["status"] == "skipped" and "GPU" in steps["build"]["reason"]
    assert steps["pytest_gpu"]["status"] in ("skipped", "passed")
    for name in ("msda_bench", "model_throughput", "example"):
        assert steps[name]["status"] == "passed", (name, steps[name])
    assert steps["example"]["steps"] == {k: "passed" for k in
                                         ("data", "convert", "train", "evaluate", "inference", "export",
                                          "onnxruntime")}
    assert {steps["tensorrt"]["status"], steps["multi_gpu_nccl"]["status"]} == {"not run"}
    # The figures carry their spread, the machine and the same-run reference.
    msda = json.loads((out / "msda.json").read_text())
    assert "load_at_start_1_5_15min" in msda["machine"] and msda["copy_bandwidth"]["cpu"]["bytes_per_s"]["median"] > 0
    implementations = {(r["case"], r["implementation"]) for r in msda["rows"]}
    assert ("encoder", "reference") in implementations and ("decoder", "reference") in implementations
    assert all({"min", "median", "max"} <= set(r["forward_s"]) for r in msda["rows"])
    throughput = json.loads((out / "model_throughput.json").read_text())
    row = throughput["rows"][0]
    assert row["ours"]["images_per_s"]["median"] > 0 and row["transformers"]["images_per_s"]["median"] > 0
    onnx = json.loads((out / "onnxruntime.json").read_text())
    assert onnx["max_abs_difference"] < onnx["tolerance"]
    for name in ("build", "tensorrt", "multi_gpu_nccl", "msda_bench", "example"):
        assert name in result.stdout  # the printed summary names every step
