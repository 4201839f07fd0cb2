"""The AutoReduce schedule: ReduceLROnPlateau on train.optim.lr_monitor (val_loss or train_loss)."""
from __future__ import annotations

import pytest
import torch

from deformable_detr.config import spec_from_dict
from deformable_detr.runtime.checkpoint import LATEST_NAME, load_checkpoint
from deformable_detr.runtime.optim import build_scheduler, monitors_a_value
from train_records import read_log
from test_resume import _assert_same_training_state
from test_train import tiny_train_spec, train_cli


@pytest.fixture(autouse=True)
def _one_attention_implementation(monkeypatch):
    monkeypatch.setenv("DDETR_MSDA_IMPL", "reference")


def _autoreduce(**optim) -> dict:
    return {"lr_scheduler": "AutoReduce", "lr_decay": 0.5, **optim}


def test_decays_when_the_value_stops_improving_by_a_tenth_of_a_percent():
    optim = spec_from_dict({"train": {"optim": _autoreduce(lr=1.0, patience=1)}}).train.optim
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=optim.lr)
    scheduler = build_scheduler(optimizer, optim)
    assert monitors_a_value(scheduler) and not monitors_a_value(
        build_scheduler(optimizer, spec_from_dict({}).train.optim))
    lrs = []
    # 1.0 -> 0.5 improves; 0.4996 is under 0.1 % better than 0.5: no improvement; a second one decays.
    for value in [1.0, 0.5, 0.4996, 0.4996, 0.3, 0.3, 0.3]:
        scheduler.step(value)
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs == pytest.approx([1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25])


def test_training_decays_the_lr_on_a_validation_loss_plateau(tiny_coco, tmp_path, write_spec):
    # An lr too small to move the validation loss by 0.1 %: every validation after the first is a plateau.
    spec = tiny_train_spec(tiny_coco, tmp_path / "results", num_epochs=3)
    spec["train"]["optim"] = _autoreduce(lr=1e-6, lr_backbone=1e-6, patience=0, monitor_name="val_loss")
    assert train_cli(write_spec, spec) == 0
    records = read_log(str(tmp_path / "results" / "train"))
    losses = [r["val_loss"] for r in records if r["kind"] == "validation"]
    assert len(losses) == 3 and all(abs(b - a) < 1e-3 * a for a, b in zip(losses, losses[1:]))
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [r["lr"] for r in epochs] == pytest.approx([1e-6, 5e-7, 2.5e-7])
    steps = [r for r in records if r["kind"] == "step"]
    assert [r["lr"] for r in steps] == pytest.approx([1e-6, 1e-6, 1e-6, 1e-6, 5e-7, 5e-7])
    assert all(r["train_loss"] > 0 for r in epochs)
    state = load_checkpoint(str(tmp_path / "results" / "train" / LATEST_NAME))["lr_scheduler"]
    # Later values were never 0.1 % better: the first stays the best.
    assert state["best"] == pytest.approx(losses[0]) and state["factor"] == 0.5


def test_train_loss_schedule_resumes_exactly(tiny_coco, tmp_path, write_spec):
    # The schedule's best value and bad-epoch count travel in the checkpoint: 2 + 1 epochs == 3 epochs.
    def spec(folder, num_epochs):
        out = tiny_train_spec(tiny_coco, tmp_path / folder, num_epochs=num_epochs)
        out["dataset"]["val_data_sources"] = []
        out["train"]["optim"] = _autoreduce(lr=1e-3, lr_backbone=1e-4, patience=0, lr_monitor="train_loss")
        return out

    assert train_cli(write_spec, spec("full", 3), name="full.yaml") == 0
    assert train_cli(write_spec, spec("resumed", 2), name="r2.yaml") == 0
    assert train_cli(write_spec, spec("resumed", 3), name="r3.yaml") == 0
    full = load_checkpoint(str(tmp_path / "full" / "train" / LATEST_NAME))
    resumed = load_checkpoint(str(tmp_path / "resumed" / "train" / LATEST_NAME))
    _assert_same_training_state(full, resumed)
    epochs = [r for r in read_log(str(tmp_path / "full" / "train")) if r["kind"] == "epoch"]
    assert full["lr_scheduler"]["best"] == pytest.approx(min(r["train_loss"] for r in epochs))
    # A run stopped inside an epoch resumes that epoch's loss sum too: checkpoints carry it.
    assert full["epoch_loss"]["steps"] == 2
    assert full["epoch_loss"]["sum"] / 2 == pytest.approx(epochs[-1]["train_loss"])


def test_val_loss_without_validation_data_is_refused(tiny_coco, tmp_path, write_spec, capsys):
    spec = tiny_train_spec(tiny_coco, tmp_path / "results")
    spec["dataset"]["val_data_sources"] = []
    spec["train"]["optim"] = _autoreduce()
    assert train_cli(write_spec, spec) == 2
    assert ("train.optim.lr_monitor: val_loss needs dataset.val_data_sources" in capsys.readouterr().err)


def test_resuming_with_another_kind_of_schedule_is_refused(tiny_coco, tmp_path, write_spec, capsys):
    spec = tiny_train_spec(tiny_coco, tmp_path / "results", num_epochs=1)
    spec["dataset"]["val_data_sources"] = []
    assert train_cli(write_spec, spec) == 0
    spec["train"]["num_epochs"] = 2
    spec["train"]["optim"] = _autoreduce(lr_monitor="train_loss")
    assert train_cli(write_spec, spec) == 2
    assert "train.optim.lr_scheduler:" in capsys.readouterr().err


@pytest.mark.slow
def test_two_processes_agree_on_the_validation_loss_with_uneven_shards(tiny_coco, tmp_path):
    # Three validation images over two ranks, one a batch: rank 1 holds a batch fewer. Both ranks must
    # run the same number of loss computations (the criterion averages box counts over ranks) and
    # step the schedule with the same value, so their learning rates never part.
    import json
    import subprocess
    import sys

    from test_train_distributed import _env

    coco = json.loads(open(tiny_coco["val"]["json_file"]).read())
    kept = {image["id"] for image in coco["images"][:3]}
    coco["images"] = [i for i in coco["images"] if i["id"] in kept]
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] in kept]
    (tmp_path / "val3.json").write_text(json.dumps(coco))
    spec = tiny_train_spec(tiny_coco, tmp_path / "r", batch_size=1, num_epochs=2)
    spec["dataset"]["val_data_sources"] = [{"image_dir": tiny_coco["val"]["image_dir"],
                                            "json_file": str(tmp_path / "val3.json")}]
    spec["train"]["optim"] = _autoreduce(lr=1e-6, lr_backbone=1e-6, patience=0)
    path = tmp_path / "spec.yaml"
    path.write_text(__import__("yaml").safe_dump(spec))
    done = subprocess.run([sys.executable, "-m", "deformable_detr", "train", "-e", str(path), "--gpus", "2"],
                          env=_env(), capture_output=True, text=True, timeout=480)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    folder = tmp_path / "r" / "train"
    records = read_log(str(folder))
    assert len([r for r in records if r["kind"] == "validation" and r["val_loss"] > 0]) == 2
    assert [r["lr"] for r in records if r["kind"] == "epoch"] == pytest.approx([1e-6, 5e-7])
    state = load_checkpoint(str(folder / LATEST_NAME))
    assert state["lr_scheduler"]["num_bad_epochs"] == 0 and state["lr_scheduler"]["_last_lr"][0] == pytest.approx(5e-7)
