"""summary.json's phases: start-up is what the other phases before the first step leave of
the process's age, and a resumed run adds up its attempts."""

import time

import pytest

from job.train import phases
from job.train.phases import EXCLUSIVE, Phases


def test_startup_is_the_age_at_the_first_step_less_data_model_and_initial_eval(monkeypatch):
    p = Phases()
    p.add("data_s", 1.5)
    p.add("model_s", 2.0)
    p.add("initial_eval_s", 0.5)
    monkeypatch.setattr(phases, "process_age", lambda: 10.0)
    p.started()
    assert p.seconds["startup_s"] == pytest.approx(6.0)


def test_a_resumed_attempt_adds_to_the_checkpoints_phases(monkeypatch):
    first = Phases()
    first.add("data_s", 1.0)
    first.add("train_s", 30.0)
    first.add("startup_s", 4.0)
    second = Phases()
    second.add("data_s", 0.25)  # this attempt's manifest, timed before the restore
    second.load_state_dict(first.state_dict())
    second.add("model_s", 2.0)
    monkeypatch.setattr(phases, "process_age", lambda: 5.0)
    second.started()
    # this attempt: 5 s old at its first step, 0.25 s of data and 2 s of model in it
    assert second.seconds["startup_s"] == pytest.approx(4.0 + 2.75)
    assert second.seconds["data_s"] == pytest.approx(1.25)
    assert second.seconds["train_s"] == pytest.approx(30.0)


def test_a_checkpoint_without_phases_starts_from_zero():
    p = Phases()
    p.load_state_dict({})
    p.load_state_dict(None)
    assert set(p.summary()) == set(EXCLUSIVE) | {"checkpoint_total_s"}
    assert all(v == 0.0 for v in p.summary().values())


def test_timed_adds_the_block_even_when_it_raises():
    p = Phases()
    with pytest.raises(RuntimeError), p.timed("eval_s"):
        raise RuntimeError("boom")
    assert p.seconds["eval_s"] > 0.0


def test_the_table_names_every_phase_and_the_exclusive_sum():
    p = Phases()
    for i, name in enumerate(EXCLUSIVE):
        p.add(name, float(i + 1))
    p.add("checkpoint_total_s", 9.0)
    rows = p.table(wall_seconds=40.0)
    assert rows[0].split() == ["phase", "seconds", "share"]
    assert [r.split()[0] for r in rows[1:10]] == [*EXCLUSIVE, "checkpoint_total_s"]
    assert rows[-2].split()[-2:] == ["36.00", "90.0%"]  # 1 + 2 + ... + 8
    assert rows[-1].split() == ["wall_seconds", "40.00"]


def test_process_age_counts_from_this_process_start():
    age = phases.process_age()
    assert 0.0 < age < 3600.0
    assert phases.process_started() <= time.perf_counter()
