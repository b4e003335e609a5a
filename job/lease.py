"""One writer per output: a lease on a folder, renewed while its holder runs.

`{output}/_lease.json`, present while a writer runs, names the holder (host, pid, start
time, a random token) and when it last renewed. It is created only if absent, replaced only
if unchanged since it was read and deleted at the end only if still the holder's
(`storage.write_if` / `delete_if`: S3 conditional requests, `If-None-Match: *` / `If-Match`;
locally an exclusive lock on the folder around read-compare-rename), so of two writers
racing for it exactly one wins. A thread renews it every quarter of
`run.lease_ttl_seconds`; a lease not renewed for a whole TTL belongs to a holder that was
killed and is taken over. A second writer waits
up to `run.lease_wait_seconds` for the holder to let go, then exits 2 naming it.

While held, the output's prefix is fenced in `storage`: every write checks the lease (a
commit reads it back from the store first), so a holder that lost it (taken over after
it stalled past its TTL) stops without writing and exits 1. A store outage stalls
everyone alike: renewals are retried, and a commit after one renews the lease first by
compare-and-swap, which fails only if another writer took it meanwhile.

Hand-written: no library offers a lease over S3 conditional writes and local files alike
(fsspec has no compare-and-swap; DynamoDB or etcd locks would add a service per cluster).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

from job import storage
from job.errors import BadInput, TransientStorageError
from job.log import log

LEASE = "_lease.json"


class LeaseLost(TransientStorageError):
    """This process no longer holds the lease of the output it writes: stop, exit 1."""


@dataclass
class Record:
    """The lease file's content."""

    token: str
    host: str
    pid: int
    started: float  # epoch seconds
    renewed: float  # epoch seconds: the holder's clock at its last renewal
    ttl: float
    released: bool = False

    def expired(self, now: float) -> bool:
        return self.released or now - self.renewed > self.ttl

    def describe(self, now: float) -> str:
        started = datetime.fromtimestamp(self.started, timezone.utc).isoformat(timespec="seconds")
        return (
            f"host {self.host}, pid {self.pid}, started {started}, "
            f"last renewed {max(0.0, now - self.renewed):.0f} s ago"
        )

    def encode(self) -> bytes:
        return (json.dumps(asdict(self)) + "\n").encode()

    @classmethod
    def decode(cls, data: bytes) -> Record | None:
        try:
            raw = json.loads(data)
            fields = {k: raw[k] for k in ("token", "host", "pid", "started", "renewed", "ttl")}
            return cls(**fields, released=bool(raw.get("released")))
        except (ValueError, KeyError, TypeError):
            return None


@dataclass
class Lease:
    """A held lease on `output` (see the module doc)."""

    output: str
    ttl: float
    name: str = LEASE
    record: Record | None = None
    version: str | None = None  # of the lease file as this holder last wrote it
    lost: str | None = None  # why it is lost, once it is
    verified: float = 0.0  # monotonic time of the last check against the store
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def uri(self) -> str:
        return storage.join(self.output, self.name)

    # ---- acquiring -------------------------------------------------------------------

    def acquire(self, wait: float, what: str) -> None:
        """Take the lease, waiting up to `wait` seconds for a live holder to let go."""
        deadline, said = time.monotonic() + wait, False
        while True:
            holder = self._try_take()
            if holder is None:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise BadInput(
                    f"{self.output} ({what}): another writer holds it "
                    f"({holder.describe(time.time())}); "
                    f"waited {wait:.0f} s (run.lease_wait_seconds)"
                )
            if not said:
                log.warning(
                    "%s: held by %s; waiting up to %.0f s for it",
                    self.output,
                    holder.describe(time.time()),
                    wait,
                )
                said = True
            time.sleep(min(left, max(0.2, min(5.0, self.ttl / 8))))

    def _try_take(self) -> Record | None:
        """Take the lease if free or expired; else return its live holder."""
        while True:
            now = time.time()
            mine = Record(uuid.uuid4().hex, socket.gethostname(), os.getpid(), now, now, self.ttl)
            current = storage.read_versioned(self.uri)
            old = Record.decode(current[0]) if current else None
            if current and old and not old.expired(now):
                return old
            version = storage.write_if(self.uri, mine.encode(), current[1] if current else None)
            if version is not None:
                break
            # another writer changed it between the read and the write: look again
        if current and old and not old.released:
            log.warning("%s: took over an expired lease (%s)", self.output, old.describe(now))
        elif current and not old:
            log.warning("%s: replaced an unreadable lease file", self.uri)
        self.record, self.version = mine, version
        self.verified = time.monotonic()
        return None

    # ---- holding ---------------------------------------------------------------------

    def renew(self) -> None:
        """Write a new renewal time if the lease is still this holder's."""
        with self._lock:
            if self.lost:
                return
            record = Record(**{**asdict(self.record), "renewed": time.time()})
            version = storage.write_if(self.uri, record.encode(), self.version)
            if version is None:
                self._lose("the lease file changed under it (taken over)")
                return
            self.record, self.version = record, version
            self.verified = time.monotonic()

    def _renew_loop(self) -> None:
        failing = False
        while not self._stop.wait(self.ttl / 4):
            try:
                self.renew()
                if failing:
                    log.info("%s: lease renewed again", self.output)
                failing = False
            except Exception as e:  # an outage: keep trying (see _verify)
                if not failing:
                    log.warning("%s: cannot renew the lease (%s); retrying", self.output, e)
                failing = True
            if self.lost:
                return

    def _lose(self, why: str) -> None:
        if not self.lost:
            self.lost = why
            log.error("%s: lease lost (%s); writing nothing more", self.output, why)

    def check(self, commit: bool) -> None:
        """Raise LeaseLost unless this process still holds the lease. A commit reads the
        lease back from the store; other writes do when the last check is old."""
        if not self.lost and (commit or time.monotonic() - self.verified > self.ttl / 8):
            self._verify()
        if self.lost:
            raise LeaseLost(
                f"{self.output}: this process no longer holds its lease ({self.lost}); "
                "stopped without writing"
            )

    def _verify(self) -> None:
        """Still ours? A lease that went unrenewed for most of its TTL (the store was down:
        nobody could renew or take it) is renewed before the commit, by compare-and-swap:
        if that fails, another writer took it over meanwhile."""
        current = storage.read_versioned(self.uri)
        record = Record.decode(current[0]) if current else None
        if record is None or record.token != self.record.token:
            self._lose("another writer holds it now" if record else "the lease file is gone")
            return
        if time.time() - record.renewed > 0.75 * self.ttl:
            self.renew()
        if not self.lost:
            self.verified = time.monotonic()

    def release(self) -> None:
        """Delete the lease file if it is still ours (compare-and-delete); where the store
        refuses a conditional delete, mark it released instead. Either way the next writer
        takes it at once."""
        self._stop.set()
        with self._lock:
            if self.lost or self.record is None:
                return
            try:
                storage.delete_if(self.uri, self.version)
            except Exception:
                record = Record(**{**asdict(self.record), "released": True})
                try:
                    storage.write_if(self.uri, record.encode(), self.version)
                except Exception as e:  # it expires on its own
                    log.warning("%s: could not release the lease (%s)", self.output, e)


@contextmanager
def hold(output: str, wait: float, ttl: float, what: str, name: str = LEASE):
    """Hold `output`'s lease for the block: acquired (or exit 2), renewed, fenced, released."""
    lease = Lease(output, ttl, name)
    lease.acquire(wait, what)
    thread = threading.Thread(target=lease._renew_loop, name="lease", daemon=True)
    thread.start()
    storage.fence(output, lease.check, exempt=lease.uri)
    try:
        yield lease
    finally:
        storage.unfence(output)
        lease.release()
        thread.join(timeout=5)
