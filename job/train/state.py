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
