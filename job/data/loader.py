"""Training-side reading of a block dataset: node-local cache, deterministic order.

Shards are copied once to each node's disk and memory-mapped: the node's first process
downloads and verifies them while the node's other processes wait, then open the same
files without hashing them again (`verify=False`). The sample order of an
epoch is a permutation that depends only on (seed, epoch); a global batch is the next
`global_batch` samples of it and rank r takes the r-th slice, so a run resumed at sample
k continues with the same samples on any number of processes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from job import storage
from job.data.shards import Manifest, load_shard
from job.errors import BadInput
from job.log import log


class BlockData:
    """The blocks of one split, addressable by global sample index."""

    def __init__(self, manifest: Manifest, split: str, cache_dir: Path, verify: bool = True):
        self.arrays = [
            load_shard(_fetch(manifest, shard, cache_dir, verify), None)
            for shard in manifest.shards(split)
        ]
        sizes = [len(a) for a in self.arrays]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        if self.offsets[-1] != manifest.blocks(split):
            raise BadInput(
                f"{manifest.uri}: {split} shards hold {self.offsets[-1]} blocks, the manifest "
                f"says {manifest.blocks(split)}: the dataset is damaged"
            )

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def get(self, indices: np.ndarray) -> np.ndarray:
        """The blocks at these global indices, in order: one fancy-indexed read per shard."""
        indices = np.asarray(indices, dtype=np.int64)
        shard = np.searchsorted(self.offsets, indices, side="right") - 1
        first = self.arrays[0]
        out = np.empty((len(indices), first.shape[1]), dtype=first.dtype)
        for s in np.unique(shard):
            rows = shard == s
            out[rows] = self.arrays[s][indices[rows] - self.offsets[s]]
        return out


def _fetch(manifest: Manifest, shard: dict, cache_dir: Path, verify: bool) -> str:
    """A local copy of a shard (local datasets are read in place), verified when asked."""
    uri = storage.join(manifest.uri, shard["path"])
    checksum = shard["sha256"] if verify else None
    if not storage.is_s3(uri):
        path = str(storage.local_path(uri))
        if not _intact(path, checksum):
            raise BadInput(
                f"{uri}: checksum mismatch: the dataset is damaged; rerun preprocess into a "
                "fresh data.output"
            )
        return path
    dataset_id = manifest.data["dataset_id"]
    local = storage.inside(Path(cache_dir) / "datasets", f"{dataset_id}/{shard['path']}", uri)
    if local.exists():
        if _intact(str(local), checksum):
            return str(local)
        log.warning("cached %s is corrupt; downloading it again", local)
    for attempt in (1, 2):  # a second download, in case the first was damaged on its way
        storage.download_file(uri, local)
        if _intact(str(local), shard["sha256"]):
            return str(local)
        if attempt == 1:
            log.warning("%s: checksum mismatch after downloading it; downloading it again", uri)
    raise BadInput(
        f"{uri}: checksum mismatch after downloading it twice: the dataset is damaged; rerun "
        "preprocess into a fresh data.output"
    )


def _intact(path: str, sha256: str | None) -> bool:
    """Does the shard match its checksum (when given)?"""
    return sha256 is None or storage.sha256_file(path) == sha256


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def batch_ids(order: np.ndarray, sample: int, rank: int, per_rank: int) -> np.ndarray:
    """This rank's samples of the global batch that starts at position `sample` of the epoch."""
    start = sample + rank * per_rank
    return order[start : start + per_rank]
