"""What every rank agrees on: a flag raised on any rank, figures summed over all ranks.

Collectives: every rank calls them, in the same order. With one process they reduce
nothing (no process group to talk to), but still read the value back to the host.
"""

from __future__ import annotations


def _summed(accelerator, values, dtype=None):
    import torch

    t = torch.tensor(values, dtype=dtype, device=accelerator.device)
    if accelerator.num_processes > 1:
        t = accelerator.reduce(t, reduction="sum")
    return t


def any_rank(accelerator, flag: bool) -> bool:
    """True on every rank when `flag` is true on any. One value read back with `.item()`
    (the one host sync a preemption check costs)."""
    return bool(_summed(accelerator, [1.0 if flag else 0.0]).item() > 0)


def sum_ranks(accelerator, *values: float) -> list[float]:
    """Each value summed over every rank, in float64 (token counts and loss sums of a
    whole split stay exact far beyond float32's 2**24)."""
    import torch

    return _summed(accelerator, values, torch.float64).tolist()
