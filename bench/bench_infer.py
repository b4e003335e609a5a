"""Fill-mask throughput on CPU: mlmjob infer against pipeline("fill-mask") line by line.

Same model (RoBERTa, 4 layers x 256, the full 50,265-token vocabulary, saved once), same
lines: LINES sentences from the shared ELI5 answers, each with one word replaced by
<mask>. The tutorial calls the pipeline once per text; mlmjob sorts by length and
batches, projecting onto the vocabulary only at mask positions.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ELI5, ROOT, TOKENIZER

LINES = int(os.environ.get("BENCH_INFER_LINES", "1000"))


def make_lines(n: int) -> list[str]:
    records = json.loads(gzip.decompress(ELI5.read_bytes()))
    out = []
    for r in records:
        for answer in r["answers"]["text"]:
            for sentence in re.split(r"(?<=[.!?])\s+", answer):
                words = sentence.split()
                if 6 <= len(words) <= 40:
                    words[len(words) // 2] = "<mask>"
                    out.append(" ".join(words))
                    if len(out) == n:
                        return out
    return out


def run() -> dict:
    import torch
    from transformers import AutoTokenizer, RobertaConfig, RobertaForMaskedLM, pipeline

    lines = make_lines(LINES)
    with tempfile.TemporaryDirectory() as tmp:
        tok = AutoTokenizer.from_pretrained(TOKENIZER)
        torch.manual_seed(0)
        model = RobertaForMaskedLM(
            RobertaConfig(
                vocab_size=len(tok),
                hidden_size=256,
                num_hidden_layers=4,
                num_attention_heads=4,
                intermediate_size=1024,
                max_position_embeddings=514,
            )
        )
        model.save_pretrained(f"{tmp}/model")
        tok.save_pretrained(f"{tmp}/model")
        Path(tmp, "lines.txt").write_text("\n".join(lines) + "\n")

        fill = pipeline("fill-mask", model=f"{tmp}/model", top_k=3)
        start = time.perf_counter()
        for line in lines:
            fill(line)
        pipeline_s = time.perf_counter() - start

        cfg = Path(tmp, "c.yaml")
        cfg.write_text(
            f"infer: {{model: '{tmp}/model', inputs: ['{tmp}/lines.txt'], "
            f"output: '{tmp}/out', top_k: 3, batch_size: 64}}\n"
        )
        env = {**os.environ, "MLMJOB_NO_PROGRESS": "1"}
        code = (
            "import json, sys; from job.config import load_config; "
            "from job.commands.infer import infer;"
            "print(json.dumps(infer(load_config(sys.argv[1]))))"
        )
        proc = subprocess.run(
            [sys.executable, "-c", code, str(cfg)],
            cwd=ROOT,
            env=env,
            check=True,
            capture_output=True,
            text=True,
        )
        stats = json.loads(proc.stdout.strip().splitlines()[-1])
    ours = stats["lines"] / stats["process_seconds"]  # model loading excluded, as for the pipeline
    theirs = len(lines) / pipeline_s
    return {
        "lines": len(lines),
        "model": "RoBERTa 4 x 256, vocab 50,265",
        "mlmjob": {"lines_per_s": round(ours, 1), "seconds": stats["process_seconds"]},
        "pipeline_one_by_one": {"lines_per_s": round(theirs, 1), "seconds": round(pipeline_s, 2)},
        "speedup": round(ours / theirs, 2),
    }
