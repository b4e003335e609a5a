"""Dynamic masking with DataCollatorForLanguageModeling's semantics, made reproducible.

15% of the non-special tokens are selected; of those 80% become <mask>, 10% a random
token, 10% stay. Instead of drawing from a stateful generator, every random number is a
hash of (seed, stream, sample index, position, draw): a sample's mask depends only on
which sample it is and in which epoch, never on the batch it landed in, the number of
processes, or whether the run was resumed. Training uses stream = epoch (new masks each
epoch); evaluation uses one fixed stream, so perplexity compares across runs.
"""

from __future__ import annotations

import math

import numpy as np

EVAL_STREAM = 2**31 - 1
_M = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser, in place on a fresh array (fewer temporaries: this runs for
    every token of every batch)."""
    with np.errstate(over="ignore"):
        x += np.uint64(0x9E3779B97F4A7C15)
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
        return x


def _key(seed: int, stream: int, draw: int) -> np.uint64:
    with np.errstate(over="ignore"):
        key = _splitmix64(np.array([np.uint64(seed) * np.uint64(1_000_003) + np.uint64(stream)]))
        return _splitmix64(key ^ np.uint64(draw))[0]


def _bits53(cells: np.ndarray, key: np.uint64) -> np.ndarray:
    """53 random bits per cell, a pure function of (cell, key)."""
    return _splitmix64(cells ^ key) >> np.uint64(11)


def _uniform(cells: np.ndarray, key: np.uint64) -> np.ndarray:
    """Floats in [0, 1) per cell."""
    return _bits53(cells, key).astype(np.float64) * (1.0 / (1 << 53))


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
    cells = sample_ids.astype(np.uint64)[:, None] * np.uint64(t) + np.arange(t, dtype=np.uint64)
    # u < p exactly when the 53 bits are below ceil(p * 2^53): no float conversion needed.
    masked = _bits53(cells, _key(seed, stream, 0)) < np.uint64(math.ceil(probability * 2**53))
    masked &= ~np.isin(ids, special_ids)
    labels = np.where(masked, ids, -100)
    # The other two draws matter only where a token is masked: drawn there alone.
    chosen = cells[masked]
    choice = _uniform(chosen, _key(seed, stream, 1))
    to_random = (choice >= 0.8) & (choice < 0.9)
    replaced = ids[masked]
    replaced[choice < 0.8] = mask_id
    random_ids = (_uniform(chosen[to_random], _key(seed, stream, 2)) * vocab_size).astype(np.int64)
    replaced[to_random] = random_ids
    inputs = ids.copy()
    inputs[masked] = replaced
    return inputs, labels
