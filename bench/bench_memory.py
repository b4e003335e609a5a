"""Peak memory and throughput of `mlmjob preprocess` as the input grows.

Inputs: the shared ELI5 file (5.06 MB of JSON, 874,594 tokens) repeated with fresh ids
(`q_id` and `a_id` get a `-k` suffix) to about 0.25 GB and 1 GB of JSON, written to a
temporary folder (never kept) as JSON lines, gzip JSON lines, one JSON array and Parquet.
Each `mlmjob preprocess` runs as a fresh process under a fresh wrapper, which reads the
child's peak resident set (`getrusage(RUSAGE_CHILDREN).ru_maxrss`: exact, no polling).
Figures: `peak_rss_mb`, `seconds` (the whole process: start-up, tokenizer load, reading,
tokenizing, shards), `tokens_per_s` = the manifest's tokens / seconds.

The 1 GB size runs on two formats only by default (gzip JSON lines, the usual one, and the
JSON array, the one a whole-file reader suffers most from) to keep the section under 10
minutes on 2 cores; `MLMJOB_BENCH_MEMORY_FULL=1` runs every format at both sizes.
`MLMJOB_BENCH_MEMORY_PYTHONPATH` runs another checkout (the figures before a change).
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ELI5, ROOT, TOKENIZER

SIZES = {"0.25GB": 50, "1GB": 200}  # repetitions of the 5.06 MB file
FORMATS = ("jsonl", "jsonl.gz", "json", "parquet")
LARGE_FORMATS = ("jsonl.gz", "json")  # at 1 GB unless MLMJOB_BENCH_MEMORY_FULL=1

# Runs one command and prints its peak RSS in kB: a fresh process per measurement, so that
# RUSAGE_CHILDREN holds that command's peak alone.
_WRAPPER = (
    "import resource, subprocess, sys\n"
    "rc = subprocess.run(sys.argv[1:]).returncode\n"
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, rc)\n"
)


def _base_records() -> list[dict]:
    return json.loads(gzip.decompress(ELI5.read_bytes()))


def _fresh(records: list[dict], k: int):
    for r in records:
        answers = {**r["answers"], "a_id": [f"{a}-{k}" for a in r["answers"]["a_id"]]}
        yield {**r, "q_id": f"{r['q_id']}-{k}", "answers": answers}


def generate(folder: Path, reps: int, fmt: str) -> Path:
    """The ELI5 file `reps` times with fresh ids, in one of FORMATS; returns the file."""
    base = _base_records()
    path = folder / f"eli5-x{reps}.{fmt}"
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        writer = None
        for k in range(reps):  # one row group per repetition
            table = pa.Table.from_pylist(list(_fresh(base, k)))
            writer = writer or pq.ParquetWriter(path, table.schema)
            writer.write_table(table)
        writer.close()
        return path
    gz = fmt.endswith(".gz")
    with gzip.open(path, "wb", compresslevel=1) if gz else open(path, "wb") as f:  # noqa: SIM115
        if fmt == "json":
            f.write(b"[\n")
        for k in range(reps):
            lines = [json.dumps(r).encode() for r in _fresh(base, k)]
            if fmt == "json":
                sep = b",\n" if k < reps - 1 else b"\n"
                f.write(b",\n".join(lines) + sep)
            else:
                f.write(b"\n".join(lines) + b"\n")
        if fmt == "json":
            f.write(b"]\n")
    return path


def measure(source: Path, workdir: Path, pythonpath: str | None = None) -> dict:
    """One `mlmjob preprocess` in a fresh process: peak RSS, seconds, tokens/s."""
    out = workdir / f"out-{source.name}-{time.time_ns()}"
    cfg = workdir / "bench-memory.yaml"
    cfg.write_text(
        f"data:\n  sources: ['{source}']\n  output: '{out}'\n  cache_dir: '{workdir}/cache'\n"
        f"model:\n  name_or_path: '{TOKENIZER}'\n"
    )
    env = {**os.environ, "MLMJOB_NO_PROGRESS": "1", "TOKENIZERS_PARALLELISM": "true"}
    env["PYTHONPATH"] = pythonpath or str(ROOT)
    cmd = [sys.executable, "-m", "job", "preprocess", "-c", str(cfg)]
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", _WRAPPER, *cmd], env=env, cwd=workdir, capture_output=True, text=True
    )
    seconds = time.perf_counter() - start
    peak_kb, rc = proc.stdout.split()[-2:]
    if rc != "0":
        raise RuntimeError(f"preprocess failed on {source}:\n{proc.stderr[-3000:]}")
    (manifest,) = out.glob("*/manifest.json")
    splits = json.loads(manifest.read_text())["splits"]
    tokens = sum(s["tokens"] for s in splits.values())
    return {
        "input_mb": round(source.stat().st_size / 2**20, 1),
        "tokens": tokens,
        "peak_rss_mb": round(int(peak_kb) / 1024),
        "seconds": round(seconds, 1),
        "tokens_per_s": round(tokens / seconds),
    }


def run() -> dict:
    full = os.environ.get("MLMJOB_BENCH_MEMORY_FULL") == "1"
    pythonpath = os.environ.get("MLMJOB_BENCH_MEMORY_PYTHONPATH")
    result = {}
    with tempfile.TemporaryDirectory(prefix="mlmjob-bench-memory-") as tmp:
        workdir = Path(tmp)
        for size, reps in SIZES.items():
            for fmt in FORMATS if full or size != "1GB" else LARGE_FORMATS:
                source = generate(workdir, reps, fmt)
                result[f"{size} {fmt}"] = measure(source, workdir, pythonpath)
                source.unlink()
                print(f"bench memory: {size} {fmt}: {result[f'{size} {fmt}']}", file=sys.stderr)
    return result


if __name__ == "__main__":  # python bench/bench_memory.py [--only-generate FOLDER REPS FMT]
    if sys.argv[1:2] == ["--only-generate"]:
        print(generate(Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]))
    else:
        print(json.dumps(run(), indent=2))
