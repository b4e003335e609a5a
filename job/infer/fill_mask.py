"""FillMask: the model, batched, giving what pipeline("fill-mask") gives, a window of lines
at a time."""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import islice
from pathlib import Path

import numpy as np

from job import env, storage
from job.config import Config
from job.errors import BadInput
from job.infer.lines import Line, read_lines
from job.log import log
from job.pretrained import load_pretrained
from job.train.model import encoder_and_head

MASK = "<mask>"
# Lines are sorted by length within a window of this many batches (little padding), and a
# window's results are written before the next is read: memory is bounded by the window.
_WINDOW_BATCHES = 32
# The head's work at once: logits and probabilities of this many bytes of mask rows x the
# vocabulary (roberta-base: 667 rows in fp32). The whole batch's, 256 lines x 510 masks, was
# about 65 GB; in chunks, peak memory no longer grows with the masks of a batch.
_HEAD_BYTES = 256 << 20


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
        # the head's output in the model's dtype, then the fp32 probabilities
        row_bytes = vocab * (self.dtype.itemsize + 4)
        self.chunk_rows = max(1, _HEAD_BYTES // row_bytes)

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
                values, tokens = self.top_k_of(head, hidden[masked])
            else:  # an unknown layout: the model's own logits, every position's at once
                logits = self.model(input_ids=ids, attention_mask=attn).logits[masked]
                values, tokens = logits.softmax(-1, dtype=torch.float32).topk(self.top_k)
        counts = masked.sum(1).tolist()
        values, tokens = values.cpu().numpy(), tokens.cpu().numpy()
        out, start = [], 0
        for c in counts:
            out.append((values[start : start + c], tokens[start : start + c]))
            start += c
        return out

    def top_k_of(self, head, rows):
        """Top-k (probabilities, token ids) of each mask row's hidden state, the head applied
        to `chunk_rows` rows at a time: what the whole [rows, vocabulary] would give."""
        import torch

        values, tokens = [], []
        for chunk in rows.split(self.chunk_rows):
            # softmax in fp32 straight from the head's dtype: no separate fp32 copy of logits
            v, t = head(chunk).softmax(-1, dtype=torch.float32).topk(self.top_k)
            values.append(v)
            tokens.append(t)
        return torch.cat(values), torch.cat(tokens)

    def free_memory(self) -> None:
        """After an out-of-memory error: the failed forward's tensors, and on a GPU the
        allocator's cached blocks, given back before the retry."""
        import torch

        gc.collect()  # tensors kept alive by reference cycles through the failed frames
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def describe(self, ids: list[int], values: np.ndarray, tokens: np.ndarray) -> list[list[dict]]:
        """The pipeline's postprocess: candidates with score, token, token_str, sequence."""
        # read once: a tokenizer's attributes cost microseconds each, and a line with M masks
        # makes M x top_k sequences of its whole length
        mask, pad = self.tok.mask_token_id, self.tok.pad_token_id
        positions = [i for i, t in enumerate(ids) if t == mask]
        single = len(positions) == 1
        sequences, rows = [], []
        for m, pos in enumerate(positions):
            for p in tokens[m].tolist():
                seq = list(ids)
                seq[pos] = p
                sequences.append([t for t in seq if t != pad])
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


def load(cfg: Config) -> FillMask:
    from job.device import torch_device

    device = torch_device(cfg.run.device)  # run.device: cuda that cannot serve exits 2
    model = cfg.infer.model
    if model is None:  # the training run's model: complete once summary.json exists
        model = storage.join(cfg.run.output, "model")
        summary = storage.join(cfg.run.output, "summary.json")
        storage.wait_for(summary, env.wait_seconds(), "the model")
    fill = FillMask(model, cfg.cache_dir, cfg.infer.top_k, device, cfg.infer.precision)
    log.info("infer: model %s on %s, precision %s", model, device, fill.precision)
    return fill


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

    def forward(batch: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
        return fill.predict([ids[i] for i in batch])

    for batch, predicted in fitted_batches(forward, good, bs, fill.free_memory):
        if predicted is None:  # out of memory alone: reported as a bad line is
            (i,) = batch
            masks = ids[i].count(fill.tok.mask_token_id)
            why = f"{len(ids[i])} tokens, {masks} masks"
            lines[i].error = f"out of memory on {fill.device.type} even alone ({why})"
            continue
        for i, (values, tokens) in zip(batch, predicted, strict=True):
            results[i] = {
                "file": uri,
                "line": lines[i].number,
                "masks": fill.describe(ids[i], values, tokens),
            }
        progress.update(len(batch))
    for i, ln in enumerate(lines):
        if results[i] is None:
            results[i] = {"file": uri, "line": ln.number, "error": ln.error}
            progress.update(1)
    return results


def fitted_batches(
    forward: Callable[[list], list],
    items: Sequence,
    size: int,
    free: Callable[[], None] = lambda: None,
) -> Iterator[tuple[list, list | None]]:
    """(batch, forward(batch)) for `items` in batches of `size`, in order. A batch that runs
    out of memory (torch.OutOfMemoryError: CUDA's) is retried in halves after `free()`, and
    the size that fit is kept for the batches after it (lines come sorted by length: the
    next ones are no shorter), down to one item; one that fails alone gives (batch, None).
    A CUDA OOM would otherwise exit 1 and the pod would retry the same part forever."""
    import torch

    start = 0
    while start < len(items):
        batch = list(items[start : start + size])
        try:
            out, failed = forward(batch), False
        except torch.OutOfMemoryError:
            out, failed = None, True  # freed below, outside the handler: its traceback
            # holds the failed forward's tensors until the handler ends
        if failed:
            free()
            if len(batch) > 1:
                size = len(batch) // 2
                log.warning("infer: out of memory on %d lines: %d at a time", len(batch), size)
                continue
            log.warning("infer: out of memory on one line alone: reported as its error")
        yield batch, out
        start += len(batch)


def run_part(fill: FillMask, uri: str, cfg: Config, progress) -> tuple[list[dict], int]:
    """A whole small file's results in memory, by the job's code (bench/gpu.py)."""
    lines = read_lines(uri, cfg.infer.text_field)
    windows = fill_windows(fill, lines, uri, cfg.infer.batch_size, progress)
    results = [r for window in windows for r in window]
    return results, sum("error" in r for r in results)
