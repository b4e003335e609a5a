"""What a training run has done so far: saved in every checkpoint, restored on resume."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from job.train.phases import Phases, process_started


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
    # The LossWindow as it is checkpointed (LossWindow.state_dict: every rank's added up);
    # the live window is the LossWindow itself, these are only its saved form.
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


def advance(st: TrainState, batch: int, block: int, seconds: float) -> None:
    """One optimizer step of `batch` samples of `block` tokens, `seconds` long."""
    st.step += 1
    st.sample += batch
    st.samples_seen += batch
    st.tokens += batch * block
    st.train_seconds += seconds
    st.window_seconds += seconds


def next_epoch(st: TrainState, schedule, batch: int) -> bool:
    """Turn to the next epoch when this one has no room for another global batch (the
    rest is dropped). Before any checkpoint of the step: a checkpoint holds the state
    the next step starts from. True when it turned."""
    st.epoch, st.sample, turned = schedule.turn(st.epoch, st.sample, batch)
    return turned


class LossWindow:
    """The train loss since the last log step: masked-token loss and masked tokens, summed.

    Each rank adds its own micro-batches, on the device (no host sync in a plain step);
    `total` adds up every rank's (a collective), at a log step and at a checkpoint. A
    checkpoint keeps that total (`state_dict`, saved as TrainState.window_loss and
    window_tokens) and a resumed run gives it back to one rank only (`load_state_dict`,
    `restored`), so the next log step counts the part of the window before the
    checkpoint once, on any number of processes."""

    def __init__(
        self, device, loss: float = 0.0, tokens: float = 0.0, rank: int = 0, sum_ranks=None
    ):
        import torch

        self.loss = torch.tensor(loss, dtype=torch.float64, device=device)
        self.tokens = tokens
        self.rank = rank
        self.sum_ranks: Callable | None = sum_ranks  # dist.sum_ranks of this run's accelerator

    @classmethod
    def restored(cls, state: TrainState, device, rank: int, sum_ranks=None) -> LossWindow:
        window = cls(device, rank=rank, sum_ranks=sum_ranks)
        window.load_state_dict(state.state_dict())
        return window

    def add(self, loss_sum, tokens: int) -> None:
        self.loss += loss_sum.detach().double()
        self.tokens += tokens

    def total(self, sum_across_ranks=None) -> tuple[float, float]:
        """(loss, tokens) of every rank; every rank calls it. One host sync: the loss."""
        loss, tokens = (sum_across_ranks or self.sum_ranks)(self.loss.item(), self.tokens)
        return loss, tokens

    def reset(self) -> None:
        self.loss.zero_()
        self.tokens = 0

    def state_dict(self) -> dict:
        """Collective: every rank's window added up, under TrainState's field names."""
        loss, tokens = self.total()
        return {"window_loss": loss, "window_tokens": tokens}

    def load_state_dict(self, state: dict) -> None:
        """Rank 0 takes the saved total, the others start empty: counted once in all."""
        if self.rank != 0:
            return
        self.loss.fill_(state.get("window_loss", 0.0))
        self.tokens = state.get("window_tokens", 0.0)


@dataclass
class Clock:
    """The run's one clock: wall time over every attempt (the checkpoint's wall seconds
    plus this attempt's, from its process's start), the mark each step's training seconds
    are counted from, and the phases the time went to."""

    wall_before: float = 0.0  # the attempts before this one (TrainState.wall_seconds)
    start: float = 0.0
    mark: float = 0.0
    phases: Phases = field(default_factory=Phases)

    def begin(self, wall_before: float) -> None:
        """At the first step: the process's age so far is this attempt's start-up."""
        self.wall_before = wall_before
        self.start = process_started()
        self.mark = time.perf_counter()
        self.phases.started()

    def step_seconds(self) -> float:
        """Since the mark: the step that just ran, with the wait for its batch."""
        return time.perf_counter() - self.mark

    def lap(self) -> None:
        """After a step's evaluation and checkpoint: they are not training time."""
        self.mark = time.perf_counter()

    def wall_seconds(self) -> float:
        return self.wall_before + time.perf_counter() - self.start
