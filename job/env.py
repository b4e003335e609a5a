"""The one place that reads the process environment torchrun and Kubernetes set."""

from __future__ import annotations

import os


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_world_size() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def planned_world_size() -> int:
    """The processes a launch will start (job.launch's variables), before it starts them."""
    if "WORLD_SIZE" in os.environ:
        return world_size()
    per_node = os.environ.get("MLMJOB_NPROC_PER_NODE") or "1"
    return int(os.environ.get("MLMJOB_NNODES", "1")) * int(per_node)


def wait_seconds() -> float:
    """MLMJOB_WAIT_SECONDS: how long a Job waits for its input (the k8s manifests set it)."""
    return float(os.environ.get("MLMJOB_WAIT_SECONDS", "0"))


def no_progress() -> bool:
    return os.environ.get("MLMJOB_NO_PROGRESS") == "1"


def exit_dir() -> str | None:
    """Set by job.launch: where each rank leaves its exit code (torchrun hides it)."""
    return os.environ.get("MLMJOB_EXIT_DIR")


def worker(index: int | None = None, count: int | None = None) -> tuple[int, int]:
    """Worker index and count: given, else the Indexed Job's environment, else 0 of 1."""
    if index is None:
        index = int(os.environ.get("JOB_COMPLETION_INDEX", "0"))
    if count is None:
        count = int(os.environ.get("MLMJOB_NUM_WORKERS", "1"))
    return index, count
