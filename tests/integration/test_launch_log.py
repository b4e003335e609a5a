"""What `kubectl logs` of a train pod ends with (issue 18.4): the one line that says why it
stopped, not torchrun's report of a failed child, when the workers' exit explains it."""

import signal
from pathlib import Path

import pytest
from support.cli import wait_for, write_config
from support.data import ROOT
from support.training import TINY, events, launch, preempt, start

from job.train import checkpoint

TORCHRUN_REPORT = ("Traceback", "ChildFailedError", "FAILED", "failed (exitcode")


def run_config(synthetic, data_dir, tmp_path):
    text = TINY.format(
        run=tmp_path / "run", eli5=synthetic.eli5, data=data_dir, tok=synthetic.tokenizer
    )
    return write_config(tmp_path / "c.yaml", text)


def last_line(stderr: str) -> str:
    return [line for line in stderr.splitlines() if line.strip()][-1]


@pytest.mark.slow
def test_sigterm_log_ends_with_the_preemption_line(synthetic, data_dir, tmp_path):
    run = tmp_path / "run"
    err = preempt(run_config(synthetic, data_dir, tmp_path), run, "train.max_steps=200", after=3)
    for report in TORCHRUN_REPORT:
        assert report not in err, err[-3000:]
    step, uri = checkpoint.latest(str(run))
    assert uri == f"{run}/checkpoints/step-{step}"
    assert (
        last_line(err) == f"mlmjob: preempted at step {step}: checkpoint committed ({uri}); exit 3"
    )
    assert f"preempted at step {step}: checkpoint committed ({uri}), exiting 3" in err  # the log


@pytest.mark.slow
def test_bad_input_log_ends_with_the_error_line_on_two_processes(synthetic, data_dir, tmp_path):
    """Rank 0 refuses the tokenizer; torchrun then stops rank 1, which may log after it."""
    (manifest,) = Path(data_dir).glob("*/manifest.json")
    proc = launch(
        run_config(synthetic, data_dir, tmp_path),
        f"data.dataset={manifest.parent}",
        f"model.name_or_path={ROOT}/job/sample/tokenizer",
        nproc=2,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    for report in TORCHRUN_REPORT:
        assert report not in proc.stderr, proc.stderr[-3000:]
    assert last_line(proc.stderr) == (
        f"mlmjob: error: model.tokenizer: '{ROOT}/job/sample/tokenizer' differs from the "
        f"dataset's tokenizer '{synthetic.tokenizer}' ({manifest.parent})"
    )


@pytest.mark.slow
def test_a_crashed_worker_keeps_torchruns_report(synthetic, data_dir, tmp_path):
    """Exit 1 (worth a retry): nothing explains it, so torchrun's report stays."""
    import psutil

    run = tmp_path / "run"
    proc = start(run_config(synthetic, data_dir, tmp_path), "train.max_steps=200")
    wait_for(lambda: (run / "metrics.jsonl").exists() and len(events(run)) >= 2)
    (worker,) = [
        p
        for p in psutil.Process(proc.pid).children(recursive=True)
        if "job.launch" not in " ".join(p.cmdline())
    ]
    worker.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err[-3000:]
    assert "ChildFailedError" in err and "exitcode  : -9" in err
    assert "mlmjob: preempted" not in err and "mlmjob: error" not in err
