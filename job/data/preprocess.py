"""`mlmjob preprocess`: ELI5 records -> tokenized, packed, sharded block dataset.

Work is split so that N workers (the pods of an Indexed Job) produce byte-for-byte the
dataset one worker does, in memory that does not grow with the input:

1. Every worker reads the record stream and tokenizes the chunks of CHUNK records whose
   index is congruent to its worker index mod N, ENCODE_BATCH records at a time, appending
   the token ids and per-record lengths to two `.npy` files as it goes (on local disk, then
   uploaded; multipart on S3). Records of other workers' chunks are counted, not decoded,
   where the format allows (see sources.iter_records). The part is committed by a small
   `_work/part-{i}-of-{N}.npz` written last (record and token counts, the first malformed
   records with their stream positions). A committed part is not redone.
2. Whichever worker sees all N parts finalizes: it fetches the parts to the node-local
   cache, maps them (no copy in memory), puts the records back in stream order as an index
   (part, offset, length per record), splits the record indices with the same seeded
   permutation `datasets.train_test_split` uses, and streams each split's ids in that order
   into shards, writing each shard as soon as it is full, then, last, the manifest. Two
   workers finalizing at once write identical bytes.

The dataset id is keyed by the inputs' versions (inputs.resolve_inputs: size and ETag or
mtime_ns per file, a Hub source's commit), taken by each worker as it starts, and every
file is checked against them as it is read: an edited input gives a new dataset (its parts
included), never a reused stale part, and a file that changes under a worker is one line,
exit 2. The manifest's `inputs` lists those versions.
"""

from __future__ import annotations

import contextlib
import io
import math
import mmap
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from job import lease, storage
from job.config import Config
from job.data import blocks as blocks_mod
from job.data import shards
from job.data.inputs import resolve_inputs
from job.data.sources import iter_records
from job.errors import BadInput
from job.log import bar, log
from job.redact import redact_all

CHUNK = 1000  # records per unit of work handed round-robin to workers
ENCODE_BATCH = 2048  # texts per encode_batch call: large enough to keep every core busy
MAX_LOGGED_BAD = 20
# Records gathered at a time when writing shards. The split's order is random, so a batch
# touches about one page of the mapped parts per record: those pages count as this
# process's memory until `release`, which bounds it near GATHER_BATCH x 8 KiB.
GATHER_BATCH = 1 << 14
FINALIZE_LEASE = "_lease-finalize.json"
PART_FORMAT = 2  # 1: one .npz holding the ids (read still); 2: .npy files beside the marker


def preprocess(cfg: Config, worker_index: int = 0, num_workers: int = 1) -> str:
    """Run this worker's share; finalize when every part is there. Returns the dataset URI."""
    if not 0 <= worker_index < num_workers:
        raise BadInput(f"--worker-index {worker_index} must be in [0, {num_workers})")
    start = time.perf_counter()
    tok = blocks_mod.load_tokenizer(cfg.tokenizer, cfg.cache_dir)
    inputs = resolve_inputs(cfg.data)  # the versions the id names and the readers check
    root = shards.dataset_uri(cfg, tok, inputs)
    if storage.exists(storage.join(root, shards.MANIFEST)):
        log.info("dataset is complete, nothing to do: %s", root)
        return root
    part = _part_uri(root, worker_index, num_workers)
    if storage.exists(part):
        log.info("worker %d: part already written, skipping tokenization", worker_index)
    else:
        _tokenize_part(cfg, tok, worker_index, num_workers, part, inputs)
    parts = [_part_uri(root, w, num_workers) for w in range(num_workers)]
    missing = [p for p in parts if not storage.exists(p)]
    if missing:
        log.info("worker %d done; %d part(s) still missing", worker_index, len(missing))
        return root
    _finalize_once(cfg, tok, root, parts, inputs, start)
    return root


def _finalize_once(cfg: Config, tok, root: str, parts: list[str], inputs, start: float) -> None:
    """Every worker that finds all parts there may get here; one of them finalizes, under
    the dataset's lease. The others wait for it to let go, then find the manifest."""
    run, what = cfg.run, "dataset finalizer"
    with lease.hold(root, run.lease_wait_seconds, run.lease_ttl_seconds, what, FINALIZE_LEASE):
        if storage.exists(storage.join(root, shards.MANIFEST)):
            log.info("dataset finalized by another worker: %s", root)
            return
        manifest = finalize(cfg, tok, root, parts, inputs)
    _summary(manifest, time.perf_counter() - start, root)


def _part_uri(root: str, worker: int, num_workers: int) -> str:
    """The part's commit marker; its arrays are `_part_file(marker, "ids"|"lengths")`."""
    return storage.join(root, "_work", f"part-{worker:05d}-of-{num_workers:05d}.npz")


def _part_file(part_uri: str, name: str) -> str:
    return f"{part_uri.removesuffix('.npz')}.{name}.npy"


def _mine(records, worker: int, num_workers: int):
    for j, rec in enumerate(records):
        if (j // CHUNK) % num_workers == worker:
            yield rec


# ---- 1. a worker's part ----------------------------------------------------------------


class NpyAppender:
    """A 1-D `.npy` file written as it grows: a header sized for any length first, the
    data appended, the header rewritten with the final length at the end (numpy's own
    header for a 1-D array is 128 bytes for every length below 10**40)."""

    def __init__(self, path: Path, dtype: np.dtype):
        self.dtype, self.length = np.dtype(dtype), 0
        self.f = open(path, "wb")  # noqa: SIM115 (closed by close())
        self._header(0)
        self.data_offset = self.f.tell()

    def _header(self, length: int) -> None:
        header = {
            "descr": np.lib.format.dtype_to_descr(self.dtype),
            "fortran_order": False,
            "shape": (length,),
        }
        np.lib.format.write_array_header_1_0(self.f, header)

    def append(self, array: np.ndarray) -> None:
        self.f.write(np.ascontiguousarray(array, dtype=self.dtype).tobytes())
        self.length += len(array)

    def close(self) -> None:
        self.f.seek(0)
        self._header(self.length)
        if self.f.tell() != self.data_offset:  # never: numpy pads every such header to 128
            raise RuntimeError(f"{self.f.name}: npy header changed size")
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()


@dataclass
class PartWriter:
    """One worker's tokenized records, appended to its two .npy files as they come, and
    the counts its commit marker holds."""

    tok: object
    ids: NpyAppender
    lengths: NpyAppender
    progress: object
    records: int = 0
    tokens: int = 0
    bad_count: int = 0
    bad: list[tuple[int, str]] = field(default_factory=list)  # (stream index, line): the first
    batch: list = field(default_factory=list)

    def add(self, j: int, rec) -> None:
        self.records += 1
        if rec.error is not None:
            if self.bad_count < MAX_LOGGED_BAD:
                log.warning("skipping %s: %s", rec.origin, rec.error)
                self.bad.append((j, f"{rec.origin}: {rec.error}"))
            self.bad_count += 1
        self.batch.append(rec)
        if len(self.batch) >= ENCODE_BATCH:
            self.flush()

    def flush(self) -> None:
        texts = [r.text for r in self.batch if r.text is not None]
        ids, lens = blocks_mod.encode(self.tok, texts, self.ids.dtype)
        it = iter(lens.tolist())
        self.ids.append(ids)
        self.lengths.append(
            np.asarray([next(it) if r.text is not None else -1 for r in self.batch], dtype=np.int64)
        )
        self.tokens += len(ids)
        self.progress.update(len(self.batch))
        self.batch.clear()

    def marker(self) -> bytes:
        buf = io.BytesIO()
        np.savez(
            buf,
            format=np.asarray(PART_FORMAT),
            records=np.asarray(self.records),
            tokens=np.asarray(self.tokens),
            bad=np.asarray([b for _, b in self.bad], dtype=np.str_),
            bad_index=np.asarray([j for j, _ in self.bad], dtype=np.int64),
            bad_count=np.asarray(self.bad_count),
        )
        return buf.getvalue()


def _tokenize_part(
    cfg: Config, tok, worker: int, num_workers: int, part_uri: str, inputs: list | None = None
) -> None:
    start = time.perf_counter()
    dtype = blocks_mod.id_dtype(len(tok))
    chunk = CHUNK  # read once: the stream and the finalizer must agree on it
    staging = Path(cfg.cache_dir) / "preprocess-staging"

    def keep(j: int) -> bool:
        return (j // chunk) % num_workers == worker

    with (
        storage.staged(_part_file(part_uri, "ids"), staging, ".npy") as ids_path,
        storage.staged(_part_file(part_uri, "lengths"), staging, ".npy") as lengths_path,
        bar(desc=f"tokenize (worker {worker}/{num_workers})", unit=" rec") as progress,
    ):
        part = PartWriter(
            tok, NpyAppender(ids_path, dtype), NpyAppender(lengths_path, np.int64), progress
        )
        stream = iter_records(cfg.data, keep=keep, inputs=inputs)
        for j, rec in _mine(enumerate(stream), worker, num_workers):
            part.add(j, rec)
        part.flush()
        part.ids.close()
        part.lengths.close()
    storage.commit(part_uri, part.marker())  # the commit point of the part
    seconds = time.perf_counter() - start
    log.info(
        "worker %d: %d records (%d malformed), %d tokens in %.1f s (%.0f tokens/s)",
        worker,
        part.records,
        part.bad_count,
        part.tokens,
        seconds,
        part.tokens / max(seconds, 1e-9),
    )


# ---- 2. finalizing ---------------------------------------------------------------------


def _map_npy(path: Path) -> tuple[np.ndarray, mmap.mmap | None]:
    """A local .npy file as a read-only array over a memory map (and the map, so that its
    pages can be released: mapped pages count as the process's memory until then)."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = {
            (1, 0): np.lib.format.read_array_header_1_0,
            (2, 0): np.lib.format.read_array_header_2_0,
        }[version]
        shape, fortran, dtype = read_header(f)
        offset = f.tell()
        if fortran or len(shape) != 1:
            raise ValueError(f"{path}: expected a 1-D array")
        if shape[0] == 0:
            return np.zeros(0, dtype), None
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    return np.frombuffer(mm, dtype=dtype, count=shape[0], offset=offset), mm


class Parts:
    """Every worker's part, mapped, and the records in stream order as an index."""

    def __init__(self, cfg: Config, root: str, parts: list[str]):
        self._maps: list[mmap.mmap] = []
        self._fetched: list[Path] = []
        self.ids: list[np.ndarray] = []
        lengths: list[np.ndarray] = []
        bad: list[tuple[int, str]] = []
        self.bad_count = 0
        legacy_order = False
        for uri in parts:
            with np.load(io.BytesIO(storage.read_bytes(uri)), allow_pickle=False) as z:
                self.bad_count += int(z["bad_count"])
                if "format" in z:
                    bad += zip(z["bad_index"].tolist(), [str(s) for s in z["bad"]], strict=True)
                    ids, n = self._fetch(cfg, root, _part_file(uri, "ids"))
                    lens, _ = self._fetch(cfg, root, _part_file(uri, "lengths"))
                    if len(lens) != int(z["records"]) or n != int(z["tokens"]):
                        raise RuntimeError(f"{uri}: the part's files disagree with its marker")
                else:  # a part written by the earlier format (ids in the .npz)
                    ids, lens = z["ids"], z["lengths"]
                    bad += [(-1, str(s)) for s in z["bad"]]
                    legacy_order = True
            self.ids.append(ids)
            lengths.append(np.asarray(lens))
        if not legacy_order:
            bad.sort(key=lambda b: b[0])  # stream order, whatever the number of workers
        self.bad_samples = [b for _, b in bad][:MAX_LOGGED_BAD]
        self._index(lengths, parts)

    def _fetch(self, cfg: Config, root: str, uri: str) -> tuple[np.ndarray, int]:
        if storage.is_s3(uri):
            loc = storage.split_s3(uri)
            path = Path(cfg.cache_dir) / "preprocess" / loc.bucket / loc.key
            storage.download_file(uri, path)
            self._fetched.append(path)
        else:
            path = storage.local_path(uri)
        array, mm = _map_npy(path)
        if mm is not None:
            self._maps.append(mm)
        return array, len(array)

    def _index(self, lengths: list[np.ndarray], parts: list[str]) -> None:
        """Stream position j -> (part, offset in its ids, length; -1: malformed)."""
        num_workers = len(lengths)
        self.n = n = sum(len(x) for x in lengths)
        j = np.arange(n, dtype=np.int64)
        chunk = j // CHUNK
        part = chunk % num_workers
        local = (chunk // num_workers) * CHUNK + j % CHUNK
        del j, chunk
        self.part = part.astype(np.int32)
        self.start = np.empty(n, np.int64)
        self.length = np.empty(n, np.int64)
        for w, lens in enumerate(lengths):
            mine = np.flatnonzero(part == w)
            if len(mine) != len(lens):  # the id names the inputs: a file edited in place
                raise BadInput(  # keeping its size and mtime could still do it
                    f"{parts[w]}: part {w} holds {len(lens)} records, the stream gives it "
                    f"{len(mine)}: the parts were made from different inputs; delete "
                    f"{parts[w].rsplit('/', 1)[0]} and rerun every worker"
                )
            sizes = np.maximum(lens, 0)
            starts = np.cumsum(sizes) - sizes
            self.start[mine] = starts[local[mine]]
            self.length[mine] = lens[local[mine]]

    def gather(self, records: np.ndarray) -> np.ndarray:
        """The ids of these (well-formed) records, concatenated in this order."""
        ids = self.ids
        pieces = [
            ids[p][s : s + n]
            for p, s, n in zip(
                self.part[records].tolist(),
                self.start[records].tolist(),
                self.length[records].tolist(),
                strict=True,
            )
        ]
        dtype = ids[0].dtype if ids else np.uint16
        return np.concatenate(pieces) if pieces else np.zeros(0, dtype)

    def release(self) -> None:
        """Drop the mapped pages from this process (they stay in the page cache)."""
        for mm in self._maps:
            mm.madvise(mmap.MADV_DONTNEED)

    def close(self) -> None:
        self.ids = []
        for mm in self._maps:
            with contextlib.suppress(BufferError):  # still referred to: the GC closes it
                mm.close()
        for path in self._fetched:
            path.unlink(missing_ok=True)


def _load_parts(parts: list[str], cfg: Config | None = None):
    """Records of all parts back in stream order: (ids per record or None, bad count, the
    first malformed records). For small datasets and tests; finalize streams instead."""
    p = Parts(cfg or Config(), "", parts)
    records = [p.gather(np.asarray([j])).copy() if p.length[j] >= 0 else None for j in range(p.n)]
    return records, p.bad_count, p.bad_samples


def split_indices(n: int, test_size: float, seed: int) -> dict[str, np.ndarray]:
    """The split of `datasets.Dataset.train_test_split(test_size, seed=seed)`, in its order."""
    perm = np.random.default_rng(seed).permutation(n)
    n_test = math.ceil(test_size * n)
    return {"train": perm[n_test:], "test": perm[:n_test]}


def finalize(cfg: Config, tok, root: str, parts: list[str], inputs: list | None = None) -> dict:
    records = Parts(cfg, root, parts)
    try:
        return _finalize(cfg, tok, root, records, inputs)
    finally:
        records.close()


def _finalize(cfg: Config, tok, root: str, records: Parts, inputs: list | None = None) -> dict:
    d = cfg.data
    n, bad_count, bad_samples = records.n, records.bad_count, records.bad_samples
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
        "sources": [redact_all(s.model_dump()) for s in d.sources],  # signed data_files URLs
        # the versions read, the id's key: [{"uri", "size", "etag"|"mtime_ns"} | {"uri", "commit"}]
        "inputs": [v for vs in (resolve_inputs(d) if inputs is None else inputs) for v in vs],
        "malformed_records": bad_count,
        "malformed_examples": bad_samples,
        "splits": {},
    }
    for split, order in split_indices(n, d.test_size, cfg.run.seed).items():
        kept = order[records.length[order] >= 0]
        tokens = int(records.length[kept].sum())
        blocks = tokens // d.block_size
        with bar(desc=f"write {split}", total=blocks, unit=" blocks") as progress:
            writer = shards.SplitWriter(root, split, d.block_size, d.shard_blocks, dtype, progress)
            for at in range(0, len(kept), GATHER_BATCH):
                writer.add(records.gather(kept[at : at + GATHER_BATCH]))
                records.release()
            entries = writer.close()
        manifest["splits"][split] = {
            "records": len(kept),
            "tokens": tokens,
            "blocks": blocks,
            "shards": entries,
        }
    shards.write_manifest(root, manifest)  # the commit point
    storage.delete_prefix(storage.join(root, "_work"))
    return manifest


def _summary(manifest: dict, seconds: float, root: str) -> None:
    s = manifest["splits"]
    tokens = sum(v["tokens"] for v in s.values())
    log.info(
        "preprocess: %d records (%d malformed skipped), %d tokens, %d blocks "
        "(train %d, test %d) in %.1f s, %.0f tokens/s -> %s",
        sum(v["records"] for v in s.values()),
        manifest["malformed_records"],
        tokens,
        sum(v["blocks"] for v in s.values()),
        s["train"]["blocks"],
        s["test"]["blocks"],
        seconds,
        tokens / max(seconds, 1e-9),
        root,
    )
