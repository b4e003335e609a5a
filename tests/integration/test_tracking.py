"""`train.report_to`: a real MLflow tracking server on loopback (`mlflow server`, SQLite
backend store, the SeaweedFS bucket as artifact store) and TensorBoard event files read
back with tensorboard's EventAccumulator, compared with metrics.jsonl."""

import json
from pathlib import Path

import pytest
from support.s3 import free_port
from support.training import config, events, launch, preempt, train_here

from job.config import load_config
from job.train.tracking import flat_params

pytestmark = pytest.mark.slow


def test_preempted_and_resumed_run_is_one_mlflow_run(
    synthetic, tmp_path, data_dir, mlflow_server, monkeypatch
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    sets = ("train.report_to=[mlflow, tensorboard]", "run.name=tracked-preempted")
    cfg = config(synthetic, tmp_path, data_dir)
    run = tmp_path / "run"
    preempt(cfg, run, *sets, nproc=2)
    state = json.loads(next((run / "checkpoints").glob("*/train_state.json")).read_text())
    run_id = state["tracker_runs"]["mlflow"]
    again = launch(cfg, *sets, nproc=2)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stderr and "tracking:" not in again.stderr

    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("tracked-preempted")
    (found,) = client.search_runs([experiment.experiment_id])  # one run, not two
    assert found.info.run_id == run_id and found.info.status == "FINISHED"
    assert found.info.run_name == "tracked-preempted"
    resolved = load_config(cfg, list(sets))
    assert found.data.params == {k: str(v) for k, v in flat_params(resolved).items()}
    history = client.get_metric_history(run_id, "eval_perplexity")
    evals = events(run, "eval")
    assert [(m.step, m.value) for m in history] == [(e["step"], e["perplexity"]) for e in evals]
    train = client.get_metric_history(run_id, "train_loss")
    assert [m.step for m in train] == [e["step"] for e in events(run)]
    summary = json.loads((run / "summary.json").read_text())
    assert found.data.metrics["summary/perplexity"] == summary["perplexity"]
    assert found.data.metrics["summary/initial_perplexity"] == summary["initial_perplexity"]
    assert {a.path for a in client.list_artifacts(run_id)} == {"loss.png", "summary.json"}
    local = client.download_artifacts(run_id, "summary.json", str(tmp_path))
    assert json.loads(Path(local).read_text()) == summary

    # TensorBoard, written by the same two attempts: what metrics.jsonl has, once per step
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard" / "tracked-preempted"))
    acc.Reload()
    got = [(s.step, s.value) for s in acc.Scalars("eval_perplexity")]
    assert [s for s, _ in got] == [e["step"] for e in evals]
    assert [v for _, v in got] == pytest.approx([e["perplexity"] for e in evals], rel=1e-6)
    loss = [(s.step, s.value) for s in acc.Scalars("train_loss")]
    assert [s for s, _ in loss] == [e["step"] for e in events(run)]
    assert [v for _, v in loss] == pytest.approx([e["loss"] for e in events(run)], rel=1e-6)


def test_tensorboard_event_files_go_to_s3(synthetic, tmp_path, data_dir, s3_prefix):
    from job import storage

    out = f"{s3_prefix}/run"
    cfg = config(synthetic, tmp_path, data_dir, run=out)
    proc = train_here(cfg, "train.report_to=[tensorboard]", "train.max_steps=6", "run.name=tb-s3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = storage.list_files(f"{out}/tensorboard/tb-s3")
    assert any("events.out.tfevents" in f for f in files), files
    local = tmp_path / "tb"
    storage.download_dir(f"{out}/tensorboard", local)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(local / "tb-s3"))
    acc.Reload()
    lines = storage.read_text(f"{out}/metrics.jsonl").splitlines()
    train = [e for e in map(json.loads, lines) if e["event"] == "train"]
    assert [s.step for s in acc.Scalars("train_loss")] == [e["step"] for e in train]


def test_unreachable_tracker_is_one_warning_and_training_goes_on(synthetic, tmp_path, data_dir):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    cfg = config(synthetic, tmp_path, data_dir)
    proc = launch(
        cfg,
        "train.report_to=[mlflow, tensorboard]",
        "train.max_steps=4",
        env={"MLFLOW_TRACKING_URI": dead},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [ln for ln in proc.stderr.splitlines() if "tracking:" in ln]
    assert len(warnings) == 1 and "mlflow failed" in warnings[0], warnings
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["global_step"] == 4
    assert list((tmp_path / "run" / "tensorboard").rglob("events.out.tfevents*"))  # unaffected
