"""`mlmjob preprocess`: ELI5 records -> tokenized, packed, sharded block dataset.

Work is split so that N workers (the pods of an Indexed Job) produce byte-for-byte the
dataset one worker does:

1. Every worker reads the record stream (cheap next to tokenizing) and tokenizes the
   chunks of CHUNK records whose index is congruent to its worker index mod N, writing one
   `_work/part-{i}-of-{N}.npz` atomically. A part that exists is not redone.
2. Whichever worker sees all N parts finalizes: it puts the records back in stream order,
   splits them with the same seeded permutation `datasets.train_test_split` uses,
   concatenates each split's ids in that order, packs blocks, writes shards and, last,
   the manifest. Two workers finalizing at once write identical bytes.
"""

from __future__ import annotations

import io
import math
import time

import numpy as np

from job import storage
from job.config import Config
from job.data import blocks as blocks_mod
from job.data import shards
from job.data.sources import Record, iter_records
from job.errors import BadInput
from job.log import bar, log

CHUNK = 1000  # records per unit of work handed round-robin to workers
ENCODE_BATCH = 2048  # texts per encode_batch call: large enough to keep every core busy
MAX_LOGGED_BAD = 20


def preprocess(cfg: Config, worker_index: int = 0, num_workers: int = 1) -> str:
    """Run this worker's share; finalize when every part is there. Returns the dataset URI."""
    if not 0 <= worker_index < num_workers:
        raise BadInput(f"--worker-index {worker_index} must be in [0, {num_workers})")
    start = time.perf_counter()
    tok = blocks_mod.load_tokenizer(cfg.tokenizer, cfg.cache_dir)
    root = shards.dataset_uri(cfg, tok)
    if storage.exists(storage.join(root, shards.MANIFEST)):
        log.info("dataset is complete, nothing to do: %s", root)
        return root
    part = _part_uri(root, worker_index, num_workers)
    if storage.exists(part):
        log.info("worker %d: part already written, skipping tokenization", worker_index)
    else:
        _tokenize_part(cfg, tok, worker_index, num_workers, part)
    parts = [_part_uri(root, w, num_workers) for w in range(num_workers)]
    missing = [p for p in parts if not storage.exists(p)]
    if missing:
        log.info("worker %d done; %d part(s) still missing", worker_index, len(missing))
        return root
    manifest = finalize(cfg, tok, root, parts)
    _summary(manifest, time.perf_counter() - start, root)
    return root


def _part_uri(root: str, worker: int, num_workers: int) -> str:
    return storage.join(root, "_work", f"part-{worker:05d}-of-{num_workers:05d}.npz")


def _mine(records, worker: int, num_workers: int):
    for j, rec in enumerate(records):
        if (j // CHUNK) % num_workers == worker:
            yield rec


def _tokenize_part(cfg: Config, tok, worker: int, num_workers: int, part_uri: str) -> None:
    start = time.perf_counter()
    dtype = blocks_mod.id_dtype(len(tok))
    ids_parts, lengths = [], []
    bad: list[str] = []
    batch: list[Record] = []
    tokens = 0
    # Reading is cheap next to tokenizing: read this worker's share first so that the bar
    # knows its total and shows an ETA.
    records = list(_mine(iter_records(cfg.data), worker, num_workers))
    progress = bar(desc=f"tokenize (worker {worker}/{num_workers})", total=len(records),
                   unit=" rec")  # fmt: skip

    def flush():
        nonlocal tokens
        texts = [r.text for r in batch if r.text is not None]
        ids, lens = blocks_mod.encode(tok, texts, dtype)
        it = iter(lens.tolist())
        lengths.extend(next(it) if r.text is not None else -1 for r in batch)
        ids_parts.append(ids)
        tokens += len(ids)
        progress.update(len(batch))
        progress.set_postfix(tok_s=f"{tokens / (time.perf_counter() - start):,.0f}")
        batch.clear()

    for rec in records:
        if rec.error is not None:
            if len(bad) < MAX_LOGGED_BAD:
                log.warning("skipping %s: %s", rec.origin, rec.error)
            bad.append(f"{rec.origin}: {rec.error}")
        batch.append(rec)
        if len(batch) >= ENCODE_BATCH:
            flush()
    flush()
    progress.close()
    buf = io.BytesIO()
    np.savez(
        buf,
        ids=np.concatenate(ids_parts) if ids_parts else np.zeros(0, dtype),
        lengths=np.asarray(lengths, dtype=np.int64),
        bad=np.asarray(bad[:MAX_LOGGED_BAD], dtype=np.str_),
        bad_count=np.asarray(len(bad)),
    )
    storage.write_bytes(part_uri, buf.getvalue())
    seconds = time.perf_counter() - start
    log.info(
        "worker %d: %d records (%d malformed), %d tokens in %.1f s (%.0f tokens/s)",
        worker, len(lengths), len(bad), tokens, seconds, tokens / max(seconds, 1e-9),
    )  # fmt: skip


def _load_parts(parts: list[str]):
    """Records of all parts back in stream order: (ids per record, bad count, samples)."""
    per_part, bad_count, bad_samples = [], 0, []
    for uri in parts:
        with np.load(io.BytesIO(storage.read_bytes(uri)), allow_pickle=False) as z:
            ids, lengths = z["ids"], z["lengths"]
            bad_count += int(z["bad_count"])
            bad_samples += [str(s) for s in z["bad"]]
        ends = np.cumsum(np.maximum(lengths, 0))
        starts = ends - np.maximum(lengths, 0)
        records = [
            ids[s:e] if n >= 0 else None for s, e, n in zip(starts, ends, lengths, strict=True)
        ]
        per_part.append([records[i : i + CHUNK] for i in range(0, len(records), CHUNK)])
    ordered = []
    num_workers = len(parts)
    for c in range(sum(len(p) for p in per_part)):
        ordered += per_part[c % num_workers][c // num_workers]
    return ordered, bad_count, bad_samples[:MAX_LOGGED_BAD]


def split_indices(n: int, test_size: float, seed: int) -> dict[str, np.ndarray]:
    """The split of `datasets.Dataset.train_test_split(test_size, seed=seed)`, in its order."""
    perm = np.random.default_rng(seed).permutation(n)
    n_test = math.ceil(test_size * n)
    return {"train": perm[n_test:], "test": perm[:n_test]}


def finalize(cfg: Config, tok, root: str, parts: list[str]) -> dict:
    d = cfg.data
    records, bad_count, bad_samples = _load_parts(parts)
    n = len(records)
    if n == 0:
        raise BadInput("data.sources: the sources hold no records")
    if bad_count / n > d.max_bad_fraction:
        raise BadInput(
            f"{bad_count} of {n} records malformed ({bad_count / n:.1%} > "
            f"data.max_bad_fraction {d.max_bad_fraction:.1%}); first: {bad_samples[0]}"
        )
    dtype = blocks_mod.id_dtype(len(tok))
    manifest = {
        "dataset_id": root.rstrip("/").rsplit("/", 1)[-1],
        "format": "npy",
        "format_version": shards.FORMAT_VERSION,
        "tokenizer": cfg.tokenizer,
        "tokenizer_sha256": blocks_mod.tokenizer_sha256(tok),
        "vocab_size": len(tok),
        "block_size": d.block_size,
        "dtype": dtype.name,
        "seed": cfg.run.seed,
        "test_size": d.test_size,
        "sources": [s.model_dump() for s in d.sources],
        "malformed_records": bad_count,
        "malformed_examples": bad_samples,
        "splits": {},
    }
    total_tokens = 0
    for split, order in split_indices(n, d.test_size, cfg.run.seed).items():
        kept = [records[i] for i in order.tolist() if records[i] is not None]
        flat = np.concatenate(kept) if kept else np.zeros(0, dtype)
        packed = blocks_mod.pack(flat, d.block_size)
        with bar(desc=f"write {split}", total=len(packed), unit=" blocks") as progress:
            entries = shards.write_split(root, split, packed, d.shard_blocks, progress)
        manifest["splits"][split] = {
            "records": len(kept),
            "tokens": int(len(flat)),
            "blocks": len(packed),
            "shards": entries,
        }
        total_tokens += len(flat)
    shards.write_manifest(root, manifest)  # the commit point
    storage.delete_prefix(storage.join(root, "_work"))
    return manifest


def _summary(manifest: dict, seconds: float, root: str) -> None:
    s = manifest["splits"]
    tokens = sum(v["tokens"] for v in s.values())
    log.info(
        "preprocess: %d records (%d malformed skipped), %d tokens, %d blocks "
        "(train %d, test %d) in %.1f s, %.0f tokens/s -> %s",
        sum(v["records"] for v in s.values()), manifest["malformed_records"], tokens,
        sum(v["blocks"] for v in s.values()), s["train"]["blocks"], s["test"]["blocks"],
        seconds, tokens / max(seconds, 1e-9), root,
    )  # fmt: skip
