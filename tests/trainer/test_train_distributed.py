"""Distributed training for real: torchrun workers on 127.0.0.1 (gloo, CPU).

- two "nodes" of two processes each (what the operator's gang runs);
- `ddp` and `ddp_sharded` (FSDP2) reach the same losses and weights (slow);
- a worker killed with SIGKILL fails the run promptly, and a re-run resumes (slow);
- SIGTERM to `deformable-detr train --gpus 2` stops every worker, rank 0 saves, exit 143.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import yaml

from deformable_detr.runtime.distributed import EXIT_PEER_LOST
from deformable_detr.runtime.checkpoint import LATEST_NAME, list_checkpoints, load_checkpoint
from train_records import read_log, read_status
from test_train import tiny_train_spec

# The PyTorch reference attention: workers never race to build the CPU kernel (a rank that loses
# the race falls back to the reference, and its numbers then differ from its peers' in the last bits).
WORKER_ENV = {"OMP_NUM_THREADS": "1", "DDETR_DIST_TIMEOUT_S": "120", "DDETR_MSDA_IMPL": "reference"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ, **WORKER_ENV)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK"):
        env.pop(name, None)
    return env


def _write(tmp_path, spec: dict, name: str) -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def _records(folder, kind: str) -> list[dict]:
    return [r for r in read_log(str(folder)) if r["kind"] == kind]


def test_two_nodes_of_two_processes_train_in_step(tiny_coco, tmp_path):
    # Four ranks, one image each, the same four images every step: a batch the model can memorise.
    spec = tiny_train_spec(tiny_coco, tmp_path / "r", batch_size=1, num_epochs=3, validation_interval=3)
    spec["dataset"]["train_data_sources"] = [tiny_coco["val"]]
    spec["dataset"]["augmentation"]["horizontal_flip_prob"] = 0.0
    spec["model"]["dropout_ratio"] = 0.0
    spec["train"]["optim"].update(lr=2e-3, lr_steps=[10])
    path = _write(tmp_path, spec, "spec.yaml")
    port = _free_port()
    # Node 0 as a user starts it (the CLI launches torchrun from MASTER_ADDR/NODE_RANK), node 1 as
    # the operator's gang does (torchrun itself); both meet at the same static rendezvous.
    node0 = [sys.executable, "-m", "deformable_detr", "train", "-e", path, "--gpus", "2", "--num_nodes", "2"]
    node0_env = dict(_env(), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NODE_RANK="0")
    node1 = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=2", "--node_rank=1",
             "--master_addr=127.0.0.1", f"--master_port={port}", "-m", "deformable_detr", "train", "-e", path]
    nodes = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for cmd, env in ((node0, node0_env), (node1, _env()))]
    try:
        outputs = [node.communicate(timeout=480)[0] for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]

    folder = tmp_path / "r" / "train"
    starts = _records(folder, "start")
    assert starts[-1]["world_size"] == 4
    losses = [r["loss"] for r in _records(folder, "step")]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0], losses
    # After every epoch all four replicas hold the same weights.
    for epoch in _records(folder, "epoch"):
        assert len(epoch["weight_checksums"]) == 4 and len(set(epoch["weight_checksums"])) == 1, epoch
    assert len(_records(folder, "validation")) == 1  # distributed validation at the end
    assert read_status(str(folder))["state"] == "completed"
    assert [ref.step for ref in list_checkpoints(str(folder))] == [1, 2, 3]


def _launch(tmp_path, spec: dict, name: str, *extra: str) -> subprocess.CompletedProcess:
    """`deformable-detr train --gpus 2`: the CLI starts torchrun itself."""
    path = _write(tmp_path, spec, name)
    return subprocess.run([sys.executable, "-m", "deformable_detr", "train", "-e", path, "--gpus", "2", *extra],
                          env=_env(), capture_output=True, text=True, timeout=480)


@pytest.mark.slow
def test_ddp_and_ddp_sharded_agree(tiny_coco, tmp_path):
    runs = {}
    for strategy in ("ddp", "ddp_sharded"):
        spec = tiny_train_spec(tiny_coco, tmp_path / strategy, batch_size=2, num_epochs=1,
                               distributed_strategy=strategy)
        result = _launch(tmp_path, spec, f"{strategy}.yaml")
        assert result.returncode == 0, result.stderr[-3000:]
        folder = tmp_path / strategy / "train"
        runs[strategy] = ([r["loss"] for r in _records(folder, "step")], load_checkpoint(str(folder / LATEST_NAME)),
                          _records(folder, "validation"))
    (ddp_losses, ddp_ckpt, ddp_val), (fsdp_losses, fsdp_ckpt, fsdp_val) = runs["ddp"], runs["ddp_sharded"]
    assert len(ddp_losses) == 2 and fsdp_losses == pytest.approx(ddp_losses, rel=1e-5)
    assert set(ddp_ckpt["model"]) == set(fsdp_ckpt["model"])
    for key, value in ddp_ckpt["model"].items():
        torch.testing.assert_close(fsdp_ckpt["model"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    # The sharded run's checkpoint holds the whole optimizer state, as the ddp one does.
    assert set(fsdp_ckpt["optimizer"]["state"]) == set(ddp_ckpt["optimizer"]["state"])
    assert len(ddp_val) == len(fsdp_val) == 1


def _worker_pids(marker: str, rank: int) -> list[int]:
    """Processes running `deformable_detr` with RANK=`rank` and DDETR_TEST_RUN=`marker` in their environment."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmdline = fh.read().split(b"\0")
            with open(f"/proc/{entry}/environ", "rb") as fh:
                environ = fh.read().split(b"\0")
        except OSError:
            continue
        if b"deformable_detr" in cmdline and f"DDETR_TEST_RUN={marker}".encode() in environ \
                and f"RANK={rank}".encode() in environ:
            found.append(int(entry))
    return found


@pytest.mark.slow
def test_killed_worker_fails_the_run_and_a_rerun_resumes(tiny_coco, tmp_path):
    spec = tiny_train_spec(tiny_coco, tmp_path / "r", batch_size=1, num_epochs=2)
    spec["dataset"]["val_data_sources"] = []
    path = _write(tmp_path, spec, "spec.yaml")
    folder = tmp_path / "r" / "train"
    cmd = [sys.executable, "-m", "deformable_detr", "train", "-e", path, "--gpus", "2"]
    marker = str(tmp_path)  # the workers inherit it; it tells them apart from other tests' workers
    run = subprocess.Popen(cmd, env=dict(_env(), DDETR_TEST_RUN=marker), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        # Kill rank 1 once epoch 0 is checkpointed and epoch 1 has started.
        while not (list_checkpoints(str(folder)) and any(r["epoch"] == 1 for r in _records(folder, "step"))):
            assert run.poll() is None, run.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "training did not reach epoch 1"
            time.sleep(0.2)
        victims = _worker_pids(marker, rank=1)
        assert victims, "rank 1 worker not found"
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        out, _ = run.communicate(timeout=180)  # no hang: the run ends well inside this
    finally:
        if run.poll() is None:
            run.kill()
    # The surviving rank loses its peer: a retryable code for the operator, not 1 (a bug).
    assert run.returncode == EXIT_PEER_LOST, out[-3000:]
    assert time.monotonic() - killed_at < 180
    assert read_status(str(folder))["state"] in ("failed", "stopped")
    saved_step = max(ref.step for ref in list_checkpoints(str(folder)))

    rerun = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=480)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    last_start = _records(folder, "start")[-1]
    assert last_start["step"] == saved_step and last_start["epoch"] >= 1  # resumed, not restarted
    assert read_status(str(folder))["state"] == "completed"
    assert load_checkpoint(str(folder / LATEST_NAME))["step"] == 8


def test_sigterm_to_the_launcher_stops_every_worker_with_a_checkpoint(tiny_coco, tmp_path):
    """What a pod sees: SIGTERM to the command reaches the workers through torchrun; rank 0 saves; exit 143."""
    spec = tiny_train_spec(tiny_coco, tmp_path / "r", batch_size=1, num_epochs=1)
    spec["dataset"]["val_data_sources"] = []
    path = _write(tmp_path, spec, "spec.yaml")
    folder = tmp_path / "r" / "train"
    run = subprocess.Popen([sys.executable, "-m", "deformable_detr", "train", "-e", path, "--gpus", "2"],
                           env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while not ((folder / "train_log.jsonl").exists() and _records(folder, "step")):
            assert run.poll() is None, run.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "no training step within the deadline"
            time.sleep(0.2)
        run.send_signal(signal.SIGTERM)
        out, _ = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 143, out[-3000:]
    status = read_status(str(folder))
    assert status["state"] == "stopped"
    saved = load_checkpoint(status["last_checkpoint"])
    assert saved["epoch_finished"] is False and saved["step"] < 4
    assert len(saved["rng"]["ranks"]) == 2


def test_two_processes_train_without_aux_loss_under_box_refinement(tiny_coco, tmp_path):
    """Without aux_loss the intermediate decoder heads get no gradient: DDP must still step."""
    spec = tiny_train_spec(tiny_coco, tmp_path / "r", batch_size=4, num_epochs=1)
    spec["dataset"]["val_data_sources"] = []
    spec["model"].update(aux_loss=False, with_box_refine=True, dec_layers=2, train_backbone=False)
    path = _write(tmp_path, spec, "spec.yaml")
    run = subprocess.run([sys.executable, "-m", "deformable_detr", "train", "-e", path, "--gpus", "2"],
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    folder = tmp_path / "r" / "train"
    steps = _records(folder, "step")
    assert steps and all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
    checksums = _records(folder, "epoch")[-1]["weight_checksums"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]
