"""ELI5 readers: files on local or S3 storage (or `hf://` Hub files), or a Hugging Face
dataset through `datasets.load_dataset`.

Yields one `Record` per question, in a fixed order (sources in config order, files of a
glob sorted, records in file order), with the text the tutorial builds: every configured
field flattened and joined with a space. A malformed record is yielded with `error` set
and `text` None, so the caller can count it; a file that cannot be read at all raises
BadInput naming it (and where in it).

Every file is streamed, never read whole (job.data.files: local, S3 and `hf://` files;
job.data.hub: the Hub and `datasets`). What is read is fixed first
(job.data.inputs.resolve_inputs): the files with their fingerprints, Hub sources with their
commits; the dataset id is keyed by them, and a file that changes while it is read is one
BadInput line.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from job.config import DataConfig, SourceConfig
from job.data.files import SKIPPED_RAW, Wants
from job.data.hub import iter_hf, iter_hub_files
from job.data.inputs import check_unchanged, iter_checked, resolve_inputs


@dataclass
class Record:
    origin: str  # "file:line" or "file record N": where to look when it is bad
    text: str | None
    error: str | None = None


# A record the caller said it does not need (iter_records' `keep`): counted, not decoded.
SKIPPED = Record("(skipped)", None)


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
            if raw is SKIPPED_RAW:
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
        yield from iter_hf(source, key, _commit(versions))
        for version in reading:
            check_unchanged(version)
        return
    if source.uri.startswith("hf://"):
        yield from iter_hub_files(source, key, wants, fields, _commit(versions))
        return
    for version in versions:
        reading[:] = [version]
        yield from iter_checked(version, wants, fields)


def _commit(versions: list[dict]) -> str | None:
    return versions[0].get("commit") if versions else None
