"""Storage through a local folder and through a real S3 server (SeaweedFS on loopback)."""

import os

import pytest
from support.cli import mlmjob, write_config

from job import storage
from job.errors import StorageError, TransientStorageError


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


def test_glob_matches_like_a_local_glob(base):
    """`*`, `?` and `[..]` stay inside one folder and `**` crosses folders, on S3 as locally
    (glob.glob(recursive=True)); a glob names files, never folders."""
    for rel in ["in/a.txt", "in/b.txt", "in/c.json", "in/old/x.txt", "in/old/deep/y.txt"]:
        storage.write_text(storage.join(base, rel), rel)

    def expand(pattern):
        return [u[len(base) + 1 :] for u in storage.expand(storage.join(base, pattern))]

    assert expand("in/*.txt") == ["in/a.txt", "in/b.txt"]
    assert expand("in/?.txt") == ["in/a.txt", "in/b.txt"]
    assert expand("in/[a].txt") == ["in/a.txt"]
    assert expand("in/*") == ["in/a.txt", "in/b.txt", "in/c.json"]
    assert expand("in/*/*.txt") == ["in/old/x.txt"]
    assert expand("in/o*/x.txt") == ["in/old/x.txt"]
    assert expand("i?/*.json") == ["in/c.json"]
    assert expand("in/**/*.txt") == ["in/a.txt", "in/b.txt", "in/old/deep/y.txt", "in/old/x.txt"]
    assert expand("in/**") == [
        "in/a.txt",
        "in/b.txt",
        "in/c.json",
        "in/old/deep/y.txt",
        "in/old/x.txt",
    ]
    assert expand("in/*.parquet") == []


def _through(proxy, s3_prefix, name="x.bin"):
    """Point storage at the proxy; an object's URI and the path the proxy counts it by."""
    storage.configure(endpoint_url=proxy.endpoint)
    uri = f"{s3_prefix}/{name}"
    return uri, "/" + uri[len("s3://") :]


@pytest.mark.parametrize("op", ["read", "upload", "download", "list", "exists"])
def test_expired_token_refreshes_the_client_and_retries_once(s3_proxy, s3_prefix, tmp_path, op):
    uri, path = _through(s3_proxy, s3_prefix)
    storage.write_bytes(uri, b"payload")
    used = storage.client()
    s3_proxy.reset()
    s3_proxy.fail_next(1, "ExpiredToken")
    (tmp_path / "up").write_bytes(b"uploaded")
    method, expected = {
        "read": ("GET", lambda: storage.read_bytes(uri) == b"payload"),
        "upload": ("PUT", lambda: storage.upload_file(tmp_path / "up", uri) is None),
        "download": ("HEAD", lambda: storage.download_file(uri, tmp_path / "down") is None),
        "list": ("GET", lambda: storage.list_files(s3_prefix) == [uri]),
        "exists": ("HEAD", lambda: storage.exists(uri)),
    }[op]
    assert expected()
    counted = path if op != "list" else "/" + s3_prefix[len("s3://") :].split("/")[0]
    assert s3_proxy.counts[(method, counted)] == 2  # the refused request, then one retry
    assert storage.client() is not used  # the retry went through a fresh client
    if op in ("upload", "download"):
        assert (
            storage.read_bytes(uri)
            == (tmp_path / ("up" if op == "upload" else "down")).read_bytes()
        )


def test_refresh_rereads_rotated_credentials(s3, s3_proxy, s3_prefix, monkeypatch):
    """The client was made with credentials since rotated: S3 says ExpiredToken, and the
    fresh client takes the new ones from the credential chain."""
    uri, path = _through(s3_proxy, s3_prefix)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "rotated-away")
    storage.client()  # made with the old key
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.env()["AWS_ACCESS_KEY_ID"])
    s3_proxy.fail_next(1, "ExpiredToken")
    storage.write_bytes(uri, b"1")
    assert s3_proxy.counts[("PUT", path)] == 2


def test_access_denied_after_success_is_retried_once_then_transient(s3_proxy, s3_prefix):
    uri, path = _through(s3_proxy, s3_prefix)
    storage.write_bytes(uri, b"payload")
    s3_proxy.reset()
    s3_proxy.fail_next(1, "AccessDenied")
    assert storage.read_bytes(uri) == b"payload"
    s3_proxy.reset()
    s3_proxy.fail_next(1, "AccessDenied")
    storage.write_bytes(uri, b"v2")  # a fresh client that has not succeeded yet is refused
    s3_proxy.fail_next(2, "AccessDenied")
    with pytest.raises(TransientStorageError, match=r"AccessDenied"):
        storage.read_bytes(uri)
    assert s3_proxy.counts[("GET", path)] == 2


def test_persistent_expired_token_is_transient(s3_proxy, s3_prefix):
    uri, path = _through(s3_proxy, s3_prefix)
    s3_proxy.fail_next(2, "ExpiredToken")
    with pytest.raises(TransientStorageError, match=r"ExpiredToken") as err:
        storage.read_bytes(uri)
    assert not isinstance(err.value, StorageError)  # StorageError means exit 2
    assert s3_proxy.counts[("GET", path)] == 2


def _infer_config(tmp_path, pattern, endpoint):
    return write_config(
        tmp_path / "c.yaml",
        f"storage: {{endpoint_url: '{endpoint}'}}\n"
        f"infer: {{inputs: ['{pattern}'], output: '{tmp_path}/out'}}\n",
    )


def test_cli_persistent_expired_token_exits_1(s3_proxy, s3_prefix, tmp_path):
    storage.write_text(f"{s3_prefix}/in/a.txt", "The <mask> is blue.\n")
    cfg = _infer_config(tmp_path, f"{s3_prefix}/in/*.txt", s3_proxy.endpoint)
    s3_proxy.fail_next(10, "ExpiredToken")
    proc = mlmjob("infer", "-c", cfg)
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"mlmjob: error: {s3_prefix}/in: S3 refused the request (ExpiredToken)")
    assert s3_proxy.counts[("GET", "/test")] == 2  # the listing, then one retry


def test_cli_wrong_key_on_a_fresh_client_exits_2(s3_proxy, s3_prefix, tmp_path):
    storage.write_text(f"{s3_prefix}/in/a.txt", "The <mask> is blue.\n")
    cfg = _infer_config(tmp_path, f"{s3_prefix}/in/*.txt", s3_proxy.endpoint)
    proc = mlmjob("infer", "-c", cfg, env={"AWS_ACCESS_KEY_ID": "wrong"})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"mlmjob: error: {s3_prefix}/in: access denied by S3 (InvalidAccessKeyId): "
        "check the credentials and the bucket policy of 'test'"
    )
    assert sum(s3_proxy.counts.values()) == 1  # no retry: retrying cannot fix a wrong key


def test_s3_proxy_counts_concurrent_requests_exactly(s3_proxy, s3_prefix):
    """The fixture other tests count requests with: every request counted once, by its
    unquoted path, also when many arrive at once."""
    from concurrent.futures import ThreadPoolExecutor

    storage.configure(endpoint_url=s3_proxy.endpoint)
    uris = [f"{s3_prefix}/shard {i}.bin" for i in range(8)]
    for uri in uris:
        storage.write_bytes(uri, uri.encode())
    s3_proxy.reset()
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(storage.read_bytes, uris * 5))
    assert got == [u.encode() for u in uris * 5]
    assert s3_proxy.counts == {("GET", "/" + u[len("s3://") :]): 5 for u in uris}
