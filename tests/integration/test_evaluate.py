"""`mlmjob evaluate` and the perplexity before the first step, end to end on the tiny runs of
test_train (its fixtures and helpers: a preprocessed dataset, an uninterrupted reference run)."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from support.cli import mlmjob
from support.data import ROOT
from support.training import COMPARABLE, config, events

from job.train.evaluate import result_name

pytestmark = pytest.mark.slow


def evaluate(cfg, *sets, nproc=None):
    """`mlmjob evaluate` in one process, or through the pod launcher on `nproc`."""
    args = ["evaluate", "-c", str(cfg)] + [a for s in sets for a in ("--set", s)]
    if nproc is None:
        return mlmjob(*args)
    env = {**os.environ, "MLMJOB_NPROC_PER_NODE": str(nproc)}
    return subprocess.run(
        [sys.executable, "-m", "job.launch", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_summary_states_the_perplexity_before_the_first_step(reference):
    summary = json.loads((reference / "summary.json").read_text())
    # a random 2-layer model guesses among ~2,000 tokens: perplexity in the thousands
    assert summary["initial_perplexity"] > 500
    assert summary["initial_perplexity"] > 2 * summary["perplexity"]
    assert summary["initial_perplexity"] == pytest.approx(
        2.718281828 ** summary["initial_eval_loss"]
    )
    assert [e["step"] for e in events(reference, "eval")] == [12, 24]  # metrics.jsonl unchanged


def test_evaluate_reproduces_the_runs_final_perplexity(synthetic, tmp_path, data_dir, reference):
    cfg = config(synthetic, tmp_path, data_dir, run=reference)
    summary = json.loads((reference / "summary.json").read_text())
    model = reference / "model"
    proc = evaluate(cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = proc.stdout.strip().splitlines()
    assert line.startswith(f"{model}: perplexity {summary['perplexity']:.6g} (eval loss ")
    out = reference / "eval" / f"{result_name(str(model))}.json"
    result = json.loads(out.read_text())
    assert result["perplexity"] == summary["perplexity"]  # same masks, same sums: exactly
    assert result["eval_loss"] == summary["eval_loss"]
    assert result["eval_tokens"] == events(reference, "eval")[-1]["eval_tokens"]
    assert result["dataset_id"] == summary["dataset_id"] and result["world_size"] == 1


def test_two_process_run_evaluated_on_two_processes_exactly_and_on_one_closely(
    synthetic, tmp_path, data_dir, ddp2
):
    run = ddp2  # conftest's 2-process run
    cfg = config(synthetic, tmp_path, data_dir, run=run)
    out = run / "eval" / f"{result_name(str(run / 'model'))}.json"
    summary = json.loads((run / "summary.json").read_text())
    proc = evaluate(cfg, *COMPARABLE, nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["world_size"] == summary["world_size"] == 2
    assert result["perplexity"] == summary["perplexity"]  # the run's batches: exactly

    one = evaluate(cfg, *COMPARABLE)
    assert one.returncode == 0, one.stderr[-3000:]
    result1 = json.loads(out.read_text())
    assert result1["world_size"] == 1 and result1["eval_tokens"] == result["eval_tokens"]
    # Other batches per process: only the summation order of float64 sums differs.
    assert result1["perplexity"] == pytest.approx(summary["perplexity"], rel=1e-6)


def test_evaluate_another_model_writes_its_own_result(synthetic, tmp_path, data_dir, reference):
    """A copy of the model elsewhere (as a hub id or an S3 URI would be): its own file."""
    cfg = config(synthetic, tmp_path, data_dir, run=tmp_path / "elsewhere")
    copy = tmp_path / "copied" / "model"
    shutil.copytree(reference / "model", copy)
    proc = evaluate(cfg, f"infer.model={copy}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (out,) = (tmp_path / "elsewhere" / "eval").glob("*.json")
    assert out.name == result_name(str(copy)) + ".json" and "copied--model" in out.name
    want = json.loads((reference / "summary.json").read_text())["perplexity"]
    assert json.loads(out.read_text())["perplexity"] == want


def test_evaluate_refuses_a_model_without_a_mask_token(synthetic, tmp_path, data_dir, reference):
    from transformers import AutoTokenizer

    bad = tmp_path / "no-mask"
    shutil.copytree(reference / "model", bad)
    tok = AutoTokenizer.from_pretrained(bad)
    tok.mask_token = None
    tok.save_pretrained(bad)
    cfg = config(synthetic, tmp_path, data_dir)
    proc = evaluate(cfg, f"infer.model={bad}")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"mlmjob: error: infer.model: '{bad}' has no mask token; masked-LM perplexity needs one"
    )
    assert not (tmp_path / "run" / "eval").exists()


def test_evaluate_refuses_a_model_with_another_tokenizer(synthetic, tmp_path, data_dir):
    """The dataset's ids would mean other tokens to it: refused, not a meaningless figure."""
    other = ROOT / "job" / "sample" / "tokenizer"  # the demo tokenizer, not the synthetic one
    proc = evaluate(config(synthetic, tmp_path, data_dir), f"infer.model={other}")
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"mlmjob: error: infer.model: the tokenizer of '{other}' differs")
