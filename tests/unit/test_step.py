"""The training step's shape: no host synchronisation in a plain step, batches prepared
ahead, and the pure rules (schedule, batch layout) the loop is built from. The direct
tests: no process, no server (the others are in tests/integration/test_step.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from job.config import TrainConfig
from job.train.batch import MaskedBatch
from job.train.prefetch import Prefetcher
from job.train.schedule import Schedule


@pytest.mark.unit
def test_masked_batch_lays_out_the_masked_positions():
    labels = np.full((3, 6), -100)
    labels[0, [1, 4]] = [11, 14]
    labels[2, [0, 2, 5]] = [20, 22, 25]  # row 1 has no masked token
    inputs = np.arange(18).reshape(3, 6)
    b = MaskedBatch.build(inputs, labels)
    assert b.n == 5
    assert b.targets.tolist() == [11, 14, 20, 22, 25]
    assert b.token_index.tolist() == [1, 4, 12, 14, 17]  # into the flat 3 x 6
    assert b.positions.shape == (3, 3)  # width: the most masked tokens in a row
    assert b.positions[0, :2].tolist() == [1, 4] and b.positions[2].tolist() == [0, 2, 5]
    assert b.query_index.tolist() == [0, 1, 6, 7, 8]  # into the flat 3 x 3
    flat = b.positions.flatten()[b.query_index]
    rows = b.query_index // 3
    assert (rows * 6 + flat).tolist() == b.token_index.tolist()


@pytest.mark.unit
def test_masked_batch_with_nothing_masked():
    b = MaskedBatch.build(np.zeros((2, 4), dtype=np.int64), np.full((2, 4), -100))
    assert b.n == 0 and b.positions.shape == (2, 1) and len(b.query_index) == 0


@pytest.mark.unit
def test_schedule_equals_the_trainer_schedule_step_for_step():
    """get_linear_schedule_with_warmup(warmup=4, total=20) at each step, batch 8."""
    from transformers import get_linear_schedule_with_warmup

    t = TrainConfig(max_steps=20, warmup_steps=4, learning_rate=1e-3)
    s = Schedule.build(t, n_train=1000, base_batch=8)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    ref = get_linear_schedule_with_warmup(opt, 4, 20)
    for step in range(20):
        assert s.lr(step * 8) == pytest.approx(ref.get_last_lr()[0], rel=1e-12, abs=1e-18)
        opt.step()
        ref.step()
    assert s.lr(20 * 8) == 0.0
    assert s.finished(seen=160, epoch=0, sample=160, batch=8)
    assert not s.finished(seen=152, epoch=0, sample=152, batch=8)


@pytest.mark.unit
def test_schedule_in_epochs_survives_a_smaller_batch():
    t = TrainConfig(epochs=2, warmup_steps=0, learning_rate=1.0)
    s = Schedule.build(t, n_train=100, base_batch=16)  # drop_last: 96 samples an epoch
    assert (s.epoch_samples, s.total_samples) == (96, 192)
    assert s.epoch_over(sample=96, batch=16) and s.epoch_over(sample=92, batch=8)
    assert not s.epoch_over(sample=88, batch=8)  # a batch of 8 still fits after a rescale
    assert s.finished(seen=184, epoch=1, sample=92, batch=8)  # the dropped tail
    assert s.lr(96) == pytest.approx(0.5)


@pytest.mark.unit
def test_prefetcher_returns_what_build_returns_for_every_key():
    calls = []
    p = Prefetcher(lambda k: calls.append(k) or k * 10)
    p.ahead(1)
    assert p.get(1) == 10
    p.ahead(2)
    assert p.get(3) == 30  # a wrong guess: built on demand, the guess dropped
    p.close()
    assert p.stats.built == len(calls) >= 2
