"""What a cloud does to a run: the S3 server stopped for 20 s in the middle of training,
preprocessing and inference, and a store that answers 503 SlowDown to a third of the
requests. Each command must exit 0 with the outputs of an uninterrupted run."""

import json
import os
import subprocess
import sys
import time

import pytest
from support.cli import mlmjob, wait_for, write_config
from support.data import ROOT
from support.s3 import S3Proxy, Weed, serve

from job import storage

pytestmark = pytest.mark.slow

OUTAGE_S = 20

CONFIG = """
run: {{output: '{run}', seed: 42}}
data: {{sources: ['{src}'], output: '{data}', max_records: 300}}
model:
  name_or_path: '{tok}'
  from_scratch: true
  config_overrides: {{hidden_size: 64, num_hidden_layers: 2, num_attention_heads: 2,
                     intermediate_size: 128}}
train:
  max_steps: 40
  per_device_batch_size: 4
  learning_rate: 1.0e-3
  eval_every_steps: 20
  checkpoint_every_steps: 10
  log_every_steps: 5
infer: {{inputs: ['{inputs}'], output: '{out}', batch_size: 16, lines_per_part: 40}}
"""


@pytest.fixture(scope="module")
def weed(s3, tmp_path_factory):
    """A server of this module's own, which the tests stop and start (the session's `s3`
    sets the test credentials in the environment)."""
    server = Weed(tmp_path_factory.mktemp("weed-outage"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def inputs(weed, synthetic, tmp_path_factory):
    """The ELI5 source and an inference input, uploaded to the module's server."""
    tmp = tmp_path_factory.mktemp("inputs")
    lines = tmp / "lines.txt"
    lines.write_text("".join(f"Line {i}: the <mask> is bright.\n" for i in range(200)))
    with pointed_at(weed):
        storage.upload_file(synthetic.eli5, "s3://test/in/eli5.jsonl")
        storage.upload_file(lines, "s3://test/in/lines.txt")
    return "s3://test/in"


class pointed_at:
    """This process's storage calls go to `weed` for the block."""

    def __init__(self, weed):
        self.weed = weed

    def __enter__(self):
        storage.configure(endpoint_url=self.weed.server.endpoint)

    def __exit__(self, *exc):
        storage.configure()


def config(tmp_path, synthetic, inputs, prefix: str, name="c.yaml"):
    text = CONFIG.format(
        run=f"{prefix}/run",
        src=f"{inputs}/eli5.jsonl",
        data=f"{prefix}/data",
        tok=synthetic.tokenizer,
        inputs=f"{inputs}/lines.txt",
        out=f"{prefix}/infer",
    )
    return write_config(tmp_path / name, text)


def run_all(cfg, endpoint: str, during=None) -> dict[str, subprocess.CompletedProcess]:
    """preprocess, train and infer in turn against `endpoint`. With `during(command, proc)`
    (called while each runs: an outage), each command is a process of its own; without,
    each runs as support.cli.mlmjob runs it (in this process: retries are the same code)."""
    env = {"AWS_ENDPOINT_URL": endpoint, "MLMJOB_CACHE": str(cfg.parent / "cache")}
    out = {}
    for command in ("preprocess", "train", "infer"):
        if during:
            out[command] = run_during(command, cfg, env, during)
        else:
            out[command] = mlmjob(command, "-c", cfg, env=env)
        assert out[command].returncode == 0, f"{command}: {out[command].stderr[-3000:]}"
    return out


def run_during(command: str, cfg, env: dict, during) -> subprocess.CompletedProcess:
    proc = subprocess.Popen(
        [sys.executable, "-m", "job", command, "-c", str(cfg)],
        cwd=ROOT,
        env={**os.environ, **env},
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    during(command, proc)
    stdout, stderr = proc.communicate(timeout=900)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def outputs(weed, prefix: str) -> dict:
    """What a run leaves that must not depend on an outage: the dataset's shards, the
    summary's figures, every logged event, the inference parts."""
    with pointed_at(weed):
        run, timing = f"{prefix}/run", {"tokens_per_s"}
        summary = json.loads(storage.read_text(f"{run}/summary.json"))
        events = [
            {k: v for k, v in json.loads(x).items() if k not in timing}
            for x in storage.read_text(f"{run}/metrics.jsonl").splitlines()
        ]
        manifest = next(
            u for u in storage.list_files(f"{prefix}/data") if u.endswith("manifest.json")
        )
        shards = {
            sp: [s["sha256"] for s in v["shards"]]
            for sp, v in json.loads(storage.read_text(manifest))["splits"].items()
        }
        parts = {
            u.rsplit("/", 1)[1]: storage.read_text(u)
            for u in storage.list_files(f"{prefix}/infer")
            if u.endswith(".jsonl")
        }
    figures = {k: summary[k] for k in ("perplexity", "eval_loss", "global_step", "train_tokens")}
    return {"summary": figures, "events": events, "shards": shards, "parts": parts}


@pytest.fixture(scope="module")
def reference(weed, inputs, synthetic, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    run_all(config(tmp, synthetic, inputs, "s3://test/reference"), weed.server.endpoint)
    return outputs(weed, "s3://test/reference")


def test_a_20_second_outage_in_every_command_changes_nothing(
    weed, inputs, synthetic, reference, tmp_path
):
    def outage(command, proc):
        # training: once the step-10 checkpoint is committed, so that a log step, a
        # checkpoint and the step-20 eval fall inside; the others: as they start reading
        if command == "train":
            marker = "s3://test/outage/run/checkpoints/step-10/COMMITTED.json"
            with pointed_at(weed):
                wait_for(lambda: storage.exists(marker), timeout=600, poll=0.2)
        else:
            time.sleep(1.0)
        weed.stop()
        time.sleep(OUTAGE_S)
        weed.start()

    runs = run_all(
        config(tmp_path, synthetic, inputs, "s3://test/outage"), weed.server.endpoint, outage
    )
    for command, proc in runs.items():
        assert "storage unavailable" in proc.stderr, command
        assert "storage answers again after" in proc.stderr, command
        assert "Traceback" not in proc.stderr, command
    assert outputs(weed, "s3://test/outage") == reference


def test_throttling_a_third_of_the_requests_slows_but_changes_nothing(
    weed, inputs, synthetic, reference, tmp_path
):
    proxy = S3Proxy(weed.server.endpoint)
    gen = serve(proxy)
    next(gen)
    try:
        proxy.throttle(3)
        runs = run_all(config(tmp_path, synthetic, inputs, "s3://test/slowdown"), proxy.endpoint)
        requests = sum(proxy.counts.values())
        proxy.throttle(0)
        assert requests >= 60  # so at least 20 of them were answered SlowDown
        assert all("Traceback" not in p.stderr for p in runs.values())
    finally:
        gen.close()
    assert outputs(weed, "s3://test/slowdown") == reference
