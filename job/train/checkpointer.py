"""When the loop checkpoints, and what goes into a checkpoint besides the accelerator's
own state (job.train.checkpoint writes, commits and prunes it)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from job.config import Config
from job.train import checkpoint
from job.train.reporter import Reporter
from job.train.state import Clock, LossWindow, TrainState


def should_checkpoint(step: int, every: int, epoch_end: bool) -> bool:
    return step % every == 0 or epoch_end


@dataclass
class Checkpointer:
    accelerator: object
    cfg: Config
    staging: Path  # node-local: ranks stage their files here before the upload
    window: LossWindow
    clock: Clock
    reporter: Reporter
    saved_at: int | None = None  # the step of the newest committed checkpoint
    saved_uri: str | None = None  # and its URI: the "last good checkpoint" errors name

    def save(self, state: TrainState, epoch_end: bool = False, force: bool = False) -> None:
        """Collective. Every `train.checkpoint_every_steps` steps and at each epoch's end,
        or now (`force`: a preemption); never twice at one step."""
        every = self.cfg.train.checkpoint_every_steps
        if not force and not should_checkpoint(state.step, every, epoch_end):
            return
        if self.saved_at == state.step:
            return
        self.saved_at = state.step
        state.load_state_dict(self.window.state_dict())  # every rank's window, added up
        # steps since the last log
        self.reporter.stop_if_diverged(state.window_loss, "train loss", state.step, self.saved_uri)
        state.wall_seconds = self.clock.wall_seconds()
        self.reporter.checkpointing()
        acc, out, keep = self.accelerator, self.cfg.run.output, self.cfg.train.keep_checkpoints
        self.saved_uri = checkpoint.save(
            acc, out, state.step, state.state_dict(), self.staging, keep
        )
