"""URIs: plain paths, `file://` paths or `s3://bucket/key`, and the joins that must stay
inside a folder."""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass
from pathlib import Path

from job.errors import StorageError


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def join(base: str, *parts: str) -> str:
    base = str(base)
    for part in parts:
        base = base.rstrip("/") + "/" + str(part).lstrip("/")
    return base


def local_path(uri: str) -> Path:
    uri = str(uri)
    return Path(uri[len("file://") :] if uri.startswith("file://") else uri)


@dataclass(frozen=True)
class S3Location:
    bucket: str
    key: str


def split_s3(uri: str) -> S3Location:
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket:
        raise StorageError(f"{uri}: an S3 URI needs a bucket (s3://bucket/key)")
    return S3Location(bucket, key)


def _norm(uri: str) -> str:
    uri = str(uri)
    return uri if is_s3(uri) else os.path.abspath(local_path(uri))


def contained(rel: str) -> bool:
    """Does the relative path `rel` stay inside the folder it is joined onto?"""
    norm = posixpath.normpath(rel)
    return not posixpath.isabs(rel) and norm != ".." and not norm.startswith("../")


def inside(base: str | Path, rel: str, what: str) -> Path:
    """`base / rel`, refused when `rel` (an object key's tail, a manifest's path: data from
    a bucket) would lead outside `base`: `..` segments or an absolute path. S3 accepts such
    keys; joined onto a local folder they would write anywhere."""
    if not contained(rel):
        raise StorageError(f"{what}: '{rel}' leads outside {base}; refused")
    return Path(base) / rel
