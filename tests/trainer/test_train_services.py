"""Training with its services: results in S3 (moto's server over HTTP) and Prometheus /metrics on rank 0."""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import urllib.request


from deformable_detr.runtime import storage
from deformable_detr.runtime.tensorboard_log import EVENTS_DIR
from test_curves import read_events
from test_train import tiny_train_spec, train_cli


def _remote_log(folder: str) -> list[dict]:
    return [json.loads(line) for line in storage.read_bytes(f"{folder}/train_log.jsonl").decode().splitlines()]


def test_results_go_to_s3_and_a_restart_resumes_from_there(bucket, tiny_coco, write_spec, tmp_path):
    spec = tiny_train_spec(tiny_coco, f"{bucket}/run", batch_size=8, num_epochs=1)
    spec["dataset"]["val_data_sources"] = []
    spec["model"]["train_backbone"] = False  # no backbone optimizer state: smaller checkpoints to upload
    assert train_cli(write_spec, spec, name="one.yaml") == 0
    folder = f"{bucket}/run/train"
    names = sorted(p[len(folder) + 1:] for p in storage.list_files(folder))
    assert [n for n in names if not n.startswith(f"{EVENTS_DIR}/")] == [
        "dd_model_latest.pth", "experiment.yaml", "model_epoch_000_step_00001.pth", "status.json", "train_log.jsonl"]
    assert len([n for n in names if n.startswith(f"{EVENTS_DIR}/events.out.tfevents.")]) == 1  # the curves, uploaded
    status = json.loads(storage.read_bytes(f"{folder}/status.json"))
    assert status["state"] == "completed" and status["last_checkpoint"] == f"{folder}/model_epoch_000_step_00001.pth"

    # A new pod (a fresh staging folder) continues from the newest checkpoint in the bucket, and its log.
    spec["train"]["num_epochs"] = 2
    assert train_cli(write_spec, spec, name="two.yaml") == 0
    records = _remote_log(folder)
    assert [(r["epoch"], r["step"]) for r in records if r["kind"] == "start"] == [(0, 0), (1, 1)]
    assert [r["step"] for r in records if r["kind"] == "step"] == [1, 2]
    assert storage.exists(f"{folder}/model_epoch_001_step_00002.pth")
    # Each launch's event file is uploaded; TensorBoard shows every step once.
    local = tmp_path / "events"
    for uri in storage.list_files(f"{folder}/{EVENTS_DIR}"):
        storage.download(uri, str(local / os.path.basename(uri)))
    assert len(os.listdir(local)) == 2
    assert [step for step, _ in read_events(local)["train/loss"]] == [1, 2]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_rank0_serves_training_metrics_while_it_trains(tiny_coco, tmp_path, write_spec):
    port = _free_port()
    spec = tiny_train_spec(tiny_coco, tmp_path / "r", batch_size=4, num_epochs=1, metrics_port=port)
    spec["dataset"]["val_data_sources"] = []
    seen: list[str] = []
    done = threading.Event()

    def scrape() -> None:
        while not done.is_set():
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
                if "ddetr_train_step{" in body:
                    seen.append(body)
            except OSError:
                pass
            time.sleep(0.05)

    scraper = threading.Thread(target=scrape, daemon=True)
    scraper.start()
    try:
        assert train_cli(write_spec, spec) == 0
    finally:
        done.set()
        scraper.join(timeout=10)
    assert seen, "no scrape saw a training step"
    body = seen[-1]
    assert 'ddetr_train_loss{job="deformable-detr",term="loss_ce"}' in body
    assert 'ddetr_train_num_epochs{job="deformable-detr"} 1.0' in body
