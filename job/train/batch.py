"""A training batch with its masked positions laid out on the host.

The host builds the masks, so it already knows which positions the loss reads and how
many there are. Passing them to the model as index tensors (instead of letting the model
find them with boolean indexing) keeps every shape host-known: no `nonzero`, no
`.item()`, so the GPU never waits for the host inside a step.

With `train.compile` the layout is also static (`Buckets`): the masked positions are
padded to widths fixed by (batch, block, masking probability), so a compiled step sees
one shape from the first step to the last and is compiled once (and CUDA graphs can
capture it). Padded entries are ignored by the loss (target -100), so the loss sum and the
token count are the unpadded batch's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from job.log import log
from job.train.masking import mask_tokens

# A row (a batch) with more masked tokens than its bucket is this rare: with 1e5 steps of
# 64 rows, about one run in 150 sees one such row (which then costs one recompile).
TAIL = 1e-9
IGNORE = -100  # cross_entropy's ignore_index: a padded entry adds nothing to the loss


@lru_cache(maxsize=64)
def tail_bound(trials: int, probability: float, tail: float = TAIL) -> int:
    """The smallest k with P(Binomial(trials, probability) > k) < tail."""
    k = torch.arange(trials + 1, dtype=torch.float64)
    p = torch.tensor(probability, dtype=torch.float64)
    pmf = torch.distributions.Binomial(trials, probs=p).log_prob(k).exp()
    at_least = pmf.flip(0).cumsum(0).flip(0)  # [k]: P(X >= k), summed from the small end
    return int((at_least >= tail).sum()) - 1


@dataclass(frozen=True)
class Buckets:
    """The static widths of a batch of `rows` x `block` tokens: masked positions per row
    (`width`) and per batch (`total`). Each row's count is Binomial(maskable tokens <=
    block, p) and the batch's Binomial(<= rows x block, p), so both bounds hold for any
    number of special tokens."""

    rows: int
    block: int
    width: int
    total: int

    @classmethod
    def of(cls, rows: int, block: int, probability: float) -> Buckets:
        width = max(tail_bound(block, probability), 1)
        return cls(rows, block, width, max(tail_bound(rows * block, probability), 1))

    def fit(self, width: int, n: int) -> tuple[int, int]:
        """(width, total) for a batch whose fullest row has `width` masked tokens and whose
        rows have `n`: the buckets, or, past one, a larger shape (rounded up to 8, so that
        the rare overflows share a few shapes) rather than dropping tokens."""
        if width <= self.width and n <= self.total:
            return self.width, self.total
        grown = (
            self.width if width <= self.width else min(_round8(width), self.block),
            self.total if n <= self.total else _round8(n),
        )
        log.warning(
            "masked batch: %d masked tokens (at most %d in a row) exceed the static layout "
            "(%d, %d in a row): padded to %d in a row, %d in all, a new shape (one recompile)",
            n,
            width,
            self.total,
            self.width,
            *grown,
        )
        return grown


def _round8(x: int) -> int:
    return math.ceil(x / 8) * 8


def _padded(values: np.ndarray, size: int, fill: int) -> torch.Tensor:
    out = np.full(size, fill, dtype=np.int64)
    out[: len(values)] = values
    return torch.from_numpy(out)


@dataclass
class MaskedBatch:
    input_ids: torch.Tensor  # [B, T] (masked inputs)
    targets: torch.Tensor  # [N] original ids at the masked positions, row-major; -100 after n
    token_index: torch.Tensor  # [N] into the flattened [B*T] positions
    positions: torch.Tensor  # [B, W] per row, its masked positions first (W: the fullest
    # row's count, or the bucket's)
    query_index: torch.Tensor  # [N] into the flattened [B*W] of `positions`
    n: int  # masked tokens in the batch (host-known): N, or fewer when padded

    @classmethod
    def build(
        cls, inputs: np.ndarray, labels: np.ndarray, buckets: Buckets | None = None
    ) -> MaskedBatch:
        """The layout of one batch. With `buckets`, W and N are the buckets' (padding:
        positions point at real unmasked positions, the other entries at index 0 with
        target -100); without, W is the fullest row's count and N = n (fewer head rows)."""
        selected = labels != IGNORE
        counts = selected.sum(1)
        n = int(counts.sum())
        width, total = max(int(counts.max(initial=0)), 1), n
        if buckets is not None:
            width, total = buckets.fit(width, n)
        # Stable sort of "not selected" puts each row's selected positions first, in order,
        # then its other positions: real positions, so padded queries attend normally.
        positions = np.argsort(~selected, axis=1, kind="stable")[:, :width]
        valid = np.arange(width) < counts[:, None]
        return cls(
            input_ids=torch.from_numpy(np.ascontiguousarray(inputs, dtype=np.int64)),
            targets=_padded(labels[selected], total, IGNORE),
            token_index=_padded(np.flatnonzero(selected), total, 0),
            positions=torch.from_numpy(np.ascontiguousarray(positions, dtype=np.int64)),
            query_index=_padded(np.flatnonzero(valid), total, 0),
            n=n,
        )

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The model's arguments, in SparseMLM.forward's order."""
        return self.input_ids, self.targets, self.token_index, self.positions, self.query_index

    def pin(self) -> MaskedBatch:
        """Page-locked copies, so that `to(non_blocking=True)` is a real async copy."""
        return MaskedBatch(*(t.pin_memory() for t in self.tensors()), n=self.n)

    def to(self, device: torch.device) -> MaskedBatch:
        return MaskedBatch(*(t.to(device, non_blocking=True) for t in self.tensors()), n=self.n)


@dataclass(frozen=True)
class Masker:
    """Everything besides (sample, stream) that decides a sample's masks. Training and
    `mlmjob evaluate` build it from the same config and tokenizer, so an evaluation of any
    model on a dataset masks exactly what training's evaluations masked."""

    seed: int
    special: np.ndarray  # ids never masked
    mask_id: int
    vocab_size: int
    probability: float
    pin: bool = False  # page-locked, for an async copy to a GPU
    static: bool = False  # the static layout (Buckets), for a compiled step

    @classmethod
    def of(
        cls, tok, seed: int, probability: float, pin: bool = False, static: bool = False
    ) -> Masker:
        special = np.asarray(sorted(set(tok.all_special_ids)), dtype=np.int64)
        return cls(seed, special, tok.mask_token_id, len(tok), probability, pin, static)

    def batch(self, data, sample_ids: np.ndarray, stream: int) -> MaskedBatch:
        """One micro-batch of `data` (a BlockData), masked and laid out on the host."""
        inputs, labels = mask_tokens(
            data.get(sample_ids),
            sample_ids,
            seed=self.seed,
            stream=stream,
            special_ids=self.special,
            mask_id=self.mask_id,
            vocab_size=self.vocab_size,
            probability=self.probability,
        )
        buckets = Buckets.of(*inputs.shape, self.probability) if self.static else None
        batch = MaskedBatch.build(inputs, labels, buckets)
        return batch.pin() if self.pin else batch
