"""Loading Hugging Face models and tokenizers from a hub id, a folder or an object store."""

from __future__ import annotations

from pathlib import Path

from job import storage
from job.errors import BadInput


def load_pretrained(cls, uri: str, cache_dir: Path, key: str, **kwargs):
    """`cls.from_pretrained` on a local copy of `uri` (S3 folders are fetched into
    `cache_dir`); a missing or unreadable model is bad input naming the config key."""
    local = storage.to_local(uri, cache_dir)
    try:
        return cls.from_pretrained(local, **kwargs)
    except (OSError, ValueError) as e:
        raise BadInput(f"{key}: cannot load '{uri}': {e}") from None
