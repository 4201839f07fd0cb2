"""Samplers: which images each process reads, epoch by epoch.

Training samplers (TAO's `dataset.train_sampler`), all with `set_epoch(epoch)` and
deterministic given the seed, and all giving every rank the same number of samples
so distributed ranks take the same number of steps:
- default_sampler: the whole split shuffled per epoch, split across ranks
  (torch's DistributedSampler).
- uniform_sampler: TAO's UniformSampler: draw with replacement, an image of source
  s weighted (N - n_s) / N, so small sources are drawn about as often as big ones
  (exactly equally for two sources).
- non_uniform_sampler: TAO's NonUniformSampler: the annotation files (shards) are
  dealt to ranks, and each rank shuffles its own files' images, so sources come in
  proportion to their size. With fewer files than ranks, images are dealt instead.
Evaluation: `ShardedSequentialSampler`: rank r reads images r, r + W, r + 2W, ...
in order; all ranks together read every image exactly once.

`ResumableSampler` wraps a training sampler for exact resume: each index it yields
carries the seed of that sample's augmentation (from seed, epoch, rank and the sample's
place in the epoch), so augmentation never depends on which loader worker (or how many)
reads it, and `skip(n)` starts an epoch after its first n samples without reading them.
"""
from __future__ import annotations

import hashlib
import math
from typing import Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DistributedSampler, Sampler


def _generator(seed: int, epoch: int, rank: int) -> torch.Generator:
    gen = torch.Generator()
    gen.manual_seed(seed * 1_000_003 + epoch * 1009 + rank)
    return gen


class UniformSourceSampler(Sampler[int]):
    def __init__(self, source_index: np.ndarray, rank: int, world_size: int, seed: int) -> None:
        self.rank, self.seed, self.epoch = rank, seed, 0
        total = len(source_index)
        sizes = np.bincount(source_index)
        if np.count_nonzero(sizes) > 1:
            weights = (total - sizes[source_index]) / total
        else:
            weights = np.ones(total)
        self.weights = torch.as_tensor(weights, dtype=torch.double)
        self.num_samples = math.ceil(total / world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        gen = _generator(self.seed, self.epoch, self.rank)
        yield from torch.multinomial(self.weights, self.num_samples, replacement=True, generator=gen).tolist()


class PerRankSourceSampler(Sampler[int]):
    def __init__(self, source_index: np.ndarray, rank: int, world_size: int, seed: int) -> None:
        self.rank, self.seed, self.epoch = rank, seed, 0
        num_sources = int(source_index.max()) + 1 if len(source_index) else 0
        if num_sources >= world_size:
            mine = np.nonzero(source_index % world_size == rank)[0]
        else:
            mine = np.arange(rank, len(source_index), world_size)
        self.indices = torch.as_tensor(mine, dtype=torch.int64)
        self.num_samples = math.ceil(len(source_index) / world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        if len(self.indices) == 0:
            return
        gen = _generator(self.seed, self.epoch, self.rank)
        # Shuffle, repeating (each pass reshuffled) when this rank has fewer images than its share.
        rounds = math.ceil(self.num_samples / len(self.indices))
        order = torch.cat([self.indices[torch.randperm(len(self.indices), generator=gen)] for _ in range(rounds)])
        yield from order[:self.num_samples].tolist()


class ShardedSequentialSampler(Sampler[int]):
    def __init__(self, size: int, rank: int, world_size: int) -> None:
        self.indices = list(range(rank, size, world_size))

    def set_epoch(self, epoch: int) -> None:
        """Evaluation order does not change between epochs."""

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)


def build_train_sampler(name: str, dataset, rank: int, world_size: int, seed: int) -> Sampler[int]:
    if name == "default_sampler":
        return DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    if name == "uniform_sampler":
        return UniformSourceSampler(dataset.source_index, rank, world_size, seed)
    if name == "non_uniform_sampler":
        return PerRankSourceSampler(dataset.source_index, rank, world_size, seed)
    raise ValueError(f"unknown train_sampler {name!r}")


def sample_seed(seed: int, epoch: int, rank: int, position: int) -> int:
    """The augmentation seed of the `position`-th sample rank `rank` reads in `epoch`."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{rank}:{position}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2 ** 63 - 1)


class SampleIndex(int):
    """A dataset index (it is the int) that carries the seed its sample is augmented with."""

    seed: int

    def __new__(cls, index: int, seed: int) -> "SampleIndex":
        value = super().__new__(cls, index)
        value.seed = seed
        return value

    def __reduce__(self):  # to loader workers, with its seed
        return SampleIndex, (int(self), self.seed)


class ResumableSampler(Sampler[int]):
    """`base`'s indices as `SampleIndex`es, from sample `skip(n)` of the epoch on."""

    def __init__(self, base: Sampler[int], seed: int, rank: int) -> None:
        self.base, self.seed, self.rank = base, seed, rank
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its first sample (call `skip` afterwards to start later)."""
        self.epoch, self.start = epoch, 0
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)

    def skip(self, samples: int) -> None:
        """Leave out this epoch's first `samples` samples: they are never read nor augmented."""
        self.start = max(int(samples), 0)

    def __len__(self) -> int:
        return max(len(self.base) - self.start, 0)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[int]:
        for position, index in enumerate(self.base):
            if position >= self.start:
                yield SampleIndex(index, sample_seed(self.seed, self.epoch, self.rank, position))


def seed_of(key: int) -> Optional[int]:
    return getattr(key, "seed", None)
