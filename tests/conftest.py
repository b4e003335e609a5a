"""Fixtures, and the hooks of the data layer. What they build on is in tests/support/.

Layout: tests/unit/ (no subprocess, no server: `pytest -m unit`, seconds) and
tests/integration/ (the CLI, the launcher and torchrun, S3, MLflow, the rendered manifests).

Most tests run on `synthetic`: ELI5-format records and a small RoBERTa-style tokenizer
generated at the start of the session (support/synthetic.py), so a fresh clone passes
`make test` on its own. The few tests that need the real ELI5 file and the real roberta-base
tokenizer (exact figures of the real file, equality with the tutorial's pipeline on it) are
the *data layer*: marked `data` (or using the `real_data` fixture), they read the folder
`$MLMJOB_TEST_DATA` (default `<project>/../shared/data`) and are skipped, with one line
saying what is missing, when it is absent; with MLMJOB_REQUIRE_DATA=1 (CI) that is an error.

Expensive things are made once per session and only read by the tests: the synthetic
inputs, the tiny dataset and its reference training run once for every xdist worker
(support/once.py), the S3 server and the MLflow server once per worker.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from support.cli import preprocessed
from support.data import REAL, REQUIRE_DATA, Inputs, data_missing, need_data
from support.hub import serve_hub
from support.once import shared_dir
from support.s3 import S3Proxy, Weed, free_port, serve
from support.training import COMPARABLE, TINY, ZERO2, config, launch, train_here

os.environ["MLMJOB_NO_PROGRESS"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

UNIT = Path(__file__).parent / "unit"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "real_data" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.data)
        if UNIT in Path(item.path).parents:
            item.add_marker(pytest.mark.unit)
    # The end-to-end tests first: the workers then start the long ones (tens of seconds, some
    # of it waiting on a server or an outage) together and end on the short ones, instead
    # of one worker finishing a long test alone at the end (xdist keeps this order).
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
    reason = data_missing()
    if reason and REQUIRE_DATA and any(item.get_closest_marker("data") for item in items):
        raise pytest.UsageError(f"MLMJOB_REQUIRE_DATA is set but {reason}")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    if item.get_closest_marker("data"):
        need_data()


@pytest.fixture(scope="session")
def real_data() -> Inputs:
    """The real ELI5 file and roberta-base tokenizer (skips the test when absent)."""
    need_data()
    return REAL


# ---- data the tests make themselves -------------------------------------------------------


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory) -> Inputs:
    """400 generated ELI5-Category records (gzip of one JSON array, as the real file) and a
    byte-level BPE trained on them with roberta-base's conventions."""
    from support import synthetic as gen

    from job.sample.build_tokenizer import build_tokenizer

    def make(root: Path) -> None:
        records = gen.eli5_records(400, seed=0)
        gen.write_eli5(root / "eli5" / "eli5-synthetic.json.gz", records)
        build_tokenizer(gen.texts(records), root / "tokenizer", vocab_size=2000)

    root = shared_dir(tmp_path_factory, "synthetic", make)
    return Inputs(eli5=root / "eli5" / "eli5-synthetic.json.gz", tokenizer=root / "tokenizer")


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """The session's S3 server (see Weed); the process environment points at it."""
    weed = Weed(tmp_path_factory.mktemp("seaweed"))
    server = weed.server
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    try:
        weed.start()
        yield server
    finally:
        weed.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_prefix(s3, request):
    """A fresh prefix in the test bucket for one test."""
    name = request.node.name.replace("[", "-").replace("]", "")
    return f"s3://{s3.bucket}/{name}-{time.time_ns()}"


@pytest.fixture
def s3_proxy(s3):
    """An S3Proxy in front of the session's S3 server (see S3Proxy for the API)."""
    yield from serve(S3Proxy(s3.endpoint))


# ---- the tiny training run ---------------------------------------------------------------


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory, synthetic):
    """The tiny training config's dataset, preprocessed once for the session (read only)."""
    return preprocessed(tmp_path_factory, synthetic, TINY, "tiny-data")


@pytest.fixture(scope="session")
def reference(tmp_path_factory, synthetic, data_dir):
    """An uninterrupted 1-process run of the tiny config, trained once for the session (read
    only): what every resumed run must reproduce (each of those starts through the launcher:
    this one needs no process of its own)."""

    def make(tmp: Path) -> None:
        proc = train_here(config(synthetic, tmp, data_dir))
        assert proc.returncode == 0, proc.stderr[-3000:]

    return shared_dir(tmp_path_factory, "reference", make) / "run"


def two_process_run(tmp_path_factory, synthetic, data_dir, name: str, *sets: str) -> Path:
    """A 2-process run of the tiny config with COMPARABLE and `sets`, trained once for the
    session's workers (its stdout and stderr beside it): what the other layouts of the
    same run are compared with."""

    def make(tmp: Path) -> None:
        proc = launch(config(synthetic, tmp, data_dir), *COMPARABLE, *sets, nproc=2)
        assert proc.returncode == 0, proc.stderr[-3000:]
        (tmp / "stdout.txt").write_text(proc.stdout)
        (tmp / "stderr.txt").write_text(proc.stderr)

    return shared_dir(tmp_path_factory, name, make) / "run"


@pytest.fixture(scope="session")
def ddp2(tmp_path_factory, synthetic, data_dir) -> Path:
    """The tiny config with COMPARABLE on 2 processes (DDP), read only."""
    return two_process_run(tmp_path_factory, synthetic, data_dir, "ddp2")


@pytest.fixture(scope="session")
def zero2(tmp_path_factory, synthetic, data_dir) -> Path:
    """The tiny config with COMPARABLE on 2 processes under DeepSpeed ZeRO-2, read only."""
    return two_process_run(tmp_path_factory, synthetic, data_dir, "zero2", ZERO2)


# ---- trackers and the Hub ----------------------------------------------------------------


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory, s3):
    """`mlflow server` on a free loopback port; artifacts proxied to the S3 bucket."""
    tmp = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    mlflow = shutil.which("mlflow") or os.path.join(os.path.dirname(sys.executable), "mlflow")
    env = {
        **os.environ,
        **s3.env(),
        "MLFLOW_S3_ENDPOINT_URL": s3.endpoint,
        # No job runner: its 8 processes (huey consumers) poll all session long, for jobs
        # (prompt optimization, trace roll-ups) that no test asks of the server.
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    log = open(tmp / "server.log", "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        [
            mlflow,
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{tmp / 'mlflow.db'}",
            "--artifacts-destination",
            f"s3://{s3.bucket}/mlflow-artifacts",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            assert proc.poll() is None, (tmp / "server.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2)
                break
            except OSError:
                assert time.time() < deadline, (tmp / "server.log").read_text()[-3000:]
                time.sleep(0.5)
        yield uri
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


@pytest.fixture
def hub():
    with serve_hub() as record:
        yield record
