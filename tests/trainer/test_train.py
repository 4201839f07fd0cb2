"""`deformable-detr train` in one process on the tiny COCO set: outputs, precision, fine-tuning, SIGTERM."""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time

import pytest
import torch
import yaml

from deformable_detr.cli import main
from deformable_detr.errors import UsageError
from deformable_detr.runtime.checkpoint import LATEST_NAME, load_checkpoint
from train_records import read_log, read_status
from deformable_detr.tasks.train.batches import padded_batches

TINY_MODEL = {"backbone": "resnet_18", "num_queries": 10, "num_feature_levels": 1, "return_interm_indices": [3],
              "hidden_dim": 32, "nheads": 2, "enc_layers": 1, "dec_layers": 1, "dim_feedforward": 64,
              "enc_n_points": 2, "dec_n_points": 2, "num_select": 10, "dropout_ratio": 0.1}
# 64 px images, kept at 64 px: random flips still draw from the RNG, every crop is the whole image.
TINY_AUGMENTATION = {"scales": [64], "train_random_resize": [64], "train_random_crop_min": 64,
                     "train_random_crop_max": 64, "random_resize_max_size": 64, "test_random_resize": 64,
                     "fixed_padding": True}


def tiny_train_spec(tiny_coco: dict, results_dir, batch_size: int = 4, **train) -> dict:
    """A spec small enough to train in seconds on a CPU; `train` overrides the train section."""
    return {
        "results_dir": str(results_dir),
        "model": dict(TINY_MODEL),
        "dataset": {"num_classes": tiny_coco["num_classes"], "batch_size": batch_size, "workers": 0,
                    "pin_memory": False, "train_data_sources": [tiny_coco["train"]],
                    "val_data_sources": [tiny_coco["val"]], "augmentation": dict(TINY_AUGMENTATION)},
        "train": {"num_epochs": 2, "seed": 11, "activation_checkpoint": False, "clip_grad_norm": 0.1,
                  "optim": {"lr": 1e-3, "lr_backbone": 1e-4, "lr_steps": [1], "lr_decay": 0.5}, **train},
    }


def train_cli(write_spec, spec: dict, *extra: str, name: str = "spec.yaml") -> int:
    return main(["train", "-e", write_spec(spec, name), *extra])


def step_losses(folder) -> list[float]:
    return [r["loss"] for r in read_log(str(folder)) if r["kind"] == "step"]


@contextlib.contextmanager
def sigterm_after_steps(folder, steps: int, timeout: float = 240):
    """SIGTERM to this process once `folder`'s log shows `steps` training steps (the kernel delivers
    it to the main thread, as in a pod); yields an Event set when it was sent."""
    sent = threading.Event()

    def send() -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (folder / "train_log.jsonl").exists() and len(step_losses(folder)) >= steps:
                os.kill(os.getpid(), signal.SIGTERM)
                sent.set()
                return
            time.sleep(0.02)

    # Should the signal ever land after training returns, this handler (not the default) catches it.
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        threading.Thread(target=send, daemon=True).start()
        yield sent
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.fixture(scope="module")
def trained(tiny_coco, tmp_path_factory):
    """One two-epoch run: its results folder."""
    root = tmp_path_factory.mktemp("trained")
    path = root / "spec.yaml"
    path.write_text(yaml.safe_dump(tiny_train_spec(tiny_coco, root / "results")))
    assert main(["train", "-e", str(path)]) == 0
    return root / "results" / "train"


def test_checkpoints_are_named_as_tao_names_them(trained):
    names = sorted(os.listdir(trained))
    assert names == ["dd_model_latest.pth", "experiment.yaml", "model_epoch_000_step_00002.pth",
                     "model_epoch_001_step_00004.pth", "status.json", "tensorboard", "train_log.jsonl"]
    last = load_checkpoint(str(trained / "model_epoch_001_step_00004.pth"))
    latest = load_checkpoint(str(trained / LATEST_NAME))
    assert set(last) >= {"model", "optimizer", "lr_scheduler", "scaler", "epoch", "step", "rng", "spec"}
    assert (last["epoch"], last["step"], last["epoch_finished"]) == (1, 4, True)
    assert last["spec"]["train"]["num_epochs"] == 2 and last["spec"]["encryption_key"] is None
    # Original parameter names (no DDP "module." prefix), and the pointer holds the newest weights.
    assert "transformer.encoder.layers.0.self_attn.sampling_offsets.weight" in last["model"]
    assert "backbone.0.body.layer1.0.conv1.weight" in last["model"]
    assert all(torch.equal(last["model"][k], latest["model"][k]) for k in last["model"])
    assert last["lr_scheduler"]["last_epoch"] == 2 and last["rng"]["ranks"][0]["torch"].dtype == torch.uint8


def test_train_log_and_status(trained):
    records = read_log(str(trained))
    steps = [r for r in records if r["kind"] == "step"]
    assert [r["step"] for r in steps] == [1, 2, 3, 4] and [r["epoch"] for r in steps] == [0, 0, 1, 1]
    for record in steps:
        assert {"loss", "loss_ce", "loss_bbox", "loss_giou", "lr",
                "images_per_s", "data_wait_seconds", "memory_mb"} <= set(record)
        assert record["loss"] == pytest.approx(sum(v for k, v in record.items() if k.startswith("loss_")))
    # MultiStep at epoch 1 halves the lr of the rest group.
    assert [r["lr"] for r in steps] == pytest.approx([1e-3, 1e-3, 5e-4, 5e-4])
    validations = [r for r in records if r["kind"] == "validation"]
    assert [v["epoch"] for v in validations] == [0, 1]
    assert all(0.0 <= v["mAP"] <= 1.0 and set(v["per_class_AP"]) == {"class_1", "class_2", "class_3"}
               for v in validations)
    status = read_status(str(trained))
    assert status["state"] == "completed" and (status["epoch"], status["num_epochs"], status["step"]) == (2, 2, 4)
    assert status["last_loss"] == pytest.approx(steps[-1]["loss"])
    assert status["last_map"] == pytest.approx(validations[-1]["mAP"])
    assert status["last_checkpoint"].endswith("model_epoch_001_step_00004.pth")


def test_a_finished_run_resumes_to_nothing_to_do(trained, tiny_coco, write_spec):
    # auto_resume finds epoch 2 of 2 already done: no step is taken and nothing is overwritten.
    before = os.path.getmtime(trained / "model_epoch_001_step_00004.pth")
    spec = tiny_train_spec(tiny_coco, trained.parent)
    assert train_cli(write_spec, spec) == 0
    assert len(step_losses(trained)) == 4
    assert os.path.getmtime(trained / "model_epoch_001_step_00004.pth") == before
    status = read_status(str(trained))  # what the finished run reported is kept
    assert status["state"] == "completed" and status["last_checkpoint"].endswith("model_epoch_001_step_00004.pth")
    assert status["last_map"] is not None and (status["epoch"], status["step"]) == (2, 4)


def _autocast_runs_on_cpu(dtype: torch.dtype) -> bool:
    try:
        with torch.autocast("cpu", dtype=dtype):
            torch.nn.functional.linear(torch.ones(2, 2), torch.ones(2, 2))
        return True
    except RuntimeError:
        return False


@pytest.mark.parametrize("precision,dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_mixed_precision_steps_on_cpu(precision, dtype, tiny_coco, tmp_path, write_spec):
    if not _autocast_runs_on_cpu(dtype):
        pytest.skip(f"this torch build has no CPU autocast for {dtype}")
    spec = tiny_train_spec(tiny_coco, tmp_path / "r", batch_size=8, num_epochs=1, precision=precision)
    spec["dataset"]["val_data_sources"] = []
    assert train_cli(write_spec, spec) == 0
    folder = tmp_path / "r" / "train"
    losses = step_losses(folder)
    assert len(losses) == 1 and all(torch.isfinite(torch.tensor(losses)))
    saved = load_checkpoint(str(folder / LATEST_NAME))
    assert (saved["scaler"] is not None) == (precision == "fp16")  # GradScaler only for fp16
    assert all(v.dtype == torch.float32 for v in saved["model"].values() if v.is_floating_point())


def test_fine_tuning_to_other_classes_keeps_the_rest(trained, tiny_coco, tmp_path, write_spec, caplog):
    spec = tiny_train_spec(tiny_coco, tmp_path / "r", batch_size=8, num_epochs=1,
                           pretrained_model_path=str(trained / LATEST_NAME))
    spec["dataset"]["num_classes"] = 6
    spec["dataset"]["val_data_sources"] = []
    spec["train"]["optim"].update(lr=0.0, lr_backbone=0.0)  # no update: weights stay as loaded
    assert train_cli(write_spec, spec) == 0
    source = load_checkpoint(str(trained / LATEST_NAME))["model"]
    tuned = load_checkpoint(str(tmp_path / "r" / "train" / LATEST_NAME))["model"]
    assert tuned["class_embed.0.weight"].shape[0] == 6 and source["class_embed.0.weight"].shape[0] == 4
    key = "transformer.encoder.layers.0.self_attn.sampling_offsets.weight"
    assert torch.equal(tuned[key], source[key])


def test_resume_from_a_non_training_checkpoint_names_the_field(tiny_coco, tmp_path, write_spec, capsys):
    plain = tmp_path / "weights.pth"
    torch.save({"model": {}}, plain)
    spec = tiny_train_spec(tiny_coco, tmp_path / "r", resume_training_checkpoint_path=str(plain))
    assert train_cli(write_spec, spec) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("deformable-detr train: error: train.resume_training_checkpoint_path:")


def test_resume_into_another_model_names_the_field(trained, tiny_coco, tmp_path, write_spec, capsys):
    spec = tiny_train_spec(tiny_coco, tmp_path / "r", resume_training_checkpoint_path=str(trained / LATEST_NAME))
    spec["model"]["hidden_dim"] = 64
    assert train_cli(write_spec, spec) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("deformable-detr train: error: train.resume_training_checkpoint_path:")
    assert "model.hidden_dim" in err  # the architecture check (tasks.train.state.check_resume) names the field


def test_encrypted_checkpoints_with_k_and_resume_with_the_key(tiny_coco, tmp_path, write_spec, capsys):
    spec = tiny_train_spec(tiny_coco, tmp_path / "r", batch_size=8, num_epochs=1)
    spec["dataset"]["val_data_sources"] = []
    assert train_cli(write_spec, spec, "-k", "s3cret") == 0
    latest = str(tmp_path / "r" / "train" / LATEST_NAME)
    with pytest.raises(UsageError, match="encrypted"):
        load_checkpoint(latest)
    assert load_checkpoint(latest, key="s3cret")["step"] == 1
    spec["train"]["num_epochs"] = 2
    assert train_cli(write_spec, spec) == 2  # auto_resume finds it, but cannot read it without the key
    assert "-k" in capsys.readouterr().err
    assert train_cli(write_spec, spec, "-k", "s3cret") == 0
    assert load_checkpoint(latest, key="s3cret")["step"] == 2


def test_padded_validation_batches_keep_every_rank_in_step():
    batches = [(torch.zeros(1), torch.zeros(1), [{"image_id": torch.tensor(5)}])] * 2
    padded = list(padded_batches(batches, 4))
    assert len(padded) == 4
    assert [int(b[2][0]["image_id"]) for b in padded] == [5, 5, -1, -1]


def test_sigterm_saves_a_checkpoint_exits_143_and_the_rerun_continues(tiny_coco, tmp_path, write_spec):
    spec = tiny_train_spec(tiny_coco, tmp_path / "r", batch_size=2, num_epochs=1)
    spec["dataset"]["val_data_sources"] = []
    folder = tmp_path / "r" / "train"
    with sigterm_after_steps(folder, 1) as sent:
        assert train_cli(write_spec, spec) == 143
    assert sent.is_set()
    status = read_status(str(folder))
    assert status["state"] == "stopped"
    stopped = load_checkpoint(status["last_checkpoint"])
    assert stopped["epoch_finished"] is False and 1 <= stopped["batches_done"] < 4
    # The rerun (auto_resume) trains only the batches the stopped run had not reached.
    assert train_cli(write_spec, spec) == 0
    steps = [r for r in read_log(str(folder)) if r["kind"] == "step"]
    assert [r["step"] for r in steps] == list(range(1, 5))
    assert read_status(str(folder))["state"] == "completed"
    assert load_checkpoint(str(folder / LATEST_NAME))["step"] == 4


def _unreachable_s3(monkeypatch) -> str:
    import socket

    with socket.socket() as probe:  # a port with nobody listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_CONFIG_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("S3_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    return "s3://unreachable/run"


def _trainer_with_a_failed_upload(tiny_coco, monkeypatch):
    """Rank 0's train outputs, with results on an S3 endpoint that is down and one upload already given up on."""
    from deformable_detr.config.loader import spec_from_dict
    from deformable_detr.runtime.artifacts import ArtifactSync
    from deformable_detr.tasks.train.outputs import TrainOutputs

    spec = spec_from_dict(tiny_train_spec(tiny_coco, _unreachable_s3(monkeypatch)))
    outputs = TrainOutputs(spec, is_main=True)
    outputs.sync = ArtifactSync(outputs.local_dir, outputs.results_dir, attempts=1, backoff_seconds=0.0)
    with open(os.path.join(outputs.local_dir, "status.json"), "w") as fh:
        fh.write("{}")
    outputs.sync.upload("status.json")
    outputs.sync.wait()
    return outputs


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_a_failed_upload_never_hides_the_error_that_failed_training(tiny_coco, monkeypatch):
    from deformable_detr.tasks.train import outputs

    trainer = _trainer_with_a_failed_upload(tiny_coco, monkeypatch)
    records = _Records()  # the CLI's logging setup stops propagation: listen on the task's logger itself
    outputs.log.addHandler(records)
    try:
        trainer.finish("failed")  # no StorageError here: the training error is the one that propagates
    finally:
        outputs.log.removeHandler(records)
    failures = [m for m in records.messages if "uploading the results failed" in m]
    assert len(failures) == 1 and "status.json" in failures[0] and "\n" not in failures[0]


def test_a_failed_upload_fails_a_successful_run_in_one_line(tiny_coco, monkeypatch):
    from deformable_detr.runtime.storage import StorageError

    trainer = _trainer_with_a_failed_upload(tiny_coco, monkeypatch)
    with pytest.raises(StorageError) as caught:
        trainer.finish("completed")
    assert "not uploaded to s3://unreachable/run/train" in str(caught.value)
    assert "\n" not in str(caught.value)


def test_checkpoint_interval_unit_step_and_cudnn_flags(tiny_coco, tmp_path, write_spec, monkeypatch):
    """TAO 6's train.checkpoint_interval_unit: step saves every N steps (and at the end); train.cudnn sets
    torch's flags."""
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)   # restored after the test
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    spec = tiny_train_spec(tiny_coco, tmp_path / "results", checkpoint_interval=3, checkpoint_interval_unit="step",
                           cudnn={"benchmark": True, "deterministic": False})
    assert train_cli(write_spec, spec) == 0
    folder = tmp_path / "results" / "train"
    # 2 epochs of 2 steps: step 3 (mid epoch 1) and the end; no epoch-end checkpoint of epoch 0.
    assert sorted(n for n in os.listdir(folder) if n.startswith("model_")) == [
        "model_epoch_001_step_00003.pth", "model_epoch_001_step_00004.pth"]
    mid = load_checkpoint(str(folder / "model_epoch_001_step_00003.pth"))
    assert (mid["epoch"], mid["step"], mid["epoch_finished"]) == (1, 3, False)
    assert (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic) == (True, False)


def test_train_gpu_ids_choose_the_visible_gpus(tiny_coco, tmp_path, write_spec, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # restored after the test: train sets it
    spec = tiny_train_spec(tiny_coco, tmp_path / "results", gpu_ids=[1], is_dry_run=True)
    assert train_cli(write_spec, spec) == 0
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "1"
