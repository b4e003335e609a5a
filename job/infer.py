"""`mlmjob infer`: batch fill-mask over text files, streamed, sharded and restartable.

A file is read as a stream (S3 ranged reads; gzip, recognised by its magic bytes,
decompressed as it is read) and cut into parts of L = `infer.lines_per_part` lines: part k
holds lines kL+1..(k+1)L (the last one fewer; part 0 exists even for an empty file). A part
is named by its input and line range, never by the input's place in the list (which shifts
when inputs come and go): `{infer.output}/part-<name>-<sha256(URI)[:12]>-lines-<first>-<last>`
`.jsonl`. Its lines are predicted a window at a time and written to a local staging file as
they come, so memory grows neither with the part nor with the file; the finished file is
uploaded, then its `.done` marker commits it, recording the input's URI, fingerprint (size +
ETag on S3, size + mtime locally) and line range. A rerun skips a part only when its marker
matches the input as it is now, so a changed file is redone and a new one done; worker 0
deletes the parts of inputs that are gone (and those of another `lines_per_part`). No line
is lost or written twice.

Part k of input i (inputs sorted) goes to worker (i + k) mod W, where the W workers are
every process of every pod (`--worker-index` x torchrun's ranks): a big file's parts go
round all the workers, and files of one part each are dealt round-robin as whole files.

Output: one JSON line per input line, in input order:
    {"file": ..., "line": N, "masks": [[{"score", "token", "token_str", "sequence"}, ...], ...]}
`masks` holds, per <mask> in the line, what `pipeline("fill-mask")` returns for it (the
pipeline itself returns a bare list when the line has one mask). A bad line gets
{"file", "line", "error"} instead.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import count as forever
from itertools import islice
from pathlib import Path

import numpy as np

from job import env, jsonio, lease, storage
from job.config import Config
from job.data.sources import open_stream
from job.errors import BadInput
from job.log import bar, log
from job.pretrained import load_pretrained
from job.train.model import encoder_and_head

MASK = "<mask>"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")  # kept out of part names (URIs, shells, globs)
_PART = re.compile(r"(part-.+)-lines-(\d+)-(\d+)\.(jsonl|done)")
_MAX_LINE = 1 << 20  # bytes: a longer line is flagged and read past, never held whole
# Lines are sorted by length within a window of this many batches (little padding), and a
# window's results are written before the next is read: memory is bounded by the window.
_WINDOW_BATCHES = 32


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


@dataclass
class Input:
    """One input file as this worker found it at the start."""

    uri: str
    index: int  # in the sorted inputs: which worker gets which part
    fingerprint: dict  # taken before the file is read (see _plan_input)
    committed: set[int] = field(default_factory=set)  # own parts done for this version
    stale: dict[int, list[str]] = field(default_factory=dict)  # own parts' files that are not
    parts: int | None = None  # the file's number of parts, once a committed marker says it

    def part(self, worker: Worker, k: int) -> Part:
        return Part(self.uri, self.fingerprint, worker.line_range(k))


@dataclass
class Line:
    number: int
    text: str | None
    error: str | None = None


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


# ---- reading ---------------------------------------------------------------------------


@contextmanager
def open_text(uri: str) -> Iterator[tuple[io.BufferedReader, bool]]:
    """A file's bytes as a stream, gunzipped as read when gzip, and whether it was gzip."""
    with open_stream(uri) as (data, _, gz):
        yield data, gz


def _raw_lines(stream: io.BufferedReader, count: int | None) -> Iterator[bytes | None]:
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
    for n, raw in enumerate(_raw_lines(stream, count), start=first):
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


class FillMask:
    """Batched fill-mask giving what pipeline("fill-mask") gives, line for line."""

    def __init__(
        self, model_uri: str, cache_dir: Path, top_k: int, device: str, precision: str = "auto"
    ):
        import torch
        from transformers import AutoModelForMaskedLM, AutoTokenizer

        cache = cache_dir / "models"
        self.tok = load_pretrained(AutoTokenizer, model_uri, cache, "infer.model")
        model = load_pretrained(
            AutoModelForMaskedLM, model_uri, cache, "infer.model", attn_implementation="sdpa"
        )
        if self.tok.mask_token is None:
            raise BadInput(f"infer.model: '{model_uri}' has a tokenizer without a mask token")
        vocab = model.config.vocab_size  # the candidates top-k is taken from
        if top_k > vocab:
            raise BadInput(
                f"infer.top_k: {top_k} is more than the vocabulary of '{model_uri}' "
                f"({vocab:,} tokens)"
            )
        self.device = torch.device(device)
        # fp32 is what equals pipeline("fill-mask"); bf16 is the fast choice on a GPU
        auto = "bf16" if self.device.type == "cuda" else "fp32"
        self.precision = auto if precision == "auto" else precision
        self.dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
        self.model = model.to(self.device, self.dtype).eval()
        self.parts = encoder_and_head(model)
        self.top_k = top_k
        limit = getattr(model.config, "max_position_embeddings", 512)
        if model.config.model_type in ("roberta", "xlm-roberta", "camembert"):
            limit -= 2  # positions start after the padding index
        self.max_len = min(limit, self.tok.model_max_length)
        self.token_str: dict[int, str] = {}

    def encode(self, lines: list[Line]) -> list[list[int] | None]:
        """Token ids per line (None for a bad one, whose `error` is then set)."""
        texts = [ln.text.replace(MASK, self.tok.mask_token) for ln in lines if ln.text is not None]
        encoded = iter(self.tok(texts, add_special_tokens=True)["input_ids"]) if texts else iter([])
        out = []
        for ln in lines:
            if ln.text is None:
                out.append(None)
                continue
            ids = next(encoded)
            if not ln.text.strip():
                ln.error = "empty line"
            elif self.tok.mask_token_id not in ids:
                ln.error = f"no {MASK} in the line"
            elif len(ids) > self.max_len:
                ln.error = f"{len(ids)} tokens, the model takes at most {self.max_len}"
            out.append(None if ln.error else ids)
        return out

    def predict(self, batch: list[list[int]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Top-k (probabilities, token ids) per mask, for each sequence of a batch."""
        import torch

        width = max(map(len, batch))
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        attn = torch.zeros((len(batch), width), dtype=torch.long)
        for i, seq in enumerate(batch):
            ids[i, : len(seq)] = torch.tensor(seq)
            attn[i, : len(seq)] = 1
        ids, attn = ids.to(self.device), attn.to(self.device)
        masked = (ids == self.tok.mask_token_id) & attn.bool()
        with torch.inference_mode():
            if self.parts:  # the vocabulary projection at mask positions only
                encoder, head = self.parts
                hidden = encoder(input_ids=ids, attention_mask=attn).last_hidden_state
                logits = head(hidden[masked])
            else:
                logits = self.model(input_ids=ids, attention_mask=attn).logits[masked]
            values, tokens = logits.float().softmax(-1).topk(self.top_k)
        counts = masked.sum(1).tolist()
        values, tokens = values.cpu().numpy(), tokens.cpu().numpy()
        out, start = [], 0
        for c in counts:
            out.append((values[start : start + c], tokens[start : start + c]))
            start += c
        return out

    def describe(self, ids: list[int], values: np.ndarray, tokens: np.ndarray) -> list[list[dict]]:
        """The pipeline's postprocess: candidates with score, token, token_str, sequence."""
        positions = [i for i, t in enumerate(ids) if t == self.tok.mask_token_id]
        single = len(positions) == 1
        sequences, rows = [], []
        for m, pos in enumerate(positions):
            for p in tokens[m].tolist():
                seq = list(ids)
                seq[pos] = p
                sequences.append([t for t in seq if t != self.tok.pad_token_id])
        decoded = iter(self.tok.batch_decode(sequences, skip_special_tokens=single))
        for m in range(len(positions)):
            row = []
            for v, p in zip(values[m].tolist(), tokens[m].tolist(), strict=True):
                if p not in self.token_str:
                    self.token_str[p] = self.tok.decode([p])
                row.append(
                    {
                        "score": v,
                        "token": p,
                        "token_str": self.token_str[p],
                        "sequence": next(decoded),
                    }
                )
            rows.append(row)
        return rows


def fill_windows(fill: FillMask, lines: Iterable[Line], uri: str, batch_size: int, progress):
    """Results a window of lines at a time, in input order, one record per line."""
    lines = iter(lines)
    while window := list(islice(lines, batch_size * _WINDOW_BATCHES)):
        yield _fill_window(fill, window, uri, batch_size, progress)


def _fill_window(fill: FillMask, lines: list[Line], uri: str, bs: int, progress) -> list[dict]:
    ids = fill.encode(lines)
    results: list[dict | None] = [None] * len(lines)
    good = [i for i, x in enumerate(ids) if x is not None]
    good.sort(key=lambda i: len(ids[i]))  # similar lengths together: little padding
    for start in range(0, len(good), bs):
        chunk = good[start : start + bs]
        for i, (values, tokens) in zip(chunk, fill.predict([ids[i] for i in chunk]), strict=True):
            results[i] = {
                "file": uri,
                "line": lines[i].number,
                "masks": fill.describe(ids[i], values, tokens),
            }
        progress.update(len(chunk))
    for i, ln in enumerate(lines):
        if results[i] is None:
            results[i] = {"file": uri, "line": ln.number, "error": ln.error}
            progress.update(1)
    return results


def run_part(fill: FillMask, uri: str, cfg: Config, progress) -> tuple[list[dict], int]:
    """A whole small file's results in memory, by the job's code (bench/gpu.py)."""
    lines = read_lines(uri, cfg.infer.text_field)
    windows = fill_windows(fill, lines, uri, cfg.infer.batch_size, progress)
    results = [r for window in windows for r in window]
    return results, sum("error" in r for r in results)


def _workers(worker_index: int, num_workers: int) -> tuple[int, int]:
    """This process's id among all processes of all pods, and their number."""
    world = env.world_size()
    return worker_index * world + env.rank(), num_workers * world


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
            self.fill = _load(self.cfg)
            self.stats["precision"] = self.fill.precision
            self.process_start = time.perf_counter()
        return self.fill


def infer(cfg: Config, worker_index: int = 0, num_workers: int = 1) -> dict:
    """This worker's parts, under its lease on the output: workers of one job write
    disjoint parts side by side, but no two processes ever act as the same worker."""
    worker = Worker(*_workers(worker_index, num_workers), cfg.infer.lines_per_part)
    run = cfg.run
    what, name = f"infer.output, worker {worker.me}", f"_lease-worker-{worker.me}.json"
    with lease.hold(cfg.infer.output, run.lease_wait_seconds, run.lease_ttl_seconds, what, name):
        return _infer(cfg, worker)


def _infer(cfg: Config, worker: Worker) -> dict:
    start = time.perf_counter()
    files = input_files(cfg)
    out, me, job = cfg.infer.output, worker.me, owner(cfg)
    names = storage.list_names(out)
    if me == 0:  # one worker tidies up, so that no two delete the same files
        names = _remove_gone_parts(out, names, files, worker, job)
    found = _found_parts(names, worker)
    inputs = [
        _plan_input(out, found.get(part_name(uri), {}), uri, i, worker)
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


def _load(cfg: Config) -> FillMask:
    import torch

    device = f"cuda:{env.local_rank()}" if torch.cuda.is_available() else "cpu"
    model = cfg.infer.model
    if model is None:  # the training run's model: complete once summary.json exists
        model = storage.join(cfg.run.output, "model")
        summary = storage.join(cfg.run.output, "summary.json")
        storage.wait_for(summary, env.wait_seconds(), "the model")
    fill = FillMask(model, cfg.cache_dir, cfg.infer.top_k, device, cfg.infer.precision)
    log.info("infer: model %s on %s, precision %s", model, device, fill.precision)
    return fill


def _found_parts(names: list[str], worker: Worker) -> dict[str, dict[int, list[str]]]:
    """The output's part files of this cut: input stem -> part index -> file names."""
    found: dict[str, dict[int, list[str]]] = {}
    for name in names:
        m = _PART.fullmatch(name)
        k = worker.part_index(int(m[2]), int(m[3])) if m else None
        if k is not None:
            found.setdefault(m[1], {}).setdefault(k, []).append(name)
    return found


def _plan_input(
    out: str, have: dict[int, list[str]], uri: str, index: int, worker: Worker
) -> Input:
    """Which of this input's own parts are committed for the file as it is now, which have
    files that are not, and (from its last committed part's marker) how many parts it has.
    The fingerprint is taken before the input is read: a file that changes while being read
    gets markers that no longer match it, so the next run redoes it."""
    src = Input(uri, index, storage.fingerprint(uri))
    done = sorted(k for k, files in have.items() if any(f.endswith(".done") for f in files))
    # its own parts' markers, and the highest one: whether the file ends there
    wanted = {k for k in done if worker.owns(index, k)} | set(done[-1:])
    markers = {
        k: _read_marker(storage.join(out, f"{src.part(worker, k).name}.done")) for k in wanted
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
                for _ in _raw_lines(stream, worker.lines_per_part):
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


def _read_marker(uri: str) -> dict | None:
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


def _remove_gone_parts(
    out: str, names: list[str], files: list[str], worker: Worker, me: str
) -> list[str]:
    """Delete this job's parts (marker, then lines) of inputs no longer among its inputs or
    of another cut (`lines_per_part`). Only parts whose marker records this job as their
    owner go: anything else in the output is not ours to delete. Returns the names left."""
    current = {part_name(uri) for uri in files}
    keep = {
        name
        for stem, parts in _found_parts(names, worker).items()
        if stem in current
        for files_ in parts.values()
        for name in files_
    }
    gone = []
    for name in names:
        m = _PART.fullmatch(name)
        if m and m[4] == "done" and name not in keep:
            marker = _read_marker(storage.join(out, name))
            if marker and marker.get("owner") == me:
                gone += [name, name.removesuffix(".done") + ".jsonl"]
    lines = [storage.join(out, n) for n in gone if n.endswith(".jsonl") and n in names]
    storage.uncommit(*(storage.join(out, n) for n in gone if n.endswith(".done")), *lines)
    if gone:
        log.info("worker 0: removed %d part(s) of inputs gone (or cut otherwise)", len(gone) // 2)
    return [n for n in names if n not in gone]


def _preview(results: list[dict]) -> None:
    """Show the first prediction in the log: a quick check that the model makes sense."""
    first = next((r for r in results if "masks" in r), None)
    if first is None:
        return
    for m, row in enumerate(first["masks"], start=1):
        top = ", ".join(f"{c['token_str'].strip()!r} {c['score']:.3f}" for c in row)
        log.info("%s:%d mask %d: %s", first["file"], first["line"], m, top)
