"""Secrets out of URLs, wherever the project writes text: logs, error lines, files.

`redact(text)` finds every URL (`scheme://...`) in free text and replaces

- its userinfo (`http://alice:pw@host` -> `http://***@host`; the user name goes too, since
  a token is often passed as the user name alone: `https://ghp_xxx@github.com`), and
- the values of its secret query (and fragment) parameters (`X-Amz-Signature`,
  `X-Amz-Credential`, `X-Amz-Security-Token`, `sig`, `token`, `access_token`, `password`,
  `secret`, `api_key`, ...: `?X-Amz-Signature=***`),

and leaves everything else as it was (`s3://bucket/key`, hosts, paths, other parameters).

Hand-written: no library redacts URLs inside free text (urllib.parse parses one URL that is
already cut out; log scrubbers match fixed secrets, not URL parts), so a regex finds the
URLs and the parts are cut out as RFC 3986 splits them (the authority ends at the first `/`,
the userinfo at its last `@`). The one place it is applied to everything: `install()` wraps
`sys.stdout` and `sys.stderr` (logging handlers, warnings, tracebacks, tqdm, print).
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from urllib.parse import unquote

MASK = "***"

# A URL runs to the first whitespace, quote, angle bracket or backtick (how URLs sit in
# log lines, YAML, JSON, reprs and Markdown).
_URL = re.compile(r"\b([A-Za-z][A-Za-z0-9+.-]*://)([^\s'\"<>`]*)")
_PARAM = re.compile(r"([?&;#])([^=&;#?]+)=([^&;#]*)")
# Parameter names (lowercased, unquoted) whose values are secrets: exactly these, or any
# name containing one of the words below (X-Amz-Security-Token, X-Goog-Signature,
# client_secret, refresh_token, AWSAccessKeyId, ...).
_SECRET_NAMES = {
    "sig",
    "sas",
    "pwd",
    "pass",
    "auth",
    "authorization",
    "key",
    "code",
    "awsaccesskeyid",
}
_SECRET_WORDS = re.compile(
    r"token|secret|passw|signature|credential|api[-_]?key|access[-_]?key|private[-_]?key|session"
)


def _secret(name: str) -> bool:
    name = unquote(name).strip().lower()
    return name in _SECRET_NAMES or bool(_SECRET_WORDS.search(name))


def _param(m: re.Match) -> str:
    sep, name, value = m.groups()
    return f"{sep}{name}={MASK}" if value and _secret(name) else m.group(0)


def _url(m: re.Match) -> str:
    scheme, rest = m.groups()
    slash = rest.find("/")
    authority = rest if slash < 0 else rest[:slash]
    at = authority.rfind("@")
    if at >= 0:
        rest = MASK + rest[at:]
    start = min((i for i in (rest.find("?"), rest.find("#")) if i >= 0), default=-1)
    if start >= 0:
        rest = rest[:start] + _PARAM.sub(_param, rest[start:])
    return scheme + rest


def redact_all(value):
    """Every string in a structure of dicts and lists, redacted (configs, manifests)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: redact_all(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_all(v) for v in value]
    return value


def redact(text: str) -> str:
    """`text` with the userinfo and secret parameter values of every URL in it as `***`."""
    if "://" not in text:  # the common case, and the hot path of every write to stderr
        return text
    return _URL.sub(_url, text)


class RedactingStream:
    """A text stream that writes `redact(text)` to `stream`, a line at a time.

    A URL can arrive in pieces (print writes its arguments one by one, a traceback its
    lines in parts), so text is held until a line ends (`\\n`, or `\\r` as a progress bar
    ends its redraws), a flush, or 64 KiB without a line end. Everything else (`isatty`,
    `fileno`, `encoding`, `buffer`) is the wrapped stream's.
    """

    HOLD = 65536

    def __init__(self, stream):
        self.stream = stream
        self._held = ""
        self._lock = threading.RLock()  # threads log too (prefetch, tqdm's monitor)

    def write(self, text: str) -> int:
        with self._lock:
            held = self._held + text
            end = max(held.rfind("\n"), held.rfind("\r")) + 1
            if end == 0 and len(held) < self.HOLD:
                self._held = held
                return len(text)
            end = end or len(held)
            self._held = held[end:]
            self.stream.write(redact(held[:end]))
        return len(text)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        with self._lock:
            if self._held:
                held, self._held = self._held, ""
                self.stream.write(redact(held))
            self.stream.flush()

    def __getattr__(self, name):  # isatty, fileno, encoding, buffer, closed, ...
        if name == "stream":  # not set yet (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self.stream, name)


class RedactingFormatter(logging.Formatter):
    """A log line (message, arguments, traceback) with its URLs redacted."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def install() -> None:
    """Redact everything this process writes to stdout and stderr, from now on: the streams
    are wrapped, and the logging handlers made before (on the root logger or any other)
    that write to them are pointed at the wrappers. Idempotent."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is None or isinstance(stream, RedactingStream):
            continue
        wrapped = RedactingStream(stream)
        setattr(sys, name, wrapped)
        loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
        for logger in loggers:
            for handler in getattr(logger, "handlers", ()):
                if isinstance(handler, logging.StreamHandler) and handler.stream is stream:
                    handler.setStream(wrapped)
