"""Where a run's time goes: summary.json's `phases` (DESIGN's contract), and the table rank 0
prints at the end.

The exclusive phases partition the wall clock from the process's start to the summary:
start-up (imports, the process group, the accelerator: what is left of the time before the
first step once the data, the model and the initial evaluation are taken out), the data,
the model (with the checkpoint it resumes from), the initial evaluation, the steps (with
their logging), the evaluations, the time steps waited for checkpoints, and the final save.
`checkpoint_total_s` overlaps the steps: a checkpoint's hashing and upload run beside them.

A resumed run adds up every attempt's phases (they travel in the checkpoint's TrainState, as
its wall seconds do), so the phases of the run sum to its `wall_seconds`; what an attempt did
after its last checkpoint is lost with that checkpoint's successors, in both.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

EXCLUSIVE = (
    "startup_s",
    "data_s",
    "model_s",
    "initial_eval_s",
    "train_s",
    "eval_s",
    "checkpoint_blocking_s",
    "save_s",
)
OVERLAPPING = ("checkpoint_total_s",)
_BEFORE_FIRST_STEP = ("data_s", "model_s", "initial_eval_s")  # taken out of start-up


def process_age() -> float:
    """Seconds since this process started (the kernel's start time: the imports count)."""
    import psutil

    return max(0.0, time.time() - psutil.Process().create_time())


def process_started() -> float:
    """This process's start on the `time.perf_counter` clock."""
    return time.perf_counter() - process_age()


def _zeros() -> dict[str, float]:
    return dict.fromkeys(EXCLUSIVE + OVERLAPPING, 0.0)


@dataclass
class Phases:
    seconds: dict[str, float] = field(default_factory=_zeros)
    # The earlier attempts' seconds: what `started` does not count as this attempt's.
    _at_attempt: dict[str, float] = field(default_factory=_zeros)

    @contextmanager
    def timed(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] += seconds

    def started(self) -> None:
        """At the first step: start-up is the process's age so far less this attempt's
        data, model and initial evaluation."""
        taken = sum(self.seconds[k] - self._at_attempt[k] for k in _BEFORE_FIRST_STEP)
        self.add("startup_s", max(0.0, process_age() - taken))

    def state_dict(self) -> dict[str, float]:
        return dict(self.seconds)

    def load_state_dict(self, state: dict) -> None:
        """A checkpoint's phases (none in one written before phases existed: zeros)."""
        for name in self.seconds:
            before = float((state or {}).get(name, 0.0))
            self.seconds[name] += before  # this attempt may have timed some already
            self._at_attempt[name] += before

    def summary(self) -> dict[str, float]:
        return {name: round(value, 3) for name, value in self.seconds.items()}

    def table(self, wall_seconds: float) -> list[str]:
        """Rank 0's lines at the end: each phase, its share of the wall clock, the sum."""
        wall = max(wall_seconds, 1e-9)
        rows = [f"{'phase':<22}{'seconds':>10}{'share':>8}"]
        for name in EXCLUSIVE + OVERLAPPING:
            value = self.seconds[name]
            rows.append(f"{name:<22}{value:>10.2f}{value / wall:>8.1%}")
        total = sum(self.seconds[k] for k in EXCLUSIVE)
        rows.append(f"{'exclusive sum':<22}{total:>10.2f}{total / wall:>8.1%}")
        rows.append(f"{'wall_seconds':<22}{wall_seconds:>10.2f}")
        return rows
