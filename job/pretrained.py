"""Loading Hugging Face models and tokenizers from a hub id, a folder or an object store."""

from __future__ import annotations

import hashlib
from pathlib import Path

from job import storage
from job.errors import BadInput

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")  # fmt: skip
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")


def load_pretrained(cls, uri: str, cache_dir: Path, key: str, **kwargs):
    """`cls.from_pretrained` on a local copy of `uri` (S3 folders are fetched into
    `cache_dir`); a missing or unreadable model is bad input naming the config key."""
    local = storage.to_local(uri, cache_dir)
    if Path(local).is_dir():
        expect_files(local, uri, key, "Tokenizer" in cls.__name__)
    try:
        return cls.from_pretrained(local, **kwargs)
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


def config_source(uri: str, cache_dir: Path) -> str:
    """Where `AutoConfig` reads `uri`'s config: an S3 folder's config.json alone is fetched
    (a preflight must not download the weights); hub ids and local folders as they are."""
    if not storage.is_s3(uri):
        return uri
    local = Path(cache_dir) / hashlib.sha256(uri.encode()).hexdigest()[:16]
    if storage.exists(storage.join(uri, "config.json")):
        storage.download_file(storage.join(uri, "config.json"), local / "config.json")
    return str(local)
