"""The part protocol: part names, workers' shares, .done markers, owner, gone parts' clean-up."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

from job import env, storage
from job.config import Config
from job.log import log

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")  # kept out of part names (URIs, shells, globs)
_PART = re.compile(r"(part-.+)-lines-(\d+)-(\d+)\.(jsonl|done)")


def part_name(uri: str, line_range: list[int] | None = None) -> str:
    """A part's file name (without .jsonl/.done), from its input: readable from the file's
    name, unique by the URI's hash, then its line range. Without one: the input's stem."""
    base = _UNSAFE.sub("_", uri.rstrip("/").rpartition("/")[2])[:64]
    name = f"part-{base}-{hashlib.sha256(uri.encode()).hexdigest()[:12]}"
    return name if line_range is None else f"{name}-lines-{line_range[0]}-{line_range[1]}"


@dataclass
class Part:
    """One unit of work, and what its .done marker must say for it to count as done."""

    uri: str
    fingerprint: dict
    line_range: list[int]  # first and last line, 1-based: the last part may end sooner

    @property
    def name(self) -> str:
        return part_name(self.uri, self.line_range)

    def key(self) -> dict:
        return {"input": self.uri, "fingerprint": self.fingerprint, "line_range": self.line_range}

    def matches(self, marker: dict | None) -> bool:
        return bool(marker) and all(marker.get(k) == v for k, v in self.key().items())


@dataclass(frozen=True)
class Worker:
    """This process among all workers, and how parts are cut and dealt to them."""

    me: int
    count: int
    lines_per_part: int

    def owns(self, input_index: int, k: int) -> bool:
        return (input_index + k) % self.count == self.me

    def line_range(self, k: int) -> list[int]:
        return [k * self.lines_per_part + 1, (k + 1) * self.lines_per_part]

    def part_index(self, first: int, last: int) -> int | None:
        """Which part a name's line range is, or None if it is not one of this cut's."""
        k, rest = divmod(first - 1, self.lines_per_part)
        return k if rest == 0 and self.line_range(k) == [first, last] else None


def worker_ids(worker_index: int, num_workers: int) -> tuple[int, int]:
    """This process's id among all processes of all pods, and their number."""
    world = env.world_size()
    return worker_index * world + env.rank(), num_workers * world


def found_parts(names: list[str], worker: Worker) -> dict[str, dict[int, list[str]]]:
    """The output's part files of this cut: input stem -> part index -> file names."""
    found: dict[str, dict[int, list[str]]] = {}
    for name in names:
        m = _PART.fullmatch(name)
        k = worker.part_index(int(m[2]), int(m[3])) if m else None
        if k is not None:
            found.setdefault(m[1], {}).setdefault(k, []).append(name)
    return found


def read_marker(uri: str) -> dict | None:
    """A .done marker's content; None when there is none, {} when it is unreadable."""
    try:
        marker = json.loads(storage.read_text(uri))
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError):
        return {}
    return marker if isinstance(marker, dict) else {}


def owner(cfg: Config) -> str:
    """Who a part belongs to: the inference job, named by its configured inputs (patterns,
    so files coming and going under a glob stay the same job's). Recorded in each marker:
    a run deletes only parts whose marker names it, never a user's file or the parts of
    another job writing to the same output."""
    return hashlib.sha256(json.dumps(list(cfg.infer.inputs)).encode()).hexdigest()[:16]


def remove_gone_parts(
    out: str, names: list[str], files: list[str], worker: Worker, me: str
) -> list[str]:
    """Delete this job's parts (marker, then lines) of inputs no longer among its inputs or
    of another cut (`lines_per_part`). Only parts whose marker records this job as their
    owner go: anything else in the output is not ours to delete. Returns the names left."""
    current = {part_name(uri) for uri in files}
    keep = {
        name
        for stem, parts in found_parts(names, worker).items()
        if stem in current
        for files_ in parts.values()
        for name in files_
    }
    gone = []
    for name in names:
        m = _PART.fullmatch(name)
        if m and m[4] == "done" and name not in keep:
            marker = read_marker(storage.join(out, name))
            if marker and marker.get("owner") == me:
                gone += [name, name.removesuffix(".done") + ".jsonl"]
    lines = [storage.join(out, n) for n in gone if n.endswith(".jsonl") and n in names]
    storage.uncommit(*(storage.join(out, n) for n in gone if n.endswith(".done")), *lines)
    if gone:
        log.info("worker 0: removed %d part(s) of inputs gone (or cut otherwise)", len(gone) // 2)
    return [n for n in names if n not in gone]
