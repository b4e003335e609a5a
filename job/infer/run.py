"""One worker's run: its parts of each input in turn, written, skipped or dropped."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from job import jsonio, storage
from job.config import Config
from job.infer.fill_mask import FillMask, fill_windows, load
from job.infer.lines import iter_lines, open_text, raw_lines
from job.infer.parts import Part, Worker, found_parts, owner, part_name, remove_gone_parts
from job.infer.plan import Input, input_files, plan_input
from job.log import bar, log


@dataclass
class Run:
    """One worker's run: what its parts share, and its figures."""

    cfg: Config
    worker: Worker
    progress: object  # a tqdm bar
    stats: dict
    owner: str
    fill: FillMask | None = None
    process_start: float = field(default_factory=time.perf_counter)

    @property
    def out(self) -> str:
        return self.cfg.infer.output

    def model(self) -> FillMask:
        """Loaded at the first part to write: a worker with nothing to do never loads it."""
        if self.fill is None:
            self.fill = load(self.cfg)
            self.stats["precision"] = self.fill.precision
            self.process_start = time.perf_counter()
        return self.fill


def run_worker(cfg: Config, worker: Worker) -> dict:
    """This worker's run, its lease held: worker 0 tidies up, then its parts; its figures."""
    start = time.perf_counter()
    files = input_files(cfg)
    out, me, job = cfg.infer.output, worker.me, owner(cfg)
    names = storage.list_names(out)
    if me == 0:  # one worker tidies up, so that no two delete the same files
        names = remove_gone_parts(out, names, files, worker, job)
    found = found_parts(names, worker)
    inputs = [
        plan_input(out, found.get(part_name(uri), {}), uri, i, worker)
        for i, uri in enumerate(files)
    ]
    skipped = sum(len(src.committed) for src in inputs)
    if skipped:
        log.info("worker %d: %d part(s) already committed, skipping them", me, skipped)
    stats = {"parts": 0, "skipped_parts": skipped, "lines": 0, "errors": 0}
    progress = bar(desc=f"infer (worker {me}/{worker.count})", unit=" lines", total=0)
    run = Run(cfg, worker, progress, stats, job)
    for src in inputs:
        _run_input(run, src)
    progress.close()
    seconds = time.perf_counter() - start
    process_seconds = time.perf_counter() - run.process_start  # after the model is loaded
    stats["seconds"] = round(seconds, 3)
    stats["process_seconds"] = round(process_seconds, 3)
    stats["lines_per_s"] = round(stats["lines"] / max(process_seconds, 1e-9), 1)
    log.info(
        "infer: %d parts written, %d skipped, %d lines (%d errors) in %.1f s, %.1f lines/s -> %s",
        stats["parts"],
        skipped,
        stats["lines"],
        stats["errors"],
        seconds,
        stats["lines_per_s"],
        out,
    )
    return stats


def _run_input(run: Run, src: Input) -> None:
    """This worker's parts of one input; then the files of own parts past its end go."""
    limit = src.parts
    if limit is None or _work_left(src, run.worker, 0, limit):
        limit = _read_input(run, src)
    if limit is not None:
        _drop_parts(run, src, limit)


def _read_input(run: Run, src: Input) -> int | None:
    """Write or skip this worker's parts in turn, reading the other workers' lines and
    discarding them; returns the most parts the file can have, if known. Reading past lines
    (rather than seeking to recorded byte offsets, which gzip does not allow anyway) costs
    little next to the model; a worker stops after its last part in the file."""
    worker = run.worker
    with open_text(src.uri) as (stream, gz):
        limit = src.parts
        if limit is None and not gz:  # each line takes a byte: a small file has few parts
            limit = max(1, -(-src.fingerprint["size"] // worker.lines_per_part))
        k = 0
        while _work_left(src, worker, k, limit):
            if k > 0 and not stream.peek(1):  # the file ends before part k
                return k
            if worker.owns(src.index, k) and k not in src.committed:
                _write_part(run, src, k, stream)
            else:
                for _ in raw_lines(stream, worker.lines_per_part):
                    pass
            k += 1
    return limit


def _work_left(src: Input, worker: Worker, k: int, limit: int | None) -> bool:
    """Has this worker an uncommitted part k or later in the input (limit: parts at most)?"""
    if limit is None:
        return True
    first = k + (worker.me - src.index - k) % worker.count  # its first part from k on
    return any(j not in src.committed for j in range(first, limit, worker.count))


def _write_part(run: Run, src: Input, k: int, stream) -> None:
    """Write part k from the stream's next lines: staged locally as the results come, then
    uploaded whole, then committed by its marker. A part without the marker is redone."""
    part = src.part(run.worker, k)
    fill = run.model()
    if any(name.endswith(".done") for name in src.stale.get(k, [])):
        log.info("%s changed since %s was written: redoing it", src.uri, part.name)
        storage.uncommit(storage.join(run.out, f"{part.name}.done"))  # then rewrite
    staging = run.cfg.cache_dir / "infer-staging"  # node-local, as checkpoints are staged
    out = storage.join(run.out, f"{part.name}.jsonl")
    with storage.staged(out, staging, ".jsonl") as tmp, open(tmp, "w", encoding="utf-8") as f:
        count, errors = _stage_part(run, fill, part, stream, f)
    marker = {
        **part.key(),
        "lines": count,
        "errors": errors,
        "last": not stream.peek(1),
        "owner": run.owner,
    }
    storage.commit(storage.join(run.out, f"{part.name}.done"), jsonio.dumps(marker) + "\n")
    run.stats.update(
        parts=run.stats["parts"] + 1,
        lines=run.stats["lines"] + count,
        errors=run.stats["errors"] + errors,
    )


def _stage_part(run: Run, fill: FillMask, part: Part, stream, f) -> tuple[int, int]:
    """The part's results into f, a window at a time; how many lines, how many bad."""
    cfg, per_part = run.cfg.infer, run.worker.lines_per_part
    run.progress.total += per_part  # known part by part: an ETA for the parts begun
    lines = iter_lines(stream, part.uri, part.line_range[0], per_part, cfg.text_field)
    count = errors = 0
    for results in fill_windows(fill, lines, part.uri, cfg.batch_size, run.progress):
        f.writelines(jsonio.dumps(r, ensure_ascii=False) + "\n" for r in results)
        if run.stats["lines"] + count == 0:
            _preview(results)
        count += len(results)
        errors += sum("error" in r for r in results)
    run.progress.total -= per_part - count
    return count, errors


def _drop_parts(run: Run, src: Input, first: int) -> None:
    """Delete this worker's files of parts `first` and later: the file is shorter now."""
    for k in sorted(k for k in src.stale if k >= first):
        names = src.stale.pop(k)
        markers = [storage.join(run.out, n) for n in names if n.endswith(".done")]
        lines = [storage.join(run.out, n) for n in names if not n.endswith(".done")]
        storage.uncommit(*markers, *lines)
        log.info("%s has no part %d any more: removed its files", src.uri, k)


def _preview(results: list[dict]) -> None:
    """Show the first prediction in the log: a quick check that the model makes sense."""
    first = next((r for r in results if "masks" in r), None)
    if first is None:
        return
    for m, row in enumerate(first["masks"], start=1):
        top = ", ".join(f"{c['token_str'].strip()!r} {c['score']:.3f}" for c in row)
        log.info("%s:%d mask %d: %s", first["file"], first["line"], m, top)
