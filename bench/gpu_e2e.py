"""The e2e part of bench/gpu.py: the job end to end, as the pods run it.

`mlmjob preprocess` (the shared ELI5 file, the roberta-base tokenizer, blocks of 128), then
`python -m job.launch train` (the pods' launcher: torchrun, one worker on one GPU), then
`mlmjob infer` on the trained model, each a fresh process, on a config written to a
temporary folder: the distilroberta-base architecture with random weights
(`model.from_scratch`), bf16 and `train.compile` on CUDA, `run.device` cuda there (cpu
in --smoke), a checkpoint every quarter of the run, so that the background checkpoint
upload runs beside the steps (the run's output is a local folder: its "upload" is a copy
there). Figures come from what the job itself leaves: summary.json (`phases` and the rest),
metrics.jsonl (the log windows' tokens/s), and the log lines of each checkpoint's commit
and of the infer run.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from itertools import pairwise
from pathlib import Path

import gpu
import torch
import yaml

# job/train/checkpointer.py's line at each commit; job/infer/run.py's at the end.
# (what lies between "began" and ";", e.g. "(hash and upload 0.10 s)", may vary).
COMMITTED = re.compile(
    r"checkpoints/step-(\d+) committed ([\d.]+) s after its save began([^;\n]*); "
    r"training waited ([\d.]+) s of it"
)
UPLOAD = re.compile(r"hash and upload ([\d.]+) s")
INFERRED = re.compile(
    r"infer: \d+ parts written, \d+ skipped, (\d+) lines \((\d+) errors\) in [\d.]+ s, "
    r"([\d.]+) lines/s"
)
SUMMARY_KEYS = (
    "phases",
    "tokens_per_second",
    "mfu",
    "wall_seconds",
    "train_seconds",
    "perplexity",
    "initial_perplexity",
    "global_step",
    "epochs",
    "precision",
    "device",
    "input_hidden_fraction",
)
SMOKE_RECORDS = 200  # of 2,375 questions: a few hundred blocks, seconds on a CPU


def schedule(args) -> dict:
    """Steps, checkpoint and log intervals: four checkpoints, five log windows each."""
    every = max(1, args.e2e_steps // 4)
    log = max(1, every // 5)
    return {"max_steps": args.e2e_steps, "checkpoint_every_steps": every, "log_every_steps": log}


def job_config(args, tmp: Path, cuda: bool) -> dict:
    """The run's YAML, as a user would write it for this benchmark."""
    arch = {**gpu.DISTILROBERTA, **(gpu.SMOKE_MODEL if args.smoke else {})}
    arch.pop("vocab_size")  # from_scratch takes the tokenizer's (50,265)
    steps = schedule(args)
    return {
        "run": {
            "output": str(tmp / "run"),
            "seed": gpu.SEED,
            "name": "bench-e2e",
            "device": "cuda" if cuda else "cpu",
        },
        "data": {
            "sources": [{"uri": str(args.eli5)}],
            "block_size": gpu.SEQ,
            "max_records": SMOKE_RECORDS if args.smoke else None,
            "output": str(tmp / "data"),
        },
        "model": {
            "name_or_path": str(args.tokenizer),
            "from_scratch": True,
            "config_overrides": arch,
        },
        "train": {
            "max_steps": steps["max_steps"],
            "per_device_batch_size": args.batch,
            "learning_rate": gpu.LR,
            "weight_decay": gpu.WEIGHT_DECAY,
            "warmup_steps": max(1, steps["max_steps"] // 10),
            "mlm_probability": gpu.MLM_PROBABILITY,
            "checkpoint_every_steps": steps["checkpoint_every_steps"],
            "log_every_steps": steps["log_every_steps"],
            "precision": "bf16" if cuda else "fp32",
            "compile": cuda,
        },
        "infer": {
            "inputs": [str(tmp / "lines.txt")],
            "output": str(tmp / "infer"),
            "top_k": 5,
            "batch_size": 64,
        },
    }


def run_logged(name: str, cmd: list[str], env: dict) -> tuple[str, float]:
    """One command of the job; its log goes on to our stderr as it comes and is kept for
    the figures. A failure raises, naming the command and its exit status."""
    start, kept = time.perf_counter(), []
    with subprocess.Popen(
        cmd, cwd=gpu.ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as proc:
        for line in proc.stdout:
            sys.stderr.write(line)
            kept.append(line)
    if proc.returncode != 0:
        raise RuntimeError(f"e2e: {name} exited {proc.returncode} (its log above, on stderr)")
    return "".join(kept), round(time.perf_counter() - start, 2)


def checkpoints(log: str) -> dict:
    """Each commit's figures from the train log: total (save began to commit) and blocking
    (what the training thread waited), then their sums."""
    rows = []
    for m in COMMITTED.finditer(log):
        row = {"step": int(m[1]), "total_s": float(m[2]), "blocking_s": float(m[4])}
        upload = UPLOAD.search(m[3])
        if upload:  # the background part: hashing and writing/uploading the files
            row["hash_and_upload_s"] = float(upload[1])
        rows.append(row)
    # The last commit is the last step's checkpoint: only the final evaluation is left to
    # hide its upload behind, so the mid-run ones are summed apart too.
    return {"count": len(rows), "all": summed(rows), "mid_run": summed(rows[:-1]), "rows": rows}


def summed(rows: list[dict]) -> dict:
    total = sum(r["total_s"] for r in rows)
    blocking = sum(r["blocking_s"] for r in rows)
    fraction = round(blocking / total, 3) if total else None
    return {"total_s": round(total, 2), "blocking_s": round(blocking, 2), "fraction": fraction}


def steady_tokens_per_second(metrics: Path, batch: int) -> float | None:
    """Tokens/s over the log windows after the first, which holds the first step's start-up
    (torch.compile's compilation and CUDA-graph capture on CUDA). summary.json's
    `tokens_per_second` counts every step, the first included. One process: the global
    batch is `batch`."""
    events = [json.loads(line) for line in metrics.read_text().splitlines()]
    train = [e for e in events if e["event"] == "train"]
    tokens = seconds = 0.0
    for before, window in pairwise(train):
        n = (window["step"] - before["step"]) * batch * gpu.SEQ
        tokens, seconds = tokens + n, seconds + n / window["tokens_per_s"]
    return round(tokens / seconds, 1) if seconds else None


def train_figures(run: Path, log: str, batch: int) -> dict:
    summary = json.loads((run / "summary.json").read_text())
    out = {key: summary.get(key) for key in SUMMARY_KEYS}  # phases: None in an older job
    steady = steady_tokens_per_second(run / "metrics.jsonl", batch)
    out["steady_tokens_per_second"] = steady
    mfu, tps = summary.get("mfu"), summary.get("tokens_per_second")
    # MFU is proportional to tokens/s: the same FLOPs per token, the same peak
    out["steady_mfu"] = round(mfu * steady / tps, 4) if mfu and steady and tps else None
    out["checkpoints"] = checkpoints(log)
    return out


def infer_figures(log: str, out: Path, lines: int) -> dict:
    """The infer run's own line (lines/s after its model is loaded), checked against the
    lines its parts hold."""
    found = INFERRED.search(log)
    if found is None:
        raise RuntimeError("e2e: the infer log has no 'infer: ... lines/s' line")
    written = sum(len(p.read_text().splitlines()) for p in out.glob("part-*.jsonl"))
    if written != lines or int(found[1]) != lines:
        raise RuntimeError(f"e2e: infer wrote {written} lines of {lines}")
    return {"lines": lines, "errors": int(found[2]), "lines_per_s": float(found[3])}


def run_e2e(args) -> dict:
    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as name:
        tmp = Path(name)
        (tmp / "lines.txt").write_text("\n".join(gpu.make_lines(args.lines)) + "\n")
        cfg = tmp / "e2e.yaml"
        cfg.write_text(yaml.safe_dump(job_config(args, tmp, cuda), sort_keys=False))
        env = {
            **os.environ,
            "MLMJOB_NO_PROGRESS": "1",
            "MLMJOB_CACHE": str(tmp / "cache"),
            "MLMJOB_NPROC_PER_NODE": "1",  # a one-GPU pod: the figures are per GPU
        }
        job, seconds = [sys.executable, "-m", "job"], {}
        _, seconds["preprocess"] = run_logged("preprocess", [*job, "preprocess", "-c", cfg], env)
        launch = [sys.executable, "-m", "job.launch", "train", "-c", str(cfg)]
        train_log, seconds["train"] = run_logged("train", launch, env)
        infer_log, seconds["infer"] = run_logged("infer", [*job, "infer", "-c", cfg], env)
        return {
            "config": {"device": "cuda" if cuda else "cpu", "batch_per_gpu": args.batch}
            | schedule(args),
            "command_seconds": seconds,
            "train": train_figures(tmp / "run", train_log, args.batch),
            "infer": infer_figures(infer_log, tmp / "infer", args.lines),
        }
