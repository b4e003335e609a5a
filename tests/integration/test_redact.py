"""No URL's password or signature leaves the process (job.redact): unit tests of `redact`
and of the redacting stdout/stderr, then one run through the CLI (preprocess, train with
MLflow and TensorBoard, push with a model card) with passwords in MLFLOW_TRACKING_URI and
in storage.endpoint_url, grepped for in everything the run printed, wrote and sent."""

import json
import secrets
import subprocess
import sys

import pytest
from support.cli import mlmjob
from support.data import ROOT
from support.hub import hub_env
from support.s3 import S3_KEY, S3_SECRET
from support.training import TINY, launch

# ---- redact() -----------------------------------------------------------------------------


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
