"""Tokenize texts and pack token ids into fixed-size blocks.

The tutorial tokenizes with `tokenizer(texts)` and packs with `group_texts`, whose
`sum(lists, [])` is quadratic in the batch size. Here the fast tokenizer's Rust
`encode_batch_fast` (the same ids, no offsets) fills one flat numpy array and packing is a
reshape: linear, and one remainder dropped per split instead of one per 1,000-record batch.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from job.errors import BadInput
from job.pretrained import load_pretrained


def load_tokenizer(name_or_uri: str, cache_dir: str | Path):
    """A fast tokenizer from a hub id, a local folder or an S3 folder; it needs a mask token."""
    from transformers import AutoTokenizer

    cache = Path(cache_dir) / "tokenizers"
    tok = load_pretrained(AutoTokenizer, name_or_uri, cache, "model.tokenizer")
    if not getattr(tok, "is_fast", False):
        raise BadInput(f"model.tokenizer: '{name_or_uri}' has no fast (Rust) tokenizer")
    if tok.mask_token is None:
        raise BadInput(f"model.tokenizer: '{name_or_uri}' has no mask token; MLM needs one")
    return tok


def tokenizer_sha256(tok) -> str:
    """Identity of a tokenizer's behaviour, independent of where it was loaded from."""
    return hashlib.sha256(tok.backend_tokenizer.to_str().encode()).hexdigest()


def id_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every token id."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def encode(tok, texts: list[str], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Token ids (special tokens included, as `tokenizer(texts)`) flat, and per-text lengths."""
    encodings = tok.backend_tokenizer.encode_batch_fast(texts, add_special_tokens=True)
    lengths = np.fromiter((len(e) for e in encodings), dtype=np.int64, count=len(encodings))
    ids = np.fromiter((i for e in encodings for i in e.ids), dtype=dtype, count=int(lengths.sum()))
    return ids, lengths


def pack(ids: np.ndarray, block_size: int) -> np.ndarray:
    """Cut a flat id array into [n, block_size] blocks, dropping the remainder once."""
    n = len(ids) // block_size
    return ids[: n * block_size].reshape(n, block_size)
