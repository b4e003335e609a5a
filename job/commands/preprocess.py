"""`mlmjob preprocess`: this worker's share of ELI5 -> the sharded block dataset
(job.data.preprocess; one worker finalizes, under the dataset's finalize lease)."""

from __future__ import annotations

from job.config import Config
from job.data.preprocess import preprocess


def main(cfg: Config, worker_index: int, num_workers: int) -> int:
    """The `mlmjob preprocess` entry: prints the dataset's URI (for scripts); exit 0."""
    print(preprocess(cfg, worker_index, num_workers))
    return 0
