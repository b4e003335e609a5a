"""Reading whole files and objects, byte ranges of them, and what they are (exists, size,
fingerprint)."""

from __future__ import annotations

from job.log import log
from job.storage.s3 import _s3_call
from job.storage.uri import is_s3, local_path, split_s3


def read_bytes(uri: str) -> bytes:
    if is_s3(uri):
        loc = split_s3(uri)
        # the body is read inside the call: a body cut short is retried as a whole
        return _s3_call(uri, lambda c: c.get_object(Bucket=loc.bucket, Key=loc.key)["Body"].read())
    return local_path(uri).read_bytes()


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def read_range(uri: str, start: int, length: int) -> bytes:
    """Bytes [start, start+length) of an object."""
    if is_s3(uri):
        loc = split_s3(uri)
        rng = f"bytes={start}-{start + length - 1}"
        get = lambda c: c.get_object(Bucket=loc.bucket, Key=loc.key, Range=rng)  # noqa: E731
        return _s3_call(uri, lambda c: get(c)["Body"].read())
    with open(local_path(uri), "rb") as f:
        f.seek(start)
        return f.read(length)


def exists(uri: str) -> bool:
    if is_s3(uri):
        try:
            _head(uri)
            return True
        except FileNotFoundError:
            return False
    return local_path(uri).is_file()


def size(uri: str) -> int:
    if is_s3(uri):
        return _head(uri)["ContentLength"]
    return local_path(uri).stat().st_size


def _head(uri: str) -> dict:
    loc = split_s3(uri)
    return _s3_call(uri, lambda c: c.head_object(Bucket=loc.bucket, Key=loc.key))


def fingerprint(uri: str) -> dict:
    """What changes when a file's content does: size + ETag on S3, size + mtime locally."""
    if is_s3(uri):
        head = _head(uri)
        return {"size": head["ContentLength"], "etag": head["ETag"]}
    st = local_path(uri).stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def wait_for(uri: str, seconds: float, what: str) -> None:
    """Poll until `uri` exists or `seconds` pass: lets a Job start before its inputs exist."""
    import time

    deadline = time.monotonic() + seconds
    while not exists(uri) and time.monotonic() < deadline:
        log.info("waiting for %s: %s", what, uri)
        time.sleep(min(30.0, max(0.0, deadline - time.monotonic())))
