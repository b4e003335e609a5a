"""A training batch with its masked positions laid out on the host.

The host builds the masks, so it already knows which positions the loss reads and how
many there are. Passing them to the model as index tensors (instead of letting the model
find them with boolean indexing) keeps every shape host-known: no `nonzero`, no
`.item()`, so the GPU never waits for the host inside a step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from job.train.masking import mask_tokens


@dataclass
class MaskedBatch:
    input_ids: torch.Tensor  # [B, T] (masked inputs)
    targets: torch.Tensor  # [N] original ids at the masked positions, row-major
    token_index: torch.Tensor  # [N] into the flattened [B*T] positions
    positions: torch.Tensor  # [B, W] per row, its masked positions first (W = max per row)
    query_index: torch.Tensor  # [N] into the flattened [B*W] of `positions`
    n: int  # N, masked tokens in the batch: host-known

    @classmethod
    def build(cls, inputs: np.ndarray, labels: np.ndarray) -> MaskedBatch:
        selected = labels != -100
        counts = selected.sum(1)
        width = max(int(counts.max(initial=0)), 1)
        # Stable sort of "not selected" puts each row's selected positions first, in order.
        positions = np.argsort(~selected, axis=1, kind="stable")[:, :width]
        valid = np.arange(width) < counts[:, None]
        return cls(
            input_ids=torch.from_numpy(np.ascontiguousarray(inputs, dtype=np.int64)),
            targets=torch.from_numpy(labels[selected].astype(np.int64)),
            token_index=torch.from_numpy(np.flatnonzero(selected)),
            positions=torch.from_numpy(np.ascontiguousarray(positions, dtype=np.int64)),
            query_index=torch.from_numpy(np.flatnonzero(valid)),
            n=int(counts.sum()),
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

    @classmethod
    def of(cls, tok, seed: int, probability: float, pin: bool = False) -> Masker:
        special = np.asarray(sorted(set(tok.all_special_ids)), dtype=np.int64)
        return cls(seed, special, tok.mask_token_id, len(tok), probability, pin)

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
        batch = MaskedBatch.build(inputs, labels)
        return batch.pin() if self.pin else batch
