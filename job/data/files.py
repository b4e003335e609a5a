"""File readers: one local, S3 or Hub file as a stream of raw records.

Every file is streamed, never read whole: gzip is recognised by its magic bytes and
decompressed as it is read, JSON lines are read line by line, a JSON array one element at
a time, Parquet one row group (in batches) at a time. Memory does not grow with the input.
A file that cannot be read at all raises BadInput naming it (and where in it); a malformed
record is yielded as an exception in its place, for job.data.sources to count.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import shutil
import tempfile
import zlib
from collections.abc import Callable
from contextlib import contextmanager

import ijson

from job import storage
from job.errors import BadInput
from job.log import log

# A record the caller does not need, as the readers yield it (job.data.sources.SKIPPED,
# raw): counted, not decoded.
SKIPPED_RAW = object()

Wants = Callable[[int], bool]  # wants(a): is the record `a` places after the next one needed?


@contextmanager
def open_stream(uri: str, opener=storage.open_read):
    """A file as (its bytes gunzipped as they are read when it is gzip, the raw stream,
    whether it is gzip): never read whole. A file that cannot be opened, or that breaks
    mid-way, is one BadInput line naming it (and where)."""
    try:
        f = opener(uri)
    except OSError as e:  # FileNotFoundError and friends; S3 errors have their own lines
        raise BadInput(f"{uri}: cannot read: {getattr(e, 'strerror', None) or e}") from None
    with f:
        if hasattr(f, "peek"):
            gz = f.peek(2)[:2] == b"\x1f\x8b"
        else:  # an fsspec file: seekable, without peek
            gz = f.read(2) == b"\x1f\x8b"
            f.seek(0)
        yield io.BufferedReader(_Checked(uri, f, gz), 1 << 20), f, gz


def iter_file(uri: str, opener, wants: Wants, fields: set[str]):
    with open_stream(uri, opener) as (data, f, gz):
        if uri.endswith(".gz") and not gz and _empty(f):
            # 0 bytes: no gzip stream in it, so no records either (an empty export, a
            # placeholder); whatever its name says is inside (.parquet.gz too), it is empty.
            log.warning("%s: 0 bytes, not gzip data: counted as an empty source", uri)
            return
        if uri.removesuffix(".gz").endswith(".parquet"):
            yield from _iter_parquet(uri, data if gz else f, wants, fields)
            return
        head = data.peek(1 << 16).lstrip()
        if head[:1] == b"[":
            yield from _iter_json_array(uri, data, wants, gz)
        else:
            yield from _iter_json_lines(uri, data, wants)


def _empty(f) -> bool:
    """Whether a stream just opened has no bytes, without moving it."""
    if hasattr(f, "peek"):
        return not f.peek(1)
    empty = not f.read(1)
    f.seek(0)
    return empty


class _Checked(io.RawIOBase):
    """The decompressed bytes of a stream (gunzipped when `gz`); a read that fails because
    the file is broken (truncated or corrupt gzip, an I/O error) is one BadInput line that
    names the file and the position. Storage errors (S3) keep their own exit codes."""

    def __init__(self, uri: str, f, gz: bool):
        super().__init__()
        self._uri, self._f = uri, f
        self._gz = gzip.GzipFile(fileobj=f, mode="rb") if gz else None
        self._out = 0  # decompressed bytes delivered

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        try:
            n = self._gz.readinto(buffer) if self._gz else self._f.readinto(buffer)
        except EOFError:
            raise BadInput(
                f"{self._uri}: cannot read: truncated gzip: the compressed data ends at byte "
                f"{self._where()} without the end-of-stream marker (after {self._out} "
                "uncompressed bytes)"
            ) from None
        except gzip.BadGzipFile as e:
            raise BadInput(f"{self._uri}: cannot read: {e} (at byte {self._where()})") from None
        except zlib.error as e:
            raise BadInput(
                f"{self._uri}: cannot read: corrupt gzip data ({e}) near byte {self._where()} "
                f"(after {self._out} uncompressed bytes)"
            ) from None
        except OSError as e:
            raise BadInput(
                f"{self._uri}: cannot read: {e.strerror or e} (at byte {self._where()})"
            ) from None
        self._out += n
        return n

    def _where(self) -> int:
        try:
            return self._f.tell()
        except Exception:
            return -1


def _iter_json_lines(uri: str, stream, wants: Wants):
    for lineno, line in enumerate(stream, start=1):
        if not line.strip():
            continue
        if not wants(0):
            yield None, SKIPPED_RAW
            continue
        origin = f"{uri}:{lineno}"
        line = line.rstrip(b"\r\n")
        try:
            yield origin, json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            yield origin, ValueError(f"invalid UTF-8 (column {e.start + 1})")
        except json.JSONDecodeError as e:
            yield origin, ValueError(f"invalid JSON: {e.msg} (column {e.colno})")


def _iter_json_array(uri: str, stream, wants: Wants, gz: bool):
    """The elements of a top-level JSON array, one at a time, parsed by ijson (its C backend
    where installed: ijson picks the fastest one it has). Numbers come as int and float, as
    from json.loads (`use_float`: not Decimal), except that yajl refuses what overflows an
    int64 or a double, which json.loads takes (ELI5 holds neither). ijson cannot step over an
    element unparsed, so the records of other workers are parsed too, then dropped."""
    counted = _Counted(stream)
    records = 0
    try:
        for raw in ijson.items(counted, "item", use_float=True):
            yield (f"{uri} record {records}", raw) if wants(0) else (None, SKIPPED_RAW)
            records += 1
    except (ijson.JSONError, ValueError) as e:  # ValueError: the Python backend's bad UTF-8
        raise BadInput(
            f"{uri}: invalid JSON: {_first_line(e)} ({counted.where(gz)}; after {records} records)"
        ) from None


def _first_line(e: Exception) -> str:
    # yajl's message goes on with a snippet of the text and a caret: noise in one line; and
    # for invalid UTF-8 it comes as bytes
    first = e.args[0] if e.args else None
    message = first.decode("utf-8", "replace") if isinstance(first, bytes) else str(e)
    return (message.strip().splitlines() or [type(e).__name__])[0].rstrip(".")


class _Counted:
    """A byte stream that counts what its reader took. ijson's errors carry no position, but
    one is found while ijson parses the last chunk it read: that range is the position we
    give (the bad bytes may start a little before it, in a token that spans chunks)."""

    def __init__(self, stream):
        self._stream = stream
        self.start, self.end = 0, 0  # the last chunk read: bytes [start, end)

    def read(self, n: int = -1) -> bytes:
        data = self._stream.read(n)
        if n != 0:  # ijson's probe for bytes or text reads 0
            self.start, self.end = self.end, self.end + len(data)
        return data

    def where(self, gz: bool) -> str:
        unit = "uncompressed byte" if gz else "byte"
        if self.start == self.end:
            return f"detected at {unit} {self.end}, the end of the data"
        return f"detected in {unit}s {self.start}-{self.end}"


def _iter_parquet(uri: str, f, wants: Wants, fields: set[str]):
    """Rows one row group at a time, in batches; only the columns the text needs."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with tempfile.TemporaryFile() if not f.seekable() else contextlib.nullcontext() as spill:
        if spill is not None:  # gzip-wrapped Parquet: Parquet needs to seek (footer first)
            shutil.copyfileobj(f, spill, 1 << 20)
            spill.seek(0)
            f = spill
        try:
            pf = pq.ParquetFile(f)
        except (pa.ArrowException, OSError) as e:
            raise BadInput(f"{uri}: not a readable Parquet file: {e}") from None
        columns = [n for n in pf.schema_arrow.names if n in fields]
        i = 0
        for group in range(pf.num_row_groups):
            rows = pf.metadata.row_group(group).num_rows
            if not any(wants(a) for a in range(rows)):  # none needed: not even read
                for _ in range(rows):
                    yield None, SKIPPED_RAW
                i += rows
                continue
            try:
                batches = pf.iter_batches(batch_size=1024, row_groups=[group], columns=columns)
                for batch in batches:
                    decoded = None
                    for r in range(batch.num_rows):
                        if not wants(0):
                            yield None, SKIPPED_RAW
                        else:
                            if decoded is None:
                                decoded = batch.to_pylist() if columns else [{}] * batch.num_rows
                            yield f"{uri} record {i}", decoded[r]
                        i += 1
            except (pa.ArrowException, OSError) as e:
                raise BadInput(
                    f"{uri}: not a readable Parquet file: {e} (row group {group}, record {i})"
                ) from None
