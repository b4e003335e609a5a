"""One interface to local folders and S3 (or any S3-compatible store).

URIs are plain paths, `file://` paths or `s3://bucket/key`. Writes are atomic: a local
file is written beside its target and renamed; an S3 object appears whole when its PUT
(or multipart upload) completes. Credentials come only from boto3's standard chain
(environment, shared config, web identity / pod identity); transient S3 errors are
retried by botocore's "standard" mode with exponential backoff and jitter. An expired token
(or a denial on a client that has worked before) drops the cached client and retries once
with a fresh one, which re-reads the credential chain (a rotated web-identity token); if
that fails too the error is a TransientStorageError (exit 1), never a StorageError (exit 2).
"""

from __future__ import annotations

import contextlib
import functools
import glob as globlib
import hashlib
import io
import os
import posixpath
import re
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from job.errors import StorageError, TransientStorageError
from job.log import log

_settings = {"endpoint_url": None, "region": None, "retry_seconds": 300.0}
_client = None
_client_worked = False  # has the cached client completed a call? (see _s3_call)

# Credentials that were valid and have lapsed: a fresh client (re-read chain) may fix them.
_EXPIRED = {
    "ExpiredToken",
    "ExpiredTokenException",
    "RequestExpired",
    "TokenRefreshRequired",
    "InvalidToken",
}
# Refusals of the credentials themselves: final on a client that has never worked.
_DENIED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden", "403"}


def configure(
    endpoint_url: str | None = None, region: str | None = None, retry_seconds: float = 300.0
) -> None:
    """Set the S3 endpoint and region (config values win over the environment) and how
    long transient errors are retried (`storage.retry_seconds`)."""
    _settings["endpoint_url"] = endpoint_url
    _settings["region"] = region
    _settings["retry_seconds"] = retry_seconds
    _drop_client()


def _drop_client() -> None:
    global _client, _client_worked
    _client, _client_worked = None, False


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


def client():
    global _client
    if _client is None:
        import boto3
        from botocore.config import Config

        endpoint = (
            _settings["endpoint_url"]
            or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL")
        )
        region = (
            _settings["region"]
            or os.environ.get("AWS_REGION")
            or os.environ.get("AWS_DEFAULT_REGION")
            or "us-east-1"
        )
        # A fresh session re-reads the credential chain (boto3's default one caches it).
        _client = boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint,
            region_name=region,
            config=Config(
                # a few quick attempts; _s3_call retries outages for storage.retry_seconds
                retries={"max_attempts": 3, "mode": "standard"},
                connect_timeout=10,
                read_timeout=120,
                s3={"addressing_style": "path" if endpoint else "auto"},
            ),
        )
    return _client


# S3 error codes (and HTTP statuses) that mean "not now": retried for storage.retry_seconds.
_TRANSIENT = {
    *("SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded"),
    *("RequestTimeout", "RequestTimeoutException", "InternalError", "ServiceUnavailable"),
    *("BandwidthLimitExceeded", "500", "502", "503", "504"),
}


def _transient(error: BaseException | None) -> bool:
    """A connection lost or refused, a timeout, a truncated body, a 5xx or throttling
    answer: anything an outage or an overloaded store gives (looked for along the chain of
    causes: s3transfer wraps what it met in S3UploadFailedError)."""
    from botocore.exceptions import ClientError

    while error is not None:
        if isinstance(error, _broken_connection_errors()):
            return True
        if isinstance(error, ClientError):
            code = str(error.response.get("Error", {}).get("Code", ""))
            status = str(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
            return code in _TRANSIENT or status in _TRANSIENT
        suppressed = error.__suppress_context__  # `raise ... from None`: a final answer
        error = error.__cause__ or (None if suppressed else error.__context__)
    return False


class _Outage:
    """One warning when storage stops answering, one line when it is back: not one per
    attempt (the prefetcher, the lease and the loop may all be retrying at once)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.since: float | None = None

    def retrying(self, uri: str, error: BaseException) -> None:
        with self.lock:
            if self.since is None:
                self.since = time.monotonic()
                budget = _settings["retry_seconds"]
                what = f"{type(error).__name__} on {uri}"
                log.warning(
                    "storage unavailable (%s); retrying for up to %.0f s (storage.retry_seconds)",
                    what,
                    budget,
                )

    def answered(self) -> None:
        if self.since is None:
            return
        with self.lock:
            if self.since is not None:
                log.info("storage answers again after %.0f s", time.monotonic() - self.since)
                self.since = None


_outage = _Outage()


def _s3_call(uri: str, call):
    """`_s3_refreshing(uri, call)`, with transient errors retried (exponential backoff with
    jitter) for up to storage.retry_seconds, then a TransientStorageError (exit 1)."""
    import tenacity

    budget = _settings["retry_seconds"]
    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_delay(budget),
        wait=tenacity.wait_random_exponential(multiplier=0.5, max=15),
        retry=tenacity.retry_if_exception(_transient),
        before_sleep=lambda state: _outage.retrying(uri, state.outcome.exception()),
        reraise=True,
    )
    try:
        result = retrying(_s3_refreshing, uri, call)
    except Exception as e:
        if not _transient(e):
            raise
        raise TransientStorageError(
            f"{uri}: storage unavailable for {budget:.0f} s (storage.retry_seconds): "
            f"{type(e).__name__}; worth a retry"
        ) from None
    _outage.answered()
    return result


def _s3_refreshing(uri: str, call):
    """Run `call(client)`, turning errors retrying cannot fix into one clear line.

    A refusal that fresh credentials may cure (an expired token; a denial on a client that
    has worked, so the credentials were good a moment ago) drops the cached client and
    retries once: a new boto3 session re-reads the credential chain. A second refusal is a
    TransientStorageError, which exits 1 so that the pod is retried, not the Job failed.
    """
    try:
        return _s3_attempt(uri, call, retry=False)
    except _Refresh as e:
        log.warning("%s: S3 refused the request (%s); retrying with fresh credentials", uri, e)
        _drop_client()
    try:
        return _s3_attempt(uri, call, retry=True)
    except _Refresh as e:
        raise TransientStorageError(
            f"{uri}: S3 refused the request ({e}) again with fresh credentials; "
            "the pod is worth a retry"
        ) from None


class _Refresh(Exception):
    """An S3 refusal that a fresh client may cure; the message is the S3 error code."""


def _s3_attempt(uri: str, call, retry: bool):
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import ClientError, NoCredentialsError

    global _client_worked
    try:
        result = call(client())
    except NoCredentialsError:
        raise StorageError(
            f"{uri}: no S3 credentials found (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
            "AWS_PROFILE, or give the pod an IAM identity)"
        ) from None
    except (ClientError, S3UploadFailedError) as e:
        # upload_file wraps the ClientError, which stays reachable as the context
        error = e if isinstance(e, ClientError) else e.__context__
        if not isinstance(error, ClientError):
            raise
        _raise_for(uri, error, worked=_client_worked or retry)
        raise
    _client_worked = True
    return result


def _raise_for(uri: str, error, worked: bool) -> None:
    """Raise what an S3 error code means here; return for codes left to the caller."""
    code = str(error.response.get("Error", {}).get("Code", ""))
    bucket = split_s3(uri).bucket
    if code == "NoSuchBucket":
        raise StorageError(f"{uri}: bucket '{bucket}' does not exist") from None
    if code in ("NoSuchKey", "404", "NotFound"):
        raise FileNotFoundError(uri) from None
    if code in _EXPIRED or (code in _DENIED and worked):
        raise _Refresh(code) from None
    if code in _DENIED:
        raise StorageError(
            f"{uri}: access denied by S3 ({code}): check the credentials and the "
            f"bucket policy of '{bucket}'"
        ) from None


# ---- reading -------------------------------------------------------------------------


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


def open_read(uri: str, buffer_size: int = 1 << 20) -> io.BufferedReader:
    """A file or object as a buffered binary stream, read as it is consumed (never whole).

    Seekable in both cases. On S3 each read continues one ranged GET from the current
    offset; a connection that breaks mid-body is reopened at that offset (see _S3Reader).
    """
    if is_s3(uri):
        return io.BufferedReader(_S3Reader(uri), buffer_size)
    return open(local_path(uri), "rb", buffering=buffer_size)  # noqa: SIM115 (the caller's)


_READ_RETRIES = 5  # reopenings of one S3 body without progress before giving up
_READ_PIECE = 256 << 10


@functools.cache  # asked at every piece read
def _broken_connection_errors() -> tuple[type[BaseException], ...]:
    """What a body read raises when the connection breaks or stalls mid-way."""
    import urllib3.exceptions
    from botocore import exceptions as bc

    return (
        bc.ResponseStreamingError,  # urllib3's ProtocolError, wrapped by StreamingBody
        bc.IncompleteReadError,  # fewer bytes than Content-Length
        bc.ReadTimeoutError,
        bc.ConnectionClosedError,
        bc.ConnectionError,  # EndpointConnectionError & co. when reopening
        urllib3.exceptions.HTTPError,  # ProtocolError, ReadTimeoutError unwrapped
        ConnectionError,
        TimeoutError,
    )


class _S3Reader(io.RawIOBase):
    """An S3 object as a seekable raw stream: one ranged GET (`bytes=pos-`) read as far
    as the consumer goes, reopened at the current offset when a seek moves it or when the
    connection breaks mid-body (up to _READ_RETRIES times in a row without progress, then a
    TransientStorageError: exit 1, worth a retry).

    Hand-written on purpose: boto3's StreamingBody cannot resume (botocore's retries cover
    the request, not a body that breaks after the headers), s3fs (which can) is not
    installed and would bring aiobotocore beside boto3 for these 60 lines. Every reopening
    carries `If-Match` with the ETag read first, so an object replaced while it is being read
    fails loudly instead of splicing two versions.
    """

    def __init__(self, uri: str):
        super().__init__()
        self.uri = uri
        self._loc = split_s3(uri)
        head = _head(uri)
        self._size = int(head["ContentLength"])
        self._etag = head.get("ETag")
        self._pos = 0
        self._body = None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        if base + offset < 0:
            raise ValueError(f"{self.uri}: negative seek position {base + offset}")
        if base + offset != self._pos:
            self._drop()
        self._pos = base + offset
        return self._pos

    def readinto(self, buffer) -> int:
        if self._pos >= self._size or not len(buffer):
            return 0
        broken = _broken_connection_errors()
        failures = 0
        while True:
            try:
                if self._body is None:
                    self._open()
                # in pieces: a body that breaks loses at most the piece being read
                n = self._body.readinto(memoryview(buffer)[:_READ_PIECE])
                if n == 0:  # the body ended before the object did
                    raise ConnectionError(f"body ended at byte {self._pos} of {self._size}")
            except broken as e:
                self._drop()
                failures += 1
                if failures > _READ_RETRIES:
                    raise TransientStorageError(
                        f"{self.uri}: the connection broke {failures} times at byte "
                        f"{self._pos} ({type(e).__name__}); worth a retry"
                    ) from None

                log.warning(
                    "%s: connection broke at byte %d (%s); resuming there",
                    self.uri,
                    self._pos,
                    type(e).__name__,
                )
                time.sleep(min(0.2 * 2**failures, 5.0))
                continue
            self._pos += n
            return n

    def _open(self) -> None:
        from botocore.exceptions import ClientError

        kwargs = {"Bucket": self._loc.bucket, "Key": self._loc.key, "Range": f"bytes={self._pos}-"}
        if self._etag:
            kwargs["IfMatch"] = self._etag
        try:
            self._body = _s3_call(self.uri, lambda c: c.get_object(**kwargs))["Body"]
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in _CONFLICT[:2]:  # If-Match failed
                raise TransientStorageError(
                    f"{self.uri}: the object changed while it was being read; worth a retry"
                ) from None
            raise

    def _drop(self) -> None:
        if self._body is not None:
            with contextlib.suppress(Exception):  # a broken connection may fail to close
                self._body.close()
            self._body = None

    def close(self) -> None:
        self._drop()
        super().close()


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


def wait_for(uri: str, seconds: float, what: str) -> None:
    """Poll until `uri` exists or `seconds` pass: lets a Job start before its inputs exist."""
    import time

    deadline = time.monotonic() + seconds
    while not exists(uri) and time.monotonic() < deadline:
        log.info("waiting for %s: %s", what, uri)
        time.sleep(min(30.0, max(0.0, deadline - time.monotonic())))


# ---- writing -------------------------------------------------------------------------


# Fenced prefixes: an output held under a lease (job.lease) -> its check. Every write and
# deletion under one calls the check first; a commit (a marker, a deletion) asks the store.
_fences: dict[str, tuple[object, str]] = {}


def _norm(uri: str) -> str:
    uri = str(uri)
    return uri if is_s3(uri) else os.path.abspath(local_path(uri))


def fence(prefix: str, check, exempt: str) -> None:
    """Call `check(commit)` before any write under `prefix` (but `exempt`, the lease file)."""
    _fences[_norm(prefix).rstrip("/") + "/"] = (check, _norm(exempt))


def unfence(prefix: str) -> None:
    _fences.pop(_norm(prefix).rstrip("/") + "/", None)


def fenced(uri: str, commit: bool = True) -> None:
    """Raise LeaseLost if `uri` is under a leased output whose lease this process lost."""
    target = _norm(uri)
    for prefix, (check, exempt) in list(_fences.items()):
        if (target + "/").startswith(prefix) and target != exempt:
            check(commit)


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
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


_CONFLICT = ("PreconditionFailed", "412", "ConditionalRequestConflict", "409")


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
