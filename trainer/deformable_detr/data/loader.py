"""DataLoaders for training and evaluation, sharded over distributed ranks."""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch.utils.data import DataLoader

from ..config.schema import ExperimentConfig
from .collate import collate_fn
from .dataset import CocoDetection, build_dataset
from .samplers import ShardedSequentialSampler, build_train_sampler
from .transforms import fixed_pad_size


def build_dataloader(spec: ExperimentConfig, split: str, rank: int = 0, world_size: int = 1,
                     seed: Optional[int] = None, dataset: Optional[CocoDetection] = None) -> DataLoader:
    """A loader over this rank's part of a split; call `loader.sampler.set_epoch(e)` each epoch.

    Training uses `dataset.train_sampler`; val/test read each image once over all ranks,
    in order. Augmentation randomness is seeded from `seed` (default train.seed) and the rank.
    """
    seed = spec.train.seed if seed is None else seed
    dataset = dataset if dataset is not None else build_dataset(spec, split)
    if split == "train":
        sampler = build_train_sampler(spec.dataset.train_sampler, dataset, rank, world_size, seed)
    else:
        sampler = ShardedSequentialSampler(len(dataset), rank, world_size)
    generator = torch.Generator()
    generator.manual_seed(seed + 7919 * rank)  # seeds the workers' augmentation randomness
    workers = spec.dataset.workers
    return DataLoader(
        dataset, batch_size=spec.dataset.batch_size, sampler=sampler, num_workers=workers,
        collate_fn=functools.partial(collate_fn, pad_to=fixed_pad_size(spec.dataset.augmentation)),
        pin_memory=spec.dataset.pin_memory and torch.cuda.is_available(),
        persistent_workers=workers > 0, generator=generator, drop_last=False)
