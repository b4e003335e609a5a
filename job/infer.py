"""`mlmjob infer`: batch fill-mask over text files, sharded and restartable.

Each input file (sorted, across every configured URI or glob) is one part; part i goes
to worker i mod W, where the W workers are every process of every pod
(`--worker-index` x torchrun's ranks). A part is written whole to
`{infer.output}/part-{i}.jsonl`, then `part-{i}.done` commits it: a rerun skips committed
parts and redoes the rest, so no line is lost or written twice.

Output: one JSON line per input line, in input order:
    {"file": ..., "line": N, "masks": [[{"score", "token", "token_str", "sequence"}, ...], ...]}
`masks` holds, per <mask> in the line, what `pipeline("fill-mask")` returns for it (the
pipeline itself returns a bare list when the line has one mask). A bad line gets
{"file", "line", "error"} instead.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from job import storage
from job.config import Config
from job.data.sources import read_input
from job.errors import BadInput
from job.log import bar, log

MASK = "<mask>"


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
    return files


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

    def __init__(self, model_uri: str, cache_dir: Path, top_k: int, device: str):
        import torch
        from transformers import AutoModelForMaskedLM, AutoTokenizer

        from job.train.model import encoder_and_head

        local = storage.to_local(model_uri, cache_dir / "models")
        try:
            self.tok = AutoTokenizer.from_pretrained(local)
            model = AutoModelForMaskedLM.from_pretrained(local, attn_implementation="sdpa")
        except (OSError, ValueError) as e:
            raise BadInput(f"infer.model: cannot load '{model_uri}': {e}") from None
        if self.tok.mask_token is None:
            raise BadInput(f"infer.model: '{model_uri}' has a tokenizer without a mask token")
        self.device = torch.device(device)
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
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
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    return worker_index * world + rank, num_workers * world


def infer(cfg: Config, worker_index: int = 0, num_workers: int = 1) -> dict:
    import torch

    start = time.perf_counter()
    files = input_files(cfg)
    me, total = _workers(worker_index, num_workers)
    mine = [(i, f) for i, f in enumerate(files) if i % total == me]
    out = cfg.infer.output
    todo = [(i, f) for i, f in mine
            if not storage.exists(storage.join(out, f"part-{i}.done"))]  # fmt: skip
    skipped = len(mine) - len(todo)
    if skipped:
        log.info("worker %d: %d part(s) already committed, skipping them", me, skipped)
    stats = {"parts": len(todo), "skipped_parts": skipped, "lines": 0, "errors": 0}
    process_start = time.perf_counter()
    if todo:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
        model = cfg.infer.model
        if model is None:  # the training run's model: complete once summary.json exists
            model = storage.join(cfg.run.output, "model")
            wait = float(os.environ.get("MLMJOB_WAIT_SECONDS", "0"))
            storage.wait_for(storage.join(cfg.run.output, "summary.json"), wait, "the model")
        fill = FillMask(model, cfg.cache_dir, cfg.infer.top_k, device)
        process_start = time.perf_counter()
        progress = bar(desc=f"infer (worker {me}/{total})", unit=" lines")
        for i, uri in todo:
            results, errors = run_part(fill, uri, cfg, progress)
            _commit(out, i, uri, results, errors)
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


def _preview(results: list[dict]) -> None:
    """Show the first prediction in the log: a quick check that the model makes sense."""
    first = next((r for r in results if "masks" in r), None)
    if first is None:
        return
    for m, row in enumerate(first["masks"], start=1):
        top = ", ".join(f"{c['token_str'].strip()!r} {c['score']:.3f}" for c in row)
        log.info("%s:%d mask %d: %s", first["file"], first["line"], m, top)


def _commit(out: str, i: int, uri: str, results: list[dict], errors: int) -> None:
    """Write the part whole, then its done marker: a part without the marker is redone."""
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        for r in results:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    try:
        storage.upload_file(f.name, storage.join(out, f"part-{i}.jsonl"))
    finally:
        os.unlink(f.name)
    marker = {"part": i, "input": uri, "lines": len(results), "errors": errors}
    storage.write_text(storage.join(out, f"part-{i}.done"), json.dumps(marker) + "\n")
