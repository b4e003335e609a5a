"""Loading Hugging Face models and tokenizers from a hub id, a folder or an object store."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from job import storage
from job.errors import BadInput

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")


def load_pretrained(cls, uri: str, cache_dir: Path, key: str, **kwargs):
    """`cls.from_pretrained` on a local copy of `uri` (S3 folders are fetched into
    `cache_dir`); a missing or unreadable model is bad input naming the config key."""
    from safetensors import SafetensorError

    local = storage.to_local(uri, cache_dir)
    if Path(local).is_dir():
        expect_files(local, uri, key, "Tokenizer" in cls.__name__)
    try:
        return cls.from_pretrained(local, **kwargs)
    except SafetensorError as e:  # a truncated or foreign weight file (transformers passes it on)
        if Path(local).is_dir():
            check_weights(local, key, shown=uri)  # names the file, when its header tells
        raise BadInput(f"{key}: cannot load '{uri}': damaged safetensors weights: {e}") from None
    except (OSError, ValueError) as e:
        raise BadInput(f"{key}: cannot load '{uri}': {e}") from None


def expect_files(folder: str, uri: str, key: str, tokenizer: bool) -> None:
    """A folder without the files a model (or tokenizer) needs is named as such, rather
    than left to transformers, whose message may be about an unrelated optional package."""
    names = storage.list_names(folder)
    if tokenizer:
        what, wanted, ok = "tokenizer", "tokenizer.json", any(n in TOKENIZER_FILES for n in names)
    else:
        what, wanted = "model", "config.json and model.safetensors (or pytorch_model.bin)"
        ok = "config.json" in names and any(n in WEIGHT_FILES for n in names)
    if not ok:
        found = ", ".join(sorted(names)[:5]) or "nothing"
        raise BadInput(f"{key}: no {what} in '{uri}' (expected {wanted}; found {found})")


def check_weights(folder: str, key: str, shown: str | None = None) -> None:
    """Every safetensors weight file in a model folder (local or S3) is as long as its header
    says: `8 + header length + the largest tensor end offset` bytes. Reads the headers only
    (ranged reads), so a preflight finds a truncated upload or a random file without
    downloading the weights. `shown`: the folder's URI in messages (default `folder`)."""
    shown = shown or folder
    names = storage.list_names(folder)
    files = [n for n in names if n.endswith(".safetensors")]
    index = "model.safetensors.index.json"
    if index in names:
        try:
            weight_map = json.loads(storage.read_text(storage.join(folder, index)))["weight_map"]
            wanted = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            where = storage.join(shown, index)
            raise BadInput(
                f"{key}: '{where}' is not a safetensors index (no 'weight_map')"
            ) from None
        missing = [n for n in wanted if n not in names]
        if missing:
            where = storage.join(shown, missing[0])
            raise BadInput(f"{key}: '{where}' is missing ({index} names it)")
        files = sorted(set(files) | set(wanted))
    for name in files:
        problem = safetensors_problem(storage.join(folder, name))
        if problem:
            where = storage.join(shown, name)
            raise BadInput(
                f"{key}: '{where}' is not a complete safetensors file ({problem}); save or "
                "upload the model again"
            )


def safetensors_problem(uri: str) -> str | None:
    """Why a file is not a whole safetensors file (from its size and header), or None."""
    size = storage.size(uri)
    if size < 8:
        return f"{size} bytes, less than the 8-byte header length"
    length = int.from_bytes(storage.read_range(uri, 0, 8), "little")
    if 8 + length > size:
        return f"header length {length:,} is past the end of the file's {size:,} bytes"
    try:
        header = json.loads(storage.read_range(uri, 8, length))
        ends = [
            entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"
        ]
        end = 8 + length + max(ends, default=0)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        return "its header is not safetensors JSON"
    if end != size:
        return f"{size:,} bytes, its header says {end:,}"
    return None


def config_source(uri: str, cache_dir: Path) -> str:
    """Where `AutoConfig` reads `uri`'s config: an S3 folder's config.json alone is fetched
    (a preflight must not download the weights); hub ids and local folders as they are."""
    if not storage.is_s3(uri):
        return uri
    local = Path(cache_dir) / hashlib.sha256(uri.encode()).hexdigest()[:16]
    if storage.exists(storage.join(uri, "config.json")):
        storage.download_file(storage.join(uri, "config.json"), local / "config.json")
    return str(local)
