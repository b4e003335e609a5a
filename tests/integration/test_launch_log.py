"""What `kubectl logs` of a train pod ends with (issue 18.4): the one line that says why it
stopped, not torchrun's report of a failed child, when the workers' exit explains it. (A
SIGTERM's line: test_train.py's test_sigterm_checkpoints_and_resume_matches_uninterrupted.)"""

import signal
from pathlib import Path

import pytest
from support.cli import wait_for, write_config
from support.data import ROOT
from support.training import TINY, assert_log_ends_with, events, last_line, launch, start


def run_config(synthetic, data_dir, tmp_path):
    text = TINY.format(
        run=tmp_path / "run", eli5=synthetic.eli5, data=data_dir, tok=synthetic.tokenizer
    )
    return write_config(tmp_path / "c.yaml", text)


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
    assert_log_ends_with(
        proc.stderr,
        f"mlmjob: error: model.tokenizer: '{ROOT}/job/sample/tokenizer' differs from the "
        f"dataset's tokenizer '{synthetic.tokenizer}' ({manifest.parent})",
    )


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_a_crashed_worker_keeps_the_report_of_its_crash(synthetic, data_dir, tmp_path, nproc):
    """Exit 1 (worth a retry): nothing explains it, so the report of the crash stays:
    torchrun's, or (one worker, which the launcher runs without torchrun) the launcher's."""
    import psutil

    run = tmp_path / "run"
    proc = start(run_config(synthetic, data_dir, tmp_path), "train.max_steps=200", nproc=nproc)
    wait_for(lambda: (run / "metrics.jsonl").exists() and len(events(run)) >= 2)
    workers = [
        p
        for p in psutil.Process(proc.pid).children(recursive=True)
        if "job.launch" not in " ".join(p.cmdline())
    ]
    assert len(workers) == nproc
    for worker in workers:  # all at once: none is left to see its peer gone
        worker.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err[-3000:]
    if nproc == 1:
        assert last_line(err) == "mlmjob: the worker was killed by SIGKILL; exit 1"
    else:
        assert "ChildFailedError" in err and "exitcode  : -9" in err
    assert "mlmjob: preempted" not in err and "mlmjob: error" not in err
