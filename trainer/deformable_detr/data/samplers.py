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
carries the seed of that sample's augmentation (from seed, epoch and the sample's place
in the epoch's global order), so augmentation never depends on which loader worker (or how many)
reads it, and `skip(n)` starts an epoch after its first n samples without reading them.
An epoch's global order interleaves its ranks' orders (global place p is rank p % W's
sample p // W; for default_sampler that is the shuffled split itself), so a run resumed at
another world size continues the epoch it was cut in from a global place (`continue_at`):
the samples already seen are neither read again nor skipped, each augmented as before.
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
        self.source_index, self.world_size = source_index, world_size
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
        self.source_index, self.world_size = source_index, world_size
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


def sampler_at(base: Sampler[int], rank: int, world_size: int) -> Sampler[int]:
    """The training sampler `base` as it is built for `rank` of `world_size` processes."""
    if isinstance(base, DistributedSampler):
        return DistributedSampler(base.dataset, num_replicas=world_size, rank=rank, shuffle=base.shuffle,
                                  seed=base.seed, drop_last=base.drop_last)
    return type(base)(base.source_index, rank, world_size, base.seed)  # type: ignore[attr-defined]


def world_size_of(base: Sampler[int]) -> int:
    return int(getattr(base, "num_replicas", getattr(base, "world_size", 1)))


def sample_seed(seed: int, epoch: int, place: int) -> int:
    """The augmentation seed of the sample at `place` in `epoch`'s global order: rank r of W reads
    places r, r + W, ...; so with default_sampler an image is augmented alike at any world size."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{place}".encode(), digest_size=8).digest()
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
    """`base`'s indices as `SampleIndex`es, from sample `skip(n)` of the epoch on, or from a global
    place of an epoch dealt to another number of processes (`continue_at`)."""

    def __init__(self, base: Sampler[int], seed: int, rank: int) -> None:
        self.base, self.seed, self.rank = base, seed, rank
        self.world_size = world_size_of(base)
        self.epoch, self.start = 0, 0
        # The rest of an epoch dealt anew at this world size: (index, its place in the epoch's global order).
        self.rest: Optional[list[tuple[int, int]]] = None
        self.rest_from, self.order_length = 0, 0

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its first sample (call `skip` or `continue_at` afterwards to start later)."""
        self.epoch, self.start, self.rest = epoch, 0, None
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)

    def skip(self, samples: int) -> None:
        """Leave out this epoch's first `samples` samples: they are never read nor augmented."""
        self.start = max(int(samples), 0)

    def continue_at(self, samples_done: int, epoch_world_size: int) -> None:
        """Start this epoch after the first `samples_done` samples of its global order, the epoch having
        been dealt to `epoch_world_size` processes. At this run's world size that is `skip`; at another,
        the rest of that order is dealt round robin to this run's processes, each the same count (the
        last ones wrap to the rest's start when the count does not divide: the ranks stay in step)."""
        if epoch_world_size == self.world_size and samples_done % epoch_world_size == 0:
            self.skip(samples_done // epoch_world_size)
            return
        orders = []
        for rank in range(epoch_world_size):
            then = sampler_at(self.base, rank, epoch_world_size)
            if hasattr(then, "set_epoch"):
                then.set_epoch(self.epoch)
            orders.append(list(then))
        self.order_length = len(orders[0]) * epoch_world_size  # every rank gets as many samples
        rest = [(orders[p % epoch_world_size][p // epoch_world_size], p)
                for p in range(min(samples_done, self.order_length), self.order_length)]
        share = math.ceil(len(rest) / self.world_size)
        self.rest = [rest[(j * self.world_size + self.rank) % len(rest)] for j in range(share)]
        self.rest_from = samples_done

    def samples_done(self, read: int) -> int:
        """Samples of the epoch's global order done, all processes together, once every process has
        read `read` samples since the epoch (re)started here: what `continue_at` takes on resume."""
        if self.rest is None:
            return min(self.start + read, len(self.base)) * self.world_size  # type: ignore[arg-type]
        return min(self.rest_from + read * self.world_size, self.order_length)

    def __len__(self) -> int:
        if self.rest is not None:
            return len(self.rest)
        return max(len(self.base) - self.start, 0)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[int]:
        if self.rest is not None:
            for index, place in self.rest:
                yield SampleIndex(index, sample_seed(self.seed, self.epoch, place))
            return
        for position, index in enumerate(self.base):
            if position >= self.start:
                yield SampleIndex(index, sample_seed(self.seed, self.epoch, position * self.world_size + self.rank))


def seed_of(key: int) -> Optional[int]:
    return getattr(key, "seed", None)
