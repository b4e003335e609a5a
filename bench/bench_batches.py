"""Host-side batch preparation: what the loop's prefetch thread does for every step.

One 128 x 128 batch = gather 128 blocks from a memory-mapped shard (random order, as an
epoch's permutation reads them), hash the masks, lay out the masked positions. Timed
alone here; how much of it the training loop hides behind compute is in the train
section (`input_hidden_fraction`, from the run's summary.json).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from job.data.loader import BlockData, epoch_order
from job.data.shards import Manifest, npy_bytes
from job.train.batch import MaskedBatch
from job.train.masking import mask_tokens

BLOCKS, BATCH, SEQ, VOCAB, REPEATS = 100_000, 128, 128, 50265, 200


def _dataset(tmp: str) -> BlockData:
    rng = np.random.default_rng(0)
    blocks = rng.integers(4, VOCAB - 1, size=(BLOCKS, SEQ), dtype=np.uint16)
    Path(tmp, "train").mkdir()
    Path(tmp, "train", "shard-00000.npy").write_bytes(npy_bytes(blocks))
    shard = {"path": "train/shard-00000.npy", "blocks": BLOCKS, "sha256": None}
    splits = {"train": {"blocks": BLOCKS, "shards": [shard]}}
    manifest = Manifest(tmp, {"dataset_id": "bench", "block_size": SEQ, "splits": splits})
    return BlockData(manifest, "train", Path(tmp), verify=False)


def run() -> dict:
    special = np.array([0, 1, 2, 3, VOCAB - 1])
    with tempfile.TemporaryDirectory() as tmp:
        data = _dataset(tmp)
        order = epoch_order(BLOCKS, 42, 0)
        parts = {"gather": 0.0, "mask": 0.0, "layout": 0.0}
        for i in range(REPEATS):
            ids = order[i * BATCH : (i + 1) * BATCH]
            t0 = time.perf_counter()
            blocks = data.get(ids)
            t1 = time.perf_counter()
            inputs, labels = mask_tokens(
                blocks,
                ids,
                seed=42,
                stream=0,
                special_ids=special,
                mask_id=VOCAB - 1,
                vocab_size=VOCAB,
            )
            t2 = time.perf_counter()
            MaskedBatch.build(inputs, labels)
            t3 = time.perf_counter()
            parts["gather"] += t1 - t0
            parts["mask"] += t2 - t1
            parts["layout"] += t3 - t2
    ms = {k: round(v / REPEATS * 1e3, 3) for k, v in parts.items()}
    return {
        "batch": f"{BATCH} x {SEQ}",
        "ms_per_batch": round(sum(ms.values()), 3),
        "ms_by_part": ms,
        "target_ms": 2.0,
    }
