"""One interface to local folders and S3 (or any S3-compatible store).

URIs are plain paths, `file://` paths or `s3://bucket/key`. Writes are atomic: a local
file is written beside its target and renamed; an S3 object appears whole when its PUT
(or multipart upload) completes. Credentials come only from boto3's standard chain
(environment, shared config, web identity / pod identity); transient S3 errors are
retried by botocore's "standard" mode with exponential backoff and jitter.
"""

from __future__ import annotations

import fnmatch
import glob as globlib
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from job.errors import StorageError

_settings = {"endpoint_url": None, "region": None}
_client = None

_DENIED = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "403",
}


def configure(endpoint_url: str | None = None, region: str | None = None) -> None:
    """Set the S3 endpoint and region (config values win over the environment)."""
    global _client
    _settings["endpoint_url"] = endpoint_url
    _settings["region"] = region
    _client = None


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
                retries={"max_attempts": 8, "mode": "standard"},
                connect_timeout=10,
                read_timeout=120,
                s3={"addressing_style": "path" if endpoint else "auto"},
            ),
        )
    return _client


def _s3_call(uri: str, fn, *args, **kwargs):
    """Run one boto3 call, turning errors retrying cannot fix into one clear line."""
    from botocore.exceptions import ClientError, NoCredentialsError

    try:
        return fn(*args, **kwargs)
    except NoCredentialsError:
        raise StorageError(
            f"{uri}: no S3 credentials found (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
            "AWS_PROFILE, or give the pod an IAM identity)"
        ) from None
    except ClientError as e:
        code = str(e.response.get("Error", {}).get("Code", ""))
        bucket = split_s3(uri).bucket
        if code == "NoSuchBucket":
            raise StorageError(f"{uri}: bucket '{bucket}' does not exist") from None
        if code in ("NoSuchKey", "404", "NotFound"):
            raise FileNotFoundError(uri) from None
        if code in _DENIED:
            raise StorageError(
                f"{uri}: access denied by S3 ({code}): check the credentials and the "
                f"bucket policy of '{bucket}'"
            ) from None
        raise


# ---- reading -------------------------------------------------------------------------


def read_bytes(uri: str) -> bytes:
    if is_s3(uri):
        loc = split_s3(uri)
        resp = _s3_call(uri, client().get_object, Bucket=loc.bucket, Key=loc.key)
        return resp["Body"].read()
    return local_path(uri).read_bytes()


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def read_range(uri: str, start: int, length: int) -> bytes:
    """Bytes [start, start+length) of an object."""
    if is_s3(uri):
        loc = split_s3(uri)
        rng = f"bytes={start}-{start + length - 1}"
        resp = _s3_call(uri, client().get_object, Bucket=loc.bucket, Key=loc.key, Range=rng)
        return resp["Body"].read()
    with open(local_path(uri), "rb") as f:
        f.seek(start)
        return f.read(length)


def exists(uri: str) -> bool:
    if is_s3(uri):
        loc = split_s3(uri)
        try:
            _s3_call(uri, client().head_object, Bucket=loc.bucket, Key=loc.key)
            return True
        except FileNotFoundError:
            return False
    return local_path(uri).is_file()


def size(uri: str) -> int:
    if is_s3(uri):
        loc = split_s3(uri)
        return _s3_call(uri, client().head_object, Bucket=loc.bucket, Key=loc.key)["ContentLength"]
    return local_path(uri).stat().st_size


def list_files(prefix: str) -> list[str]:
    """Every file under a folder URI, recursively, sorted."""
    if is_s3(prefix):
        loc = split_s3(prefix)
        key = loc.key.rstrip("/") + "/" if loc.key else ""
        out = []
        paginator = client().get_paginator("list_objects_v2")
        pages = _s3_call(prefix, lambda: list(paginator.paginate(Bucket=loc.bucket, Prefix=key)))
        for page in pages:
            out += [f"s3://{loc.bucket}/{o['Key']}" for o in page.get("Contents", [])]
        return sorted(out)
    root = local_path(prefix)
    if not root.is_dir():
        return []
    return sorted(str(p) for p in root.rglob("*") if p.is_file())


def expand(pattern: str) -> list[str]:
    """A URI or glob to the sorted list of files it names (a folder names its files)."""
    if not any(c in pattern for c in "*?["):
        if is_s3(pattern):
            return [pattern] if exists(pattern) else list_files(pattern)
        p = local_path(pattern)
        return list_files(pattern) if p.is_dir() else ([str(p)] if p.exists() else [])
    if is_s3(pattern):
        loc = split_s3(pattern)
        fixed = loc.key[: min(loc.key.find(c) for c in "*?[" if c in loc.key)]
        folder = fixed.rsplit("/", 1)[0] if "/" in fixed else ""
        base = f"s3://{loc.bucket}/{folder}"
        return [u for u in list_files(base) if fnmatch.fnmatchcase(u, pattern)]
    return sorted(globlib.glob(str(local_path(pattern)), recursive=True))


def wait_for(uri: str, seconds: float, what: str) -> None:
    """Poll until `uri` exists or `seconds` pass: lets a Job start before its inputs exist."""
    import time

    from job.log import log

    deadline = time.monotonic() + seconds
    while not exists(uri) and time.monotonic() < deadline:
        log.info("waiting for %s: %s", what, uri)
        time.sleep(min(30.0, max(0.0, deadline - time.monotonic())))


# ---- writing -------------------------------------------------------------------------


def write_bytes(uri: str, data: bytes) -> None:
    """Atomic: readers see the old object or the whole new one, never a part."""
    if is_s3(uri):
        loc = split_s3(uri)
        _s3_call(uri, client().put_object, Bucket=loc.bucket, Key=loc.key, Body=data)
        return
    path = local_path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def upload_file(local: str | Path, uri: str) -> None:
    """Copy a local file to a URI atomically (multipart for large files on S3)."""
    if is_s3(uri):
        loc = split_s3(uri)
        _s3_call(uri, client().upload_file, str(local), loc.bucket, loc.key)
        return
    path = local_path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        shutil.copyfile(local, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def download_file(uri: str, local: str | Path) -> None:
    """Copy a URI to a local file atomically."""
    local = Path(local)
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(f".{local.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        if is_s3(uri):
            loc = split_s3(uri)
            _s3_call(uri, client().download_file, loc.bucket, loc.key, str(tmp))
        else:
            shutil.copyfile(local_path(uri), tmp)
        os.replace(tmp, local)
    finally:
        tmp.unlink(missing_ok=True)


def upload_dir(local_dir: str | Path, uri: str) -> None:
    local_dir = Path(local_dir)
    for p in sorted(local_dir.rglob("*")):
        if p.is_file():
            upload_file(p, join(uri, p.relative_to(local_dir).as_posix()))


def download_dir(uri: str, local_dir: str | Path) -> None:
    prefix = uri.rstrip("/") + "/"
    for file_uri in list_files(uri):
        download_file(file_uri, Path(local_dir) / file_uri[len(prefix) :])


def delete(uri: str) -> None:
    if is_s3(uri):
        loc = split_s3(uri)
        _s3_call(uri, client().delete_object, Bucket=loc.bucket, Key=loc.key)
    else:
        local_path(uri).unlink(missing_ok=True)


def delete_prefix(uri: str) -> None:
    """Remove a folder and everything under it."""
    if is_s3(uri):
        for file_uri in list_files(uri):
            delete(file_uri)
    else:
        shutil.rmtree(local_path(uri), ignore_errors=True)


def to_local(uri: str, cache_dir: str | Path) -> str:
    """A local path for a file or folder URI: S3 content is downloaded into cache_dir."""
    if not is_s3(uri):
        return str(local_path(uri))
    loc = split_s3(uri)
    dest = Path(cache_dir) / loc.bucket / loc.key.rstrip("/")
    if exists(uri):
        download_file(uri, dest)
    else:
        files = list_files(uri)
        if not files:
            raise FileNotFoundError(uri)
        download_dir(uri, dest)
    return str(dest)
