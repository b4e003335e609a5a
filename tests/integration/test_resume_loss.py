"""The logged train loss of a multi-process run resumed inside a log window (issue 18.5).

Each rank sums its own micro-batches' loss between log steps; a checkpoint keeps the sum
of every rank's, and the resumed run counts it once: every logged loss equals the
uninterrupted run's, the window that spans the checkpoint included."""

import pytest
from support.cli import wait_for, write_config
from support.training import TINY, events, kill_all, launch, start

# 2 processes, 12 steps, a log step every 3 and a checkpoint every 5: the window of steps
# 4-6 is cut by the checkpoint at step 5 (steps 4 and 5 before it, 6 after).
SETS = (
    "train.max_steps=12",
    "train.log_every_steps=3",
    "train.checkpoint_every_steps=5",
    "train.keep_checkpoints=10",
    "train.eval_every_steps=12",
)


def run_config(synthetic, data_dir, tmp_path, name: str):
    text = TINY.format(
        run=tmp_path / name, eli5=synthetic.eli5, data=data_dir, tok=synthetic.tokenizer
    )
    return write_config(tmp_path / f"{name}.yaml", text)


@pytest.mark.slow
def test_two_process_resume_inside_a_log_window_logs_the_uninterrupted_losses(
    synthetic, data_dir, tmp_path
):
    ref = launch(run_config(synthetic, data_dir, tmp_path, "ref"), *SETS, nproc=2)
    assert ref.returncode == 0, ref.stderr[-3000:]
    want = {e["step"]: e["loss"] for e in events(tmp_path / "ref")}
    assert sorted(want) == [3, 6, 9, 12]

    run = tmp_path / "run"
    cfg = run_config(synthetic, data_dir, tmp_path, "run")
    proc = start(cfg, *SETS, nproc=2)
    wait_for(lambda: (run / "checkpoints" / "step-5" / "COMMITTED.json").exists())
    kill_all(proc)  # as a node loss: no checkpoint at the kill, the step-5 one is the latest
    for later in (run / "checkpoints").glob("step-*"):
        if later.name != "step-5":
            (later / "COMMITTED.json").unlink(missing_ok=True)
    again = launch(cfg, *SETS, nproc=2)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming from {run}/checkpoints/step-5" in again.stderr
    got = {e["step"]: e["loss"] for e in events(run)}
    assert sorted(got) == sorted(want)
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-6), (step, got, want)
    got_eval, want_eval = events(run, "eval"), events(tmp_path / "ref", "eval")
    assert [e["eval_loss"] for e in got_eval] == pytest.approx(
        [e["eval_loss"] for e in want_eval], rel=1e-6
    )
