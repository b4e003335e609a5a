"""`mlmjob push` and `train.push_to_hub`, tested up to the HTTP boundary: a local HTTP server
stands in for the Hugging Face Hub (HF_ENDPOINT) and records what huggingface_hub's client
sends. This is a mock of the Hub (the real one is not reachable from here): it answers the
endpoints a commit uses (create repo, create branch, validate the card's YAML, preupload,
commit) with the shapes
the Hub documents, every file as a regular (non-LFS) blob."""

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import test_train
import yaml
from conftest import mlmjob
from test_train import config, launch

pytestmark = pytest.mark.slow
data_dir, reference = test_train.data_dir, test_train.reference  # its fixtures, this module's


class FakeHub(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _reply(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        hub = self.server.hub
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        hub["requests"].append(("POST", self.path, self.headers.get("Authorization")))
        if hub.get("fail"):
            return self._reply(503, {"error": "the Hub is down (test)"})
        path = self.path.split("?")[0]
        if path == "/api/repos/create":
            repo = json.loads(body)
            hub["created"].append(repo)
            return self._reply(200, {"url": f"{hub['url']}/{repo['organization']}/{repo['name']}"})
        if path == "/api/validate-yaml":  # the client asks the Hub to check the card's header
            hub["validated"].append(json.loads(body))
            return self._reply(200, {})
        if "/branch/" in path:
            hub["branches"].append(path.rsplit("/branch/", 1)[1])
            return self._reply(200, {})
        if "/preupload/" in path:
            files = json.loads(body)["files"]
            return self._reply(
                200,
                {
                    "files": [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                        for f in files
                    ]
                },
            )
        if "/commit/" in path:
            lines = [json.loads(line) for line in body.decode().splitlines() if line]
            files = {
                v["value"]["path"]: base64.b64decode(v["value"]["content"])
                for v in lines
                if v["key"] == "file"
            }
            repo, revision = path.removeprefix("/api/models/").rsplit("/commit/", 1)
            hub["commits"].append({"revision": revision, "files": files, "header": lines[0]})
            return self._reply(
                200,
                {
                    "commitUrl": f"{hub['url']}/{repo}/commit/abc123",
                    "commitOid": "abc123" + "0" * 34,
                },
            )
        self._reply(404, {"error": f"not faked: {path}"})


@pytest.fixture
def hub():
    record = {"requests": [], "created": [], "branches": [], "commits": [], "validated": []}
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    server.daemon_threads = True
    server.hub = record
    record["url"] = f"http://127.0.0.1:{server.server_port}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield record
    server.shutdown()
    server.server_close()


def hub_env(hub) -> dict:
    return {
        "HF_ENDPOINT": hub["url"],
        "HF_TOKEN": "hf_test_token_not_real",
        "HF_HUB_DISABLE_XET": "1",
    }


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
