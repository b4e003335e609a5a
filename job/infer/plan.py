"""Planning a worker's run: its inputs, and which of its parts each has committed."""

from __future__ import annotations

from dataclasses import dataclass, field

from job import storage
from job.config import Config
from job.errors import BadInput
from job.infer.parts import Part, Worker, read_marker


@dataclass
class Input:
    """One input file as this worker found it at the start."""

    uri: str
    index: int  # in the sorted inputs: which worker gets which part
    fingerprint: dict  # taken before the file is read (see plan_input)
    committed: set[int] = field(default_factory=set)  # own parts done for this version
    stale: dict[int, list[str]] = field(default_factory=dict)  # own parts' files that are not
    parts: int | None = None  # the file's number of parts, once a committed marker says it

    def part(self, worker: Worker, k: int) -> Part:
        return Part(self.uri, self.fingerprint, worker.line_range(k))


def input_files(cfg: Config) -> list[str]:
    files = []
    for i, pattern in enumerate(cfg.infer.inputs):
        found = storage.expand(pattern)
        if not found:
            raise BadInput(f"infer.inputs[{i}]: '{pattern}' matches no file")
        files += found
    if not files:
        raise BadInput("infer.inputs: no inputs configured")
    return list(dict.fromkeys(files))  # a file two patterns name is still one part


def plan_input(out: str, have: dict[int, list[str]], uri: str, index: int, worker: Worker) -> Input:
    """Which of this input's own parts are committed for the file as it is now, which have
    files that are not, and (from its last committed part's marker) how many parts it has.
    The fingerprint is taken before the input is read: a file that changes while being read
    gets markers that no longer match it, so the next run redoes it."""
    src = Input(uri, index, storage.fingerprint(uri))
    done = sorted(k for k, files in have.items() if any(f.endswith(".done") for f in files))
    # its own parts' markers, and the highest one: whether the file ends there
    wanted = {k for k in done if worker.owns(index, k)} | set(done[-1:])
    markers = {
        k: read_marker(storage.join(out, f"{src.part(worker, k).name}.done")) for k in wanted
    }
    for k, files in have.items():
        if not worker.owns(index, k):
            continue
        if src.part(worker, k).matches(markers.get(k)):
            src.committed.add(k)
        else:
            src.stale[k] = files
    top = done[-1] if done else None
    if top is not None and src.part(worker, top).matches(markers[top]) and markers[top]["last"]:
        src.parts = top + 1
    return src
