"""`mlmjob infer`: batch fill-mask over text files, sharded and restartable.

Each input file is one part, named by its input, never by its place in the input list
(which shifts when inputs come and go): `{infer.output}/part-<name>-<sha256(URI)[:12]>.jsonl`
is written whole, then its `.done` marker commits it, recording the input's URI and
fingerprint (size + ETag on S3, size + mtime locally). A rerun skips a part only when its
marker matches the input as it is now, so a changed file is redone and a new one done;
worker 0 deletes the parts of inputs that are gone. No line is lost or written twice.
Work is dealt round-robin over the sorted inputs: input i goes to worker i mod W, where
the W workers are every process of every pod (`--worker-index` x torchrun's ranks).

Output: one JSON line per input line, in input order:
    {"file": ..., "line": N, "masks": [[{"score", "token", "token_str", "sequence"}, ...], ...]}
`masks` holds, per <mask> in the line, what `pipeline("fill-mask")` returns for it (the
pipeline itself returns a bare list when the line has one mask). A bad line gets
{"file", "line", "error"} instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from job import env, storage
from job.config import Config
from job.data.sources import read_input
from job.errors import BadInput
from job.log import bar, log
from job.pretrained import load_pretrained
from job.train.model import encoder_and_head

MASK = "<mask>"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")  # kept out of part names (URIs, shells, globs)


def part_name(uri: str, line_range: list[int] | None = None) -> str:
    """A part's file name (without .jsonl/.done), from its input: readable from the file's
    name, unique by the URI's hash. A line range (for when a file is split) is appended."""
    base = _UNSAFE.sub("_", uri.rstrip("/").rpartition("/")[2])[:64]
    name = f"part-{base}-{hashlib.sha256(uri.encode()).hexdigest()[:12]}"
    return name if line_range is None else f"{name}-lines-{line_range[0]}-{line_range[1]}"


@dataclass
class Part:
    """One unit of work, and what its .done marker must say for it to count as done."""

    uri: str
    fingerprint: dict
    line_range: list[int] | None = None  # None: the whole file (files are not split yet)

    @property
    def name(self) -> str:
        return part_name(self.uri, self.line_range)

    def key(self) -> dict:
        return {"input": self.uri, "fingerprint": self.fingerprint, "line_range": self.line_range}


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


def read_lines(uri: str, text_field: str) -> list[Line]:
    """Every line of a .txt or .jsonl file (optionally gzip); undecodable lines flagged."""
    data = read_input(uri)
    jsonl = uri.removesuffix(".gz").endswith((".jsonl", ".json"))
    raws = data.split(b"\n")
    if raws[-1] == b"":
        raws.pop()  # the newline that ends the file starts no line
    lines = []
    for n, raw in enumerate(raws, start=1):
        raw = raw.rstrip(b"\r")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            lines.append(Line(n, None, f"invalid UTF-8 at column {e.start + 1}"))
            continue
        if jsonl:
            try:
                record = json.loads(text)
                text = record[text_field]
                if not isinstance(text, str):
                    raise TypeError
            except (json.JSONDecodeError, KeyError, TypeError):
                lines.append(Line(n, None, f"not a JSON object with a string '{text_field}'"))
                continue
        lines.append(Line(n, text))
    return lines


class FillMask:
    """Batched fill-mask giving what pipeline("fill-mask") gives, line for line."""

    def __init__(
        self, model_uri: str, cache_dir: Path, top_k: int, device: str, precision: str = "auto"
    ):
        import torch
        from transformers import AutoModelForMaskedLM, AutoTokenizer

        cache = cache_dir / "models"
        self.tok = load_pretrained(AutoTokenizer, model_uri, cache, "infer.model")
        model = load_pretrained(AutoModelForMaskedLM, model_uri, cache, "infer.model",
                                attn_implementation="sdpa")  # fmt: skip
        if self.tok.mask_token is None:
            raise BadInput(f"infer.model: '{model_uri}' has a tokenizer without a mask token")
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
                row.append({"score": v, "token": p, "token_str": self.token_str[p],
                            "sequence": next(decoded)})  # fmt: skip
            rows.append(row)
        return rows


def run_part(fill: FillMask, uri: str, cfg: Config, progress) -> tuple[list[dict], int]:
    lines = read_lines(uri, cfg.infer.text_field)
    progress.total = (progress.total or 0) + len(lines)  # known part by part: ETA for those
    progress.refresh()
    ids = fill.encode(lines)
    results: list[dict | None] = [None] * len(lines)
    good = [i for i, x in enumerate(ids) if x is not None]
    good.sort(key=lambda i: len(ids[i]))  # similar lengths together: little padding
    bs = cfg.infer.batch_size
    for start in range(0, len(good), bs):
        chunk = good[start : start + bs]
        for i, (values, tokens) in zip(chunk, fill.predict([ids[i] for i in chunk]), strict=True):
            results[i] = {"file": uri, "line": lines[i].number,
                          "masks": fill.describe(ids[i], values, tokens)}  # fmt: skip
        progress.update(len(chunk))
    errors = 0
    for i, ln in enumerate(lines):
        if results[i] is None:
            results[i] = {"file": uri, "line": ln.number, "error": ln.error}
            errors += 1
            progress.update(1)
    return results, errors


def _workers(worker_index: int, num_workers: int) -> tuple[int, int]:
    """This process's id among all processes of all pods, and their number."""
    world = env.world_size()
    return worker_index * world + env.rank(), num_workers * world


def infer(cfg: Config, worker_index: int = 0, num_workers: int = 1) -> dict:
    start = time.perf_counter()
    files = input_files(cfg)
    me, total = _workers(worker_index, num_workers)
    out = cfg.infer.output
    if me == 0:  # one worker tidies up, so that no two delete the same files
        _remove_gone_parts(out, files)
    todo, skipped = _pending(out, files[me::total])
    if skipped:
        log.info("worker %d: %d part(s) already committed, skipping them", me, skipped)
    stats = {"parts": len(todo), "skipped_parts": skipped, "lines": 0, "errors": 0}
    process_start = time.perf_counter()
    if todo:
        fill = _load(cfg)
        stats["precision"] = fill.precision
        process_start = time.perf_counter()
        progress = bar(desc=f"infer (worker {me}/{total})", unit=" lines")
        for part in todo:
            results, errors = run_part(fill, part.uri, cfg, progress)
            _commit(out, part, results, errors)
            if stats["lines"] == 0:
                _preview(results)
            stats["lines"] += len(results)
            stats["errors"] += errors
        progress.close()
    seconds = time.perf_counter() - start
    process_seconds = time.perf_counter() - process_start  # after the model is loaded
    stats["seconds"] = round(seconds, 3)
    stats["process_seconds"] = round(process_seconds, 3)
    stats["lines_per_s"] = round(stats["lines"] / max(process_seconds, 1e-9), 1)
    log.info("infer: %d parts written, %d skipped, %d lines (%d errors) in %.1f s, "
             "%.1f lines/s -> %s", stats["parts"], skipped, stats["lines"], stats["errors"],
             seconds, stats["lines_per_s"], out)  # fmt: skip
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


def _pending(out: str, uris: list[str]) -> tuple[list[Part], int]:
    """The parts of these inputs not committed for the input as it is now, and how many
    are. The fingerprint is taken before the input is read: a file that changes while
    being read gets a marker that no longer matches it, so the next run redoes it."""
    todo, skipped = [], 0
    for uri in uris:
        part = Part(uri, storage.fingerprint(uri))
        marker_uri = storage.join(out, f"{part.name}.done")
        marker = _read_marker(marker_uri)
        if marker is not None and all(marker.get(k) == v for k, v in part.key().items()):
            skipped += 1
            continue
        if marker is not None:  # committed for an older version: uncommit before rewriting
            log.info("%s changed since its part was written: redoing it", uri)
            storage.delete(marker_uri)
        todo.append(part)
    return todo, skipped


def _read_marker(uri: str) -> dict | None:
    """A .done marker's content; None when there is none, {} when it is unreadable."""
    try:
        marker = json.loads(storage.read_text(uri))
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError):
        return {}
    return marker if isinstance(marker, dict) else {}


def _remove_gone_parts(out: str, files: list[str]) -> None:
    """Delete the parts (lines and marker) of inputs no longer among the inputs, and any
    other part-* file not named after a current input (e.g. positional names of old)."""
    current = {part_name(uri) for uri in files}
    gone = [
        name
        for name in storage.list_names(out)
        if name.startswith("part-")
        and name.endswith((".jsonl", ".done"))
        and name.rpartition(".")[0] not in current
    ]
    for name in sorted(gone, key=lambda n: not n.endswith(".done")):  # uncommit first
        storage.delete(storage.join(out, name))
    if gone:
        log.info("worker 0: removed %d file(s) of parts whose input is gone", len(gone))


def _preview(results: list[dict]) -> None:
    """Show the first prediction in the log: a quick check that the model makes sense."""
    first = next((r for r in results if "masks" in r), None)
    if first is None:
        return
    for m, row in enumerate(first["masks"], start=1):
        top = ", ".join(f"{c['token_str'].strip()!r} {c['score']:.3f}" for c in row)
        log.info("%s:%d mask %d: %s", first["file"], first["line"], m, top)


def _commit(out: str, part: Part, results: list[dict], errors: int) -> None:
    """Write the part whole, then its done marker: a part without the marker is redone."""
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        for r in results:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    try:
        storage.upload_file(f.name, storage.join(out, f"{part.name}.jsonl"))
    finally:
        os.unlink(f.name)
    marker = {**part.key(), "lines": len(results), "errors": errors}
    storage.write_text(storage.join(out, f"{part.name}.done"), json.dumps(marker) + "\n")
