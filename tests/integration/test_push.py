"""`mlmjob push` and `train.push_to_hub`, tested up to the HTTP boundary: a local HTTP server
stands in for the Hugging Face Hub (HF_ENDPOINT) and records what huggingface_hub's client
sends. This is a mock of the Hub (the real one is not reachable from here): it answers the
endpoints a commit uses (create repo, create branch, validate the card's YAML, preupload,
commit) with the shapes
the Hub documents, every file as a regular (non-LFS) blob."""

import json

import pytest
import yaml
from support.cli import mlmjob
from support.hub import hub_env
from support.training import config, launch

pytestmark = pytest.mark.slow


def card_header(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n", 2)[1])


def test_push_uploads_the_model_with_a_model_card(synthetic, tmp_path, data_dir, reference, hub):
    cfg = config(synthetic, tmp_path, data_dir, run=reference)
    sets = ("--set", "train.push_to_hub={repo_id: me/tiny-mlm, revision: v1}")
    proc = mlmjob("push", "-c", cfg, *sets, env=hub_env(hub))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert hub["created"][0] == {"name": "tiny-mlm", "organization": "me", "visibility": "private"}
    assert hub["branches"] == ["v1"]
    (commit,) = hub["commits"]
    assert commit["revision"] == "v1"
    model = reference / "model"
    want = {
        p.relative_to(model).as_posix(): p.read_bytes() for p in model.rglob("*") if p.is_file()
    }
    files = dict(commit["files"])
    card = files.pop("README.md").decode()
    assert files == want  # every file of model/, byte for byte
    assert all(auth == "Bearer hf_test_token_not_real" for *_, auth in hub["requests"])
    summary = json.loads((reference / "summary.json").read_text())
    meta = card_header(card)
    assert meta["pipeline_tag"] == "fill-mask" and meta["library_name"] == "transformers"
    assert "base_model" not in meta  # trained from scratch
    (result,) = meta["model-index"][0]["results"]
    assert result["metrics"] == [
        {"type": "perplexity", "value": summary["perplexity"], "name": "Perplexity"}
    ]
    assert result["dataset"]["name"] == summary["dataset_id"]
    assert f"before training: {summary['initial_perplexity']:.4g}" in card
    assert "learning_rate: 0.001" in card  # the training config
    assert proc.stdout.strip() == f"{hub['url']}/me/tiny-mlm/commit/abc123"


def test_card_names_the_base_model_and_hub_dataset():
    from job.config import Config
    from job.push import model_card

    cfg = Config.model_validate(
        {
            "model": {"name_or_path": "distilbert/distilroberta-base"},
            "data": {"sources": [{"hf": "sentence-transformers/eli5", "split": "train"}]},
            "train": {"push_to_hub": {"repo_id": "me/x"}},
        }
    )
    summary = {"perplexity": 8.5, "initial_perplexity": 20.1, "dataset_id": "eli5-abc"}
    meta = card_header(model_card(cfg, summary))
    assert meta["base_model"] == "distilbert/distilroberta-base"
    assert meta["datasets"] == ["sentence-transformers/eli5"]
    metric = meta["model-index"][0]["results"][0]["metrics"][0]
    assert metric["type"] == "perplexity" and metric["value"] == 8.5


def test_failed_push_keeps_the_run_and_can_be_rerun(synthetic, tmp_path, data_dir, hub):
    cfg = config(synthetic, tmp_path, data_dir)
    run = tmp_path / "run"
    hub["fail"] = True
    sets = ("train.max_steps=4", "train.push_to_hub={repo_id: me/tiny-mlm}")
    proc = launch(cfg, *sets, env=hub_env(hub))
    assert proc.returncode == 0, proc.stderr[-3000:]  # the run is complete all the same
    assert "push to me/tiny-mlm failed" in proc.stderr and "rerun `mlmjob push`" in proc.stderr
    assert (run / "summary.json").exists() and (run / "model" / "model.safetensors").exists()
    assert not hub["commits"]
    hub["fail"] = False
    again = mlmjob("push", "-c", cfg, "--set", sets[1], env=hub_env(hub))
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(hub["commits"]) == 1 and "model.safetensors" in hub["commits"][0]["files"]


def test_push_without_repo_or_before_the_run_ends_is_bad_input(synthetic, tmp_path, data_dir):
    cfg = config(synthetic, tmp_path, data_dir)
    proc = mlmjob("push", "-c", cfg)
    assert proc.returncode == 2
    assert (
        proc.stderr.strip().splitlines()[-1].startswith("mlmjob: error: train.push_to_hub: not set")
    )
    proc = mlmjob("push", "-c", cfg, "--set", "train.push_to_hub={repo_id: me/x}")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"mlmjob: error: run.output: '{tmp_path / 'run'}' has no summary.json; train the run first"
    )
