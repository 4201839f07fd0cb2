"""SIGTERM and SIGINT in every task (issue 35 item 4): one line, the signal's exit code (143/130), and
experiment.yaml replaced only together with the results it describes.

The signals are real: the process sends them to itself at a chosen point of the task (the kernel
delivers them to the main thread, as in a pod), and the task's own handler meets them.
"""
from __future__ import annotations

import os
import signal

import pytest

from deformable_detr import exit_codes
from deformable_detr.cli import main
from deformable_detr.runtime.distributed import exit_code_for
from deformable_detr.runtime.signals import Stopped
from test_evaluate import tiny_spec as evaluate_spec
from test_evaluate import tiny_weights  # noqa: F401  (module fixture: a tiny model's checkpoint)
from test_inference import checkpoint, classmap, image_folder  # noqa: F401  (fixtures)
from test_inference import tiny_spec as inference_spec
from test_train import tiny_train_spec


@pytest.fixture(autouse=True)
def _reference_attention(monkeypatch):
    monkeypatch.setenv("DDETR_MSDA_IMPL", "reference")


def _signal_then(fn, signum=signal.SIGTERM, times: list | None = None):
    """`fn`, after this process has been sent `signum` (on the first call only)."""
    calls = times if times is not None else []

    def wrapped(*args, **kwargs):
        if not calls:
            calls.append(signum)
            os.kill(os.getpid(), signum)
        return fn(*args, **kwargs)
    return wrapped


def _stop_line(capsys, task: str, signal_name: str = "SIGTERM") -> None:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.startswith(f"deformable-detr {task}:")]
    assert lines == [f"deformable-detr {task}: stopped by {signal_name} before it finished; experiment.yaml in its "
                     "results folder describes the results there"], err[-2000:]
    assert err.strip().splitlines()[-1] == lines[0]


def _snapshot(folder) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


def test_evaluate_stopped_by_sigterm_keeps_the_earlier_results_and_their_spec(tiny_coco, tiny_weights, tmp_path,
                                                                               write_spec, capsys, monkeypatch):
    from deformable_detr.tasks import evaluate

    _, weights = tiny_weights
    assert main(["evaluate", "-e", write_spec(evaluate_spec(tiny_coco, tmp_path / "r", weights,
                                                            conf_threshold=0.2), "first.yaml")]) == 0
    folder = tmp_path / "r" / "evaluate"
    earlier = _snapshot(folder)
    assert "conf_threshold: 0.2" in earlier["experiment.yaml"].decode()
    capsys.readouterr()

    monkeypatch.setattr(evaluate, "evaluate_coco", _signal_then(evaluate.evaluate_coco))
    code = main(["evaluate", "-e", write_spec(evaluate_spec(tiny_coco, tmp_path / "r", weights,
                                                            conf_threshold=0.3), "second.yaml")])
    assert code == exit_codes.TERMINATED.code == 143
    _stop_line(capsys, "evaluate")
    assert _snapshot(folder) == earlier  # results.json, detections.json and the spec that made them


def test_a_signal_during_the_final_writes_waits_until_results_and_spec_are_both_written(
        tiny_coco, tiny_weights, tmp_path, write_spec, capsys, monkeypatch):
    from deformable_detr.tasks import evaluate

    _, weights = tiny_weights
    # SIGTERM as detections.json is written: results.json and experiment.yaml still follow it.
    monkeypatch.setattr(evaluate, "write_text", _signal_then(evaluate.write_text))
    code = main(["evaluate", "-e", write_spec(evaluate_spec(tiny_coco, tmp_path / "r", weights,
                                                            conf_threshold=0.3))])
    assert code == exit_codes.TERMINATED.code
    _stop_line(capsys, "evaluate")
    folder = tmp_path / "r" / "evaluate"
    assert sorted(os.listdir(folder)) == ["detections.json", "experiment.yaml", "results.json"]
    assert "conf_threshold: 0.3" in (folder / "experiment.yaml").read_text()
    assert '"conf_threshold": 0.3' in (folder / "results.json").read_text()


def test_export_stopped_by_ctrl_c_writes_no_onnx_file_and_keeps_the_earlier_spec(tiny_weights, tmp_path, write_spec,
                                                                                  capsys, monkeypatch):
    from deformable_detr.tasks import export
    from test_evaluate import TINY_MODEL

    _, weights = tiny_weights
    folder = tmp_path / "r" / "export"
    folder.mkdir(parents=True)
    (folder / "experiment.yaml").write_text("# the run before\n")
    monkeypatch.setattr(export, "export_to_bytes", _signal_then(export.export_to_bytes, signal.SIGINT))
    spec = {"results_dir": str(tmp_path / "r"), "model": dict(TINY_MODEL), "dataset": {"num_classes": 4},
            "export": {"checkpoint": weights, "input_width": 64, "input_height": 64}}
    assert main(["export", "-e", write_spec(spec)]) == exit_codes.INTERRUPTED.code == 130
    _stop_line(capsys, "export", "SIGINT")
    assert _snapshot(folder) == {"experiment.yaml": b"# the run before\n"}


def test_inference_stopped_by_sigterm_does_not_replace_the_spec(checkpoint, image_folder, classmap, tmp_path,
                                                                write_spec, capsys, monkeypatch):
    from deformable_detr.tasks import inference

    folder = tmp_path / "r" / "inference"
    folder.mkdir(parents=True)
    (folder / "experiment.yaml").write_text("# the run before\n")
    monkeypatch.setattr(inference, "_write_outputs", _signal_then(inference._write_outputs))
    spec = inference_spec(tmp_path / "r", checkpoint, [image_folder], classmap)
    assert main(["inference", "-e", write_spec(spec)]) == exit_codes.TERMINATED.code
    _stop_line(capsys, "inference")
    assert (folder / "experiment.yaml").read_text() == "# the run before\n"


def test_train_stopped_before_its_loop_is_one_line_and_takes_its_spec_back(tiny_coco, tmp_path, write_spec,
                                                                          capsys, monkeypatch):
    """Train's loop stops after the step and saves (test_train.py); before it, the signal ends the run at once."""
    from deformable_detr.tasks.train.loop import Trainer

    monkeypatch.setattr(Trainer, "_build", _signal_then(Trainer._build))
    spec = tiny_train_spec(tiny_coco, tmp_path / "r")
    assert main(["train", "-e", write_spec(spec)]) == exit_codes.TERMINATED.code
    _stop_line(capsys, "train")
    assert not (tmp_path / "r" / "train" / "experiment.yaml").exists()


def test_convert_stopped_by_sigterm_keeps_the_earlier_spec(tmp_path, write_spec, capsys, monkeypatch):
    from deformable_detr.data.example import make_example_data
    from deformable_detr.tasks import convert

    make_example_data(str(tmp_path / "data"), num_train=4, num_val=2, image_size=32, seed=0)
    kitti = tmp_path / "data" / "kitti"
    folder = tmp_path / "r" / "convert"
    folder.mkdir(parents=True)
    (folder / "experiment.yaml").write_text("# the run before\n")
    monkeypatch.setattr(convert, "read_source", _signal_then(convert.read_source))
    spec = {"results_dir": str(tmp_path / "r"), "convert": {"input_source": str(kitti / "sources.txt"),
                                                            "mapping_path": str(kitti / "mapping.json")}}
    assert main(["convert", "-e", write_spec(spec)]) == exit_codes.TERMINATED.code
    _stop_line(capsys, "convert")
    assert _snapshot(folder) == {"experiment.yaml": b"# the run before\n"}


def test_a_worker_stopped_by_a_signal_records_the_signals_exit_code_for_its_launcher():
    """Under torchrun each worker records its code; a stop is retryable (143/130), never a bug's 1."""
    assert exit_code_for(Stopped(signal.SIGTERM)) == exit_codes.TERMINATED.code
    assert exit_code_for(Stopped(signal.SIGINT)) == exit_codes.INTERRUPTED.code
    assert exit_codes.is_retryable(exit_code_for(Stopped(signal.SIGTERM)))
