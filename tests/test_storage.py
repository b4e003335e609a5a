"""Storage through a local folder and through a real S3 server (SeaweedFS on loopback)."""

import os

import pytest
from conftest import mlmjob, write_config

from job import storage
from job.errors import StorageError


@pytest.fixture(params=["local", "s3"])
def base(request, tmp_path):
    storage.configure()
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_prefix")


def test_round_trip(base):
    uri = storage.join(base, "a/b/data.bin")
    payload = bytes(range(256)) * 1000
    assert not storage.exists(uri)
    storage.write_bytes(uri, payload)
    assert storage.exists(uri)
    assert storage.read_bytes(uri) == payload
    assert storage.size(uri) == len(payload)
    assert storage.read_range(uri, 1000, 300) == payload[1000:1300]
    storage.write_text(storage.join(base, "a/c.txt"), "héllo")
    assert storage.read_text(storage.join(base, "a/c.txt")) == "héllo"
    assert storage.list_files(storage.join(base, "a")) == [
        storage.join(base, "a/b/data.bin"),
        storage.join(base, "a/c.txt"),
    ]
    assert storage.expand(storage.join(base, "a/*.txt")) == [storage.join(base, "a/c.txt")]
    assert storage.expand(storage.join(base, "a/*/*.bin")) == [uri]
    storage.delete_prefix(storage.join(base, "a"))
    assert storage.list_files(storage.join(base, "a")) == []


def test_missing_object_raises_file_not_found(base):
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(storage.join(base, "nope"))


def test_file_and_dir_transfer(base, tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "x.txt").write_text("x")
    (src / "sub" / "y.bin").write_bytes(os.urandom(6 * 1024 * 1024))  # multipart on S3
    storage.upload_dir(src, storage.join(base, "dir"))
    dest = tmp_path / "dest"
    storage.download_dir(storage.join(base, "dir"), dest)
    assert (dest / "x.txt").read_text() == "x"
    assert (dest / "sub" / "y.bin").read_bytes() == (src / "sub" / "y.bin").read_bytes()


def test_local_write_is_atomic_and_leaves_no_temp(tmp_path):
    uri = str(tmp_path / "f.bin")
    storage.write_bytes(uri, b"old")
    storage.write_bytes(uri, b"new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]
    assert storage.read_bytes(uri) == b"new"


def test_missing_bucket_is_one_clear_line(s3):
    storage.configure()
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist"):
        storage.read_bytes("s3://no-such-bucket/x")


def test_wrong_credentials_are_one_clear_line(s3, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "wrong")
    storage.configure()
    try:
        with pytest.raises(StorageError, match="access denied by S3"):
            storage.write_bytes(f"s3://{s3.bucket}/x", b"1")
    finally:
        monkeypatch.undo()
        storage.configure()


def test_cli_missing_bucket_exits_2(s3, tmp_path):
    cfg = write_config(
        tmp_path / "c.yaml",
        "data:\n  sources: ['s3://no-such-bucket/eli5.json']\n"
        f"  output: {tmp_path}/out\nmodel:\n  name_or_path: job/sample/tokenizer\n",
    )
    proc = mlmjob("preprocess", "-c", cfg)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert (
        last
        == "mlmjob: error: s3://no-such-bucket/eli5.json: bucket 'no-such-bucket' does not exist"
    )
