"""Experiment tracking through accelerate's trackers (`train.report_to`, as the Trainer's
`report_to`): MLflow, TensorBoard, Weights & Biases.

Rank 0 logs what metrics.jsonl has, at the same steps, plus the config (as params), the
summary figures and, to trackers that store files, loss.png and summary.json. Where to
send them (MLFLOW_TRACKING_URI, WANDB_API_KEY / WANDB_MODE) comes from the environment,
never from the config. Each tracker's run id is kept in the TrainState, so a preempted
and resumed job continues one tracker run. Tracking never stops training: a tracker
that fails is one warning and is dropped.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from job import storage
from job.config import Config, to_dict
from job.log import log
from job.redact import redact

TENSORBOARD = "tensorboard"
# An unreachable server must cost seconds, not MLflow's default of 7 retries with backoff
# (minutes). Set only when the environment does not choose.
_MLFLOW_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}


def flat_params(cfg: Config) -> dict:
    """The resolved config as dotted keys (`train.learning_rate`): scalars as they are,
    lists, mappings and None as JSON, which every tracker accepts as a param. URLs are
    redacted (`to_dict`): trackers' params are read by everyone with access to the run."""
    out: dict = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict) and value and prefix.count(".") < 1:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        elif isinstance(value, bool | int | float | str):
            out[prefix] = value
        else:
            out[prefix] = json.dumps(value)

    for section, values in to_dict(cfg).items():
        walk(section, values)
    return out


def tensorboard_dir(run_output: str, staging: Path) -> Path:
    """Where the event files are written: in `{run.output}/tensorboard/` itself when it is
    local; else staged on local disk and uploaded there (`Tracking.sync`)."""
    if storage.is_s3(run_output):
        return staging / TENSORBOARD
    return storage.local_path(storage.join(run_output, TENSORBOARD))


@dataclass
class Tracking:
    """The trackers of one training process (empty on ranks other than 0)."""

    accelerator: object
    run_output: str
    logging_dir: Path
    warned: set = field(default_factory=set)

    @property
    def trackers(self) -> list:
        return list(self.accelerator.trackers)

    def start(self, cfg: Config, names: list[str], run_ids: dict) -> dict:
        """Start each tracker on its own, so that one unreachable server costs only itself.
        A new run logs the config; a resumed one (`run_ids`) continues its tracker runs.
        Returns the tracker run ids to keep in the checkpoint."""
        acc, started = self.accelerator, []
        for key, value in _MLFLOW_DEFAULTS.items():
            os.environ.setdefault(key, value)
        for name in names:
            acc.log_with, acc.trackers = [name], []
            try:
                acc.init_trackers(
                    cfg.run.name,
                    None if run_ids else flat_params(cfg),
                    _init_kwargs(name, cfg, run_ids.get(name)),
                )
                started += acc.trackers
            except Exception as e:  # any failure of an optional side channel
                self._warn(name, e)
        acc.trackers = started
        # A tracker down at this restart keeps its id for the next one.
        return {**run_ids, **{n: i for n in names if (i := self._run_id(n))}}

    def _run_id(self, name: str) -> str | None:
        if name not in [t.name for t in self.trackers]:
            return None
        run = self.accelerator.get_tracker(name, unwrap=True)
        if name == "mlflow":
            return run.info.run_id
        return getattr(run, "id", None)  # wandb

    def log(self, values: dict, step: int) -> None:
        for tracker in self.trackers:
            self._guard(tracker, lambda t: t.log(values, step=step))

    def artifacts(self, files: dict[str, bytes]) -> None:
        """Files (name -> content) for the trackers that store them (MLflow)."""
        with tempfile.TemporaryDirectory(prefix="mlmjob-artifacts-") as tmp:
            for name, data in files.items():
                Path(tmp, name).write_bytes(data)
            for tracker in self.trackers:
                if hasattr(tracker, "log_artifacts"):
                    self._guard(tracker, lambda t: t.log_artifacts(tmp))

    def sync(self) -> None:
        """Upload staged event files to `{run.output}/tensorboard/` (S3 runs only)."""
        if not storage.is_s3(self.run_output) or not self.logging_dir.is_dir():
            return
        try:
            storage.upload_dir(self.logging_dir, storage.join(self.run_output, TENSORBOARD))
        except Exception as e:  # the bucket is retried at the next sync
            self._warn(TENSORBOARD, e)

    def finish(self) -> None:
        """Close every tracker run (before `accelerator.end_training`, which then has
        nothing left to close: a failure here must not fail the run)."""
        for tracker in self.trackers:
            self._guard(tracker, lambda t: t.finish())
        self.accelerator.trackers = []
        self.sync()

    def _guard(self, tracker, call) -> None:
        try:
            call(tracker)
        except Exception as e:  # a tracker that fails mid-run is dropped, training goes on
            self._warn(tracker.name, e)
            if tracker in self.accelerator.trackers:
                self.accelerator.trackers.remove(tracker)

    def _warn(self, name: str, e: Exception) -> None:
        if name not in self.warned:
            self.warned.add(name)
            # MLflow's errors name the tracking URI, userinfo and all: redacted before the cut
            text = redact(str(e)).strip()
            first = text.splitlines()[0][:300] if text else type(e).__name__
            log.warning("tracking: %s failed (%s); training goes on without it", name, first)


def _init_kwargs(name: str, cfg: Config, run_id: str | None) -> dict:
    if name == "mlflow":
        return {"mlflow": {"run_name": cfg.run.name, "run_id": run_id}}
    if name == "wandb":
        resume = {"id": run_id, "resume": "must"} if run_id else {}
        return {"wandb": {"name": cfg.run.name, **resume}}
    return {}
