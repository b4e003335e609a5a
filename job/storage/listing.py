"""What is in a folder, and which files a URI or glob names."""

from __future__ import annotations

import glob as globlib
import os
import re

from job.errors import StorageError
from job.storage.read import exists
from job.storage.s3 import _s3_call
from job.storage.uri import is_s3, local_path, split_s3


def _list_pages(uri: str, **kwargs) -> list[dict]:
    """Every list_objects_v2 page (all pages in one retryable call: a refresh restarts it)."""
    return _s3_call(uri, lambda c: list(c.get_paginator("list_objects_v2").paginate(**kwargs)))


def list_names(folder: str) -> list[str]:
    """Names of the files directly in a folder URI (not in its subfolders), sorted."""
    if is_s3(folder):
        loc = split_s3(folder)
        key = loc.key.rstrip("/") + "/" if loc.key else ""
        pages = _list_pages(folder, Bucket=loc.bucket, Prefix=key, Delimiter="/")
        return sorted(o["Key"][len(key) :] for page in pages for o in page.get("Contents", []))
    root = local_path(folder)
    return sorted(p.name for p in root.iterdir() if p.is_file()) if root.is_dir() else []


def list_files(prefix: str) -> list[str]:
    """Every file under a folder URI, recursively, sorted."""
    if is_s3(prefix):
        loc = split_s3(prefix)
        key = loc.key.rstrip("/") + "/" if loc.key else ""
        out = []
        for page in _list_pages(prefix, Bucket=loc.bucket, Prefix=key):
            out += [f"s3://{loc.bucket}/{o['Key']}" for o in page.get("Contents", [])]
        return sorted(out)
    root = local_path(prefix)
    if not root.is_dir():
        return []
    return sorted(str(p) for p in root.rglob("*") if p.is_file())


def expand(pattern: str) -> list[str]:
    """A URI or glob to the sorted list of files it names (a folder names its files).

    Globs match as glob.glob(recursive=True) does, on S3 too: `*`, `?` and `[..]` stay
    within one folder, `**` spans any number of them; only files are named, never folders.
    """
    if not any(c in pattern for c in "*?["):
        if is_s3(pattern):
            return [pattern] if exists(pattern) else list_files(pattern)
        p = local_path(pattern)
        return list_files(pattern) if p.is_dir() else ([str(p)] if p.exists() else [])
    if is_s3(pattern):
        return _expand_s3(pattern)
    found = globlib.glob(str(local_path(pattern)), recursive=True)
    return sorted(p for p in found if os.path.isfile(p))


def _expand_s3(pattern: str) -> list[str]:
    from fsspec.utils import glob_translate

    loc = split_s3(pattern)
    try:
        regex = re.compile(glob_translate(loc.key))
    except ValueError as e:  # '**' inside a name (a local glob reads it as '*')
        raise StorageError(f"{pattern}: {e}") from None
    wild = min(loc.key.find(c) for c in "*?[" if c in loc.key)
    folder = loc.key[:wild].rpartition("/")[0]  # list only below the fixed part
    bucket = f"s3://{loc.bucket}/"
    return [u for u in list_files(bucket + folder) if regex.match(u[len(bucket) :])]
