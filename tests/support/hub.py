"""A mock of the Hugging Face Hub (the real one is not reachable from here): a loopback HTTP
server (HF_ENDPOINT) answering the endpoints a commit uses (create repo, create branch,
validate the card YAML, preupload, commit) with the shapes the Hub documents, every file a
regular (non-LFS) blob, and recording what huggingface_hub sends."""

import base64
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeHub(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _reply(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        hub = self.server.hub
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        hub["requests"].append(("POST", self.path, self.headers.get("Authorization")))
        if hub.get("fail"):
            return self._reply(503, {"error": "the Hub is down (test)"})
        path = self.path.split("?")[0]
        if path == "/api/repos/create":
            repo = json.loads(body)
            hub["created"].append(repo)
            return self._reply(200, {"url": f"{hub['url']}/{repo['organization']}/{repo['name']}"})
        if path == "/api/validate-yaml":  # the client asks the Hub to check the card's header
            hub["validated"].append(json.loads(body))
            return self._reply(200, {})
        if "/branch/" in path:
            hub["branches"].append(path.rsplit("/branch/", 1)[1])
            return self._reply(200, {})
        if "/preupload/" in path:
            files = json.loads(body)["files"]
            return self._reply(
                200,
                {
                    "files": [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                        for f in files
                    ]
                },
            )
        if "/commit/" in path:
            lines = [json.loads(line) for line in body.decode().splitlines() if line]
            files = {
                v["value"]["path"]: base64.b64decode(v["value"]["content"])
                for v in lines
                if v["key"] == "file"
            }
            repo, revision = path.removeprefix("/api/models/").rsplit("/commit/", 1)
            hub["commits"].append({"revision": revision, "files": files, "header": lines[0]})
            return self._reply(
                200,
                {
                    "commitUrl": f"{hub['url']}/{repo}/commit/abc123",
                    "commitOid": "abc123" + "0" * 34,
                },
            )
        self._reply(404, {"error": f"not faked: {path}"})


@contextmanager
def serve_hub(handler: type[FakeHub] = FakeHub) -> Iterator[dict]:
    """A stand-in Hub on loopback; yields its record (requests seen, repos, commits, url)."""
    record = {"requests": [], "created": [], "branches": [], "commits": [], "validated": []}
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    server.hub = record
    record["url"] = f"http://127.0.0.1:{server.server_port}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield record
    finally:
        server.shutdown()
        server.server_close()


def hub_env(hub) -> dict:
    return {
        "HF_ENDPOINT": hub["url"],
        "HF_TOKEN": "hf_test_token_not_real",
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_OFFLINE": "0",  # the session's default is offline (support/__init__.py)
    }
