"""Training runs for the tests: the tiny config, the pod launch script (torchrun) as a
process, what a run leaves (events, weights) and how two runs compare."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from support.cli import mlmjob, wait_for, write_config
from support.data import ROOT, Inputs

TINY = """
run:
  output: '{run}'
  lease_ttl_seconds: 10  # a killed run's lease expires in seconds, not a minute
  seed: 42
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
  max_steps: 24
  per_device_batch_size: 4
  # the test split's 94 blocks in 3 batches, not 24: on a CPU the tiny model's forward of
  # 32 rows costs what 5 of 4 rows do (each evaluation cost as much as 8 training steps)
  eval_batch_size: 32
  learning_rate: 1.0e-3
  warmup_steps: 4
  eval_every_steps: 12
  checkpoint_every_steps: 6
  keep_checkpoints: 2
  log_every_steps: 1
"""


TIMING = {"tokens_per_s"}

NO_CLIP = "train.max_grad_norm=1.0e9"  # DeepSpeed clips in its own way
NO_DROPOUT = (
    "model.config_overrides={hidden_size: 64, num_hidden_layers: 2, "
    "num_attention_heads: 2, intermediate_size: 128, hidden_dropout_prob: 0.0, "
    "attention_probs_dropout_prob: 0.0}"
)
# What the layout comparisons run (conftest's ddp2 and zero2): no clipping, no dropout
# (DDP, DeepSpeed, 1 process x 8 samples and 2 x 4 draw dropout masks from different
# streams), 12 steps.
COMPARABLE = (NO_CLIP, NO_DROPOUT, "train.max_steps=12")
ZERO2 = "train.deepspeed=configs/deepspeed/zero2.json"

# What torchrun prints when a worker exits but 0: never in a log that a worker's exit file
# explains (exit 2 or 3, issue 18.4)
TORCHRUN_REPORT = ("Traceback", "ChildFailedError", "FAILED", "failed (exitcode")


def last_line(stderr: str) -> str:
    return [line for line in stderr.splitlines() if line.strip()][-1]


def assert_log_ends_with(stderr: str, line: str) -> None:
    """The pod's log ends with `line` (why it stopped), torchrun's report left out."""
    for report in TORCHRUN_REPORT:
        assert report not in stderr, stderr[-3000:]
    assert last_line(stderr) == line


def config(src: Inputs, tmp_path: Path, data_dir, run=None, name="c.yaml") -> Path:
    run = run or tmp_path / "run"
    return write_config(
        tmp_path / name, TINY.format(run=run, eli5=src.eli5, data=data_dir, tok=src.tokenizer)
    )


def launch_cmd(cfg, *sets):
    args = [sys.executable, "-m", "job.launch", "train", "-c", str(cfg)]
    for s in sets:
        args += ["--set", s]
    return args


def launch(cfg, *sets, nproc=1, env=None, timeout=600):
    env = {**os.environ, "MLMJOB_NPROC_PER_NODE": str(nproc), **(env or {})}
    proc = subprocess.run(
        launch_cmd(cfg, *sets), cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    return proc


def train_here(cfg, *sets, env=None):
    """`mlmjob train` on one process as `launch` runs it, in this process where it needs
    no fresh one (support.cli.mlmjob; DeepSpeed: a process of its own): for the runs whose
    process and launcher are not what a test is about (a reference, a resume)."""
    return mlmjob("train", "-c", cfg, *(x for s in sets for x in ("--set", s)), env=env)


def start(cfg, *sets, nproc=1):
    env = {**os.environ, "MLMJOB_NPROC_PER_NODE": str(nproc)}
    return subprocess.Popen(
        launch_cmd(cfg, *sets),
        cwd=ROOT,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def events(run: Path, kind="train"):
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == kind]


def without_timing(evts):
    return [{k: v for k, v in e.items() if k not in TIMING} for e in evts]


def weights(run: Path):
    return load_file(run / "model" / "model.safetensors")


def kill_all(proc):
    """SIGKILL the launcher, torchrun and every worker at once, as a node loss would."""
    import psutil

    tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for p in tree:
        p.kill()
    psutil.wait_procs(tree, timeout=30)
    proc.wait()


def preempt(cfg, run: Path, *sets, nproc=1, after=5) -> str:
    """Start a run, SIGTERM it (what the kubelet sends the pod's PID 1) once it has logged
    `after` train events, and check it stops with a committed checkpoint: its stderr."""
    proc = start(cfg, *sets, nproc=nproc)
    wait_for(lambda: (run / "metrics.jsonl").exists() and len(events(run)) >= after)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 3, err[-3000:]
    return err


def assert_events_close(got: list[dict], want: list[dict], rel=1e-5):
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys()
        for k in w:
            if isinstance(w[k], float):
                assert g[k] == pytest.approx(w[k], rel=rel), (k, g, w)
            else:
                assert g[k] == w[k], (k, g, w)


def assert_same_as(run: Path, reference: Path, rel=1e-5, atol=1e-6):
    assert_events_close(without_timing(events(run)), without_timing(events(reference)), rel)
    assert_events_close(events(run, "eval"), events(reference, "eval"), rel)
    got, want = weights(run), weights(reference)
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=rel, atol=atol, msg=k)
