"""A checkpoint on its way to storage: staged on local disk, hashed and uploaded by a
background thread on each node's local main process while training goes on, committed by
the Checkpointer once every node is done.

The thread never commits and never joins a collective: it only writes the checkpoint's own
files (fenced by rank 0's lease like any write). What it met (the file list, or the error:
a storage failure after its retries, a lost lease) waits here for the training thread,
which raises the error as its own at the next wait point or check; nothing is swallowed.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from job.errors import TransientStorageError
from job.train import checkpoint


@dataclass
class Upload:
    """Checkpoint `step`, staged and not committed yet. On every rank: its step, URI and
    clock (when its save began, how long the training thread has spent on it); on a
    node's local main also the thread uploading the node's files."""

    step: int
    uri: str
    started: float  # time.monotonic() when its save began
    blocking: float = 0.0  # seconds the training thread spent on it so far
    seconds: float = 0.0  # the thread's: hashing and uploading this node's files
    files: dict = field(default_factory=dict)  # this node's, once uploaded
    error: BaseException | None = None
    thread: threading.Thread | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)

    def start(self, local: Path) -> None:
        """Hash and upload `local` on a daemon thread: a run that fails on the training
        thread exits without waiting for it (`cancel` stops it between two files)."""
        name = f"upload-step-{self.step}"
        self.thread = threading.Thread(target=self._run, args=(local,), name=name, daemon=True)
        self.thread.start()

    def _run(self, local: Path) -> None:
        began = time.monotonic()
        try:
            self.files = checkpoint.upload(local, self.uri, self.cancelled)
        except BaseException as e:  # kept for the training thread, which raises it
            self.error = e
        self.seconds = time.monotonic() - began

    @property
    def busy(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    @property
    def failed(self) -> bool:
        return not self.busy and self.error is not None

    def join(self) -> None:
        """Wait for this node's upload (on the other ranks: nothing to wait for)."""
        if self.thread is not None:
            self.thread.join()

    def cancel(self) -> None:
        self.cancelled.set()

    def raise_failure(self) -> None:
        """On every rank once some node's upload failed: that node's local main raises what
        its thread met (a StorageError exits 2, a lost lease or an outage past
        storage.retry_seconds 1), every other rank a TransientStorageError (exit 1)."""
        if self.error is not None:
            raise self.error
        raise TransientStorageError(
            f"{self.uri}: the checkpoint's upload failed on another node; worth a retry"
        )
