"""This rank's micro-batches of each training step, built ahead by the Prefetcher.

A step's batches are a pure function of its position (epoch, sample): the epoch's order
comes from (seed, epoch) and the masks from (seed, epoch, sample). So the background
thread needs nothing of the loop's state, only the key the loop hands it.
"""

from __future__ import annotations

import threading

import numpy as np

from job.data.loader import BlockData, batch_ids, epoch_order
from job.train.batch import MaskedBatch, Masker
from job.train.prefetch import Prefetcher


class Batches:
    def __init__(
        self,
        data: BlockData,
        masker: Masker,
        rank: int,
        world: int,
        per_device: int,
        accumulation: int,
    ):
        self.data, self.masker = data, masker
        self.rank, self.world = rank, world
        self.per_device, self.accumulation = per_device, accumulation
        self.prefetch = Prefetcher(self.build)
        self._orders: dict[int, np.ndarray] = {}
        self._orders_lock = threading.Lock()  # the loop and the prefetch thread both ask

    def order(self, epoch: int) -> np.ndarray:
        """The epoch's sample order: a pure function of (seed, epoch), computed once."""
        with self._orders_lock:
            if epoch not in self._orders:  # at most two epochs are in use: this and the next
                self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}
                # the masker's seed is the run's seed, which also orders the samples
                self._orders[epoch] = epoch_order(len(self.data), self.masker.seed, epoch)
            return self._orders[epoch]

    def build(self, key: tuple[int, int]) -> list[MaskedBatch]:
        """This rank's micro-batches of the global batch at (epoch, sample), masked and laid
        out on the host (pinned for an async copy)."""
        epoch, sample = key
        B, order = self.per_device, self.order(epoch)
        starts = [sample + m * B * self.world for m in range(self.accumulation)]
        return [
            self.masker.batch(self.data, batch_ids(order, s, self.rank, B), epoch) for s in starts
        ]

    def get(self, key: tuple[int, int], ahead: tuple[int, int]) -> list[MaskedBatch]:
        """The batches at `key`; the thread starts on `ahead` (a guess: where the step
        after this one starts)."""
        batches = self.prefetch.get(key)
        self.prefetch.ahead(ahead)
        return batches

    @property
    def stats(self):
        return self.prefetch.stats

    def close(self) -> None:
        self.prefetch.close()
