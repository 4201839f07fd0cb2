"""The README's figures for bench/msda.py and bench/model_step.py are the ones in bench/results/
(scripts/readme_figures.py renders them), and those JSON files carry the spread, the machine and
the same-run reference."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_readme_figures_match_bench_results():
    result = subprocess.run([sys.executable, str(REPO / "scripts/readme_figures.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_bench_results_carry_spread_machine_and_reference():
    msda = json.loads((REPO / "bench/results/msda.json").read_text())
    assert {"cpu_model", "cpu_cores", "load_at_start_1_5_15min", "versions"} <= set(msda["machine"])
    implementations = {r["implementation"] for r in msda["rows"]}
    assert {"reference", "cpu"} <= implementations
    for row in msda["rows"]:
        for key in ("forward_s", "forward_backward_s", "forward_speedup", "forward_backward_speedup"):
            stats = row[key]
            assert stats["min"] <= stats["median"] <= stats["max"] and stats["n"] >= 5, (key, stats)
    step = json.loads((REPO / "bench/results/model_step.json").read_text())
    assert "load_at_start_1_5_15min" in step["machine"]
    for row in step["rows"]:
        for stats in list(row["seconds"].values()) + [row["speedup_default"], row["speedup_reference"]]:
            assert stats["min"] <= stats["median"] <= stats["max"] and stats["n"] >= 5


def test_real_size_model_step_carries_fold_memory_and_shared_machine():
    step = json.loads((REPO / "bench/results/model_step_tao_default.json").read_text())
    assert step["config"]["backbone"] == "resnet_50" and step["config"]["layers"] == 6
    assert step["config"]["queries"] == 300 and "shared" in step["machine"]
    for row in step["rows"]:
        assert {"ours_reference", "ours_default", "ours_default_unfolded", "transformers"} <= set(row["seconds"])
        # Each speed change of ours timed alone in the same rounds (issue 34 item 3).
        assert set(row["change_speedups"]) == set(step["changes"]) and len(step["changes"]) == 4
        for stats in (list(row["seconds"].values()) + list(row["change_speedups"].values())
                      + [row["speedup_default"], row["batchnorm_fold_speedup"]]):
            assert stats["min"] <= stats["median"] <= stats["max"] and stats["n"] >= 5
    # The bench stops unless each revert matches within atol + rtol x |output|; outputs are O(1).
    assert all(c["outputs_max_abs_diff"] < 1e-3 for c in step["changes"].values())
    memory = {(m["model"], m["activation_checkpoint"]) for m in step["train_step_memory"]}
    assert memory == {(model, on) for model in ("ours", "transformers") for on in (False, True)}


@pytest.mark.parametrize("name", ["export.json", "export_tao_default.json"])
def test_export_figures_carry_both_batches_spread_and_the_tensorrt_gap(name):
    export = json.loads((REPO / "bench/results" / name).read_text())
    assert {r["batch"] for r in export["rows"]} == {1, 4} and "GPU" in export["tensorrt"]
    assert "load_at_start_1_5_15min" in export["machine"]
    for row in export["rows"]:
        for stats in (list(row["ms_per_image"].values())
                      + [row["speedup_per_round"], row["speedup_vs_eager_kernel_per_round"]]):
            assert stats["min"] <= stats["median"] <= stats["max"] and stats["n"] >= 5
        assert row["max_abs_diff"] < 1e-3  # the ONNX graph computes what eager does
