"""The training step's shape: no host synchronisation in a plain step, batches prepared
ahead, and the pure rules (schedule, batch layout) the loop is built from."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from job.config import TrainConfig, load_config
from job.train.batch import MaskedBatch
from job.train.loop import iteration
from job.train.prefetch import Prefetcher
from job.train.schedule import Schedule

# Operations that make the host wait for the device (a value read back, or a shape that
# depends on data).
SYNCING = {
    "aten._local_scalar_dense",
    "aten.item",
    "aten.nonzero",
    "aten.is_nonzero",
    "aten.equal",
    "aten.masked_select",
    "aten.unique",
    "aten._unique2",
}


def _bool_index(args) -> bool:
    """Indexing with a boolean mask (`x[mask]`, `x[mask] = v`): its output shape depends on
    the data, so it runs a nonzero inside, below the dispatch mode; seen here as the op."""
    flat = [a for arg in args for a in (arg if isinstance(arg, (list, tuple)) else [arg])]
    return any(
        isinstance(a, torch.Tensor) and a.dtype in (torch.bool, torch.uint8) for a in flat[1:]
    )


class SyncCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name in SYNCING:
            self.ops[name] += 1
        elif name in ("aten.index", "aten.index_put", "aten.index_put_") and _bool_index(args):
            self.ops[f"{name} (boolean mask)"] += 1
        return func(*args, **(kwargs or {}))


def test_the_counter_sees_boolean_mask_indexing():
    x, mask = torch.arange(6.0), torch.tensor([True, False] * 3)
    with SyncCounter() as counter:
        _ = x[mask]
        x[mask] = 0.0
        _ = x[torch.tensor([0, 2])]  # integer indices: fixed shape, no sync
        _ = x.sum().item()
    assert counter.ops == Counter(
        {
            "aten.index (boolean mask)": 1,
            "aten.index_put_ (boolean mask)": 1,
            "aten._local_scalar_dense": 1,
        }
    )


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    """A training run's parts on the bundled demo sample, in this process (one CPU process),
    set up for the first step."""
    from job.data.preprocess import preprocess
    from job.train.build import build
    from job.train.loop import begin

    tmp = tmp_path_factory.mktemp("step")
    # 29 steps an epoch at batch 1: the steps measured never reach an epoch end.
    sets = [
        f"data.output={tmp / 'data'}",
        f"run.output={tmp / 'run'}",
        "train.epochs=100",
        "train.log_every_steps=1000",
        "train.eval_every_steps=1000",
        "train.checkpoint_every_steps=1000",
        f"data.cache_dir={tmp / 'cache'}",
        "train.per_device_batch_size=1",
    ]
    cfg = load_config("configs/demo.yaml", sets)
    preprocess(cfg)
    parts = build(cfg)
    begin(parts)
    return parts


def test_plain_steps_do_not_synchronise(trainer):
    """Steps 1-9 are plain; step 10 checks for a SIGTERM (one all-reduced flag read back)."""
    for step in range(1, 10):
        with SyncCounter() as counter:
            assert iteration(trainer) is False
        assert trainer.state.step == step
        assert counter.ops == Counter(), f"step {step}: {dict(counter.ops)}"
    with SyncCounter() as counter:
        iteration(trainer)
    assert counter.ops == Counter({"aten._local_scalar_dense": 1})  # the preemption flag


def test_log_step_reads_the_loss_once(trainer):
    trainer.cfg.train.log_every_steps = 3  # a log step: the window's loss comes back once
    try:
        while (trainer.state.step + 1) % 3 != 0 or (trainer.state.step + 1) % 10 == 0:
            iteration(trainer)
        with SyncCounter() as counter:
            iteration(trainer)
    finally:
        trainer.cfg.train.log_every_steps = 1000
    # the window's loss, then the preemption flag (log steps check it too)
    assert counter.ops == Counter({"aten._local_scalar_dense": 2})


def test_prefetcher_builds_the_next_batch_ahead(trainer):
    stats = trainer.batches.stats
    built = stats.built
    for _ in range(5):
        iteration(trainer)
    assert stats.built == built + 5
    assert 0.0 <= stats.hidden_fraction <= 1.0


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
