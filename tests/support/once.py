"""What the session's pytest-xdist workers make once between them: a folder that the first
worker to ask builds, under a lock, and every other worker then reads.

A session-scoped fixture is made once per *worker* (`-n 3`: up to three times), a module
one once per worker that runs a test of the module; each of those trains a model or
preprocesses a dataset (seconds of CPU on a 2-core machine). pytest-xdist has no shared
fixture of its own; its documentation shows this recipe (a FileLock in the session's
base temporary folder, which every worker's is under).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock

DONE = ".made"


def shared_dir(tmp_path_factory, name: str, make: Callable[[Path], None]) -> Path:
    """The folder `name` of this test session, which `make(folder)` filled once (read only
    from then on: every worker's tests read the same files)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's own folder, above each worker's
    folder = root / f"shared-{name}"
    with FileLock(f"{folder}.lock"):
        if not (folder / DONE).exists():
            shutil.rmtree(folder, ignore_errors=True)  # a worker that failed making it
            folder.mkdir(parents=True)
            make(folder)
            (folder / DONE).touch()
    return folder
