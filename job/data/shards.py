"""Block shards (.npy, readable by `numpy.load` alone) and the manifest that commits them.

Layout under `{data.output}/{dataset_id}/`:
    train/shard-00000.npy ...   uint16/uint32 arrays of shape [blocks, block_size]
    test/shard-00000.npy ...
    manifest.json               written last: its presence means the dataset is complete
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass

import numpy as np

from job import storage
from job.config import Config
from job.data.blocks import tokenizer_sha256
from job.data.sources import resolve_inputs
from job.errors import BadInput, StorageError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def dataset_id(cfg: Config, tokenizer_sha: str, inputs: list[list[dict]] | None) -> str:
    """Derived from everything that changes the dataset's bytes, nothing else: the config's
    keys and the versions of the inputs (sources.resolve_inputs: each file's fingerprint, a
    Hub source's commit), so an edited input gives a new dataset."""
    d = cfg.data
    key = {
        "format": FORMAT_VERSION,
        "sources": [s.model_dump() for s in d.sources],
        "inputs": inputs,
        "max_records": d.max_records,
        "subreddits": d.subreddits,
        "text_fields": d.text_fields,
        "test_size": d.test_size,
        "seed": cfg.run.seed,
        "block_size": d.block_size,
        "shard_blocks": d.shard_blocks,
        "tokenizer": tokenizer_sha,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return f"{d.name}-{digest[:12]}"


class DatasetUri(str):
    """A dataset folder URI; `unresolved` says why its inputs could not be fingerprinted
    (no dataset can be there: read_manifest gives that reason)."""

    unresolved: str | None = None


def dataset_uri(cfg: Config, tok, inputs: list[list[dict]] | None = None) -> str:
    """The folder of the dataset these config and inputs give. `inputs` are
    sources.resolve_inputs(cfg.data), taken now when not given (a HEAD per S3 file, a stat
    per local one): `train` and `preflight` find the dataset preprocessing made from the
    same versions. Inputs that cannot be resolved (a source gone) give a folder that holds
    no dataset and says why, so that `preflight` names that problem once (its source check
    does) and `train` names it when it finds no manifest."""
    unresolved = None
    if inputs is None:
        try:
            inputs = resolve_inputs(cfg.data)
        except (BadInput, StorageError) as e:
            unresolved = str(e)
    uri = DatasetUri(storage.join(cfg.data.output, dataset_id(cfg, tokenizer_sha256(tok), inputs)))
    uri.unresolved = unresolved
    return uri


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


class SplitWriter:
    """One split's shards, streaming: token ids are added in the split's order and cut
    into blocks; each shard is written as soon as it holds `shard_blocks` blocks, the last
    one with what is left, and a remainder shorter than a block is dropped. Memory is one
    shard."""

    def __init__(self, root: str, split: str, block_size: int, shard_blocks: int,
                 dtype: np.dtype, progress=None):  # fmt: skip
        self.root, self.split, self.progress = root, split, progress
        self.block_size, self.shard_blocks = block_size, shard_blocks
        self._buf = np.empty(shard_blocks * block_size, dtype)
        self._fill = 0
        self.entries: list[dict] = []

    def add(self, ids: np.ndarray) -> None:
        at = 0
        while at < len(ids):
            take = min(len(ids) - at, len(self._buf) - self._fill)
            self._buf[self._fill : self._fill + take] = ids[at : at + take]
            self._fill += take
            at += take
            if self._fill == len(self._buf):
                self._write(self.shard_blocks)

    def close(self) -> list[dict]:
        """Write the last, partial shard; return the manifest's shard entries."""
        blocks = self._fill // self.block_size
        if blocks:
            self._write(blocks)
        self._fill = 0
        return self.entries

    def _write(self, blocks: int) -> None:
        part = self._buf[: blocks * self.block_size].reshape(blocks, self.block_size)
        data = npy_bytes(part)
        rel = f"{self.split}/shard-{len(self.entries):05d}.npy"
        uri = storage.join(self.root, rel)
        storage.write_bytes(uri, data)
        self.entries.append(
            {"path": rel, "blocks": blocks, "sha256": hashlib.sha256(data).hexdigest()}
        )
        self._fill = 0
        if self.progress is not None:
            self.progress.update(blocks)


@dataclass
class Manifest:
    uri: str  # the dataset folder
    data: dict

    @property
    def block_size(self) -> int:
        return self.data["block_size"]

    def shards(self, split: str) -> list[dict]:
        return self.data["splits"][split]["shards"]

    def blocks(self, split: str) -> int:
        return self.data["splits"][split]["blocks"]


def write_manifest(root: str, manifest: dict) -> None:
    """The dataset's commit point, written after every shard."""
    storage.commit(storage.join(root, MANIFEST), json.dumps(manifest, indent=2) + "\n")


def read_manifest(root: str) -> Manifest:
    uri = storage.join(root, MANIFEST)
    try:
        data = json.loads(storage.read_text(uri))
    except FileNotFoundError:
        reason = getattr(root, "unresolved", None)
        if reason:  # the inputs the dataset is found by are not there
            raise BadInput(f"{reason} (the dataset is found by its inputs' versions)") from None
        raise BadInput(f"{uri}: no dataset there; run `mlmjob preprocess` first") from None
    except json.JSONDecodeError as e:
        raise BadInput(f"{uri}:{e.lineno}: invalid JSON: {e.msg}") from None
    for split, info in (data.get("splits") or {}).items():
        for shard in info.get("shards", []):  # joined onto the dataset and the cache
            if not storage.contained(str(shard.get("path"))):
                path = shard.get("path")
                raise BadInput(
                    f"{uri}: splits.{split} shard path '{path}' leads outside the dataset "
                    "folder; refused"
                )
    return Manifest(root, data)


def load_shard(path: str, sha256: str | None = None) -> np.ndarray:
    """Load a local shard, memory-mapped; verify its checksum when given."""
    if sha256 is not None and storage.sha256_file(path) != sha256:
        raise ValueError(f"{path}: checksum mismatch")
    return np.load(path, mmap_mode="r", allow_pickle=False)
