"""DataLoaders for training and evaluation, sharded over distributed ranks."""
from __future__ import annotations

import functools
import os
import signal
from typing import Any, Optional

import torch
from torch.utils.data import DataLoader, Dataset

from ..config.schema import ExperimentConfig
from ..errors import UsageError
from ..runtime.logging import get_logger
from .collate import collate_fn
from .dataset import CocoDetection, build_dataset
from .images import UnreadableImageError
from .prefetch import PrefetchingSampler
from .samplers import ResumableSampler, ShardedSequentialSampler, build_train_sampler, seed_of
from .transforms import fixed_pad_size


log = get_logger("data")

# The target key under which a training item names the files skipped in its place (paths, in order).
SKIPPED_KEY = "skipped_images"


class SkipUnusable(Dataset):
    """Training's items, where a sample whose image cannot be used (unreadable, empty, a size unlike
    the annotation file's) is replaced by the next usable one in dataset order, with a warning naming
    the file; the replacement's target lists what it replaced under SKIPPED_KEY, for training to
    count (tasks/train/loop.py) and to stop past dataset.max_skipped_share.

    Replaced, not dropped: every rank's batches keep their size and every rank its number of steps,
    so the ranks' collectives stay in step; the replacement is the same on every run (and its
    augmentation seeded as the skipped sample's would have been), so a resumed run stays exact."""

    def __init__(self, dataset: CocoDetection) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        skipped: list[str] = []
        first_problem = ""
        for offset in range(len(self.dataset)):
            key = (int(index) + offset) % len(self.dataset)
            try:
                image, target = self.dataset[key]
            except UnreadableImageError as err:
                log.warning("skipping a training image: %s", err)
                skipped.append(self.dataset.store.record(key).path)
                first_problem = first_problem or str(err)
                continue
            target[SKIPPED_KEY] = skipped
            return image, target
        raise UsageError(f"dataset.train_data_sources: no training image can be used; the first: {first_problem}")

    def __getattr__(self, name: str) -> Any:  # coco, source_index, json_files ... of the wrapped dataset
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


class SeededSamples(Dataset):
    """`dataset`, each item read with torch's generator seeded from its index's `seed` (a
    `SampleIndex`), restored afterwards: augmentation draws the same numbers in any worker,
    and reading a sample never moves the reader's own random stream."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: int) -> Any:
        seed = seed_of(key)
        if seed is None:
            return self.dataset[key]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[int(key)]

    def __getattr__(self, name: str) -> Any:  # coco, source_index, json_files ... of the wrapped dataset
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """Loader workers leave SIGTERM and SIGINT to the main process: sent to the whole process
    group (timeout, Slurm, Ctrl-C), they would otherwise kill the workers before the main
    process could save its checkpoint. So each worker moves to a process group of its own and
    ignores SIGINT; a SIGTERM sent to the worker itself still ends it, as the DataLoader's
    shutdown and multiprocessing's exit handler need (a worker ignoring SIGTERM hung its main
    process at exit). Workers still exit with their main process."""
    os.setpgid(0, 0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the task's handler, inherited through fork


def build_dataloader(spec: ExperimentConfig, split: str, rank: int = 0, world_size: int = 1,
                     seed: Optional[int] = None, dataset: Optional[CocoDetection] = None) -> DataLoader:
    """A loader over this rank's part of a split; call `loader.sampler.set_epoch(e)` each epoch.

    Training uses `dataset.train_sampler` inside a `ResumableSampler`: each sample is augmented
    with a seed of its own (from `seed`, default train.seed, the epoch and its place in the epoch's
    global order), whatever the number of workers, and `loader.sampler.continue_at` resumes mid-epoch.
    val/test read each image once over all ranks, in order.
    """
    seed = spec.train.seed if seed is None else seed
    dataset = dataset if dataset is not None else build_dataset(spec, split)
    if split == "train":
        sampler = ResumableSampler(build_train_sampler(spec.dataset.train_sampler, dataset, rank, world_size, seed),
                                   seed, rank)
        items: Dataset = SeededSamples(SkipUnusable(dataset))
    else:
        sampler = ShardedSequentialSampler(len(dataset), rank, world_size)
        items = dataset
    if getattr(dataset, "remote_images", False):  # s3:// images: this rank's next ones fetched ahead
        sampler = PrefetchingSampler(sampler, lambda index: dataset.store.record(index).path)
    generator = torch.Generator()
    generator.manual_seed(seed + 7919 * rank)  # seeds the workers' own randomness (eval splits)
    workers = spec.dataset.workers
    return DataLoader(
        items, batch_size=spec.dataset.batch_size, sampler=sampler, num_workers=workers,
        collate_fn=functools.partial(collate_fn, pad_to=fixed_pad_size(spec.dataset.augmentation, split == "train")),
        pin_memory=spec.dataset.pin_memory and torch.cuda.is_available(),
        persistent_workers=workers > 0, generator=generator, drop_last=False,
        worker_init_fn=ignore_stop_signals if workers > 0 else None)
