"""Training's evaluations: before the first step, every `train.eval_every_steps` steps (or
at each epoch's end), and at the end. The figure is job.train.evaluate's masked_lm_loss,
the one `mlmjob evaluate` reports."""

from __future__ import annotations

import math

from job.config import Config
from job.data.loader import BlockData
from job.errors import BadInput
from job.log import log
from job.train.batch import Masker
from job.train.checkpointer import Checkpointer
from job.train.evaluate import masked_lm_loss
from job.train.masking import EVAL_STREAM
from job.train.phases import Phases
from job.train.reporter import Reporter
from job.train.state import TrainState


def should_eval(step: int, every: int | None, epoch_end: bool) -> bool:
    """Every `every` steps, or at each epoch's end when `every` is None."""
    return bool(every and step % every == 0) or (epoch_end and every is None)


class Validator:
    def __init__(
        self,
        accelerator,
        wrapper,
        data: BlockData | None,
        masker: Masker,
        cfg: Config,
        reporter: Reporter,
        checkpointer: Checkpointer,
        phases: Phases,
    ):
        self.accelerator, self.wrapper, self.data, self.masker = accelerator, wrapper, data, masker
        self.cfg, self.reporter, self.checkpointer = cfg, reporter, checkpointer
        self.phases = phases  # initial_eval_s and eval_s

    def should_validate(self, step: int, epoch_end: bool) -> bool:
        return should_eval(step, self.cfg.train.eval_every_steps, epoch_end)

    def evaluate(self) -> dict:
        """Token-weighted masked-LM loss over the whole eval split and every rank."""
        t, data = self.cfg.train, self.data
        return masked_lm_loss(
            self.accelerator,
            self.wrapper,
            len(data),
            lambda ids: self.masker.batch(data, ids, EVAL_STREAM),
            t.eval_batch_size or t.per_device_batch_size,
        )

    def initial(self, st: TrainState) -> None:
        """The perplexity before the first step (kept in the TrainState, so a resumed run
        still reports it). Eval mode draws no dropout and the masks are hashes, so the
        training that follows is the same as without it."""
        if self.data is None or st.step > 0 or st.initial_eval is not None:
            return
        with self.phases.timed("initial_eval_s"):
            st.initial_eval = self.evaluate()
        loss = st.initial_eval["eval_loss"]  # the same on every rank
        if not math.isfinite(loss):
            name = self.cfg.model.name_or_path
            raise BadInput(
                f"eval loss is {loss} before the first step: {name} gives no finite loss"
            )
        log.info(
            "before training: eval loss %.4f, perplexity %.3f",
            st.initial_eval["eval_loss"],
            st.initial_eval["perplexity"],
        )

    def validate(self, st: TrainState) -> None:
        """Collective: an evaluation at this step (none without a test split), with its
        reporting (the eval event redraws loss.png): eval_s."""
        if self.data is None:
            return
        with self.phases.timed("eval_s"):
            self._validate(st)

    def _validate(self, st: TrainState) -> None:
        result = self.evaluate()
        last_good = self.checkpointer.settled
        self.reporter.stop_if_diverged(result["eval_loss"], "eval loss", st.step, last_good)
        st.last_eval = {**result, "step": st.step}
        self.reporter.eval_event(st, result)
        log.info(
            "step %d: eval loss %.4f, perplexity %.3f",
            st.step,
            result["eval_loss"],
            result["perplexity"],
        )
