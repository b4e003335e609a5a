"""Compare-and-swap on one object: read it with its version, write or delete it only if
it is still at that version (conditional requests on S3, a folder lock locally)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from job.errors import TransientStorageError
from job.storage.s3 import _CONFLICT, _s3_call
from job.storage.uri import is_s3, local_path, split_s3
from job.storage.write import _write_bytes


def read_versioned(uri: str) -> tuple[bytes, str] | None:
    """An object's bytes and a version to pass to write_if (its ETag on S3, its sha256
    locally), or None when there is none."""
    if is_s3(uri):
        loc = split_s3(uri)

        def get(c):
            resp = c.get_object(Bucket=loc.bucket, Key=loc.key)
            return resp["Body"].read(), resp["ETag"]

        try:
            return _s3_call(uri, get)
        except FileNotFoundError:
            return None
    try:
        data = local_path(uri).read_bytes()
    except FileNotFoundError:
        return None
    return data, hashlib.sha256(data).hexdigest()


def write_if(uri: str, data: bytes, version: str | None) -> str | None:
    """Compare-and-swap: write `uri` only if it is still at `version` (None: only if it does
    not exist). Returns the new version, or None when another writer changed it first.
    On S3 a conditional PUT (`If-None-Match: *` / `If-Match`); locally the same under an
    exclusive lock on a sidecar file, around read, compare and rename."""
    if is_s3(uri):
        return _s3_write_if(uri, data, version)
    path = local_path(uri)
    with _folder_lock(path):
        current = read_versioned(uri)
        if (current[1] if current else None) != version:
            return None
        _write_bytes(uri, data)
    return hashlib.sha256(data).hexdigest()


def delete_if(uri: str, version: str) -> bool:
    """Compare-and-delete: remove `uri` only if it is still at `version` (S3: a DELETE
    with `If-Match`). False when another writer changed it first."""
    if is_s3(uri):
        from botocore.exceptions import ClientError

        loc = split_s3(uri)
        try:
            _s3_call(
                uri, lambda c: c.delete_object(Bucket=loc.bucket, Key=loc.key, IfMatch=version)
            )
        except ClientError as e:
            if str(e.response.get("Error", {}).get("Code", "")) in _CONFLICT:
                return False
            raise
        except FileNotFoundError:
            return False
        return True
    path = local_path(uri)
    with _folder_lock(path):
        current = read_versioned(uri)
        if not current or current[1] != version:
            return False
        path.unlink()
    return True


@contextmanager
def _folder_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on the folder holding `path` (flock on the folder itself: no lock
    file left beside the outputs)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        _flock(fd, path.parent)
        yield
    finally:
        os.close(fd)


_LOCK_SECONDS = 60.0  # the lock is held for a read-compare-rename: milliseconds


def _flock(fd: int, folder: Path) -> None:
    """flock with a deadline: a holder that hangs inside its few milliseconds (a stopped or
    frozen process) must not hang every other writer of the folder with it."""
    import fcntl
    import time

    deadline = time.monotonic() + _LOCK_SECONDS
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise TransientStorageError(
                    f"{folder}: its lock has been held by another process for {_LOCK_SECONDS:.0f} s"
                ) from None
            time.sleep(0.01)


def _s3_write_if(uri: str, data: bytes, version: str | None) -> str | None:
    from botocore.exceptions import ClientError

    loc = split_s3(uri)
    cond = {"IfNoneMatch": "*"} if version is None else {"IfMatch": version}
    try:
        resp = _s3_call(
            uri, lambda c: c.put_object(Bucket=loc.bucket, Key=loc.key, Body=data, **cond)
        )
    except FileNotFoundError:  # If-Match on an object deleted meanwhile
        return None
    except ClientError as e:
        if str(e.response.get("Error", {}).get("Code", "")) not in _CONFLICT:
            raise
        # A retried PUT whose first attempt did land fails its own condition: it is ours
        # when the object holds exactly what this call wrote.
        current = read_versioned(uri)
        return current[1] if current and current[0] == data else None
    return resp["ETag"]
