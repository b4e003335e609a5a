"""Reading a file or object as a stream, never whole: on S3 a ranged GET that resumes
where a broken connection left it."""

from __future__ import annotations

import contextlib
import io
import time

from job.errors import TransientStorageError
from job.log import log
from job.storage.read import _head
from job.storage.s3 import _CONFLICT, _broken_connection_errors, _s3_call
from job.storage.uri import is_s3, local_path, split_s3


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
