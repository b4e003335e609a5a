"""Input lines: a file read as a text stream, cut into lines, each decoded or flagged bad."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import count as forever

from job.data.files import open_stream

_MAX_LINE = 1 << 20  # bytes: a longer line is flagged and read past, never held whole


@dataclass
class Line:
    number: int
    text: str | None
    error: str | None = None


@contextmanager
def open_text(uri: str) -> Iterator[tuple[io.BufferedReader, bool]]:
    """A file's bytes as a stream, gunzipped as read when gzip, and whether it was gzip."""
    with open_stream(uri) as (data, _, gz):
        yield data, gz


def raw_lines(stream: io.BufferedReader, count: int | None) -> Iterator[bytes | None]:
    """The next `count` lines (all when None) without their line ends; None for a line
    over _MAX_LINE bytes. The newline that ends the file starts no line."""
    for _ in range(count) if count is not None else forever():
        raw = stream.readline(_MAX_LINE + 1)
        if not raw:
            return
        if len(raw) > _MAX_LINE and not raw.endswith(b"\n"):
            while raw and not raw.endswith(b"\n"):  # the rest of it, a piece at a time
                raw = stream.readline(_MAX_LINE)
            yield None
            continue
        yield raw.removesuffix(b"\n").rstrip(b"\r")


def iter_lines(stream, uri: str, first: int, count: int | None, text_field: str):
    """Lines of a .txt or .jsonl stream (numbered from `first`), bad ones flagged."""
    jsonl = uri.removesuffix(".gz").endswith((".jsonl", ".json"))
    for n, raw in enumerate(raw_lines(stream, count), start=first):
        yield _decode(n, raw, jsonl, text_field)


def _decode(n: int, raw: bytes | None, jsonl: bool, text_field: str) -> Line:
    if raw is None:
        return Line(n, None, f"longer than {_MAX_LINE >> 20} MiB")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return Line(n, None, f"invalid UTF-8 at column {e.start + 1}")
    if jsonl:
        try:
            record = json.loads(text)
            text = record[text_field]
            if not isinstance(text, str):
                raise TypeError
        except (json.JSONDecodeError, KeyError, TypeError):
            return Line(n, None, f"not a JSON object with a string '{text_field}'")
    return Line(n, text)


def read_lines(uri: str, text_field: str) -> list[Line]:
    """Every line of a small file, in memory (bench/gpu.py); the job streams its parts."""
    with open_text(uri) as (stream, _):
        return list(iter_lines(stream, uri, 1, None, text_field))
