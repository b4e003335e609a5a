"""When the loop checkpoints, and what goes into a checkpoint besides the accelerator's
own state (job.train.checkpoint writes, commits and prunes it).

A checkpoint blocks training only while every rank writes it to the node-local staging
folder; each node's local main then hashes and uploads it on a background thread
(job.train.upload) and training goes on. It is committed when every node is done, found
at whichever comes first:

- the preemption check (`poll`, every 10 steps and at log steps): the all-reduce that
  agrees on a SIGTERM also sums how many nodes are still uploading and how many failed, so
  the commit comes at most 10 steps after the last upload ends and no rank ever waits in a
  collective for another node's upload;
- a wait point (`wait`): the next checkpoint (at most one upload in flight, and its staging
  folder is never written over while it uploads), a SIGTERM, the end of training. There
  every node joins its upload first, then the ranks commit.

Why not a commit by a thread of rank 0 that polls per-node "done" markers in the store:
the all-reduce runs anyway, it tells every rank at once that a node failed (so all stop
together, none hangs in a collective), and it needs no extra requests nor a thread that
could wait forever for a node that died. A commit may thus trail its upload by a few
steps; a SIGTERM and the end of training still commit before they exit or export.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from job.config import Config
from job.log import log
from job.train import checkpoint, dist
from job.train.reporter import Reporter
from job.train.state import Clock, LossWindow, TrainState
from job.train.upload import Upload


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
    saved_at: int | None = None  # the step of the newest checkpoint saved (maybe in flight)
    saved_uri: str | None = None  # the newest committed one: the "last good checkpoint"
    pending: Upload | None = None  # saved, not committed yet (at most one)

    def save(self, state: TrainState, epoch_end: bool = False, force: bool = False) -> None:
        """Collective. Every `train.checkpoint_every_steps` steps and at each epoch's end,
        or now (`force`: a preemption); never twice at one step. Returns once the ranks'
        files are staged; the upload goes on in the background."""
        every = self.cfg.train.checkpoint_every_steps
        if not force and not should_checkpoint(state.step, every, epoch_end):
            return
        if self.saved_at == state.step:
            return
        self.saved_at = state.step
        self.wait()  # the previous one first: it is the last good one should this diverge
        began = time.monotonic()
        state.load_state_dict(self.window.state_dict())  # every rank's window, added up
        # steps since the last log
        self.reporter.stop_if_diverged(state.window_loss, "train loss", state.step, self.settled)
        # the wall clock and the phases as of now, beside the TrainState: a run resumed
        # from here adds its own to them
        state.wall_seconds = self.clock.wall_seconds()
        saved = {**state.state_dict(), "phases": self.clock.phases.state_dict()}
        self.reporter.checkpointing()
        acc, out = self.accelerator, self.cfg.run.output
        local = checkpoint.stage(acc, state.step, saved, self.staging)
        upload = Upload(state.step, checkpoint.step_uri(out, state.step), began)
        if acc.is_local_main_process:
            upload.start(local)
        self._blocked(upload, time.monotonic() - began)
        self.pending = upload

    def poll(self, flag: bool) -> bool:
        """Collective, at the preemption check: True on every rank when `flag` (a SIGTERM)
        is set on any. The same all-reduce tells whether every node's upload is done
        (then the checkpoint is committed) or one failed (then every rank raises)."""
        p = self.pending
        busy, failed = (p.busy, p.failed) if p else (False, False)
        flags, uploading, failures = dist.sum_ranks(self.accelerator, flag, busy, failed)
        if p and failures:
            p.raise_failure()
        if p and not uploading:
            self._commit()
        return flags > 0

    def wait(self) -> None:
        """Collective, a wait point: every node's upload done, then the commit; raises
        what a failed upload met, on every rank."""
        p, began = self.pending, time.monotonic()
        if p is None:
            return
        p.join()
        failed = dist.any_rank(self.accelerator, p.failed)
        self._blocked(p, time.monotonic() - began)
        if failed:
            p.raise_failure()
        self._commit()

    def settled(self) -> str | None:
        """Collective: the newest committed checkpoint, once the one uploading is committed.
        A run stopping on a diverged loss keeps the good checkpoint it was uploading (its
        loss was checked before it was staged) instead of abandoning it half written."""
        self.wait()
        return self.saved_uri

    def abandon(self) -> None:
        """The run fails: stop uploading (between two files) what will never be committed."""
        if self.pending is not None:
            self.pending.cancel()

    def _commit(self) -> None:
        p, began = self.pending, time.monotonic()
        acc, out, keep = self.accelerator, self.cfg.run.output, self.cfg.train.keep_checkpoints
        self.saved_uri = checkpoint.commit(acc, out, p.step, p.files, keep)
        self.pending = None
        now = time.monotonic()
        self._blocked(p, now - began)
        total = now - p.started
        self.clock.phases.add("checkpoint_total_s", total)
        log.info(
            "checkpoint %s committed %.2f s after its save began (hash and upload %.2f s); "
            "training waited %.2f s of it",
            self.saved_uri,
            total,
            p.seconds,
            p.blocking,
        )

    def _blocked(self, p: Upload, seconds: float) -> None:
        """The training thread spent `seconds` on checkpoint `p`: counted as they pass, so
        that the loop can take them out of the time around a preemption check."""
        p.blocking += seconds
        self.clock.phases.add("checkpoint_blocking_s", seconds)  # summary.json's phases
