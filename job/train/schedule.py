"""The learning-rate schedule and the length of training, both measured in samples.

Steps are the wrong unit once a run can be resumed on another number of processes: the
global batch changes, and a schedule in steps would jump (and train for more epochs than
configured). Everything here is in samples of the *base* batch, the global batch the run
started with; with a constant batch it equals the Trainer's schedule step for step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from job.config import TrainConfig


@dataclass(frozen=True)
class Schedule:
    learning_rate: float
    warmup_samples: int
    total_samples: int
    epoch_samples: int  # each epoch trains on this many samples of its permutation
    epochs: int | None  # None when train.max_steps sets the length

    @classmethod
    def build(cls, t: TrainConfig, n_train: int, base_batch: int) -> Schedule:
        # drop_last as the Trainer does, fixed by the base batch: an epoch is the same
        # samples whatever batch a resumed run uses.
        epoch_samples = n_train // base_batch * base_batch
        steps = total_steps(t, n_train, base_batch)
        return cls(
            t.learning_rate,
            warmup_steps(t, steps) * base_batch,
            steps * base_batch,
            epoch_samples,
            None if t.max_steps else t.epochs,
        )

    def lr(self, seen: int) -> float:
        """get_linear_schedule_with_warmup at `seen` samples done (as the Trainer: the first
        step runs at 0 when there is warmup)."""
        if seen < self.warmup_samples:
            return self.learning_rate * (seen / self.warmup_samples)
        left = max(0, self.total_samples - seen)
        return self.learning_rate * (left / max(1, self.total_samples - self.warmup_samples))

    def epoch_over(self, sample: int, batch: int) -> bool:
        """No room in this epoch for another batch of `batch` samples."""
        return sample + batch > self.epoch_samples

    def turn(self, epoch: int, sample: int, batch: int) -> tuple[int, int, bool]:
        """Where a step of `batch` samples starts when the last one ended at (epoch,
        sample): the next epoch's first sample when this epoch has no room for another
        batch (the rest is dropped). The loop's state and the prefetcher's guess of the
        next batch both go through here. The bool: whether it turned."""
        if self.epoch_over(sample, batch):
            return epoch + 1, 0, True
        return epoch, sample, False

    def finished(self, seen: int, epoch: int, sample: int, batch: int) -> bool:
        if seen >= self.total_samples:
            return True
        # After a rescale whose batch does not divide the epoch, the last epoch's tail
        # (shorter than one batch) is dropped, as every epoch's is.
        last_epoch = self.epochs is not None and epoch >= self.epochs - 1
        return last_epoch and self.epoch_over(sample, batch)


def total_steps(t: TrainConfig, n_train: int, base_batch: int) -> int:
    """The run's steps of its base batch: `train.max_steps`, else the epochs' (drop_last)."""
    return t.max_steps or t.epochs * (n_train // base_batch)


def warmup_steps(t: TrainConfig, steps: int) -> int:
    """`train.warmup_steps` when set, else the Trainer's rule for `train.warmup_ratio`
    (TrainingArguments.get_warmup_steps): ceil(ratio x the run's steps). A resubmission
    that changes the run's length (train.epochs, train.max_steps) moves a ratio's warm-up
    with it, as a Trainer run of that length would have."""
    return t.warmup_steps or math.ceil(t.warmup_ratio * steps)
