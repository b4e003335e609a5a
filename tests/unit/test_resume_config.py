"""A resubmitted run against its `{run.output}/config.yaml` (job/train/resume_check.py): a
change of what the run is exits 2 naming the key and both values, before the model is
built; safe changes (train.max_steps to extend it) continue; `run.allow_changed` lets a
deliberate change through and records  The direct tests: no process, no server (the
others are in tests/integration/test_resume_config.py)."""

from pathlib import Path

import pytest
import yaml

from job import storage
from job.config import Config, dump_yaml
from job.errors import BadInput
from job.train import resume_check
from job.train.resume_check import SAFE, changes, judge


def as_written(**sections) -> dict:
    """A config as `config.yaml` holds it, with the given sections' keys set."""
    return yaml.safe_load(dump_yaml(Config.model_validate(sections)))


def keys(found) -> list[str]:
    return [c.key for c in found]


@pytest.mark.unit
def test_unchanged_config_has_no_changes():
    assert changes(as_written(), as_written()) == []


@pytest.mark.unit
def test_changes_that_make_another_run_are_refused_by_key():
    old = as_written(train={"learning_rate": 0.002})
    new = as_written(
        train={"learning_rate": 0.5, "warmup_steps": 10, "mlm_probability": 0.2},
        data={"block_size": 64, "sources": ["other.jsonl"]},
        model={"config_overrides": {"hidden_size": 96}, "name_or_path": "roberta-base"},
        run={"seed": 1},
    )
    verdict = judge(changes(old, new), [])
    assert verdict.safe == verdict.allowed == []
    assert sorted(keys(verdict.refused)) == [
        "data.block_size",
        "data.sources",
        "model.config_overrides.hidden_size",
        "model.name_or_path",
        "run.seed",
        "train.learning_rate",
        "train.mlm_probability",
        "train.warmup_steps",
    ]
    lr = next(c for c in verdict.refused if c.key == "train.learning_rate")
    assert (lr.old, lr.new) == (0.002, 0.5)
    lines = resume_check.refusal("out/run/config.yaml", verdict.refused).splitlines()
    assert len(lines) == len(verdict.refused)
    line = next(x for x in lines if x.startswith("train.learning_rate:"))
    assert "0.002 in out/run/config.yaml, now 0.5" in line and "run.allow_changed" in line
    hidden = next(x for x in lines if x.startswith("model.config_overrides.hidden_size:"))
    assert "(not set) in out/run/config.yaml, now 96" in hidden


@pytest.mark.unit
def test_where_how_fast_and_how_long_may_change():
    old = as_written(train={"max_steps": 4})
    new = as_written(
        run={
            "output": "s3://b/moved",
            "name": "again",
            "lease_wait_seconds": 5,
            "allow_changed": ["model"],
        },
        data={"cache_dir": "/scratch", "output": "s3://b/data"},
        train={
            "max_steps": 40,
            "epochs": 5,
            "per_device_batch_size": 2,
            "gradient_accumulation_steps": 4,
            "eval_every_steps": 7,
            "checkpoint_every_steps": 9,
            "keep_checkpoints": 5,
            "log_every_steps": 3,
            "report_to": ["tensorboard"],
            "compile": True,
            "num_threads": 2,
            "push_to_hub": {"repo_id": "me/model"},
        },
        infer={"top_k": 9, "inputs": ["x.txt"]},
    )
    verdict = judge(changes(old, new), [])
    assert verdict.refused == [] and len(verdict.safe) >= 20
    assert {"train.max_steps", "run.output", "train.push_to_hub.repo_id"} <= set(keys(verdict.safe))


@pytest.mark.unit
def test_storage_is_not_compared():
    """Its URLs are written redacted (`***`), and they say where the bytes are."""
    old = as_written(storage={"endpoint_url": "http://***@minio:9000"})
    new = as_written(storage={"endpoint_url": "http://key:secret@other:9000", "region": "x"})
    assert changes(old, new) == []


@pytest.mark.unit
def test_allow_changed_lets_a_key_or_a_section_through():
    old = as_written()
    new = as_written(
        train={"learning_rate": 0.5, "precision": "fp32"},
        model={"config_overrides": {"hidden_size": 96}},
    )
    verdict = judge(changes(old, new), ["train.learning_rate", "model"])
    assert keys(verdict.allowed) == ["train.learning_rate", "model.config_overrides.hidden_size"]
    assert keys(verdict.refused) == ["train.precision"]
    assert keys(judge(changes(old, new), ["train.learning"]).refused)[0] == "train.learning_rate"


@pytest.mark.unit
def test_a_key_unknown_to_the_safe_list_is_refused():
    """New keys default to refused; keys the schema gained since compare at their default."""
    old = as_written()
    del old["run"]["lease_ttl_seconds"], old["run"]["allow_changed"]  # an older config.yaml
    assert changes(old, as_written()) == []
    old["train"]["retired_knob"] = 3  # a key this schema no longer has
    verdict = judge(changes(old, as_written()), [])
    assert keys(verdict.refused) == ["train.retired_knob"]
    assert "3 in c.yaml, now (not set)" in resume_check.refusal("c.yaml", verdict.refused)


@pytest.mark.unit
def test_every_safe_key_exists():
    """A misspelt entry would refuse the key it meant. Two are keys the design names for
    later (run.device, train.collective_timeout_seconds)."""
    known = set(resume_check.flatten(as_written())) | {"infer", "train.push_to_hub"}
    assert set(SAFE) - known <= {"run.device", "train.collective_timeout_seconds"}


def fake_run(tmp_path: Path, checkpoint: bool, summary: bool = False) -> Config:
    run = tmp_path / "run"
    cfg = Config.model_validate({"run": {"output": str(run)}, "train": {"max_steps": 4}})
    storage.write_text(str(run / "config.yaml"), dump_yaml(cfg))
    if checkpoint:
        storage.write_text(str(run / "checkpoints/step-2/COMMITTED.json"), '{"files": {}}')
    if summary:
        storage.write_text(str(run / "summary.json"), "{}")
    return cfg


@pytest.mark.unit
@pytest.mark.parametrize("checkpoint, summary", [(True, False), (False, True)])
def test_check_refuses_when_there_is_a_run_to_continue(tmp_path, checkpoint, summary):
    cfg = fake_run(tmp_path, checkpoint, summary)
    with pytest.raises(BadInput, match=r"^train\.learning_rate: 2e-05 in .*, now 0\.5: "):
        resume_check.check(
            cfg.model_copy(update={"train": cfg.train.model_copy(update={"learning_rate": 0.5})})
        )


@pytest.mark.unit
def test_check_without_a_checkpoint_lets_the_run_start_afresh(tmp_path):
    cfg = fake_run(tmp_path, checkpoint=False)
    changed = cfg.model_copy(update={"run": cfg.run.model_copy(update={"seed": 7})})
    assert resume_check.check(changed) is None  # the new run writes config.yaml itself


@pytest.mark.unit
def test_check_returns_safe_changes_and_record_rewrites_the_config(tmp_path):
    cfg = fake_run(tmp_path, checkpoint=True)
    assert resume_check.check(cfg) is None
    longer = cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_steps": 8})})
    verdict = resume_check.check(longer)
    assert keys(verdict.safe) == ["train.max_steps"] and not verdict.refused
    resume_check.record(longer, verdict)
    written = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert written["train"]["max_steps"] == 8
    assert resume_check.check(longer) is None
