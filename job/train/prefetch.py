"""Batches prepared ahead, in a background thread, while the accelerator computes.

Building a batch (gather the blocks, hash the masks, lay out the masked positions, pin)
is host work on the step's critical path otherwise. The loop says which batch it will
need next (`ahead`); by the time it asks for it (`get`) the thread has usually built it.
Masks stay a pure function of (seed, epoch, sample), so prefetching changes no result.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass


@dataclass
class PrefetchStats:
    built: int = 0
    build_seconds: float = 0.0  # host time spent building batches (either thread)
    wait_seconds: float = 0.0  # time the loop waited for a batch: not hidden behind compute

    @property
    def hidden_fraction(self) -> float:
        return 1.0 - self.wait_seconds / self.build_seconds if self.build_seconds else 1.0


class Prefetcher:
    def __init__(self, build: Callable[[Hashable], object], enabled: bool = True):
        self._build = build
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="mlmjob-batches") if enabled else None
        self._pending: dict[Hashable, Future] = {}
        self.stats = PrefetchStats()

    def _timed_build(self, key: Hashable):
        start = time.perf_counter()
        out = self._build(key)
        self.stats.build_seconds += time.perf_counter() - start
        self.stats.built += 1
        return out

    def ahead(self, key: Hashable) -> None:
        """Start building the batch for `key` (a guess: an unused one is dropped)."""
        if self._pool is not None and key not in self._pending:
            self._pending[key] = self._pool.submit(self._timed_build, key)

    def get(self, key: Hashable):
        start = time.perf_counter()
        future = self._pending.pop(key, None)
        for stale in self._pending.values():  # a wrong guess (the loop went elsewhere)
            stale.cancel()
        self._pending.clear()
        out = future.result() if future is not None else self._timed_build(key)
        self.stats.wait_seconds += time.perf_counter() - start
        return out

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
