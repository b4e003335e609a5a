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

from job import jsonio, storage
from job.config import Config
from job.data.blocks import tokenizer_sha256
from job.data.inputs import resolve_inputs
from job.errors import BadInput, StorageError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def dataset_id(cfg: Config, tokenizer_sha: str, inputs: list[list[dict]] | None) -> str:
    """Derived from everything that changes the dataset's bytes, nothing else: the config's
    keys and the versions of the inputs (inputs.resolve_inputs: each file's fingerprint, a
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
    inputs.resolve_inputs(cfg.data), taken now when not given (a HEAD per S3 file, a stat
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

    def __init__(
        self,
        root: str,
        split: str,
        block_size: int,
        shard_blocks: int,
        dtype: np.dtype,
        progress=None,
    ):
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
    storage.commit(storage.join(root, MANIFEST), jsonio.dumps(manifest, indent=2) + "\n")


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
    except UnicodeDecodeError as e:
        raise BadInput(f"{uri}: not UTF-8 text (byte offset {e.start})") from None
    problem = _manifest_problem(data)
    if problem:
        raise BadInput(
            f"{uri}: {problem}; not a manifest `mlmjob preprocess` wrote (rerun it into a "
            "fresh data.output)"
        )
    for split, info in (data.get("splits") or {}).items():
        for shard in info.get("shards", []):  # joined onto the dataset and the cache
            if not storage.contained(str(shard.get("path"))):
                path = shard.get("path")
                raise BadInput(
                    f"{uri}: splits.{split} shard path '{path}' leads outside the dataset "
                    "folder; refused"
                )
    return Manifest(root, data)


# What training and evaluation read from a manifest: (key, type) at the top, per split, per shard.
_REQUIRED = (
    ("dataset_id", str),
    ("tokenizer", str),
    ("tokenizer_sha256", str),
    ("block_size", int),
    ("dtype", str),
    ("splits", dict),
)
_SPLIT_KEYS = (("blocks", int), ("shards", list))
_SHARD_KEYS = (("path", str), ("sha256", str))


def _manifest_problem(data) -> str | None:
    """The first required key a manifest lacks (or holds with the wrong type), or None."""
    if not isinstance(data, dict):
        return "not a JSON object"
    if problem := _missing(data, _REQUIRED, ""):
        return problem
    for split in ("train", "test"):
        info = data["splits"].get(split)
        if not isinstance(info, dict):
            return f"no split 'splits.{split}'"
        if problem := _missing(info, _SPLIT_KEYS, f"splits.{split}."):
            return problem
        for i, shard in enumerate(info["shards"]):
            where = f"splits.{split}.shards[{i}]"
            if not isinstance(shard, dict):
                return f"'{where}' is not an object"
            if problem := _missing(shard, _SHARD_KEYS, f"{where}."):
                return problem
    return None


def _missing(data: dict, keys, prefix: str) -> str | None:
    for key, kind in keys:
        if key not in data:
            return f"missing key '{prefix}{key}'"
        value = data[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            return f"key '{prefix}{key}' must be {kind.__name__}, got {value!r}"
    return None


def load_shard(path: str, sha256: str | None = None) -> np.ndarray:
    """Load a local shard, memory-mapped; verify its checksum when given."""
    if sha256 is not None and storage.sha256_file(path) != sha256:
        raise ValueError(f"{path}: checksum mismatch")
    return np.load(path, mmap_mode="r", allow_pickle=False)
