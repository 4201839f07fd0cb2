"""Resuming at another world size (a job resized while suspended): real torchrun workers (gloo, CPU).

Two processes train, are stopped mid-epoch (SIGTERM: a checkpoint), and one process resumes: the
global batch stays (per-rank batch x gradient accumulation), every step reads the images the
uninterrupted two-process run read at that step (none skipped or repeated in the cut epoch),
and the losses continue the uninterrupted run's curve; and (ddp_sharded) one process stopped, two
resumed with FSDP2 sharding the full checkpoint anew. Also the pure parts: the batch plan and the
sampler's continuation from a global place.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict

import numpy as np
import pytest
import yaml
from torch.utils.data import DistributedSampler

from deformable_detr.data.samplers import (PerRankSourceSampler, ResumableSampler, UniformSourceSampler,
                                           sample_seed)
from deformable_detr.runtime.batch_plan import plan_batches
from deformable_detr.runtime.checkpoint import load_checkpoint
from deformable_detr.tasks.train.sample_record import FOLDER_ENV
from train_records import read_log, read_status
from test_train import step_losses, tiny_train_spec
from test_train_distributed import _env, _write


def test_the_batch_plan_keeps_the_global_batch_within_the_per_rank_memory():
    assert plan_batches(4, 2, 2).describe() == ("global batch 4 = 2 process(es) x per-rank batch 2 x gradient "
                                                "accumulation 1")
    one = plan_batches(4, 1, 2)
    assert (one.per_rank, one.accumulation) == (2, 2)
    assert (plan_batches(12, 2, 4).per_rank, plan_batches(12, 2, 4).accumulation) == (3, 2)
    four = plan_batches(4, 4, 2)  # more processes: a smaller per-rank batch, no accumulation
    assert (four.per_rank, four.accumulation) == (1, 1)
    with pytest.raises(ValueError, match="global batch is 4 .* 3 process.*accepted world sizes .*: 1, 2, 4"):
        plan_batches(4, 3, 2)


class _Sized:
    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size


def _global_order(samplers: list) -> list[tuple[int, int]]:
    """(index, seed) of every sample of an epoch, in global order: rank p % W's sample p // W."""
    streams = [list(s) for s in samplers]
    return [(int(streams[p % len(streams)][p // len(streams)]), streams[p % len(streams)][p // len(streams)].seed)
            for p in range(sum(map(len, streams)))]


@pytest.mark.parametrize("kind", ["default", "uniform", "non_uniform"])
@pytest.mark.parametrize("old_world,new_world,done", [(2, 1, 4), (2, 3, 6), (4, 2, 8), (2, 2, 5)])
def test_an_epoch_cut_at_one_world_size_continues_at_another(kind, old_world, new_world, done):
    sources = np.array([0] * 7 + [1] * 5)

    def base(rank: int, world: int):
        if kind == "default":
            return DistributedSampler(_Sized(12), num_replicas=world, rank=rank, shuffle=True, seed=5)
        cls = UniformSourceSampler if kind == "uniform" else PerRankSourceSampler
        return cls(sources, rank, world, 5)

    def resumable(rank: int, world: int) -> ResumableSampler:
        sampler = ResumableSampler(base(rank, world), seed=5, rank=rank)
        sampler.set_epoch(3)
        return sampler

    before = _global_order([resumable(r, old_world) for r in range(old_world)])
    after = []
    for rank in range(new_world):
        sampler = resumable(rank, new_world)
        sampler.continue_at(done, old_world)
        after.append(sampler)
    lengths = {len(s) for s in after}
    assert len(lengths) == 1  # every rank the same number of samples: the ranks stay in step
    rest = _global_order(after)
    # The rest of the cut epoch: exactly what the old world had not read yet, each sample augmented as
    # it would have been (only a count that does not divide wraps to the start of the rest).
    assert rest[:len(before) - done] == before[done:]
    assert rest[len(before) - done:] == before[done:][:len(rest) - (len(before) - done)]
    assert after[0].samples_done(len(after[0])) == len(before)
    assert after[0].samples_done(1) == done + new_world


def test_continuing_at_the_same_world_size_is_a_skip():
    sampler = ResumableSampler(list(range(10)), seed=3, rank=0)
    sampler.set_epoch(1)
    sampler.continue_at(4, 1)
    assert [int(i) for i in sampler] == list(range(4, 10)) and sampler.rest is None
    assert [i.seed for i in sampler] == [sample_seed(3, 1, p) for p in range(4, 10)]
    assert sampler.samples_done(2) == 6


def _spec(tiny_coco, results, strategy: str) -> dict:
    # 8 images, one per process and step on two processes: 4 steps per epoch, 2 epochs.
    spec = tiny_train_spec(tiny_coco, results, batch_size=1, num_epochs=2)
    spec["dataset"]["val_data_sources"] = []
    spec["train"]["distributed_strategy"] = strategy
    # Dropout draws from each process's own random stream, which a new world size starts afresh
    # (state.restore_rng): without it, the resumed steps are the uninterrupted run's up to the order of sums.
    spec["model"]["dropout_ratio"] = 0.0
    return spec


def _run(args: list[str], record, timeout: float = 480) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deformable_detr", "train", *args],
                          env=dict(_env(), **{FOLDER_ENV: str(record)}), capture_output=True, text=True,
                          timeout=timeout)


def _samples_by_step(record) -> dict[int, list[int]]:
    """Every step's images over all ranks (and all launches), sorted."""
    steps: dict[int, list[int]] = defaultdict(list)
    for name in sorted(os.listdir(record)):
        with open(record / name, encoding="utf-8") as lines:
            for line in lines:
                entry = json.loads(line)
                steps[entry["step"]].extend(entry["image_ids"])
    return {step: sorted(ids) for step, ids in steps.items()}


@pytest.fixture(scope="module")
def uninterrupted(tiny_coco, tmp_path_factory):
    """Two processes, never stopped: each step's images, the step losses and learning rates."""
    root = tmp_path_factory.mktemp("resize_reference")
    path = _write(root, _spec(tiny_coco, root / "r", "ddp"), "spec.yaml")
    run = _run(["-e", path, "--gpus", "2"], root / "samples")
    assert run.returncode == 0, run.stderr[-3000:]
    return _samples_by_step(root / "samples"), step_losses(root / "r" / "train"), _lrs(root / "r" / "train")


def _lrs(folder) -> list[float]:
    return [r["lr"] for r in read_log(str(folder)) if r["kind"] == "step"]


def _gpus(world: int) -> list[str]:
    return ["--gpus", str(world)] if world > 1 else []


# (strategy, processes before the stop, after it, the per-rank batch the run starts with, what the resumed
# run logs). ddp_sharded checkpoints hold full tensors (runtime/checkpoint.py): resumed on 2 processes,
# FSDP2 shards them anew.
RESIZES = [
    ("ddp", 2, 1, 1, "global batch 2 = 1 process(es) x per-rank batch 1 x gradient accumulation 2"),
    pytest.param("ddp_sharded", 1, 2, 2, "global batch 2 = 2 process(es) x per-rank batch 1 x gradient accumulation 1",
                 marks=pytest.mark.slow),
]


@pytest.mark.parametrize("strategy,before,after,batch_size,plan", RESIZES)
def test_stopped_mid_epoch_and_resumed_at_another_world_size(uninterrupted, tiny_coco, tmp_path, strategy, before,
                                                             after, batch_size, plan):
    samples, losses, lrs = uninterrupted  # 2 processes x batch 1: the same global batch of 2
    spec = _spec(tiny_coco, tmp_path / "r", strategy)
    spec["dataset"]["batch_size"] = batch_size
    path = _write(tmp_path, spec, "spec.yaml")
    folder, record = tmp_path / "r" / "train", tmp_path / "samples"
    run = subprocess.Popen([sys.executable, "-m", "deformable_detr", "train", "-e", path, *_gpus(before)],
                           env=dict(_env(), **{FOLDER_ENV: str(record)}), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while not ((folder / "train_log.jsonl").exists() and step_losses(folder)):
            assert run.poll() is None, run.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "no training step within the deadline"
            time.sleep(0.1)
        run.send_signal(signal.SIGTERM)
        out, _ = run.communicate(timeout=180)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 143, out[-3000:]
    saved = load_checkpoint(read_status(str(folder))["last_checkpoint"])
    assert saved["epoch"] == 0 and not saved["epoch_finished"] and 1 <= saved["step"] < 4
    assert (saved["world_size"], saved["global_batch"], saved["epoch_samples_done"]) == (before, 2, 2 * saved["step"])

    resumed = _run(["-e", path, *_gpus(after)], record)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming at world size {after} (the checkpoint's: {before}): {plan}" in resumed.stderr
    # The same images at every step, over the whole run: none skipped, none read twice in the cut epoch.
    assert _samples_by_step(record) == samples
    starts = [r for r in read_log(str(folder)) if r["kind"] == "start"]
    assert [s["world_size"] for s in starts] == [before, after]
    # The loss continues the uninterrupted curve (the same images, augmentations and schedule; only the
    # order of the gradient sums differs).
    assert step_losses(folder) == pytest.approx(losses, rel=1e-4)
    assert _lrs(folder) == lrs
