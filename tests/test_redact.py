"""No URL's password or signature leaves the process (job.redact): unit tests of `redact`
and of the redacting stdout/stderr, then one run through the CLI (preprocess, train with
MLflow and TensorBoard, push with a model card) with passwords in MLFLOW_TRACKING_URI and
in storage.endpoint_url, grepped for in everything the run printed, wrote and sent."""

import io
import json
import secrets
import subprocess
import sys

import pytest
from conftest import ROOT, mlmjob
from test_push import hub, hub_env  # noqa: F401 (a fixture, this module's)
from test_tracking import mlflow_server  # noqa: F401 (a fixture, this module's)
from test_train import TINY, launch

from job.redact import MASK, RedactingStream, redact

# ---- redact() -----------------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize(
    "url, want",
    [
        ("http://alice:pw@host", "http://***@host"),
        ("http://alice:pw@host:5000/api?x=1", "http://***@host:5000/api?x=1"),
        ("https://ghp_token123@github.com/o/r.git", "https://***@github.com/o/r.git"),
        ("http://admin:p@ss@127.0.0.1:8333", "http://***@127.0.0.1:8333"),  # an unencoded @
        ("postgresql://u:pw@db:5432/mlflow", "postgresql://***@db:5432/mlflow"),
    ],
)
def test_userinfo_is_masked(url, want):
    assert redact(url) == want


SECRET_PARAMS = [
    "X-Amz-Signature",
    "X-Amz-Credential",
    "X-Amz-Security-Token",
    "sig",
    "token",
    "access_token",
    "refresh_token",
    "password",
    "secret",
    "client_secret",
    "api_key",
    "apikey",
    "X-Goog-Signature",
    "Signature",
    "AWSAccessKeyId",
    "x-amz-signature",
]


@pytest.mark.unit
@pytest.mark.parametrize("name", SECRET_PARAMS)
def test_each_secret_query_parameter_is_masked(name):
    url = f"https://b.s3.amazonaws.com/k.json?X-Amz-Expires=3600&{name}=S3cr3t%2Fv&keep=1"
    assert redact(url) == f"https://b.s3.amazonaws.com/k.json?X-Amz-Expires=3600&{name}=***&keep=1"


@pytest.mark.unit
def test_presigned_s3_url():
    url = (
        "https://bucket.s3.us-east-1.amazonaws.com/data/eli5.json.gz?X-Amz-Algorithm="
        "AWS4-HMAC-SHA256&X-Amz-Credential=AKIAEXAMPLE%2F20250101%2Fus-east-1%2Fs3%2F"
        "aws4_request&X-Amz-Date=20250101T000000Z&X-Amz-Expires=3600&X-Amz-SignedHeaders="
        "host&X-Amz-Security-Token=IQoJb3JpZ2lu&X-Amz-Signature=0123abcd"
    )
    assert redact(url) == (
        "https://bucket.s3.us-east-1.amazonaws.com/data/eli5.json.gz?X-Amz-Algorithm="
        "AWS4-HMAC-SHA256&X-Amz-Credential=***&X-Amz-Date=20250101T000000Z&X-Amz-Expires=3600"
        "&X-Amz-SignedHeaders=host&X-Amz-Security-Token=***&X-Amz-Signature=***"
    )


@pytest.mark.unit
def test_urls_in_a_sentence_and_several_urls():
    text = (
        "tracking: mlflow failed (API request to http://alice:hunter2@10.0.0.1:5000/api/2.0/"
        "runs/create failed: Max retries); also tried 'https://x.blob.core.windows.net/c/b?"
        "sv=2022&sig=AbC%3D&se=2030' and <https://app.example/cb#access_token=zzz&state=s1>, "
        "then s3://bucket/key."
    )
    assert redact(text) == (
        "tracking: mlflow failed (API request to http://***@10.0.0.1:5000/api/2.0/"
        "runs/create failed: Max retries); also tried 'https://x.blob.core.windows.net/c/b?"
        "sv=2022&sig=***&se=2030' and <https://app.example/cb#access_token=***&state=s1>, "
        "then s3://bucket/key."
    )
    assert "hunter2" not in redact(text) and "AbC" not in redact(text)


@pytest.mark.unit
@pytest.mark.parametrize(
    "text",
    [
        "s3://bucket/key",
        "s3://bucket/prefix/run/checkpoints/step-6/",
        "http://127.0.0.1:8333",
        "https://huggingface.co/me/model?revision=main&page=2#readme",
        "hf://datasets/sentence-transformers/eli5/pair/train-00000.parquet",
        "file:///tmp/out/run and out/run and a plain sentence: no URL here",
        "https://medium.com/@author/a-post",  # an @ in the path is not userinfo
        "http://h/p?token=&a=1",  # an empty value hides nothing
        "",
    ],
)
def test_urls_without_secrets_are_unchanged(text):
    assert redact(text) == text


@pytest.mark.unit
def test_redact_is_idempotent():
    text = "http://a:b@h/x?token=t&ok=1 https://u@h2"
    assert (
        redact(redact(text))
        == redact(text)
        == f"http://{MASK}@h/x?token={MASK}&ok=1 " + (f"https://{MASK}@h2")
    )


@pytest.mark.unit
def test_stream_redacts_a_url_written_in_pieces():
    out = io.StringIO()
    stream = RedactingStream(out)
    for piece in ("connecting to http://admin:Pa", "ssw0rd@127.0.0.1", ":8333/b ...", "\n"):
        stream.write(piece)
    stream.write("progress 1/2\rprogress 2/2 http://u:tail@h")  # no line end: held ...
    assert out.getvalue() == "connecting to http://***@127.0.0.1:8333/b ...\nprogress 1/2\r"
    stream.flush()  # ... until a flush
    assert out.getvalue().endswith("\rprogress 2/2 http://***@h")
    assert "Pa" not in out.getvalue() and "tail" not in out.getvalue()


def test_install_covers_tracebacks_warnings_prints_and_earlier_log_handlers():
    code = (
        "import logging, warnings\n"
        "logging.basicConfig()\n"  # a root handler made before install, on the raw stderr
        "from job import redact\n"
        "redact.install(); redact.install()\n"
        "logging.getLogger('botocore').warning('endpoint http://a:pw-log@h')\n"
        "warnings.warn('see http://a:pw-warn@h')\n"
        "print('stdout', 'http://a:pw-print@h/x?X-Amz-Signature=pw-sig')\n"
        "raise RuntimeError('Could not connect to the endpoint URL: http://a:pw-exc@h:1/b')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    both = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "RuntimeError" in proc.stderr
    assert "http://***@h/x?X-Amz-Signature=***" in proc.stdout
    for secret in ("pw-log", "pw-warn", "pw-print", "pw-sig", "pw-exc"):
        assert secret not in both, both
    assert both.count("***@h") == 4


@pytest.mark.unit
def test_config_written_out_is_redacted():
    from job.config import Config, dump_yaml, to_dict
    from job.train.tracking import flat_params

    cfg = Config.model_validate({"storage": {"endpoint_url": "http://admin:pw@minio:9000"}})
    assert cfg.storage.endpoint_url == "http://admin:pw@minio:9000"  # what boto3 is given
    assert "endpoint_url: http://***@minio:9000" in dump_yaml(cfg)
    assert to_dict(cfg)["storage"]["endpoint_url"] == "http://***@minio:9000"
    assert flat_params(cfg)["storage.endpoint_url"] == "http://***@minio:9000"
    assert to_dict(cfg, redacted=False)["storage"]["endpoint_url"].endswith("pw@minio:9000")


@pytest.mark.unit
def test_tracker_warning_is_redacted(caplog, monkeypatch, tmp_path):
    from job.log import log
    from job.train.tracking import Tracking

    monkeypatch.setattr(log, "propagate", True)  # caplog listens on the root logger
    # the password straddles the 300th character, where the warning cuts the message
    error = ConnectionError("y" * 280 + " http://alice:pw-tracker@127.0.0.1:1/api/2.0/runs")
    Tracking(None, str(tmp_path), tmp_path)._warn("mlflow", error)
    (record,) = caplog.records
    assert "tracking: mlflow failed" in record.getMessage()
    assert " http://***@127.0.0." in record.getMessage()
    assert "pw-tr" not in record.getMessage()


def test_bad_input_line_is_redacted(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("run:\n  output: 'http://admin:pw-bad@host/run'\n")
    proc = mlmjob("validate", "-c", cfg)
    assert proc.returncode == 2
    assert (
        "run.output' must be a local path" in proc.stderr and "http://***@host/run" in proc.stderr
    )
    assert "pw-bad" not in proc.stderr + proc.stdout


# ---- end to end ---------------------------------------------------------------------------


def _bucket_objects(s3, *prefixes: str) -> dict[str, bytes]:
    import boto3
    from conftest import S3_KEY, S3_SECRET

    client = boto3.client(
        "s3",
        endpoint_url=s3.endpoint,
        region_name="us-east-1",
        aws_access_key_id=S3_KEY,
        aws_secret_access_key=S3_SECRET,
    )
    out = {}
    for prefix in prefixes:
        for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=s3.bucket, Prefix=prefix
        ):
            for obj in page.get("Contents", []):
                out[obj["Key"]] = client.get_object(Bucket=s3.bucket, Key=obj["Key"])["Body"].read()
    return out


def _leak(where: str, data: bytes, pw: str) -> str:
    """`pw in where`, with the first line holding it (for text)."""
    line = next(ln for ln in data.split(b"\n") if pw.encode() in ln)
    return f"{pw.rsplit('-', 1)[0]} in {where}: {line[:300]!r}"


@pytest.mark.slow
def test_no_password_in_any_output_of_a_run(synthetic, tmp_path, s3, s3_prefix, mlflow_server, hub):  # noqa: F811
    pw_mlflow, pw_s3 = f"pw-mlflow-{secrets.token_hex(6)}", f"pw-s3-{secrets.token_hex(6)}"
    tracking_uri = mlflow_server.replace("http://", f"http://alice:{pw_mlflow}@")
    endpoint = s3.endpoint.replace("http://", f"http://admin:{pw_s3}@")
    run = f"{s3_prefix}/run"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        TINY.format(run=run, eli5=synthetic.eli5, data=f"{s3_prefix}/data", tok=synthetic.tokenizer)
        + f"storage:\n  endpoint_url: '{endpoint}'\n"
    )
    cache = f"data.cache_dir={tmp_path / 'cache'}"
    name = f"leak-{secrets.token_hex(4)}"
    sets = (
        "train.max_steps=6",
        "train.eval_every_steps=6",
        f"run.name={name}",
        "train.report_to=[mlflow, tensorboard]",
        cache,
    )
    env = {"MLFLOW_TRACKING_URI": tracking_uri}
    procs = {"validate": mlmjob("validate", "-c", cfg)}
    procs["preprocess"] = mlmjob("preprocess", "-c", cfg, "--set", cache)
    procs["train"] = launch(cfg, *sets, env=env)
    push_sets = ("--set", "train.push_to_hub={repo_id: me/leak-test, private: false}")
    procs["push"] = mlmjob("push", "-c", cfg, "--set", cache, *push_sets, env=hub_env(hub))
    for step, proc in procs.items():
        assert proc.returncode == 0, f"{step}: {proc.stderr[-3000:]}"
    assert "tracking:" not in procs["train"].stderr  # MLflow took the URI with its userinfo

    # every place the run's secrets could have gone
    places: dict[str, bytes] = {}
    for step, proc in procs.items():
        places[f"{step} stdout+stderr"] = (proc.stdout + proc.stderr).encode()
    prefix = s3_prefix.removeprefix(f"s3://{s3.bucket}/")
    for key, data in _bucket_objects(s3, prefix, "mlflow-artifacts/").items():
        places[f"s3://{s3.bucket}/{key}"] = data
    for path in tmp_path.rglob("*"):
        if path.is_file() and path != cfg:
            places[str(path)] = path.read_bytes()
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name(name)
    (found,) = client.search_runs([experiment.experiment_id])
    places["mlflow run"] = json.dumps(found.to_dictionary()).encode()
    (commit,) = hub["commits"]
    card = commit["files"]["README.md"]
    places["model card"] = card
    places["hub requests"] = json.dumps(hub["validated"] + hub["created"]).encode()

    leaks = [
        _leak(where, data, pw)
        for where, data in places.items()
        for pw in (pw_mlflow, pw_s3)
        if pw.encode() in data
    ]
    assert not leaks, "\n".join(leaks)
    # ... and what was there is there, redacted
    masked = f"http://***@127.0.0.1:{s3.endpoint.rsplit(':', 1)[1]}"
    config_yaml = places[f"{run}/config.yaml"].decode()
    assert f"endpoint_url: {masked}" in config_yaml
    assert found.data.params["storage.endpoint_url"] == masked
    assert f"endpoint_url: {masked}" in card.decode()
    assert f"endpoint_url: {masked}" in procs["validate"].stdout
    assert any(k.startswith(f"{run}/tensorboard/") for k in places)
    assert found.info.status == "FINISHED"
