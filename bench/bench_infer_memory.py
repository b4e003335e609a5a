"""Peak memory of `mlmjob infer` as the input file and the part grow.

A tiny random RoBERTa (1 layer x 32, roberta-base's 50,265-token vocabulary: this measures
memory, not the model) fills bench_infer's lines (ELI5 sentences, one word replaced by
<mask>), written over and over to a temporary text file (never kept); top_k 3, batch 64,
the job's defaults. Each `mlmjob infer` runs as a fresh process under bench_memory's
wrapper, which reads the child's peak resident set (`getrusage(RUSAGE_CHILDREN)`: exact,
no polling).

file_50MB, file_200MB: the file is cut into P parts of 5,000 lines and the run is worker
P-1 of P, which owns the last part only: it streams the whole file, reading past the other
workers' lines, and infers 5,000 of them. Inferring all 0.5-2 million lines would take
hours on 2 CPUs; how memory goes with the lines inferred is what part_* measures.
part_5k, part_20k: one worker infers a file of 5,000 and of 20,000 lines, one part each
(where the whole-part code grew: it held a part's results until the commit).
masks_48x200: 48 lines of 200 masks each (about 410 tokens), one batch of 64: 9,600 mask
rows x 50,265 tokens, which the head once took whole (logits and probabilities, 3.9 GB in
fp32) and now takes 667 rows at a time (issue 20, item 5).

`MLMJOB_BENCH_INFER_MEMORY_PYTHONPATH` runs another checkout (the figures before a change;
part_* and masks_* only, as older checkouts have no `infer.lines_per_part`).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_infer import make_lines
from bench_memory import _WRAPPER
from common import ROOT, TOKENIZER

PER_PART = 5_000
FILES = {"file_50MB": 50 << 20, "file_200MB": 200 << 20}  # bytes, rounded to whole parts
PARTS = {"part_5k": 5_000, "part_20k": 20_000}  # lines, in one part
MASK_HEAVY = {"masks_48x200": (48, 200)}  # lines, masks per line
_DONE = re.compile(r"infer: (\d+) parts written, (\d+) skipped, (\d+) lines")


def write_input(path: Path, base: list[str], lines: int) -> int:
    """`lines` lines cycling over `base`, numbered so that no two are equal; its size."""
    with open(path, "w") as f:
        for i in range(lines):
            f.write(f"{i}: {base[i % len(base)]}\n")
    return path.stat().st_size


def write_mask_heavy(path: Path, lines: int, masks: int) -> None:
    """`lines` lines of `masks` masks, each followed by a word: the head's worst case."""
    words = ["stars", "the", "sky", "planets", "light", "why"]
    with open(path, "w") as f:
        for i in range(lines):
            f.write(f"{i}: " + " ".join(f"<mask> {words[(i + m) % 6]}" for m in range(masks)))
            f.write("\n")


def tiny_model(folder: Path) -> None:
    import torch
    from transformers import AutoTokenizer, RobertaConfig, RobertaForMaskedLM

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    torch.manual_seed(0)
    config = RobertaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=514,
        pad_token_id=tok.pad_token_id,
    )
    RobertaForMaskedLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)


def measure(workdir: Path, source: Path, args: list[str], pythonpath: str | None) -> dict:
    """One `mlmjob infer` in a fresh process: peak RSS, seconds, the lines it inferred."""
    out = workdir / f"out-{time.time_ns()}"
    cfg = workdir / "bench-infer-memory.yaml"
    cfg.write_text(
        f"infer: {{model: '{workdir}/model', inputs: ['{source}'], output: '{out}', top_k: 3, "
        f"batch_size: 64}}\ndata: {{cache_dir: '{workdir}/cache'}}\n"
    )
    env = {**os.environ, "MLMJOB_NO_PROGRESS": "1", "PYTHONPATH": pythonpath or str(ROOT)}
    cmd = [sys.executable, "-m", "job", "infer", "-c", str(cfg), *args]
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", _WRAPPER, *cmd], env=env, cwd=workdir, capture_output=True, text=True
    )
    seconds = time.perf_counter() - start
    peak_kb, rc = proc.stdout.split()[-2:]
    done = _DONE.search(proc.stderr)
    if rc != "0" or not done:
        raise RuntimeError(f"infer failed on {source}:\n{proc.stderr[-3000:]}")
    written = sum(p.read_bytes().count(b"\n") for p in out.glob("part-*.jsonl"))
    assert written == int(done[3]), (written, done[0])
    return {
        "input_mb": round(source.stat().st_size / 2**20, 1),
        "lines_inferred": written,
        "peak_rss_mb": round(int(peak_kb) / 1024),
        "seconds": round(seconds, 1),
    }


def run() -> dict:
    pythonpath = os.environ.get("MLMJOB_BENCH_INFER_MEMORY_PYTHONPATH")
    base = make_lines(20_000)
    result: dict = {"model": "RoBERTa 1 x 32, vocab 50,265", "lines_per_part": PER_PART}
    with tempfile.TemporaryDirectory(prefix="mlmjob-bench-infer-memory-") as tmp:
        workdir = Path(tmp)
        tiny_model(workdir / "model")
        source = workdir / "lines.txt"
        for name, lines in PARTS.items():
            write_input(source, base, lines)
            result[name] = measure(workdir, source, [], pythonpath)
            print(f"bench infer memory: {name}: {result[name]}", file=sys.stderr)
        for name, (lines, masks) in MASK_HEAVY.items():
            write_mask_heavy(source, lines, masks)
            result[name] = {"masks": lines * masks, **measure(workdir, source, [], pythonpath)}
            print(f"bench infer memory: {name}: {result[name]}", file=sys.stderr)
        for name, size in ({} if pythonpath else FILES).items():
            avg = sum(len(f"{i}: {line}\n".encode()) for i, line in enumerate(base)) / len(base)
            parts = max(1, round(size / avg / PER_PART))
            write_input(source, base, parts * PER_PART)
            args = [
                "--set",
                f"infer.lines_per_part={PER_PART}",
                "--worker-index",
                str(parts - 1),
                "--num-workers",
                str(parts),
            ]
            result[name] = {"parts": parts, **measure(workdir, source, args, pythonpath)}
            print(f"bench infer memory: {name}: {result[name]}", file=sys.stderr)
        source.unlink()
    return result


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
