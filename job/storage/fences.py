"""Fenced prefixes: outputs held under a lease (job.lease), checked before every write and
deletion under them. The registry lives here and only here."""

from __future__ import annotations

from job.storage.uri import _norm

# Fenced prefixes: an output held under a lease (job.lease) -> its check. Every write and
# deletion under one calls the check first; a commit (a marker, a deletion) asks the store.
_fences: dict[str, tuple[object, str]] = {}


def fence(prefix: str, check, exempt: str) -> None:
    """Call `check(commit)` before any write under `prefix` (but `exempt`, the lease file)."""
    _fences[_norm(prefix).rstrip("/") + "/"] = (check, _norm(exempt))


def unfence(prefix: str) -> None:
    _fences.pop(_norm(prefix).rstrip("/") + "/", None)


def fenced(uri: str, commit: bool = True) -> None:
    """Raise LeaseLost if `uri` is under a leased output whose lease this process lost."""
    target = _norm(uri)
    for prefix, (check, exempt) in list(_fences.items()):
        if (target + "/").startswith(prefix) and target != exempt:
            check(commit)
