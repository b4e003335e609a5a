"""ELI5 readers: files on local or S3 storage (or `hf://` Hub files), or a Hugging Face
dataset through `datasets.load_dataset`.

Yields one `Record` per question, in a fixed order (sources in config order, files of a
glob sorted, records in file order), with the text the tutorial builds: every configured
field flattened and joined with a space. A malformed record is yielded with `error` set
and `text` None, so the caller can count it; a file that cannot be read at all raises
BadInput naming it (and where in it).

Every file is streamed, never read whole: gzip is recognised by its magic bytes and
decompressed as it is read, JSON lines are read line by line, a JSON array one element at
a time, Parquet one row group (in batches) at a time. Memory does not grow with the input.

What is read is fixed first (`resolve_inputs`): every file with its fingerprint (size and
ETag on S3, size and mtime_ns locally), a Hub source with the commit its revision names.
The dataset id is keyed by them; the readers read those files only, each checked before it
is opened and after it is read (a file that changed is one BadInput line), and Hub sources
at that commit, so a dataset holds exactly the versions its id and manifest name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import io
import json
import re
import shutil
import tempfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import ijson

from job import storage
from job.config import DataConfig, SourceConfig
from job.errors import BadInput, TransientStorageError
from job.log import log


@dataclass
class Record:
    origin: str  # "file:line" or "file record N": where to look when it is bad
    text: str | None
    error: str | None = None


# A record the caller said it does not need (iter_records' `keep`): counted, not decoded.
SKIPPED = Record("(skipped)", None)
_SKIP = object()  # its raw form, from the file readers

Wants = Callable[[int], bool]  # wants(a): is the record `a` places after the next one needed?


def _all(_ahead: int) -> bool:
    return True


def iter_records(
    cfg: DataConfig,
    keep: Callable[[int], bool] | None = None,
    inputs: list[list[dict]] | None = None,
) -> Iterator[Record]:
    """The record stream: subreddit filter applied, cut at `max_records`.

    `keep(j)`, when given, says whether the caller needs record j of the stream. Records it
    does not need are yielded as SKIPPED, in their place, and the readers skip decoding them
    where they can (a JSON line is not parsed; a Parquet row group with no needed row is not
    read). With a subreddit filter every record must be decoded to know whether it counts,
    so `keep` saves nothing then, but the stream is the same.

    `inputs` (resolve_inputs(cfg), resolved now when not given) are the versions to read: a
    file that is not that version any more, before it is opened or once it is read, is a
    BadInput naming it.
    """
    if inputs is None:
        inputs = resolve_inputs(cfg)
    wanted = set(cfg.subreddits) if cfg.subreddits else None
    count = 0
    reading: list[dict] = []  # the versions being read now: checked when the stream is cut

    def wants(ahead: int) -> bool:
        return keep(count + ahead)

    def cut() -> None:
        for version in reading:
            check_unchanged(version)

    lazy = wants if keep is not None and wanted is None else _all
    fields = {f.split(".")[0] for f in cfg.text_fields} | ({"subreddit"} if wanted else set())
    for i, source in enumerate(cfg.sources):
        raws = _iter_raw(source, f"data.sources[{i}]", lazy, fields, inputs[i], reading)
        for origin, raw in raws:
            if raw is _SKIP:
                if cfg.max_records is not None and count >= cfg.max_records:
                    return cut()
                count += 1
                yield SKIPPED
                continue
            if wanted is not None and isinstance(raw, dict) and raw.get("subreddit") not in wanted:
                continue
            if cfg.max_records is not None and count >= cfg.max_records:
                return cut()
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


def _iter_raw(
    source: SourceConfig,
    key: str,
    wants: Wants,
    fields: set[str],
    versions: list[dict],
    reading: list[dict],
):
    if source.hf:
        reading[:] = [v for v in versions if "size" in v]  # local files of a builder or folder
        yield from _iter_hf(source, key, _commit(versions))
        for version in reading:
            check_unchanged(version)
        return
    if source.uri.startswith("hf://"):
        yield from _iter_hub_files(source, key, wants, fields, _commit(versions))
        return
    for version in versions:
        reading[:] = [version]
        yield from _iter_checked(version, wants, fields)


def _commit(versions: list[dict]) -> str | None:
    return versions[0].get("commit") if versions else None


# ---- what is read, and which version of it -----------------------------------------------


def resolve_inputs(cfg: DataConfig) -> list[list[dict]]:
    """Per source, the versions preprocessing reads: each file as `{"uri", "size", "etag"}`
    (S3) or `{"uri", "size", "mtime_ns"}` (local), a Hub dataset or `hf://` source as
    `{"uri", "commit"}` (the commit sha its revision names now). One HEAD (or stat) per
    file; the Hub is asked only when the revision is not a commit sha already."""
    if not cfg.sources:
        raise BadInput("data.sources: no sources configured")
    return [_resolve(source, f"data.sources[{i}]") for i, source in enumerate(cfg.sources)]


def _resolve(source: SourceConfig, key: str) -> list[dict]:
    if source.hf:
        return _resolve_hf(source, key)
    if source.uri.startswith("hf://"):
        return [{"uri": source.uri, "commit": hub_commit(source, key)}]
    if source.revision:
        raise BadInput(f"{key}: 'revision' applies to 'hf' sources and hf:// URIs only")
    files = storage.expand(source.uri)
    if not files:
        raise BadInput(f"{key}: '{source.uri}' matches no file")
    return [version_of(uri) for uri in files]


def version_of(uri: str) -> dict:
    """A file's URI and fingerprint (storage.fingerprint)."""
    try:
        return {"uri": uri, **storage.fingerprint(uri)}
    except FileNotFoundError:  # listed a moment ago
        raise BadInput(
            f"{uri}: cannot read: it was removed while the sources were listed"
        ) from None


def check_unchanged(version: dict) -> None:
    """A BadInput naming the file when it is no longer the version `version` records."""
    uri = version["uri"]
    was = {k: v for k, v in version.items() if k != "uri"}
    try:
        now = storage.fingerprint(uri)
    except FileNotFoundError:
        now = None
    if now == was:
        return
    if now is None:
        change = "removed"
    else:
        keys = sorted(set(was) | set(now))
        change = ", ".join(
            f"{k} {was.get(k)} → {now.get(k)}" for k in keys if was.get(k) != now.get(k)
        )
    raise BadInput(f"{uri} changed while it was being read ({change}); rerun once it is stable")


def _iter_checked(version: dict, wants: Wants, fields: set[str]):
    """A file's records if it is still `version` when opened, checked again once read. A
    change also explains a read that failed (a gzip cut short by a rewrite, a reopened S3
    body refused by If-Match): that failure is then reported as the change."""
    check_unchanged(version)
    try:
        yield from _iter_file(version["uri"], storage.open_read, wants, fields)
    except (BadInput, TransientStorageError):
        check_unchanged(version)
        raise
    check_unchanged(version)


def _resolve_hf(source: SourceConfig, key: str) -> list[dict]:
    """A builder (`json`, `parquet`, ...) reads its `data_files`; a local folder its files;
    anything else is a Hub dataset, read at the commit its revision names now."""
    if source.hf in _builders():
        patterns = source.data_files or []
        if isinstance(patterns, dict):
            patterns = [p for v in patterns.values() for p in ([v] if isinstance(v, str) else v)]
        elif isinstance(patterns, str):
            patterns = [patterns]
        out = []
        for pattern in patterns:
            if "://" in pattern and not pattern.startswith(("s3://", "file://")):
                out.append({"uri": pattern})  # http(s), hf://: no fingerprint to take
            else:  # none matched: load_dataset says so, in its words
                out += [version_of(uri) for uri in storage.expand(pattern)]
        return out
    folder = Path(source.hf).expanduser()
    if folder.is_dir():  # load_dataset ignores hidden files and folders
        files = storage.list_files(str(folder))
        hidden = [any(p.startswith(".") for p in Path(u).relative_to(folder).parts) for u in files]
        return [version_of(uri) for uri, h in zip(files, hidden, strict=True) if not h]
    return [{"uri": f"hf:{source.hf}", "commit": hub_commit(source, key)}]


def _builders() -> set[str]:
    try:
        from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES
    except ImportError:  # no datasets (reading says so), or it moved them
        return {"arrow", "csv", "json", "pandas", "parquet", "text", "webdataset", "xml"}
    return set(_PACKAGED_DATASETS_MODULES)


_SHA = re.compile(r"[0-9a-f]{40}")


def hub_commit(source: SourceConfig, key: str) -> str:
    """The commit sha a Hub source's revision (default: the main branch) names now; the
    revision itself, without asking the Hub, when it is a commit sha already."""
    in_uri = re.search(r"@([0-9a-f]{40})(?:/|$)", source.uri or "")
    for revision in (source.revision, in_uri and in_uri[1]):
        if revision and _SHA.fullmatch(revision):
            return revision
    what = source.uri or _hf_name(source)
    try:
        from huggingface_hub import HfApi, HfFileSystem
    except ImportError:
        raise BadInput(f"{key}: {what}: Hub sources need the huggingface_hub package") from None
    try:
        if source.hf:
            return HfApi().dataset_info(source.hf, revision=source.revision).sha
        path = HfFileSystem().resolve_path(_hub_path(source, key))
        return HfApi().repo_info(path.repo_id, repo_type=path.repo_type, revision=path.revision).sha
    except Exception as e:
        raise BadInput(_hf_failure(key, what, e)) from None


# ---- files -----------------------------------------------------------------------------


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


def _iter_file(uri: str, opener, wants: Wants, fields: set[str]):
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
            yield None, _SKIP
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
            yield (f"{uri} record {records}", raw) if wants(0) else (None, _SKIP)
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
                    yield None, _SKIP
                i += rows
                continue
            try:
                batches = pf.iter_batches(batch_size=1024, row_groups=[group], columns=columns)
                for batch in batches:
                    decoded = None
                    for r in range(batch.num_rows):
                        if not wants(0):
                            yield None, _SKIP
                        else:
                            if decoded is None:
                                decoded = batch.to_pylist() if columns else [{}] * batch.num_rows
                            yield f"{uri} record {i}", decoded[r]
                        i += 1
            except (pa.ArrowException, OSError) as e:
                raise BadInput(
                    f"{uri}: not a readable Parquet file: {e} (row group {group}, record {i})"
                ) from None


# ---- the Hugging Face Hub ----------------------------------------------------------------


def _hub_path(source: SourceConfig, key: str) -> str:
    """An hf:// URI as HfFileSystem's path, with `revision` put after the repository."""
    path = source.uri[len("hf://") :]
    if source.revision and "@" not in path:
        parts = path.split("/")
        if len(parts) < 3:
            raise BadInput(f"{key}: '{source.uri}' is not hf://datasets/OWNER/NAME/PATH")
        parts[2] += "@" + quote(source.revision, safe="")
        path = "/".join(parts)
    return path


def hub_files(source: SourceConfig, key: str, commit: str | None = None):
    """The files an `hf://datasets/OWNER/NAME[@REVISION]/PATH-OR-GLOB` URI names, through
    huggingface_hub's fsspec file system: (the file system, the sorted paths). With
    `commit`, at that commit whatever the revision names now."""
    try:
        from huggingface_hub import HfFileSystem
    except ImportError:
        raise BadInput(
            f"{key}: hf:// URIs need the huggingface_hub package (pip install huggingface_hub)"
        ) from None
    path = _hub_path(source, key)
    fs = HfFileSystem()
    try:
        if commit:
            resolved = fs.resolve_path(path)
            path = dataclasses.replace(resolved, revision=commit, _raw_revision=None).unresolve()
        if any(c in path for c in "*?["):
            files = sorted(fs.glob(path))
        elif fs.isdir(path):
            files = sorted(fs.find(path))
        else:
            files = [path] if fs.exists(path) else []
    except Exception as e:
        raise BadInput(_hf_failure(key, source.uri, e)) from None
    if not files:
        raise BadInput(f"{key}: '{source.uri}' matches no file")
    return fs, files


def _iter_hub_files(
    source: SourceConfig, key: str, wants: Wants, fields: set[str], commit: str | None = None
):
    """Hub files streamed with ranged reads, like S3 objects."""
    fs, files = hub_files(source, key, commit)

    def opener(uri: str):
        try:
            return fs.open(uri[len("hf://") :], "rb", block_size=1 << 20)
        except Exception as e:
            raise BadInput(_hf_failure(key, uri, e)) from None

    for file in files:
        try:
            yield from _iter_file(f"hf://{file}", opener, wants, fields)
        except (OSError, ConnectionError, TimeoutError) as e:  # the network, mid-file
            raise TransientStorageError(f"hf://{file}: reading from the Hub failed: {e}") from None


def _hf_name(source: SourceConfig) -> str:
    return f"hf:{source.hf}" + (f"/{source.hf_config}" if source.hf_config else "")


def _iter_hf(
    source: SourceConfig, key: str, commit: str | None = None
) -> Iterator[tuple[str, object]]:
    """A `datasets.load_dataset` split, row by row; a Hub dataset at `commit` when given."""
    name = _hf_name(source)
    try:
        import datasets
    except ImportError:
        raise BadInput(f"{key}: 'hf' sources need the datasets package") from None
    kwargs = {}
    if commit or source.revision is not None:
        kwargs["revision"] = commit or source.revision
    if source.data_files is not None:
        kwargs["data_files"] = source.data_files
    if source.streaming:
        kwargs["streaming"] = True
    split = source.split or "train"
    what = f"{name} split '{split}'"
    try:
        ds = datasets.load_dataset(source.hf, source.hf_config, split=split, **kwargs)
    except Exception as e:  # load_dataset fails in many ways; each is one line
        raise BadInput(_hf_failure(key, what, e)) from None
    rows = iter(ds)
    i = 0
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except Exception as e:  # a streaming dataset reads as it goes
            if _is_network(e):
                raise TransientStorageError(f"{key}: {what}: reading failed: {e}") from None
            raise BadInput(_hf_failure(key, what, e)) from None
        yield f"{name}[{source.split}] record {i}", row
        i += 1


_NETWORK_ERRORS = {
    "ConnectionError",
    "TimeoutError",
    "LocalEntryNotFoundError",
    "OfflineModeIsEnabled",
    "ConnectError",
    "ReadTimeout",
    "ConnectTimeout",
    "RemoteProtocolError",
}


def _is_network(e: BaseException) -> bool:
    return any(c.__name__ in _NETWORK_ERRORS for c in type(e).__mro__)


def _hf_failure(key: str, what: str, e: BaseException) -> str:
    """One line: the source, what failed, and what to do about it."""
    message = (str(e).strip().splitlines() or [""])[0][:300]
    kind = type(e).__name__
    if "Dataset scripts are no longer supported" in message:
        return (
            f"{key}: {what}: it is a script-based dataset ({message}), which datasets >= 4 "
            "cannot load; use its Parquet export with `revision: refs/convert/parquet` (and "
            "`hf_config: default` or the config's name), or point `data_files` at its data "
            "files, or mirror the files to storage and list them as `uri:`"
        )
    if kind in ("DatasetNotFoundError", "RepositoryNotFoundError", "RevisionNotFoundError") or (
        "doesn't exist on the Hub" in message
    ):
        return (
            f"{key}: {what}: not found ({message}); check the name, and set HF_TOKEN for a "
            "gated or private dataset"
        )
    if "Unknown split" in message or "Bad split" in message:
        return f"{key}: {what}: no such split ({message}); set `split:` to one of them"
    if kind in ("DataFilesNotFoundError", "FileNotFoundError", "EmptyDatasetError") or (
        isinstance(e, StopIteration)
    ):
        return (
            f"{key}: {what}: no data files found{f' ({message})' if message else ''}; check "
            "`data_files` (paths or globs, relative to the dataset's repository or folder)"
        )
    if _is_network(e) or "Couldn't reach" in message:
        return (
            f"{key}: {what}: the Hub cannot be reached ({message}); check the network, "
            "HF_ENDPOINT and HF_HUB_OFFLINE, or mirror the files to storage and list them "
            "as `uri:`"
        )
    return f"{key}: {what}: cannot load: {kind}: {message}"
