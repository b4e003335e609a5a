"""Copying between local disk and URIs: uploads, downloads, staged writes, and a local
path (a cached download) for any URI."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from job.storage.fences import fenced
from job.storage.listing import list_files
from job.storage.read import exists
from job.storage.s3 import _s3_call
from job.storage.uri import inside, is_s3, join, local_path, split_s3
from job.storage.write import atomic_path


@contextmanager
def staged(uri: str, folder: Path, suffix: str = "") -> Iterator[Path]:
    """A local file to write `uri`'s content into, published to `uri` only if the block
    succeeds: renamed into place beside a local target, uploaded (multipart when large) to
    S3 from `folder` (node-local staging). Never visible half written."""
    if not is_s3(uri):
        with atomic_path(local_path(uri)) as tmp:
            yield tmp
            fenced(uri, commit=False)
        return
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"{uuid.uuid4().hex}{suffix}"
    try:
        yield tmp
        upload_file(tmp, uri)
    finally:
        tmp.unlink(missing_ok=True)


def upload_file(local: str | Path, uri: str) -> None:
    """Copy a local file to a URI atomically (multipart for large files on S3)."""
    fenced(uri, commit=False)
    if is_s3(uri):
        loc = split_s3(uri)
        _s3_call(uri, lambda c: c.upload_file(str(local), loc.bucket, loc.key))
        return
    with atomic_path(local_path(uri)) as tmp:
        shutil.copyfile(local, tmp)


def download_file(uri: str, local: str | Path) -> None:
    """Copy a URI to a local file atomically."""
    with atomic_path(Path(local)) as tmp:
        if is_s3(uri):
            loc = split_s3(uri)
            _s3_call(uri, lambda c: c.download_file(loc.bucket, loc.key, str(tmp)))
        else:
            shutil.copyfile(local_path(uri), tmp)


def upload_dir(local_dir: str | Path, uri: str) -> None:
    local_dir = Path(local_dir)
    for p in sorted(local_dir.rglob("*")):
        if p.is_file():
            upload_file(p, join(uri, p.relative_to(local_dir).as_posix()))


def download_dir(uri: str, local_dir: str | Path) -> None:
    prefix = uri.rstrip("/") + "/"
    for file_uri in list_files(uri):
        download_file(file_uri, inside(local_dir, file_uri[len(prefix) :], file_uri))


def to_local(uri: str, cache_dir: str | Path) -> str:
    """A local path for a file or folder URI: S3 content is downloaded into cache_dir."""
    if not is_s3(uri):
        return str(local_path(uri))
    loc = split_s3(uri)
    dest = inside(cache_dir, f"{loc.bucket}/{loc.key.rstrip('/')}", uri)
    if exists(uri):
        download_file(uri, dest)
    else:
        files = list_files(uri)
        if not files:
            raise FileNotFoundError(uri)
        download_dir(uri, dest)
    return str(dest)
