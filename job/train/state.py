"""What a training run has done so far: saved in every checkpoint, restored on resume."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class TrainState:
    """Progress is counted in samples, not steps: a run resumed on another number of
    processes (another global batch) continues the same schedule and the same epochs."""

    step: int = 0  # optimizer steps taken
    epoch: int = 0
    sample: int = 0  # position in this epoch's permutation
    samples_seen: int = 0  # over all epochs: what the learning-rate schedule reads
    tokens: int = 0
    base_batch: int = 0  # the global batch the run started with: the schedule's unit
    world_size: int = 1
    train_seconds: float = 0.0  # inside training steps only (the Trainer's train_runtime)
    wall_seconds: float = 0.0
    window_seconds: float = 0.0  # since the last log event
    # The LossWindow of every rank added up at this checkpoint (see LossWindow)
    window_loss: float = 0.0
    window_tokens: float = 0.0
    last_eval: dict | None = None
    # Before the first step: every run states its own before/after (summary.json).
    initial_eval: dict | None = None
    # tracker name -> its run id: a resumed job continues the same MLflow / W&B run
    tracker_runs: dict = field(default_factory=dict)

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for f in dataclasses.fields(self):
            if f.name in state:
                setattr(self, f.name, state[f.name])


class LossWindow:
    """The train loss since the last log step: masked-token loss and masked tokens, summed.

    Each rank adds its own micro-batches, on the device (no host sync in a plain step);
    `total` adds up every rank's (a collective), at a log step and at a checkpoint. A
    checkpoint keeps that total (TrainState.window_loss, window_tokens) and a resumed run
    gives it back to one rank only (`restored`), so the next log step counts the part of
    the window before the checkpoint once, on any number of processes."""

    def __init__(self, device, loss: float = 0.0, tokens: float = 0.0):
        import torch

        self.loss = torch.tensor(loss, dtype=torch.float64, device=device)
        self.tokens = tokens

    @classmethod
    def restored(cls, state: TrainState, device, rank: int) -> LossWindow:
        if rank != 0:
            return cls(device)
        return cls(device, state.window_loss, state.window_tokens)

    def add(self, loss_sum, tokens: int) -> None:
        self.loss += loss_sum.detach().double()
        self.tokens += tokens

    def total(self, sum_across_ranks) -> tuple[float, float]:
        """(loss, tokens) of every rank; every rank calls it."""
        loss, tokens = sum_across_ranks(self.loss.item(), self.tokens)
        return loss, tokens

    def reset(self) -> None:
        self.loss.zero_()
        self.tokens = 0
