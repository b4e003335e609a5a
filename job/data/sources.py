"""ELI5 readers: files on local or S3 storage, or a Hugging Face dataset.

Yields one `Record` per question, in a fixed order (sources in config order, files of a
glob sorted, records in file order), with the text the tutorial builds: every configured
field flattened and joined with a space. A malformed record is yielded with `error` set
and `text` None, so the caller can count it; a file that cannot be read at all raises
BadInput naming it.
"""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass

from job import storage
from job.config import DataConfig, SourceConfig
from job.errors import BadInput


@dataclass
class Record:
    origin: str  # "file:line" or "file record N": where to look when it is bad
    text: str | None
    error: str | None = None


def iter_records(cfg: DataConfig) -> Iterator[Record]:
    """The record stream: subreddit filter applied, cut at `max_records`."""
    if not cfg.sources:
        raise BadInput("data.sources: no sources configured")
    wanted = set(cfg.subreddits) if cfg.subreddits else None
    count = 0
    for i, source in enumerate(cfg.sources):
        for origin, raw in _iter_raw(source, f"data.sources[{i}]"):
            if wanted is not None and isinstance(raw, dict) and raw.get("subreddit") not in wanted:
                continue
            if cfg.max_records is not None and count >= cfg.max_records:
                return
            count += 1
            yield to_record(origin, raw, cfg.text_fields)


def to_record(origin: str, raw, text_fields: list[str]) -> Record:
    if isinstance(raw, Exception):
        return Record(origin, None, str(raw))
    if not isinstance(raw, dict):
        return Record(origin, None, f"expected a JSON object, got {type(raw).__name__}")
    pieces: list[str] = []
    for field in text_fields:
        value = _lookup(raw, field)
        if value is None:
            what = "answers" if field.startswith("answers") else f"'{field}'"
            return Record(origin, None, f"record has no {what}")
        values = value if isinstance(value, list) else [value]
        if not all(isinstance(v, str) for v in values):
            return Record(origin, None, f"'{field}' must hold strings")
        pieces.extend(values)
    # The tutorial: tokenizer([" ".join(x) for x in examples["answers.text"]])
    text = " ".join(pieces)
    if not text.strip():
        return Record(origin, None, "empty text")
    return Record(origin, text)


def _lookup(raw: dict, dotted: str):
    node = raw
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    if isinstance(node, list) and not node:
        return None
    return node


def _iter_raw(source: SourceConfig, key: str) -> Iterator[tuple[str, object]]:
    if source.hf:
        yield from _iter_hf(source)
        return
    if not source.uri:
        raise BadInput(f"{key}: give either 'uri' or 'hf'")
    files = storage.expand(source.uri)
    if not files:
        raise BadInput(f"{key}: '{source.uri}' matches no file")
    for uri in files:
        yield from _iter_file(uri)


def _iter_hf(source: SourceConfig) -> Iterator[tuple[str, object]]:
    import datasets

    name = f"hf:{source.hf}" + (f"/{source.hf_config}" if source.hf_config else "")
    try:
        ds = datasets.load_dataset(source.hf, source.hf_config, split=source.split or "train")
    except (FileNotFoundError, ValueError) as e:
        raise BadInput(f"{name}: cannot load split '{source.split}': {e}") from None
    for i, row in enumerate(ds):
        yield f"{name}[{source.split}] record {i}", row


def read_input(uri: str) -> bytes:
    """A file's bytes, gunzipped when gzip; an unreadable file is one BadInput line."""
    try:
        data = storage.read_bytes(uri)
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
        return data
    except (OSError, EOFError) as e:
        raise BadInput(f"{uri}: cannot read: {getattr(e, 'strerror', None) or e}") from None


def _iter_file(uri: str) -> Iterator[tuple[str, object]]:
    name = uri.removesuffix(".gz")
    if name.endswith(".parquet"):
        yield from _iter_parquet(uri)
        return
    data = read_input(uri)
    if data.lstrip()[:1] == b"[":
        yield from _iter_json_array(uri, data)
    else:
        yield from _iter_json_lines(uri, data)


def _iter_json_array(uri: str, data: bytes) -> Iterator[tuple[str, object]]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise BadInput(f"{uri}:{line}: invalid UTF-8 at byte {e.start}") from None
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadInput(f"{uri}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None
    for i, raw in enumerate(records):
        yield f"{uri} record {i}", raw


def _iter_json_lines(uri: str, data: bytes) -> Iterator[tuple[str, object]]:
    for lineno, line in enumerate(io.BytesIO(data), start=1):
        line = line.rstrip(b"\r\n")
        if not line.strip():
            continue
        origin = f"{uri}:{lineno}"
        try:
            yield origin, json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            yield origin, ValueError(f"invalid UTF-8 (column {e.start + 1})")
        except json.JSONDecodeError as e:
            yield origin, ValueError(f"invalid JSON: {e.msg} (column {e.colno})")


def _iter_parquet(uri: str) -> Iterator[tuple[str, object]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(io.BytesIO(read_input(uri)))
    except pa.ArrowInvalid as e:
        raise BadInput(f"{uri}: not a readable Parquet file: {e}") from None
    for i, raw in enumerate(table.to_pylist()):
        yield f"{uri} record {i}", raw
