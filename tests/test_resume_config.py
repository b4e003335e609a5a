"""A resubmitted run against its `{run.output}/config.yaml` (job/train/resume_check.py):
a change of what the run is exits 2 naming the key and both values, before the model is
built; safe changes (train.max_steps to extend it) continue; `run.allow_changed` lets a
deliberate change through and records it in config.yaml."""

import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import mlmjob, write_config
from test_train import TINY

from job import storage
from job.config import Config, dump_yaml
from job.errors import BadInput
from job.train import resume_check
from job.train.resume_check import SAFE, changes, judge

# The smallest training run of tests/test_train.py, 4 steps, a checkpoint every 2; the
# values the cases change are pinned here.
SHORT = (
    "train.max_steps=4",
    "train.checkpoint_every_steps=2",
    "train.eval_every_steps=null",
    "train.learning_rate=0.001",
    "data.block_size=128",
    "model.config_overrides.hidden_size=64",
)


def as_written(**sections) -> dict:
    """A config as `config.yaml` holds it, with the given sections' keys set."""
    return yaml.safe_load(dump_yaml(Config.model_validate(sections)))


def keys(found) -> list[str]:
    return [c.key for c in found]


# ---- the comparison ---------------------------------------------------------------------


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


# ---- through the CLI --------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory, synthetic) -> Path:
    """One 4-step run with a checkpoint at step 4 and no summary.json: as a run lost after
    its last checkpoint looks. Every CLI case continues a copy of it."""
    tmp = tmp_path_factory.mktemp("trained")
    cfg = config(synthetic, tmp, tmp / "data", tmp / "run")
    mlmjob("preprocess", "-c", cfg, check=True)
    mlmjob("train", "-c", cfg, *sets(SHORT), check=True)
    (tmp / "run" / "summary.json").unlink()
    shutil.rmtree(tmp / "run" / "model")
    return tmp


def config(src, tmp: Path, data: Path, run: Path) -> Path:
    return write_config(
        tmp / "c.yaml", TINY.format(run=run, eli5=src.eli5, data=data, tok=src.tokenizer)
    )


def sets(items) -> list[str]:
    return [arg for s in items for arg in ("--set", s)]


def resubmit(trained: Path, synthetic, tmp_path: Path, *changed: str, complete=False):
    """Train a copy of the trained run with `changed` on top of its own settings."""
    run = tmp_path / "run"
    shutil.copytree(trained / "run", run)
    if complete:
        (run / "summary.json").write_text("{}")
    cfg = config(synthetic, tmp_path, trained / "data", run)
    return mlmjob("train", "-c", cfg, *sets((*SHORT, *changed)))


def refused_line(proc, key: str) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [x for x in proc.stderr.splitlines() if x.startswith("mlmjob: error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert errors[0].startswith(f"mlmjob: error: {key}: "), errors[0]
    assert "resuming from" not in proc.stderr  # refused before the model and checkpoint
    return errors[0]


@pytest.mark.slow
def test_changed_learning_rate_exits_2_naming_both_values(trained, synthetic, tmp_path):
    proc = resubmit(trained, synthetic, tmp_path, "train.learning_rate=0.5")
    line = refused_line(proc, "train.learning_rate")
    assert f"train.learning_rate: 0.001 in {tmp_path / 'run' / 'config.yaml'}, now 0.5:" in line


@pytest.mark.slow
def test_changed_block_size_exits_2(trained, synthetic, tmp_path):
    line = refused_line(
        resubmit(trained, synthetic, tmp_path, "data.block_size=64"), "data.block_size"
    )
    assert "128 in " in line and ", now 64:" in line


@pytest.mark.slow
def test_changed_hidden_size_exits_2(trained, synthetic, tmp_path):
    proc = resubmit(trained, synthetic, tmp_path, "model.config_overrides.hidden_size=96")
    line = refused_line(proc, "model.config_overrides.hidden_size")
    assert "64 in " in line and ", now 96:" in line


@pytest.mark.slow
def test_completed_run_with_a_changed_key_exits_2(trained, synthetic, tmp_path):
    """Not "run already complete": that would credit the old run to the new config."""
    proc = resubmit(trained, synthetic, tmp_path, "train.learning_rate=0.5", complete=True)
    refused_line(proc, "train.learning_rate")


@pytest.mark.slow
def test_raised_max_steps_continues(trained, synthetic, tmp_path):
    proc = resubmit(trained, synthetic, tmp_path, "train.max_steps=6")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from" in proc.stderr and "checkpoints/step-4" in proc.stderr
    assert "(safe to change): " in proc.stderr and "train.max_steps 4 -> 6" in proc.stderr
    run = tmp_path / "run"
    assert json.loads((run / "summary.json").read_text())["global_step"] == 6
    written = yaml.safe_load((run / "config.yaml").read_text())
    assert written["train"]["max_steps"] == 6 and written["run"]["output"] == str(run)


@pytest.mark.slow
def test_allowed_learning_rate_change_continues_and_is_recorded(trained, synthetic, tmp_path):
    proc = resubmit(
        trained,
        synthetic,
        tmp_path,
        "train.learning_rate=0.5",
        "train.max_steps=6",
        "run.allow_changed=[train.learning_rate]",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(run.allow_changed): train.learning_rate 0.001 -> 0.5" in proc.stderr
    run = tmp_path / "run"
    assert json.loads((run / "summary.json").read_text())["global_step"] == 6
    written = yaml.safe_load((run / "config.yaml").read_text())
    assert written["train"]["learning_rate"] == 0.5
    assert written["run"]["allow_changed"] == ["train.learning_rate"]
    events = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    after = [e["lr"] for e in events if e["event"] == "train" and e["step"] > 4]
    assert len(after) == 2 and all(lr > 0.01 for lr in after)  # the new peak applies
