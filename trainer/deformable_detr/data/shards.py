"""Partitions (folds), shards and ids of a converted source, as TAO's KITTI converter makes them.

Per source, TAO seeds Python's `random` with 42, then draws in this order: in random mode each
partition is shuffled once while partitioning, then every partition is shuffled (again), then
a short last shard is filled up with `random.sample` of its partition. Shards are
ceil(n / num_shards) images long. Empty partitions write no file, and the remaining ones are
numbered in order (with val_split 0, the training images are fold 000). Image and annotation
ids count from where the previous source (or an earlier run into the same folder, read back
from stats.txt) stopped, across partitions and shards.
"""
from __future__ import annotations

import math
import random
from typing import Sequence

PARTITION_SEED = 42


def shard_file_name(source: str, partition: int, num_partitions: int, shard: int, num_shards: int) -> str:
    """`{source}[-fold-{p:03d}-of-{P:03d}]-shard-{s:05d}-of-{S:05d}.json`; the fold part only with several
    partitions, the shard part only with num_shards > 0 (TAO then writes the name without `.json`;
    it is kept here)."""
    name = source
    if num_partitions not in (0, 1):
        name += f"-fold-{partition:03d}-of-{num_partitions:03d}"
    if num_shards != 0:
        name += f"-shard-{shard:05d}-of-{num_shards:05d}"
    return name + ".json"


def shard_partition(partition: list, num_shards: int, rng: random.Random) -> list[list]:
    """TAO's shards of one partition: consecutive runs of ceil(n / num_shards) entries, a short
    one filled with entries drawn from the partition (`rng.sample`)."""
    num_shards = max(num_shards, 1)
    size = math.ceil(len(partition) / num_shards)
    shards = []
    for index in range(num_shards):
        begin, end = index * size, (index + 1) * size
        shard = partition[begin:end]
        if end > len(partition):
            shard = partition[begin:] + rng.sample(partition, end - len(partition))
        shards.append(shard)
    return shards


def shard_partitions(partitions: Sequence[list], num_shards: int, rng: random.Random,
                     renumber: bool = True) -> list[tuple[int, list[list]]]:
    """(fold number in the file names, its shards) for the partitions that have entries. TAO numbers
    those in order (`renumber`); sequence mode, which TAO lacks, keeps each partition's own number."""
    written = [(index, p) for index, p in enumerate(partitions) if p]
    return [(fold if renumber else index, shard_partition(list(p), num_shards, rng))
            for fold, (index, p) in enumerate(written)]


def partition_frames(frames: list, num_partitions: int, partition_mode: str | None, val_split: int,
                     rng: random.Random, sequence_index: int = 0) -> list[list]:
    """TAO's partitions of one source's frames (in the order the folder lists them), shuffled.

    null: one partition. random: two, fold 0 the first int(val_split% of n) frames, fold 1 the
    rest, each shuffled. sequence: the whole source goes to partition `sequence_index %
    num_partitions` (sources dealt out in turn; TAO documents this mode but its code refuses it).
    """
    partitions: list[list] = [[] for _ in range(num_partitions)]
    if partition_mode == "random":
        num_val = int(val_split / 100.0 * len(frames))
        partitions[0].extend(frames[:num_val])
        partitions[1].extend(frames[num_val:])
        for part in partitions:
            rng.shuffle(part)
    elif partition_mode == "sequence":
        partitions[sequence_index % num_partitions].extend(frames)
    else:
        partitions[0].extend(frames)
    for part in partitions:
        rng.shuffle(part)
    return partitions
