"""Logging and progress bars: rank 0 talks, other ranks only warn."""

from __future__ import annotations

import logging
import sys

from tqdm import tqdm

from job import env
from job.redact import RedactingFormatter

log = logging.getLogger("mlmjob")


def setup_logging() -> None:
    level = logging.INFO if env.rank() == 0 else logging.WARNING
    handler = logging.StreamHandler(sys.stderr)
    # Redacted here too, not only by the stream (job.redact.install): in-process callers
    # that never installed it (tests, notebooks) get redacted lines as well.
    handler.setFormatter(RedactingFormatter("%(asctime)s mlmjob %(levelname)s %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False


def bar(**kwargs) -> tqdm:
    """A tqdm bar on rank 0; in a pod's log (no TTY) it redraws every 30 s, not every 0.1 s."""
    tty = sys.stderr.isatty()
    kwargs.setdefault("mininterval", 0.5 if tty else 30.0)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(disable=env.rank() != 0 or env.no_progress(), **kwargs)
