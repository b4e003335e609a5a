"""A launched worker exits when its parent (torchrun's agent, or job.launch) does.

Such workers do not die with a SIGKILLed launcher (kill -9 of the launcher alone, a
laptop's Ctrl-\\ to torchrun's process group): reparented, they would go on training and
committing beside a resubmitted run. In a pod the container's cgroup takes them all;
everywhere else this watch does: once the parent is gone the worker exits 1 at once.
Everything it committed is whole (every commit is atomic), and the lease it held expires
for the next run.
"""

from __future__ import annotations

import os
import threading
import time

from job import env
from job.errors import EXIT_RETRY
from job.log import log

POLL_SECONDS = 1.0


def exit_with_parent() -> None:
    """Under job.launch (which sets MLMJOB_EXIT_DIR), watch the parent process: torchrun's
    agent, or the launcher itself for a single worker."""
    if not env.exit_dir():
        return
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(POLL_SECONDS)
        log.error("its launcher (pid %d) is gone: this worker exits too", parent)
        os._exit(EXIT_RETRY)

    threading.Thread(target=watch, name="orphan-watch", daemon=True).start()
