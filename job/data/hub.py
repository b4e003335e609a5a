"""Hugging Face readers: `hf://` Hub files through huggingface_hub's fsspec file system,
and `datasets.load_dataset` splits; the commit a Hub source's revision names; and every
Hub or datasets failure as one line saying what to do about it.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from urllib.parse import quote

from job.config import SourceConfig
from job.data.files import Wants, iter_file
from job.errors import BadInput, TransientStorageError

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


def iter_hub_files(
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
            yield from iter_file(f"hf://{file}", opener, wants, fields)
        except (OSError, ConnectionError, TimeoutError) as e:  # the network, mid-file
            raise TransientStorageError(f"hf://{file}: reading from the Hub failed: {e}") from None


def _hf_name(source: SourceConfig) -> str:
    return f"hf:{source.hf}" + (f"/{source.hf_config}" if source.hf_config else "")


def iter_hf(
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
