"""The fast unit layer: the pure rules the job is built from, tested directly.

No subprocess, no S3, no network; local storage is a temp folder. Every expected value is
worked out here (by hand, by `transformers`' or `datasets`' own code), not read back from
the code under test.

Several tests here found defects (checkpoint lookup under `file://`/`./` run folders and
under a `.../checkpoints/step-N/` parent, pruning of the checkpoint just saved after a
fallback, malformed-record examples that depended on the worker count); fixed since.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from support.data import DEMO_TOKENIZER, ROOT

from job import storage
from job.config import TrainConfig, load_config
from job.data import preprocess as pre
from job.data.blocks import encode, id_dtype, load_tokenizer
from job.data.loader import batch_ids, epoch_order
from job.data.sources import iter_records
from job.log import log
from job.train import checkpoint
from job.train.build import rescale
from job.train.checkpointer import should_checkpoint
from job.train.loop import PREEMPTION_CHECK_STEPS, should_check_preemption
from job.train.reporter import should_log
from job.train.schedule import Schedule
from job.train.state import TrainState
from job.train.validator import should_eval

pytestmark = pytest.mark.unit

SAMPLE = ROOT / "job" / "sample" / "eli5-sample.jsonl"


@pytest.fixture(autouse=True)
def _log_propagates(monkeypatch):
    """caplog listens on the root logger; `setup_logging` (run by the CLI) cuts mlmjob off."""
    monkeypatch.setattr(log, "propagate", True)


# ---- 1. the learning-rate schedule ----------------------------------------------------

LR = 1e-3


def trainer_lr(step: float, warmup: int, total: int) -> float:
    """transformers' own lr lambda (get_linear_schedule_with_warmup) at a (fractional) step."""
    from transformers import get_linear_schedule_with_warmup

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    return LR * get_linear_schedule_with_warmup(opt, warmup, total).lr_lambdas[0](step)


def test_schedule_values_at_the_landmarks():
    """warmup 4 steps, 20 steps of batch 8: worked out by hand from the linear formula."""
    s = Schedule.build(TrainConfig(max_steps=20, warmup_steps=4, learning_rate=LR), 1000, 8)
    assert (s.warmup_samples, s.total_samples, s.epochs) == (32, 160, None)
    assert s.lr(0) == 0.0  # the first step runs at 0 (the Trainer's warmup)
    assert s.lr(8) == pytest.approx(LR / 4)  # step 1
    assert s.lr(24) == pytest.approx(3 * LR / 4)  # step 3: the last warmup step
    assert s.lr(32) == pytest.approx(LR)  # step 4: warmup done, the peak
    assert s.lr(96) == pytest.approx(LR * 8 / 16)  # step 12: half way down
    assert s.lr(152) == pytest.approx(LR / 16)  # step 19: the last step trains, above 0
    assert s.lr(160) == 0.0  # after the last step: exactly 0
    assert s.lr(10_000) == 0.0  # never negative past the end


def test_schedule_without_warmup_starts_at_the_peak():
    s = Schedule.build(TrainConfig(max_steps=10, warmup_steps=0, learning_rate=LR), 100, 4)
    assert s.lr(0) == LR
    assert s.lr(20) == pytest.approx(LR * 5 / 10)
    assert s.lr(40) == 0.0


@pytest.mark.parametrize("new_batch", [4, 16, 24])
def test_schedule_follows_samples_when_the_global_batch_changes(new_batch):
    """6 steps of 8, then a resume on another process count: every later step's lr is the
    Trainer's lr at the same number of samples (its step = samples / 8, fractional when the
    new batch does not divide), and training stops at the same 160 samples."""
    s = Schedule.build(TrainConfig(max_steps=20, warmup_steps=4, learning_rate=LR), 1000, 8)
    seen, steps, lrs = 0, 0, []
    while not s.finished(seen, epoch=0, sample=seen, batch=8 if steps < 6 else new_batch):
        lrs.append((seen, s.lr(seen)))
        seen += 8 if steps < 6 else new_batch
        steps += 1
    for at, lr in lrs:
        assert lr == pytest.approx(trainer_lr(at / 8, 4, 20), rel=1e-12, abs=1e-18), at
    # 48 samples in 6 steps, then (160 - 48) / new_batch more, the last one rounded up
    assert steps == 6 + -(-112 // new_batch)
    assert seen == 48 + -(-112 // new_batch) * new_batch  # 24 overshoots 160 by 8 (see report)
    assert lrs[-1][1] > 0 and s.lr(seen) == 0.0


def test_schedule_in_epochs_rescaled_mid_warmup():
    """3 epochs of 100 samples at base batch 16 (drop_last: 96 an epoch), warmup 2 steps;
    the run goes on at batch 4 from sample 16: the lr reads samples, not steps."""
    t = TrainConfig(epochs=3, warmup_steps=2, learning_rate=LR)
    s = Schedule.build(t, n_train=100, base_batch=16)
    assert (s.warmup_samples, s.epoch_samples, s.total_samples) == (32, 96, 288)
    assert s.lr(16) == pytest.approx(LR / 2)
    assert s.lr(20) == pytest.approx(LR * 20 / 32)  # between the base run's steps
    assert s.lr(32) == pytest.approx(LR)
    assert s.lr(160) == pytest.approx(LR * 128 / 256)
    assert s.lr(284) == pytest.approx(LR * 4 / 256)
    for seen in range(0, 289, 4):
        assert s.lr(seen) == pytest.approx(trainer_lr(seen / 16, 2, 18), rel=1e-12, abs=1e-18)


# ---- 2. checkpoints: committed, latest, prune, fetch -----------------------------------


def write_ckpt(run: str, step: int, files: dict[str, bytes] | None = None, commit: bool = True):
    """A checkpoint as `checkpoint.save` lays it out, sizes and sha256 computed here."""
    uri = f"{run}/checkpoints/step-{step}"
    files = {"model.safetensors": f"weights of step {step}".encode() * 10, **(files or {})}
    files["train_state.json"] = json.dumps({"step": step, "samples_seen": step * 8}).encode()
    for rel, data in files.items():
        storage.write_bytes(f"{uri}/{rel}", data)
    if commit:
        listed = {
            rel: {"size": len(d), "sha256": hashlib.sha256(d).hexdigest()}
            for rel, d in files.items()
        }
        storage.write_text(f"{uri}/COMMITTED.json", json.dumps({"step": step, "files": listed}))
    return uri


def damage(uri: str, rel: str = "model.safetensors", truncate: bool = False) -> None:
    path = Path(uri) / rel
    data = path.read_bytes()
    path.write_bytes(data[:-5] if truncate else data[:-5] + b"XXXXX")  # same size, new bytes


def on_disk(run: str) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in Path(run, "checkpoints").glob("step-*"))


def accelerator(other_nodes_damaged=()):
    """The surface `fetch` uses of an Accelerator: one node's main process. `reduce` adds the
    other nodes' verdicts, one per checkpoint tried, in order."""
    verdicts = iter(other_nodes_damaged)

    def reduce(t, reduction):
        assert reduction == "sum"
        return t + float(next(verdicts))

    n = 2 if other_nodes_damaged else 1
    return SimpleNamespace(
        is_local_main_process=True, num_processes=n, device=torch.device("cpu"), reduce=reduce
    )


def test_committed_is_newest_first_by_number_and_skips_uncommitted_and_truncated(tmp_path):
    run = str(tmp_path / "run")
    for step in (9, 10, 100):
        write_ckpt(run, step)
    write_ckpt(run, 200, commit=False)  # in progress, or killed before its marker
    damage(write_ckpt(run, 150), truncate=True)  # a file of the wrong size
    c = f"{run}/checkpoints"
    assert checkpoint.committed(run) == [
        (100, f"{c}/step-100"),
        (10, f"{c}/step-10"),
        (9, f"{c}/step-9"),
    ]
    assert checkpoint.latest(run) == (100, f"{c}/step-100")
    assert checkpoint.latest(str(tmp_path / "nothing")) is None


def test_a_missing_file_makes_a_checkpoint_damaged(tmp_path, caplog):
    run = str(tmp_path / "run")
    write_ckpt(run, 3)
    uri = write_ckpt(run, 6, files={"rng_0.pth": b"rng"})
    (Path(uri) / "rng_0.pth").unlink()
    assert checkpoint.latest(run) == (3, f"{run}/checkpoints/step-3")
    assert f"checkpoint {uri} is damaged (rng_0.pth is missing); skipping it" in caplog.text


@pytest.mark.parametrize(
    "where",
    [
        "abs",
        "abs/",
        "file://",
        "./rel",
        "step-dir",
    ],
)
def test_latest_for_every_spelling_of_a_local_run_folder(tmp_path, monkeypatch, where):
    monkeypatch.chdir(tmp_path)
    run = {
        "abs": str(tmp_path / "run"),
        "abs/": f"{tmp_path}/run/",
        "file://": f"file://{tmp_path}/run",
        "./rel": "./run",
        "step-dir": str(tmp_path / "sweep" / "step-1" / "run"),
    }[where]
    on_path = storage.local_path(run)
    for step in (6, 12):
        write_ckpt(str(on_path), step)
    found = checkpoint.latest(run)
    assert found is not None and found[0] == 12
    expected = (on_path / "checkpoints" / "step-12").resolve()
    assert storage.local_path(found[1]).resolve() == expected


def test_prune_keeps_the_newest_committed_and_any_newer_save_in_progress(tmp_path):
    run = str(tmp_path / "run")
    for step in (3, 6, 9):
        write_ckpt(run, step)
    write_ckpt(run, 8, commit=False)  # abandoned: older than a committed one
    write_ckpt(run, 12, commit=False)  # another save in progress: newer than every commit
    checkpoint.prune(run, keep=2)
    assert on_disk(run) == [6, 9, 12]
    checkpoint.prune(run, keep=1)
    assert on_disk(run) == [9, 12]
    assert checkpoint.latest(run)[0] == 9


def test_prune_without_any_commit_deletes_nothing(tmp_path):
    run = str(tmp_path / "run")
    write_ckpt(run, 5, commit=False)
    write_ckpt(run, 7, commit=False)
    checkpoint.prune(run, keep=1)
    assert on_disk(run) == [5, 7]


def test_prune_uncommits_before_it_deletes(tmp_path, monkeypatch):
    """A prune killed half way must leave no committed checkpoint with missing files."""
    run = str(tmp_path / "run")
    for step in (1, 2):
        write_ckpt(run, step)
    calls = []
    monkeypatch.setattr(storage, "delete", lambda uri: calls.append(("delete", uri)))
    monkeypatch.setattr(storage, "delete_prefix", lambda uri: calls.append(("prefix", uri)))
    checkpoint.prune(run, keep=1)
    uri = f"{run}/checkpoints/step-1"
    assert calls == [("delete", f"{uri}/COMMITTED.json"), ("prefix", uri)]


def test_fetch_falls_back_from_a_checksum_mismatch(tmp_path, caplog):
    run, staging = str(tmp_path / "run"), tmp_path / "staging"
    write_ckpt(run, 6)
    write_ckpt(run, 12)
    damaged = write_ckpt(run, 18, files={"rng_1.pth": b"only in 18"})
    damage(damaged)  # same size: committed() cannot tell, only the sha256 can
    write_ckpt(run, 24, commit=False)
    assert checkpoint.latest(run)[0] == 18
    got = checkpoint.fetch(accelerator(), run, staging)
    assert (got.step, got.uri) == (12, f"{run}/checkpoints/step-12")
    assert got.state == {"step": 12, "samples_seen": 96}
    assert got.local == staging / "resume"
    # exactly step 12's files, nothing left of the damaged attempt (rng_1.pth)
    assert sorted(p.name for p in got.local.iterdir()) == ["model.safetensors", "train_state.json"]
    assert (got.local / "model.safetensors").read_bytes() == b"weights of step 12" * 10
    assert (
        f"checkpoint {damaged} is damaged (model.safetensors: checksum mismatch); falling "
        "back to the previous one"
    ) in caplog.text


def test_fetch_falls_back_when_another_node_saw_damage(tmp_path, caplog):
    run = str(tmp_path / "run")
    write_ckpt(run, 6)
    write_ckpt(run, 12)
    got = checkpoint.fetch(accelerator(other_nodes_damaged=[1, 0]), run, tmp_path / "staging")
    assert got.step == 6
    assert f"checkpoint {run}/checkpoints/step-12 is damaged (on another node)" in caplog.text


def test_fetch_gives_none_when_every_checkpoint_is_damaged(tmp_path):
    run = str(tmp_path / "run")
    damage(write_ckpt(run, 6))
    damage(write_ckpt(run, 12), rel="train_state.json")
    assert checkpoint.fetch(accelerator(), run, tmp_path / "staging") is None


@pytest.mark.parametrize("truncate", [False, True], ids=["checksum", "size"])
def test_a_save_after_a_fallback_survives_its_prune(tmp_path, truncate):
    run, staging = str(tmp_path / "run"), tmp_path / "staging"
    write_ckpt(run, 6)
    damage(write_ckpt(run, 12), truncate=truncate)
    assert checkpoint.fetch(accelerator(), run, staging).step == 6
    write_ckpt(run, 9)  # what save() uploads and commits, then it prunes:
    checkpoint.prune(run, keep=1, saved=9)
    assert sorted(checkpoint._steps(run)) == [9]  # the damaged, abandoned step-12 is gone
    got = checkpoint.fetch(accelerator(), run, staging)
    assert got is not None and got.step == 9


# ---- 3. sample order and batch ids on any number of processes --------------------------


def run_epoch(order, schedule, world, per_rank, accum=1, start=0):
    """Each step's ids per rank, as Batches.build and state.next_epoch lay them out."""
    gb = per_rank * world * accum
    steps, sample = [], start
    while not schedule.epoch_over(sample, gb):
        starts = [sample + m * per_rank * world for m in range(accum)]
        steps.append(
            [
                np.concatenate([batch_ids(order, s, r, per_rank) for s in starts])
                for r in range(world)
            ]
        )
        sample += gb
    return steps


@pytest.mark.parametrize(
    "world,per_rank,accum", [(1, 4, 1), (2, 4, 1), (3, 4, 1), (8, 4, 1), (3, 2, 2), (8, 1, 3)]
)
def test_every_sample_once_per_epoch_but_the_dropped_tail(world, per_rank, accum):
    n, gb = 103, world * per_rank * accum  # 103 is prime: no global batch divides it
    s = Schedule.build(TrainConfig(epochs=2), n_train=n, base_batch=gb)
    kept = n // gb * gb
    dropped = []
    for epoch in (0, 1):
        order = epoch_order(n, seed=42, epoch=epoch)
        steps = run_epoch(order, s, world, per_rank, accum)
        assert len(steps) == n // gb
        assert all(len(ids) == per_rank * accum for step in steps for ids in step)  # lockstep
        seen = np.concatenate([ids for step in steps for ids in step])
        assert len(seen) == len(set(seen.tolist())) == kept
        assert sorted(seen.tolist()) == sorted(order[:kept].tolist())
        dropped.append(set(order[kept:].tolist()))
        assert len(dropped[-1]) == n - kept
    assert n % gb == 0 or dropped[0] != dropped[1]  # another tail each epoch


def test_rank_slices_of_a_global_batch_are_contiguous_in_rank_order():
    order = np.arange(100, 200)
    assert batch_ids(order, 8, 0, 4).tolist() == [108, 109, 110, 111]
    assert batch_ids(order, 8, 2, 4).tolist() == [116, 117, 118, 119]
    # the union over ranks is the global batch whatever the world size: same samples a step
    for world, per_rank in ((1, 12), (2, 6), (3, 4), (4, 3)):
        got = np.concatenate([batch_ids(order, 24, r, per_rank) for r in range(world)])
        assert got.tolist() == list(range(124, 136))


@pytest.mark.parametrize("new_world", [1, 3, 8])
def test_a_resume_on_another_world_size_continues_the_same_epoch(new_world):
    """5 steps on 2 x 4 (base batch 8), then on new_world x 4 from sample 40: no sample
    twice, and the epoch ends where the new batch no longer fits."""
    n = 103
    s = Schedule.build(TrainConfig(epochs=1), n_train=n, base_batch=8)  # 96 an epoch
    order = epoch_order(n, seed=7, epoch=0)
    before = run_epoch(order, s, 2, 4)[:5]
    after = run_epoch(order, s, new_world, 4, start=40)
    ids = np.concatenate([r for step in before + after for r in step]).tolist()
    end = 40 + (96 - 40) // (4 * new_world) * 4 * new_world  # 96, 84, 72
    assert len(ids) == len(set(ids)) == end
    assert sorted(ids) == sorted(order[:end].tolist())


def test_epoch_order_is_a_pure_function_of_seed_and_epoch():
    a = epoch_order(1000, seed=42, epoch=3)
    assert sorted(a.tolist()) == list(range(1000))
    assert np.array_equal(a, epoch_order(1000, seed=42, epoch=3))
    assert not np.array_equal(a, epoch_order(1000, seed=42, epoch=4))
    assert not np.array_equal(a, epoch_order(1000, seed=43, epoch=3))
    # Pinned: a checkpoint resumes into this order, so it must not change between releases
    # (numpy's PCG64 with a [seed, epoch] SeedSequence).
    assert epoch_order(10, 42, 0).tolist() == [5, 6, 0, 7, 3, 2, 4, 9, 1, 8]
    assert epoch_order(10, 42, 1).tolist() == [0, 8, 7, 4, 3, 1, 2, 9, 6, 5]


# ---- 4. the train/test split of the records --------------------------------------------


@pytest.mark.parametrize(
    "n,test_size,seed", [(10, 0.2, 42), (35, 0.1, 42), (1000, 0.2, 0), (7, 0.5, 3), (3, 0.01, 1)]
)
def test_split_equals_datasets_train_test_split(n, test_size, seed):
    import datasets

    ref = datasets.Dataset.from_dict({"i": list(range(n))}).train_test_split(
        test_size=test_size, seed=seed
    )
    got = pre.split_indices(n, test_size, seed)
    assert got["train"].tolist() == ref["train"]["i"]
    assert got["test"].tolist() == ref["test"]["i"]


@pytest.mark.parametrize(
    "n,test_size,n_test", [(10, 0.2, 2), (35, 0.1, 4), (3, 0.01, 1), (100, 0.0, 0), (9, 0.5, 5)]
)
def test_split_sizes_disjoint_and_deterministic(n, test_size, n_test):
    """ceil(test_size * n) for test (35 * 0.1 is 3.5000000000000004 in floating point)."""
    got = pre.split_indices(n, test_size, seed=42)
    train, test = got["train"].tolist(), got["test"].tolist()
    assert len(test) == n_test and len(train) == n - n_test
    assert not set(train) & set(test) and sorted(train + test) == list(range(n))
    again = pre.split_indices(n, test_size, seed=42)
    assert again["train"].tolist() == train and again["test"].tolist() == test
    if n_test:
        other = pre.split_indices(n, test_size, seed=43)
        assert other["test"].tolist() != test or other["train"].tolist() != train


def test_split_is_pinned():
    got = pre.split_indices(10, 0.2, 42)
    assert got["test"].tolist() == [5, 6]
    assert got["train"].tolist() == [0, 7, 3, 2, 4, 9, 1, 8]


# ---- 5. preprocess parts: per-worker tokenizing, loading back in stream order ----------


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(str(DEMO_TOKENIZER), "/nonexistent-cache")  # local: read in place


@pytest.fixture(scope="module")
def stream(tmp_path_factory):
    """The demo sample with two malformed records, at stream positions 5 and 9."""
    lines = SAMPLE.read_text().splitlines()
    lines.insert(5, "{not json")
    lines.insert(9, '{"answers": {"text": []}}')
    path = tmp_path_factory.mktemp("stream") / "records.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def parts_for(stream_path, tok, root, num_workers, monkeypatch):
    """Every worker's part, written in reverse worker order, with chunks of 4 records."""
    monkeypatch.setattr(pre, "CHUNK", 4)
    cfg = load_config(ROOT / "configs" / "demo.yaml", [f"data.sources=[{{uri: '{stream_path}'}}]"])
    for w in reversed(range(num_workers)):
        pre._tokenize_part(cfg, tok, w, num_workers, pre._part_uri(root, w, num_workers))
    return cfg, [pre._part_uri(root, w, num_workers) for w in range(num_workers)]


def test_worker_shares_are_round_robin_chunks(monkeypatch):
    monkeypatch.setattr(pre, "CHUNK", 3)
    shares = [list(pre._mine(range(20), w, 3)) for w in range(3)]
    assert shares == [[0, 1, 2, 9, 10, 11, 18, 19], [3, 4, 5, 12, 13, 14], [6, 7, 8, 15, 16, 17]]


def test_part_names_sort_in_worker_order_and_carry_the_worker_count():
    names = [pre._part_uri("r", w, 12) for w in range(12)]
    assert sorted(reversed(names)) == names  # a listing in name order is worker order
    assert names[2] == "r/_work/part-00002-of-00012.npz"
    assert pre._part_uri("r", 0, 2) != pre._part_uri("r", 0, 3)  # stale parts never reused


@pytest.mark.parametrize("num_workers", [1, 2, 3, 12])
def test_parts_load_back_in_stream_order(tmp_path, monkeypatch, tok, stream, num_workers):
    """34 records, 9 chunks of 4: with 12 workers three parts are empty."""
    cfg, parts = parts_for(stream, tok, str(tmp_path / "ds"), num_workers, monkeypatch)
    records, bad_count, _ = pre._load_parts(parts)
    texts = [r.text for r in iter_records(cfg.data)]
    assert len(records) == len(texts) == 34 and bad_count == 2
    assert [i for i, t in enumerate(texts) if t is None] == [5, 9]
    dtype = id_dtype(len(tok))
    for i, (got, text) in enumerate(zip(records, texts, strict=True)):
        if text is None:
            assert got is None, i
        else:
            assert got.tolist() == encode(tok, [text], dtype)[0].tolist(), i


def test_malformed_examples_do_not_depend_on_the_worker_count(tmp_path, monkeypatch, tok, stream):
    _, one = parts_for(stream, tok, str(tmp_path / "one"), 1, monkeypatch)
    _, two = parts_for(stream, tok, str(tmp_path / "two"), 2, monkeypatch)
    assert pre._load_parts(one)[2] == pre._load_parts(two)[2]


# ---- 6. when the loop logs, evaluates, checkpoints, checks for a SIGTERM ----------------

STEPS = range(1, 8)


def test_should_log_truth_table():
    assert [should_log(s, 3, last=False) for s in STEPS] == [0, 0, 1, 0, 0, 1, 0]
    assert all(should_log(s, 3, last=True) for s in STEPS)
    assert all(should_log(s, 1, last=False) for s in STEPS)


def test_should_eval_truth_table():
    """eval_every_steps set: only its multiples (an epoch's end alone does not evaluate);
    unset: exactly at each epoch's end."""
    assert [should_eval(s, 3, epoch_end=False) for s in STEPS] == [0, 0, 1, 0, 0, 1, 0]
    assert [should_eval(s, 3, epoch_end=True) for s in STEPS] == [0, 0, 1, 0, 0, 1, 0]
    assert not any(should_eval(s, None, epoch_end=False) for s in STEPS)
    assert all(should_eval(s, None, epoch_end=True) for s in STEPS)
    for every in (3, None):
        assert all(type(should_eval(s, every, x)) is bool for s in STEPS for x in (False, True))


def test_should_checkpoint_truth_table():
    assert [should_checkpoint(s, 3, epoch_end=False) for s in STEPS] == [0, 0, 1, 0, 0, 1, 0]
    assert all(should_checkpoint(s, 3, epoch_end=True) for s in STEPS)


def test_should_check_preemption_truth_table():
    def checked(log_every):
        return [s for s in range(1, 31) if should_check_preemption(s, log_every)]

    assert PREEMPTION_CHECK_STEPS == 10
    assert checked(10) == [10, 20, 30]
    assert checked(4) == [4, 8, 10, 12, 16, 20, 24, 28, 30]
    assert checked(25) == [10, 20, 25, 30]
    assert checked(1) == list(range(1, 31))
    for log_every in range(1, 40):  # the promise: at most 10 steps between two checks
        at = [0] + [s for s in range(1, 200) if should_check_preemption(s, log_every)]
        assert max(np.diff(at)) <= 10, log_every


# ---- 7. TrainState through a checkpoint -----------------------------------------------

SAVED = {
    "step": 37,
    "epoch": 2,
    "sample": 40,
    "samples_seen": 296,
    "tokens": 18944,
    "base_batch": 8,
    "world_size": 2,
    "train_seconds": 12.5,
    "wall_seconds": 20.25,
    "window_seconds": 0.75,
    "window_loss": 123.5,
    "window_tokens": 41.0,
    "last_eval": {"eval_loss": 2.5, "perplexity": 12.18, "eval_tokens": 99, "step": 30},
    "initial_eval": {"eval_loss": 6.9, "perplexity": 992.3, "eval_tokens": 99},
    "tracker_runs": {"mlflow": "0123456789abcdef0123456789abcdef"},
}


def test_train_state_round_trips_every_field_through_json():
    st = TrainState(**SAVED)
    assert set(st.state_dict()) == set(SAVED)  # a new field must be added here too
    defaults = TrainState().state_dict()
    assert all(SAVED[k] != defaults[k] for k in SAVED)  # so a field lost on load shows
    fresh = TrainState(base_batch=8, world_size=2)
    fresh.load_state_dict(json.loads(json.dumps(st.state_dict())))  # as train_state.json
    assert fresh == st and fresh.state_dict() == SAVED


def test_train_state_keeps_the_base_batch_when_the_world_size_changes():
    """Saved on 2 processes (global batch 8), resumed on 3 (global batch 12): the schedule's
    unit stays 8, the position stays where it was; build.rescale then records the new
    world size (DDP: nothing else to convert)."""
    st = TrainState(base_batch=12, world_size=3)  # what the new run starts with
    st.load_state_dict(json.loads(json.dumps(SAVED)))
    assert (st.base_batch, st.world_size, st.epoch, st.sample) == (8, 2, 2, 40)
    rescale(st, 3, accelerator=None, restored=None, deepspeed=None)
    assert st.state_dict() == {**SAVED, "world_size": 3}


def test_train_state_load_ignores_unknown_keys_and_keeps_missing_ones():
    st = TrainState(base_batch=16, world_size=4)
    st.load_state_dict({"step": 5, "from_a_newer_version": 1})
    assert (st.step, st.base_batch, st.world_size) == (5, 16, 4)
    assert not hasattr(st, "from_a_newer_version")


def test_loss_window_checkpoints_every_ranks_total_and_restores_it_to_rank_0_only():
    """LossWindow's own state_dict is what a checkpoint keeps (TrainState's window_* keys);
    on resume only rank 0 takes it back, so the next log step counts it once."""
    from job.train.state import LossWindow

    window = LossWindow("cpu", sum_ranks=lambda loss, tokens: [loss + 2.0, tokens + 3])
    window.add(torch.tensor(5.0), 4)  # this rank; the lambda adds another rank's 2.0 and 3
    saved = window.state_dict()
    assert saved == {"window_loss": 7.0, "window_tokens": 7}
    assert set(saved) <= set(TrainState().state_dict())
    for rank, want in [(0, (7.0, 7)), (1, (0.0, 0))]:
        back = LossWindow("cpu", rank=rank)
        back.load_state_dict(json.loads(json.dumps(saved)))
        assert (back.loss.item(), back.tokens) == want
