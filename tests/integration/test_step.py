"""The training step's shape: no host synchronisation in a plain step, batches prepared
ahead, and the pure rules (schedule, batch layout) the loop is built from."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from job.config import load_config
from job.train import dist
from job.train.loop import iteration

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


@pytest.fixture
def checks(monkeypatch):
    """The preemption checks made (Checkpointer.poll's one all-reduce: the SIGTERM flag and
    the nodes still uploading a checkpoint, read back in one `.tolist()`, which a CPU tensor
    does not dispatch, so SyncCounter cannot see it here)."""
    made = []
    real = dist.sum_ranks
    monkeypatch.setattr(dist, "sum_ranks", lambda *a: made.append(a) or real(*a))
    return made


def test_plain_steps_do_not_synchronise(trainer, checks):
    """Steps 1-9 are plain; step 10 checks for a SIGTERM (one all-reduce read back)."""
    for step in range(1, 10):
        with SyncCounter() as counter:
            assert iteration(trainer) is False
        assert trainer.state.step == step
        assert counter.ops == Counter(), f"step {step}: {dict(counter.ops)}"
        assert checks == [], f"step {step}"
    with SyncCounter() as counter:
        iteration(trainer)
    assert counter.ops == Counter()
    assert len(checks) == 1  # the preemption flag, with the uploads in flight


def test_log_step_reads_the_loss_once(trainer, checks):
    trainer.cfg.train.log_every_steps = 3  # a log step: the window's loss comes back once
    try:
        while (trainer.state.step + 1) % 3 != 0 or (trainer.state.step + 1) % 10 == 0:
            iteration(trainer)
        before = len(checks)
        with SyncCounter() as counter:
            iteration(trainer)
    finally:
        trainer.cfg.train.log_every_steps = 1000
    # the window's loss (`.item()`), then the preemption check (log steps check it too)
    assert counter.ops == Counter({"aten._local_scalar_dense": 1})
    assert len(checks) == before + 1


def test_prefetcher_builds_the_next_batch_ahead(trainer):
    stats = trainer.batches.stats
    iteration(trainer)  # a fresh trainer's first step builds its batch and the next one
    built = stats.built
    for _ in range(5):
        iteration(trainer)
    assert stats.built == built + 5
    assert 0.0 <= stats.hidden_fraction <= 1.0
