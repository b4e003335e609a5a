"""Writing and deleting: atomic writes, the commit point of every output, deletions; all
fenced by the output's lease (see fences)."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from job.storage.fences import fenced
from job.storage.listing import list_files
from job.storage.s3 import _s3_call
from job.storage.uri import is_s3, local_path, split_s3


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary name beside `path`, renamed to `path` if the block succeeds: readers see
    the old file or the whole new one, never a part; a failed write leaves nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


_MULTIPART = 256 << 20  # bytes above which an upload goes in parts (one PUT: 5 GB at most)


def write_bytes(uri: str, data: bytes) -> None:
    """Atomic: readers see the old object or the whole new one, never a part."""
    fenced(uri, commit=False)
    _write_bytes(uri, data)


def _write_bytes(uri: str, data: bytes) -> None:
    if is_s3(uri):
        loc = split_s3(uri)
        if len(data) > _MULTIPART:  # completed multipart uploads appear whole, too
            _s3_call(uri, lambda c: c.upload_fileobj(io.BytesIO(data), loc.bucket, loc.key))
        else:
            _s3_call(uri, lambda c: c.put_object(Bucket=loc.bucket, Key=loc.key, Body=data))
        return
    with atomic_path(local_path(uri)) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def commit(marker: str, content: str | bytes) -> None:
    """Write the object that makes an output count (a checkpoint's or a part's marker, a
    manifest, a summary), after everything it vouches for: the one commit point of every
    output, fenced by the output's lease (a holder that lost it writes nothing)."""
    fenced(marker, commit=True)
    _write_bytes(marker, content.encode("utf-8") if isinstance(content, str) else content)


def uncommit(*uris: str) -> None:
    """Remove markers, then what they vouched for (markers first in `uris`): a marker is
    never left without its files."""
    for uri in uris:
        delete(uri)


def delete(uri: str) -> None:
    fenced(uri, commit=True)  # a deletion may take away what another commit vouched for
    _delete(uri)


def _delete(uri: str) -> None:
    if is_s3(uri):
        loc = split_s3(uri)
        _s3_call(uri, lambda c: c.delete_object(Bucket=loc.bucket, Key=loc.key))
    else:
        local_path(uri).unlink(missing_ok=True)


def delete_prefix(uri: str) -> None:
    """Remove a folder and everything under it."""
    fenced(uri, commit=True)
    if is_s3(uri):
        for file_uri in list_files(uri):
            _delete(file_uri)
    else:
        shutil.rmtree(local_path(uri), ignore_errors=True)
