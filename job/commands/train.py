"""`mlmjob train`: the training run (job.train.build makes it, job.train.loop runs it),
under rank 0's lease on `run.output`."""

from __future__ import annotations

from job import env, lease, storage
from job.config import Config
from job.errors import EXIT_OK, EXIT_PREEMPTED
from job.log import log
from job.train.accel import Preempted, Preemption
from job.train.build import build
from job.train.loop import startup_preempted, train


def main(cfg: Config) -> int:
    """`mlmjob train`: rank 0 holds the lease on `run.output` throughout (the others
    write only into checkpoint folders that rank 0 commits, fenced, or not at all).

    A SIGTERM from here on is a preemption (exit 3), during start-up too (Preemption)."""
    Preemption.install()
    try:
        if env.rank() != 0:
            return _train(cfg)
        run = cfg.run
        with lease.hold(run.output, run.lease_wait_seconds, run.lease_ttl_seconds, "run.output"):
            return _train(cfg)
    except Preempted:  # while waiting for the dataset: nothing written yet
        startup_preempted("while waiting for the dataset, nothing written")
        return EXIT_PREEMPTED


def _train(cfg: Config) -> int:
    from job.train import resume_check

    # First, before the accelerator: a resubmission that changes what the run is exits 2.
    changed = resume_check.check(cfg)
    summary = storage.join(cfg.run.output, "summary.json")
    if storage.exists(summary):
        log.info("run already complete, nothing to do: %s", summary)
        return EXIT_OK
    parts = build(cfg)
    if changed and parts.accelerator.is_main_process:  # once the checkpoint restored
        resume_check.record(cfg, changed)
    return train(parts)
