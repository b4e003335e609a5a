"""No URL's password or signature leaves the process (job.redact): unit tests of `redact`
and of the redacting stdout/stderr, then one run through the CLI (preprocess, train with
MLflow and TensorBoard, push with a model card) with passwords in MLFLOW_TRACKING_URI
and in storage.endpoint_url, grepped f The direct tests: no process, no server (the
others are in tests/integration/test_redact.py)."""

import io

import pytest

from job.redact import MASK, RedactingStream, redact


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
