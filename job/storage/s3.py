"""The S3 client and every call through it: settings from configure(), one cached client,
transient errors retried for storage.retry_seconds, refused credentials refreshed once.

This module is the one home of the client cache and of configure()'s settings: other
modules reach S3 only through `_s3_call` (or `client()`), never through copies of them.
"""

from __future__ import annotations

import functools
import os
import threading
import time

from job.errors import StorageError, TransientStorageError
from job.log import log
from job.storage.uri import split_s3

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

# A conditional request (If-Match / If-None-Match) that another writer got to first.
_CONFLICT = ("PreconditionFailed", "412", "ConditionalRequestConflict", "409")


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
