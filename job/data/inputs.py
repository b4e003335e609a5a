"""What is read, and which version of it.

What is read is fixed first (`resolve_inputs`): every file with its fingerprint (size and
ETag on S3, size and mtime_ns locally), a Hub source with the commit its revision names.
The dataset id is keyed by them; the readers read those files only, each checked before it
is opened and after it is read (a file that changed is one BadInput line), and Hub sources
at that commit, so a dataset holds exactly the versions its id and manifest name.
"""

from __future__ import annotations

from pathlib import Path

from job import storage
from job.config import DataConfig, SourceConfig
from job.data.files import Wants, iter_file
from job.data.hub import hub_commit
from job.errors import BadInput, TransientStorageError


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


def iter_checked(version: dict, wants: Wants, fields: set[str]):
    """A file's records if it is still `version` when opened, checked again once read. A
    change also explains a read that failed (a gzip cut short by a rewrite, a reopened S3
    body refused by If-Match): that failure is then reported as the change."""
    check_unchanged(version)
    try:
        yield from iter_file(version["uri"], storage.open_read, wants, fields)
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
