"""Training throughput on CPU: mlmjob against the tutorial's Trainer, same everything.

Same model config (RoBERTa, 4 layers x 256, the full 50,265-token vocabulary), same
blocks (the shared ELI5 file preprocessed once), batch 8 x 128, same optimizer settings,
same number of steps. Each trainer runs in its own process. Afterwards both final models
are evaluated by one procedure (fixed masks, token-weighted over the test split), so the
perplexities compare like for like.

mlmjob trains twice: eagerly and with `train.compile` (the static batch layout, the whole
forward compiled once). Their step rates are read the same way from metrics.jsonl (the
median of the log windows' tokens/s after the first window, which holds the compilation),
side by side in "compile".
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ELI5, ROOT, TOKENIZER

STEPS = int(os.environ.get("BENCH_TRAIN_STEPS", "100"))
MODEL = {
    "hidden_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "intermediate_size": 1024,
}
LR, WARMUP, BATCH = 5e-4, 6, 8

CONFIG = """
run: {{output: '{run}', seed: 42}}
data: {{sources: ['{eli5}'], output: '{data}'}}
model:
  name_or_path: '{tok}'
  from_scratch: true
  config_overrides: {model}
train:
  max_steps: {steps}
  per_device_batch_size: {batch}
  learning_rate: {lr}
  warmup_steps: {warmup}
  checkpoint_every_steps: 100000
  eval_every_steps: 100000
  log_every_steps: 10
"""


def _trainer_baseline(dataset_dir: str, out: str) -> None:
    """The tutorial's way: Trainer + DataCollatorForLanguageModeling (runs in a subprocess)."""
    import time

    import datasets
    import numpy as np
    import torch
    from transformers import (
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        RobertaConfig,
        RobertaForMaskedLM,
        Trainer,
        TrainingArguments,
    )

    manifest = json.loads((Path(dataset_dir) / "manifest.json").read_text())
    blocks = np.concatenate(
        [np.load(Path(dataset_dir) / s["path"]) for s in manifest["splits"]["train"]["shards"]]
    )
    train = datasets.Dataset.from_dict({"input_ids": blocks.astype(np.int64).tolist()})
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    torch.manual_seed(42)
    config = RobertaConfig(
        vocab_size=len(tok), max_position_embeddings=130, pad_token_id=tok.pad_token_id, **MODEL
    )
    model = RobertaForMaskedLM(config)
    args = TrainingArguments(
        output_dir=out,
        max_steps=STEPS,
        per_device_train_batch_size=BATCH,
        learning_rate=LR,
        weight_decay=0.01,
        warmup_steps=WARMUP,
        lr_scheduler_type="linear",
        logging_steps=10,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=42,
        disable_tqdm=True,
    )
    collator = DataCollatorForLanguageModeling(tokenizer=tok, mlm_probability=0.15)
    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=collator)
    start = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - start
    trainer.save_model(str(Path(out) / "model"))
    tokens = STEPS * BATCH * 128
    Path(out, "result.json").write_text(
        json.dumps(
            {
                "steps": STEPS,
                "train_seconds": round(seconds, 2),
                "tokens_per_s": round(tokens / seconds, 1),
                "train_loss": result.training_loss,
            }
        )
    )


def eval_perplexity(model_dir: str, dataset_dir: str) -> float:
    """One evaluation for both: fixed masks, token-weighted over the whole test split."""
    import numpy as np
    import torch
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from job.train.batch import MaskedBatch
    from job.train.masking import EVAL_STREAM, mask_tokens
    from job.train.model import SparseMLM

    manifest = json.loads((Path(dataset_dir) / "manifest.json").read_text())
    blocks = np.concatenate(
        [np.load(Path(dataset_dir) / s["path"]) for s in manifest["splits"]["test"]["shards"]]
    )
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    model = SparseMLM(AutoModelForMaskedLM.from_pretrained(model_dir)).eval()
    special = np.asarray(sorted(tok.all_special_ids))
    total = count = 0.0
    with torch.inference_mode():
        for i in range(0, len(blocks), 32):
            ids = np.arange(i, min(i + 32, len(blocks)))
            inputs, labels = mask_tokens(
                blocks[ids],
                ids,
                seed=42,
                stream=EVAL_STREAM,
                special_ids=special,
                mask_id=tok.mask_token_id,
                vocab_size=len(tok),
            )
            batch = MaskedBatch.build(inputs, labels)
            total += float(model(*batch.tensors()))
            count += batch.n
    return math.exp(total / count)


def steady_rate(run_dir: Path) -> dict:
    """Steps/s and tokens/s of the log windows after the first (start-up, compilation)."""
    lines = Path(run_dir, "metrics.jsonl").read_text().splitlines()
    rates = [e["tokens_per_s"] for e in map(json.loads, lines) if e["event"] == "train"][1:]
    tokens_per_s = statistics.median(rates)
    return {
        "tokens_per_s": round(tokens_per_s, 1),
        "steps_per_s": round(tokens_per_s / (BATCH * 128), 3),
        "windows": len(rates),
    }


def compile_section(eager_dir: Path, compiled_dir: Path, compiled_summary: dict) -> dict:
    eager, compiled = steady_rate(eager_dir), steady_rate(compiled_dir)
    return {
        "eager": eager,
        "compiled": {**compiled, "train_seconds": compiled_summary["train_seconds"]},
        "speedup": round(compiled["tokens_per_s"] / eager["tokens_per_s"], 2),
    }


def run() -> dict:
    env = {**os.environ, "MLMJOB_NO_PROGRESS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "bench.yaml"
        cfg.write_text(
            CONFIG.format(
                run=f"{tmp}/run",
                eli5=ELI5,
                data=f"{tmp}/data",
                tok=TOKENIZER,
                model=json.dumps(MODEL),
                steps=STEPS,
                batch=BATCH,
                lr=LR,
                warmup=WARMUP,
            )
        )
        job = [sys.executable, "-m", "job"]
        dataset = subprocess.run(
            [*job, "preprocess", "-c", cfg],
            env=env,
            cwd=ROOT,
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        subprocess.run(
            [*job, "train", "-c", cfg], env=env, cwd=ROOT, check=True, capture_output=True
        )
        ours = json.loads(Path(tmp, "run", "summary.json").read_text())
        compiled = [f"run.output={tmp}/compiled", "train.compile=true"]
        subprocess.run(
            [*job, "train", "-c", cfg, *(a for s in compiled for a in ("--set", s))],
            env=env,
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        compiled_summary = json.loads(Path(tmp, "compiled", "summary.json").read_text())
        side_by_side = compile_section(Path(tmp, "run"), Path(tmp, "compiled"), compiled_summary)
        code = f"import bench_train; bench_train._trainer_baseline({dataset!r}, {tmp + '/hf'!r})"
        subprocess.run(
            [sys.executable, "-c", code],
            env=env,
            cwd=Path(__file__).parent,
            check=True,
            capture_output=True,
        )
        hf = json.loads(Path(tmp, "hf", "result.json").read_text())
        ppl_ours = eval_perplexity(f"{tmp}/run/model", dataset)
        ppl_hf = eval_perplexity(f"{tmp}/hf/model", dataset)
        side_by_side["eager"]["eval_perplexity"] = round(ppl_ours, 2)
        ppl_compiled = eval_perplexity(f"{tmp}/compiled/model", dataset)
        side_by_side["compiled"]["eval_perplexity"] = round(ppl_compiled, 2)
    return {
        "model": {**MODEL, "vocab_size": 50265, "batch": f"{BATCH} x 128", "steps": STEPS},
        "mlmjob": {
            "tokens_per_s": ours["tokens_per_second"],
            "train_seconds": ours["train_seconds"],
            "eval_perplexity": round(ppl_ours, 2),
            "input_hidden_fraction": ours["input_hidden_fraction"],
            "input_wait_seconds": ours["input_wait_seconds"],
        },
        "trainer": {
            "tokens_per_s": hf["tokens_per_s"],
            "train_seconds": hf["train_seconds"],
            "eval_perplexity": round(ppl_hf, 2),
        },
        "speedup": round(ours["tokens_per_second"] / hf["tokens_per_s"], 2),
        "perplexity_ratio": round(ppl_ours / ppl_hf, 4),
        "compile": side_by_side,
    }
