"""`mlmjob push`: a finished run's `model/` to the Hugging Face Hub (job.push, which a
training run with `train.push_to_hub` also calls at its end)."""

from __future__ import annotations

from job.config import Config
from job.push import push


def main(cfg: Config) -> int:
    """The `mlmjob push` entry: 0 when pushed, EXIT_RETRY when the Hub refused."""
    return push(cfg)
