"""Dynamic masking with DataCollatorForLanguageModeling's semantics, made reproducible.

15% of the non-special tokens are selected; of those 80% become <mask>, 10% a random
token, 10% stay. Instead of drawing from a stateful generator, every random number is a
hash of (seed, stream, sample index, position, draw): a sample's mask depends only on
which sample it is and in which epoch, never on the batch it landed in, the number of
processes, or whether the run was resumed. Training uses stream = epoch (new masks each
epoch); evaluation uses one fixed stream, so perplexity compares across runs.
"""

from __future__ import annotations

import numpy as np

EVAL_STREAM = 2**31 - 1
_M = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _uniform(seed: int, stream: int, sample_ids: np.ndarray, length: int, draw: int):
    """[len(sample_ids), length] floats in [0, 1), a pure function of the arguments."""
    with np.errstate(over="ignore"):
        key = _splitmix64(np.uint64(seed) * np.uint64(1_000_003) + np.uint64(stream))
        key = _splitmix64(key ^ np.uint64(draw))
        cell = sample_ids.astype(np.uint64)[:, None] * np.uint64(length) + np.arange(
            length, dtype=np.uint64
        )
        bits = _splitmix64(cell ^ key)
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def mask_tokens(
    input_ids: np.ndarray,
    sample_ids: np.ndarray,
    *,
    seed: int,
    stream: int,
    special_ids: np.ndarray,
    mask_id: int,
    vocab_size: int,
    probability: float = 0.15,
) -> tuple[np.ndarray, np.ndarray]:
    """Returns (inputs, labels) as int64 arrays; labels are -100 where nothing is masked."""
    ids = input_ids.astype(np.int64)
    b, t = ids.shape
    masked = _uniform(seed, stream, sample_ids, t, 0) < probability
    masked &= ~np.isin(ids, special_ids)
    labels = np.where(masked, ids, -100)
    choice = _uniform(seed, stream, sample_ids, t, 1)
    to_mask = masked & (choice < 0.8)
    to_random = masked & (choice >= 0.8) & (choice < 0.9)
    random_ids = (_uniform(seed, stream, sample_ids, t, 2) * vocab_size).astype(np.int64)
    inputs = np.where(to_mask, mask_id, np.where(to_random, random_ids, ids))
    return inputs, labels
