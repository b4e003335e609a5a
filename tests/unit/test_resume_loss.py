"""The logged train loss of a multi-process run resumed inside a log window (issue 18.5).
The direct tests: no process, no server (the others are in
tests/integration/test_resume_loss.py)."""

import json

import pytest
import torch

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
