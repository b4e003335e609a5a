"""Preprocessing throughput: mlmjob against the tutorial's pipeline, same data, same run.

Input: the shared ELI5 file repeated REPEAT times (about 3.5 M tokens) so that start-up
does not dominate. Three figures, tokens per second:
- encode_batch: the raw Rust tokenizer on the joined texts (the bound for any pipeline),
- mlmjob: `preprocess()` end to end (read gzip JSON, tokenize, split, pack, write shards),
- tutorial: datasets map(preprocess_function) + map(group_texts with sum(lists, [])),
  num_proc=2, as the Hugging Face tutorial does.
"""

from __future__ import annotations

import gzip
import json
import tempfile
import time
from pathlib import Path

from common import ELI5, TOKENIZER

REPEAT = 4


def _records() -> list[dict]:
    records = json.loads(gzip.decompress(ELI5.read_bytes()))
    return [{**r, "q_id": f"{r['q_id']}-{k}"} for k in range(REPEAT) for r in records]


def bench_encode_batch(texts: list[str]) -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TOKENIZER).backend_tokenizer
    start = time.perf_counter()
    tokens = sum(len(e.ids) for e in tok.encode_batch(texts))
    seconds = time.perf_counter() - start
    return {"tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds)}


def bench_mlmjob(path: Path, out: Path) -> dict:
    from job.config import Config, DataConfig, ModelConfig, SourceConfig
    from job.data.preprocess import preprocess
    from job.data.shards import read_manifest

    cfg = Config(
        data=DataConfig(sources=[SourceConfig(uri=str(path))], output=str(out)),
        model=ModelConfig(name_or_path=str(TOKENIZER)),
    )
    start = time.perf_counter()
    root = preprocess(cfg)
    seconds = time.perf_counter() - start
    splits = read_manifest(root).data["splits"]
    tokens = sum(s["tokens"] for s in splits.values())
    blocks = sum(s["blocks"] for s in splits.values())
    return {
        "tokens": tokens,
        "blocks": blocks,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(tokens / seconds),
    }


def bench_tutorial(records: list[dict]) -> dict:
    import datasets
    from transformers import AutoTokenizer

    datasets.disable_caching()
    start = time.perf_counter()
    rows = [{"q_id": r["q_id"], "answers": {"text": r["answers"]["text"]}} for r in records]
    eli5 = datasets.Dataset.from_list(rows).train_test_split(test_size=0.2, seed=42).flatten()
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    block_size = 128

    def preprocess_function(examples):
        return tokenizer([" ".join(x) for x in examples["answers.text"]])

    def group_texts(examples):
        concatenated = {k: sum(examples[k], []) for k in examples.keys()}  # noqa: SIM118 (verbatim)
        total = len(concatenated[list(examples.keys())[0]])
        if total >= block_size:
            total = (total // block_size) * block_size
        return {
            k: [t[i : i + block_size] for i in range(0, total, block_size)]
            for k, t in concatenated.items()
        }

    tokenized = eli5.map(
        preprocess_function, batched=True, num_proc=2, remove_columns=eli5["train"].column_names
    )
    tokens = sum(len(x) for split in tokenized.values() for x in split["input_ids"])
    lm = tokenized.map(group_texts, batched=True, num_proc=2)
    seconds = time.perf_counter() - start
    blocks = sum(len(split) for split in lm.values())
    return {
        "tokens": tokens,
        "blocks": blocks,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(tokens / seconds),
    }


def run() -> dict:
    records = _records()
    texts = [" ".join(r["answers"]["text"]) for r in records]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "eli5.json.gz"
        path.write_bytes(gzip.compress(json.dumps(records).encode(), compresslevel=6))
        raw = bench_encode_batch(texts)
        ours = bench_mlmjob(path, Path(tmp) / "out")
        tutorial = bench_tutorial(records)
    return {
        "input": f"{ELI5.name} x{REPEAT} ({len(records)} records)",
        "encode_batch": raw,
        "mlmjob": ours,
        "tutorial": tutorial,
        "mlmjob_vs_encode_batch": round(ours["tokens_per_s"] / raw["tokens_per_s"], 3),
        "mlmjob_vs_tutorial": round(ours["tokens_per_s"] / tutorial["tokens_per_s"], 2),
    }
