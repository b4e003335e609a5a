"""A resubmitted run against its `{run.output}/config.yaml` (job/train/resume_check.py):
a change of what the run is exits 2 naming the key and both values, before the model is
built; safe changes (train.max_steps to extend it) continue; `run.allow_changed` lets a
deliberate change through and records it in config.yaml."""

import json
import shutil
from pathlib import Path

import pytest
import yaml
from support.cli import mlmjob, write_config
from support.once import shared_dir
from support.training import TINY

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


# ---- the comparison ---------------------------------------------------------------------


# ---- through the CLI --------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory, synthetic) -> Path:
    """One 4-step run with a checkpoint at step 4 and no summary.json: as a run lost after
    its last checkpoint looks. Every CLI case continues a copy of it."""

    def make(tmp: Path) -> None:
        cfg = config(synthetic, tmp, tmp / "data", tmp / "run")
        mlmjob("preprocess", "-c", cfg, check=True)
        mlmjob("train", "-c", cfg, *sets(SHORT), check=True)
        (tmp / "run" / "summary.json").unlink()
        shutil.rmtree(tmp / "run" / "model")

    return shared_dir(tmp_path_factory, "resume-config-trained", make)


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
