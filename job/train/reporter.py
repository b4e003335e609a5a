"""What a run reports while it trains: metrics.jsonl (rank 0), the trackers, the progress
bar, and the train event at log steps (loss over every rank, throughput, learning rate).

Nothing here decides what training does, with one exception that every report shares: a
NaN or infinite loss stops the run (`stop_if_diverged`) before it is written anywhere.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

from job import jsonio, storage
from job.config import Config
from job.errors import BadInput
from job.log import bar
from job.train.metrics import Metrics
from job.train.state import LossWindow, TrainState
from job.train.tracking import Tracking

LastGood = Callable[[], "str | None"]  # Checkpointer.settled


def should_log(step: int, every: int, last: bool) -> bool:
    return step % every == 0 or last


class Reporter:
    def __init__(
        self, accelerator, cfg: Config, tb_dir: Path, window: LossWindow, batch: int, block: int
    ):
        self.accelerator, self.cfg, self.tb_dir = accelerator, cfg, tb_dir
        self.window = window
        self.global_batch, self.block = batch, block  # samples a step, tokens a sample
        self.metrics: Metrics | None = None  # rank 0 only, from `begin` on
        self.tracking: Tracking | None = None
        self.progress = None
        self.last_loss: float | None = None  # the last train event's loss (summary.json)

    def begin(self, state: TrainState, resume_step: int | None, total_steps: int) -> None:
        """At the first step, not before: a run stopped in start-up writes no metrics."""
        acc, cfg, out = self.accelerator, self.cfg, self.cfg.run.output
        self.metrics = Metrics(out, resume_step) if acc.is_main_process else None
        self.tracking = Tracking(acc, out, self.tb_dir)
        if cfg.train.report_to:
            state.tracker_runs = self.tracking.start(cfg, cfg.train.report_to, state.tracker_runs)
        if self.metrics:
            # A run resumed at its last step logs no train event itself: its final train
            # loss is the last one logged before the checkpoint it resumed from.
            train = [e for e in self.metrics.events if e["event"] == "train"]
            self.last_loss = train[-1]["loss"] if train else None
        self.progress = bar(total=total_steps, initial=state.step, desc="train", unit=" step")

    def stepped(self) -> None:
        self.progress.update(1)

    def log(self, state: TrainState, lr: float, last: bool, last_good: LastGood) -> None:
        """At a log step (every rank): the window's loss over every rank (the one host
        sync), the tokens per second since the last log step, the train event."""
        every = self.cfg.train.log_every_steps
        if not should_log(state.step, every, last):
            return
        loss_sum, tokens = self.window.total()
        self.window.reset()
        window_steps = (state.step - 1) % every + 1
        rate = window_steps * self.global_batch * self.block / max(state.window_seconds, 1e-9)
        state.window_seconds = 0.0
        loss = loss_sum / max(tokens, 1.0)
        self.stop_if_diverged(loss, "train loss", state.step, last_good)
        self.progress.set_postfix(loss=f"{loss:.3f}", tok_s=f"{rate:,.0f}")
        self.last_loss = loss
        if self.metrics:
            self._train_event(state, loss, lr, rate)

    def _train_event(self, st: TrainState, loss: float, lr: float, rate: float) -> None:
        event = {
            "event": "train",
            "step": st.step,
            "epoch": st.epoch,
            "samples": st.sample,
            "samples_seen": st.samples_seen,
            "loss": loss,
            "lr": lr,
            "tokens_per_s": rate,
        }
        self.metrics.log(event)
        self.tracking.log(
            {"train_loss": loss, "lr": lr, "tokens_per_s": rate, "epoch": st.epoch}, st.step
        )
        if not storage.is_s3(self.cfg.run.output):
            self.metrics.flush()

    def eval_event(self, st: TrainState, result: dict) -> None:
        if not self.metrics:
            return
        self.metrics.log({"event": "eval", "step": st.step, "epoch": st.epoch, **result})
        self.tracking.log(
            {
                "eval_loss": result["eval_loss"],
                "eval_perplexity": result["perplexity"],
                "eval_tokens": result["eval_tokens"],
            },
            st.step,
        )
        self.metrics.flush()
        self.metrics.plot()

    def stop_if_diverged(self, value: float, what: str, step: int, last_good: LastGood) -> None:
        """Exit 2 on a NaN or infinite loss, before it is logged or checkpointed. Callers
        pass a value reduced across ranks, so every rank stops here together (no hang).
        `last_good()`: the newest committed checkpoint, once the one still uploading is
        committed (Checkpointer.settled, a collective: every rank calls it here)."""
        if math.isfinite(value):
            return
        first = step - (step - 1) % self.cfg.train.log_every_steps
        mean = ""
        if what == "train loss" and first < step:  # the mean since the last log step
            mean = f" (the mean of steps {first}-{step})"
        if self.metrics:
            self.metrics.flush()  # the finite events before it
        raise BadInput(
            f"{what} is {value} at step {step}{mean}: training diverged (lower "
            f"train.learning_rate or raise train.warmup_steps); last good checkpoint: "
            f"{last_good() or 'none yet'}"
        )

    def checkpointing(self) -> None:
        """Before a checkpoint: what it covers is in metrics.jsonl and the trackers' files."""
        if self.metrics:
            self.metrics.flush()
            self.tracking.sync()

    def close(self) -> None:
        self.progress.close()

    def final_plot(self) -> bytes:
        """Rank 0, at the end: the last events, and loss.png (its bytes)."""
        self.metrics.flush()
        return self.metrics.plot()

    def track_summary(self, summary: dict, png: bytes, step: int) -> None:
        """The final figures as metrics at the last step, and the run's files."""
        figures = {
            f"summary/{k}": v
            for k, v in summary.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        }
        self.tracking.log(figures, step)
        files = {"summary.json": (jsonio.dumps(summary, indent=2) + "\n").encode()}
        self.tracking.artifacts({**files, "loss.png": png})

    def finish(self) -> None:
        self.tracking.finish()
