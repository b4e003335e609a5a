"""`mlmjob infer`: this worker's parts of the batch fill-mask (job.infer), under its lease."""

from __future__ import annotations

from job import lease
from job.config import Config
from job.infer.parts import Worker, worker_ids
from job.infer.run import run_worker


def main(cfg: Config, worker_index: int, num_workers: int) -> int:
    """The `mlmjob infer` entry: this worker's parts under its lease; exit status 0."""
    infer(cfg, worker_index, num_workers)
    return 0


def infer(cfg: Config, worker_index: int = 0, num_workers: int = 1) -> dict:
    """This worker's parts, under its lease on the output: workers of one job write
    disjoint parts side by side, but no two processes ever act as the same worker.
    Returns the run's figures (bench/bench_infer.py reads them)."""
    worker = Worker(*worker_ids(worker_index, num_workers), cfg.infer.lines_per_part)
    run = cfg.run
    what, name = f"infer.output, worker {worker.me}", f"_lease-worker-{worker.me}.json"
    with lease.hold(cfg.infer.output, run.lease_wait_seconds, run.lease_ttl_seconds, what, name):
        return run_worker(cfg, worker)
