"""Fetching a rank's next S3 images into the node's cache while the loader works on the current ones.

`PrefetchingSampler` wraps the rank's own sampler: it reads `depth` indices ahead of what it has
handed the DataLoader and has `threads` threads download their images into the node cache, so a
loader worker finds its image on local disk (or waits on the file lock of the download under way)
instead of making a GET of its own. Only indices this rank's sampler yields are fetched.

Memory stays bounded: downloads stream to disk, `object_cache.CHUNK` bytes at a time, and at most
`depth` fetches are queued; `bound_bytes` is what they may hold at once. A failed prefetch is left to
the reader, whose own fetch reports it (one line naming the URI).
"""
from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterator, Optional

from torch.utils.data import Sampler

from ..runtime.object_cache import CHUNK, node_cache
from . import remote

DEFAULT_DEPTH = 64
DEFAULT_THREADS = 16


class PrefetchingSampler(Sampler):
    def __init__(self, sampler: Sampler, path_of: Callable[[int], str], depth: int = DEFAULT_DEPTH,
                 threads: int = DEFAULT_THREADS) -> None:
        self.sampler = sampler
        self.path_of = path_of
        self.depth = max(1, depth)
        self.threads = max(1, threads)
        self._pool: Optional[ThreadPoolExecutor] = None

    @property
    def bound_bytes(self) -> int:
        """The most image bytes the prefetch threads hold in memory at once."""
        return self.threads * CHUNK

    def _fetch(self, index: int) -> None:
        path = self.path_of(int(index))
        if remote.is_s3(path) and not node_cache().holds(remote.info(path)):  # a hit is the reader's to check
            remote.local_copy(path)

    def __iter__(self) -> Iterator[Any]:
        if self._pool is None:  # made in the process that iterates (the loader's main process)
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="prefetch")
        ahead: deque[tuple[Any, Future]] = deque()
        for index in self.sampler:
            ahead.append((index, self._pool.submit(self._fetch, index)))
            if len(ahead) > self.depth:
                yield ahead.popleft()[0]
        while ahead:
            yield ahead.popleft()[0]

    def __len__(self) -> int:
        return len(self.sampler)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:  # set_epoch, skip, state ... of the wrapped sampler
        if name == "sampler":
            raise AttributeError(name)
        return getattr(self.sampler, name)


def fetch_all(paths: list[str], threads: int = DEFAULT_THREADS) -> None:
    """Bring every s3:// path of `paths` into the node cache, `threads` at a time (e.g. before checking
    every image up front); the first failure is raised."""
    remote_paths = [path for path in paths if remote.is_s3(path)]
    if remote_paths:
        with ThreadPoolExecutor(threads, thread_name_prefix="prefetch") as pool:
            for _ in pool.map(remote.local_copy, remote_paths):
                pass
