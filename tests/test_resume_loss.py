"""The logged train loss of a multi-process run resumed inside a log window (issue 18.5).

Each rank sums its own micro-batches' loss between log steps; a checkpoint keeps the sum
of every rank's, and the resumed run counts it once: every logged loss equals the
uninterrupted run's, the window that spans the checkpoint included."""

import json

import pytest
import torch
from conftest import preprocessed, wait_for, write_config
from test_train import TINY, events, kill_all, launch, start

from job.train.state import LossWindow, TrainState


@pytest.mark.unit
def test_a_checkpointed_loss_window_is_counted_once_on_any_number_of_processes():
    def total(windows: list[LossWindow]) -> tuple[float, float]:  # the all-reduce, simulated
        return windows[0].total(
            lambda *_: [sum(w.loss.item() for w in windows), sum(w.tokens for w in windows)]
        )

    before = [LossWindow("cpu") for _ in range(2)]  # 2 ranks, the steps before a checkpoint
    for rank, window in enumerate(before):
        window.add(torch.tensor(10.0 + rank), 4 + rank)
    saved = TrainState()
    saved.window_loss, saved.window_tokens = total(before)
    assert (saved.window_loss, saved.window_tokens) == (21.0, 9)
    for world in (2, 1, 3):  # resumed on as many processes, or on fewer or more
        state = TrainState(**json.loads(json.dumps(saved.state_dict())))  # train_state.json
        after = [LossWindow.restored(state, "cpu", rank) for rank in range(world)]
        for window in after:
            window.add(torch.tensor(1.0), 1)
        assert total(after) == (21.0 + world, 9 + world)
        for window in after:
            window.reset()
        assert total(after) == (0.0, 0)


# 2 processes, 12 steps, a log step every 3 and a checkpoint every 5: the window of steps
# 4-6 is cut by the checkpoint at step 5 (steps 4 and 5 before it, 6 after).
SETS = (
    "train.max_steps=12",
    "train.log_every_steps=3",
    "train.checkpoint_every_steps=5",
    "train.keep_checkpoints=10",
    "train.eval_every_steps=12",
)


@pytest.fixture(scope="module")
def data(tmp_path_factory, synthetic):
    return preprocessed(tmp_path_factory, synthetic, TINY)


def run_config(synthetic, data, tmp_path, name: str):
    text = TINY.format(run=tmp_path / name, eli5=synthetic.eli5, data=data, tok=synthetic.tokenizer)
    return write_config(tmp_path / f"{name}.yaml", text)


@pytest.mark.slow
def test_two_process_resume_inside_a_log_window_logs_the_uninterrupted_losses(
    synthetic, data, tmp_path
):
    ref = launch(run_config(synthetic, data, tmp_path, "ref"), *SETS, nproc=2)
    assert ref.returncode == 0, ref.stderr[-3000:]
    want = {e["step"]: e["loss"] for e in events(tmp_path / "ref")}
    assert sorted(want) == [3, 6, 9, 12]

    run = tmp_path / "run"
    cfg = run_config(synthetic, data, tmp_path, "run")
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
