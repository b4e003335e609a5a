"""Validation gaps (issue 18, item 3): non-finite numbers in the config, a run whose loss
turns NaN or infinite, strict JSON in every file written, duplicate YAML keys, a 0-byte
`.gz` source, and a SIGTERM during start-up.

Each case goes through the CLI where it can (exit code, one `mlmjob: error:` line, no
traceback); the training runs share one preprocessed dataset (module scope)."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from support.cli import mlmjob, write_config
from support.data import ROOT

from job import jsonio
from job.config import load_config
from job.train.accel import Preemption
from job.train.metrics import Metrics, write_summary

TINY = """
run:
  output: '{run}'
  lease_ttl_seconds: 10  # a killed run's lease expires in seconds, not a minute
data:
  sources: ['{eli5}']
  output: '{data}'
  max_records: 300
model:
  name_or_path: '{tok}'
  from_scratch: true
  config_overrides: {{hidden_size: 64, num_hidden_layers: 2, num_attention_heads: 2,
                     intermediate_size: 128}}
train:
  max_steps: 12
  per_device_batch_size: 4
  learning_rate: 1.0e-3
  warmup_steps: 0
  eval_every_steps: 100
  checkpoint_every_steps: 2
  log_every_steps: 1
"""
# Peak 1e6, warmed up over 1000 steps: finite losses for a few steps (lr 0, 1000, 2000,
# ...), then NaN (at step 6 on the CPU tried), well before max_steps.
DIVERGE = ("train.learning_rate=1.0e+6", "train.warmup_steps=1000")


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("mlmjob: error:")]


def one_error(proc) -> str:
    """The single `mlmjob: error:` line of a run that exited 2, without the prefix."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (line,) = error_lines(proc.stderr)
    return line.removeprefix("mlmjob: error: ")


def _refuse(constant: str):
    raise ValueError(f"not JSON: {constant}")


def strict(text: str):
    """json.loads that refuses NaN and Infinity, as jq and every other strict reader do."""
    return json.loads(text, parse_constant=_refuse)


def strict_lines(path: Path) -> list[dict]:
    return [strict(line) for line in path.read_text().splitlines()] if path.exists() else []


def checkpoint_steps(run: Path) -> list[int]:
    """Every step-N folder, committed or not."""
    return sorted(int(p.name.removeprefix("step-")) for p in (run / "checkpoints").glob("step-*"))


# ---- (a) non-finite numbers in the config ------------------------------------------------


def test_infinite_learning_rate_exits_2_before_training(tmp_path):
    run = tmp_path / "run"
    for command in ("validate", "train"):
        proc = mlmjob(
            command,
            "-c",
            "configs/demo.yaml",
            "--set",
            "train.learning_rate=.inf",
            "--set",
            f"run.output={run}",
        )
        assert one_error(proc) == (
            "configs/demo.yaml: key 'train.learning_rate' must be a finite number, got inf"
        )
    assert not run.exists()


# ---- (d) duplicate YAML keys -----------------------------------------------------------


def test_duplicate_key_exits_2_with_one_line(tmp_path):
    path = write_config(tmp_path / "c.yaml", "run:\n  output: a\nrun:\n  output: b\n")
    proc = mlmjob("validate", "-c", path)
    assert one_error(proc) == f"{path}:3: invalid YAML: duplicate key 'run' (first at line 1)"


# ---- (c) strict JSON ---------------------------------------------------------------------


@pytest.mark.unit
def test_json_writer_refuses_nan_and_infinity(tmp_path):
    assert jsonio.dumps({"a": [1.5, None]}) == '{"a": [1.5, null]}'
    for bad, where in [
        ({"loss": math.nan}, "loss"),
        ({"e": [{"x": math.inf}]}, "e[0].x"),
        ([-math.inf], "[0]"),
    ]:
        with pytest.raises(ValueError, match=re.escape(f"not JSON: {where} is")):
            jsonio.dumps(bad)
    metrics = Metrics(str(tmp_path), None)
    metrics.log({"event": "train", "step": 1, "loss": 2.5})
    metrics.flush()
    metrics.log({"event": "train", "step": 2, "loss": math.nan})
    with pytest.raises(ValueError, match="not JSON: loss is nan"):
        metrics.flush()
    assert strict_lines(tmp_path / "metrics.jsonl") == [{"event": "train", "step": 1, "loss": 2.5}]
    with pytest.raises(ValueError, match="not JSON: perplexity is inf"):
        write_summary(str(tmp_path), {"perplexity": math.inf})
    assert not (tmp_path / "summary.json").exists()


# ---- (e) a 0-byte .gz source -----------------------------------------------------------


def test_preprocess_with_a_zero_byte_gz_among_the_sources(tmp_path):
    (tmp_path / "empty.json.gz").write_bytes(b"")
    sources = f"data.sources=[{ROOT}/job/sample/eli5-sample.jsonl, {tmp_path}/empty.json.gz]"
    proc = mlmjob(
        "preprocess",
        "-c",
        "configs/demo.yaml",
        "--set",
        sources,
        "--set",
        f"data.output={tmp_path / 'data'}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = [line for line in proc.stderr.splitlines() if "0 bytes" in line]
    assert len(said) == 1 and said[0].endswith(
        f"{tmp_path}/empty.json.gz: 0 bytes, not gzip data: counted as an empty source"
    )
    (manifest,) = (tmp_path / "data").glob("*/manifest.json")
    splits = strict(manifest.read_text())["splits"]
    assert splits["train"]["records"] + splits["test"]["records"] == 32  # the sample's


# ---- (b) a run whose loss turns NaN or infinite -------------------------------------------


def config(synthetic, tmp_path: Path, data_dir: Path) -> Path:
    return write_config(
        tmp_path / "c.yaml",
        TINY.format(
            run=tmp_path / "run", eli5=synthetic.eli5, data=data_dir, tok=synthetic.tokenizer
        ),
    )


def train(cfg: Path, *sets: str):
    args = ["train", "-c", cfg]
    for s in sets:
        args += ["--set", s]
    return mlmjob(*args)


DIVERGED = re.compile(
    r"(train|eval) loss is (nan|inf|-inf) at step (\d+)( \(the mean of steps \d+-\d+\))?: "
    r"training diverged \(lower train.learning_rate or raise train.warmup_steps\); "
    r"last good checkpoint: (.*)$"
)


def diverged(proc, run: Path) -> tuple[str, int, int | None]:
    """(which loss, the step it stopped at, the last good checkpoint's step or None) of a
    run that stopped on a NaN, after checking what it left behind."""
    m = DIVERGED.match(one_error(proc))
    assert m, one_error(proc)
    which, step, last = m[1], int(m[3]), m[5]
    good = None
    if last != "none yet":
        assert last.startswith(f"{run}/checkpoints/step-"), last
        good = int(last.rsplit("-", 1)[1])
        assert (run / "checkpoints" / f"step-{good}" / "COMMITTED.json").exists()
        assert good < step
    assert all(s <= (good or 0) for s in checkpoint_steps(run)), checkpoint_steps(run)
    for name in ("train_state.json", "COMMITTED.json"):
        for path in (run / "checkpoints").glob(f"*/{name}"):
            strict(path.read_text())
    events = strict_lines(run / "metrics.jsonl")  # strict: no NaN, no Infinity
    assert all(e["step"] < step or (e["event"] == "train" and which == "eval") for e in events)
    assert not (run / "summary.json").exists()
    return which, step, good


@pytest.mark.slow
def test_diverging_run_exits_2_naming_the_last_good_checkpoint(synthetic, tmp_path, data_dir):
    run = tmp_path / "run"
    proc = train(config(synthetic, tmp_path, data_dir), *DIVERGE)
    which, step, good = diverged(proc, run)
    assert which == "train" and step < 12
    assert good == (step - 1) // 2 * 2 and good > 0  # every 2 steps, the last before it
    losses = [e["loss"] for e in strict_lines(run / "metrics.jsonl")]
    assert len(losses) == step - 1 and all(math.isfinite(x) for x in losses)


@pytest.mark.slow
def test_nan_right_away_names_no_checkpoint(synthetic, tmp_path, data_dir):
    proc = train(config(synthetic, tmp_path, data_dir), "train.learning_rate=1.0e+6")
    assert diverged(proc, tmp_path / "run")[2] is None
    assert one_error(proc).endswith("last good checkpoint: none yet")
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_nan_between_log_steps_is_caught_before_the_checkpoint(synthetic, tmp_path, data_dir):
    """Logged only at the end: the checkpoint every 2 steps is what sees the NaN first, and
    it is not written."""
    run = tmp_path / "run"
    proc = train(config(synthetic, tmp_path, data_dir), *DIVERGE, "train.log_every_steps=100")
    which, step, good = diverged(proc, run)
    assert which == "train" and step % 2 == 0 and step < 12
    assert good == step - 2
    assert f"(the mean of steps 1-{step})" in one_error(proc)
    assert strict_lines(run / "metrics.jsonl") == []


@pytest.mark.slow
def test_nan_eval_loss_stops_before_the_checkpoint(synthetic, tmp_path, data_dir):
    """Step 5's update makes the weights NaN: its (finite) train loss is logged, then the
    evaluation of step 5 is NaN and its checkpoint is never written."""
    run = tmp_path / "run"
    proc = train(
        config(synthetic, tmp_path, data_dir),
        *DIVERGE,
        "train.log_every_steps=5",
        "train.eval_every_steps=5",
        "train.checkpoint_every_steps=5",
    )
    which, step, good = diverged(proc, run)
    assert (which, step, good) == ("eval", 5, None)
    assert [e["step"] for e in strict_lines(run / "metrics.jsonl")] == [5]  # train only


@pytest.mark.slow
def test_huge_finite_eval_loss_completes_with_a_capped_perplexity(synthetic, tmp_path, data_dir):
    """Weights blown up but finite: eval loss above 709.78, where exp overflows (this was
    an OverflowError, exit 1). Warmup keeps the learning rate at 10 x step."""
    run = tmp_path / "run"
    proc = train(
        config(synthetic, tmp_path, data_dir),
        "train.learning_rate=1.0e+6",
        "train.warmup_steps=100000",
        "train.max_steps=4",
        "train.checkpoint_every_steps=100",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = strict((run / "summary.json").read_text())
    assert summary["eval_loss"] > 709.79
    assert summary["perplexity"] == pytest.approx(sys.float_info.max)
    strict_lines(run / "metrics.jsonl")


# ---- (f) SIGTERM during start-up ---------------------------------------------------------


def launch_cmd(cfg: Path, *sets: str) -> list[str]:
    args = [sys.executable, "-m", "job.launch", "train", "-c", str(cfg)]
    for s in sets:
        args += ["--set", s]
    return args


def start(cfg: Path, *sets: str, env: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, "MLMJOB_NPROC_PER_NODE": "1", **(env or {})}
    return subprocess.Popen(
        launch_cmd(cfg, *sets),
        cwd=ROOT,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def sigterm_when(proc: subprocess.Popen, text: str) -> str:
    """SIGTERM the launcher (as the kubelet does PID 1) once a line with `text` is logged;
    the whole stderr once it has exited."""
    head = []
    for line in proc.stderr:
        head.append(line)
        if text in line:
            break
    proc.send_signal(signal.SIGTERM)
    _, rest = proc.communicate(timeout=300)
    return "".join(head) + rest


def resubmit_completes(cfg: Path, run: Path, *sets: str) -> None:
    """The resubmission, in this process (what it starts from is the test, not its launch)."""
    proc = train(cfg, *sets)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from" not in proc.stderr  # nothing was checkpointed: it starts over
    assert strict((run / "summary.json").read_text())["global_step"] == 4


@pytest.mark.slow
def test_sigterm_during_startup_exits_3_and_a_resubmission_completes(synthetic, tmp_path, data_dir):
    """SIGTERM once the model is built (prepare and the initial evaluation follow): exit 3
    at the end of start-up, not 143 (or 1 through torchrun), nothing checkpointed."""
    cfg = config(synthetic, tmp_path, data_dir)
    run = tmp_path / "run"
    sets = ("train.max_steps=4", "train.eval_batch_size=1")
    proc = start(cfg, *sets)
    err = sigterm_when(proc, "optimizer: AdamW")
    assert proc.returncode == 3, err[-3000:]
    assert "Traceback" not in err
    assert err.rstrip().endswith(
        "mlmjob: preempted during start-up, before the first step: nothing to checkpoint yet "
        "(a resubmission starts over); exit 3"
    )
    assert not (run / "checkpoints").exists() and not (run / "metrics.jsonl").exists()
    resubmit_completes(cfg, run, *sets)


@pytest.mark.slow
def test_sigterm_in_the_initial_evaluation_exits_3(synthetic, tmp_path, data_dir, monkeypatch):
    """In process, the SIGTERM arriving in the middle of the evaluation before step 1."""
    from job.train.build import build
    from job.train.loop import train

    cfg = load_config(
        config(synthetic, tmp_path, data_dir),
        ["train.max_steps=4", f"data.cache_dir={tmp_path / 'cache'}"],
    )
    old = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(Preemption, "_installed", None)
    try:
        parts = build(cfg)
        evaluate = parts.validator.evaluate

        def interrupted():
            handler = getattr(signal.getsignal(signal.SIGTERM), "__self__", None)
            if not isinstance(handler, Preemption):  # else the SIGTERM would end pytest
                pytest.fail("no SIGTERM handler during start-up")
            os.kill(os.getpid(), signal.SIGTERM)
            return evaluate()

        monkeypatch.setattr(parts.validator, "evaluate", interrupted)
        assert train(parts) == 3
    finally:
        signal.signal(signal.SIGTERM, old)
    assert parts.state.step == 0 and parts.state.initial_eval is not None
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_sigterm_while_waiting_for_the_dataset_exits_3_at_once(synthetic, tmp_path):
    cfg = config(synthetic, tmp_path, tmp_path / "no-data-yet")
    proc = start(cfg, env={"MLMJOB_WAIT_SECONDS": "300"})
    began = time.monotonic()
    err = sigterm_when(proc, "waiting for the dataset")
    assert proc.returncode == 3, err[-3000:]
    assert time.monotonic() - began < 60  # not the 300 s of the wait
    assert err.rstrip().endswith(
        "mlmjob: preempted during start-up, before the first step: while waiting for the "
        "dataset, nothing written; exit 3"
    )
    assert "Traceback" not in err


def catches_sigterm(pid: int) -> bool:
    """Whether process `pid` has a SIGTERM handler: Linux's SigCgt mask in /proc/PID/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    return False


@pytest.mark.slow
def test_sigterm_before_the_launcher_starts_a_worker_exits_3(synthetic, tmp_path, data_dir):
    """The kubelet's SIGTERM in a pod's first moments: as soon as the launcher handles it,
    while it still loads the config (a sleep of a second, instead, was sometimes too early
    for a launcher starting on a busy machine, and it died of the signal: -15)."""
    cfg = config(synthetic, tmp_path, data_dir)
    proc = start(cfg, "train.max_steps=4")
    while not catches_sigterm(proc.pid):
        assert proc.poll() is None, proc.stderr.read()[-3000:]  # it exited before: say why
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    assert not psutil.Process(proc.pid).children()  # no worker yet when the signal came
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 3, err[-3000:]
