"""A pydantic validation error as one line: the dotted key path, what is allowed, and
what was given (`data.sources[0].uri`, `>= 1`, `0`)."""

from __future__ import annotations

import math
from typing import Any

_BOUNDS = {
    "greater_than": "> {gt}",
    "greater_than_equal": ">= {ge}",
    "less_than": "< {lt}",
    "less_than_equal": "<= {le}",
}
_TYPES = {
    "int": "int",
    "float": "float",
    "bool": "bool",
    "string": "str",
    "list": "a list",
    "dict": "a mapping",
    "model": "a mapping",
}


def describe(err: dict) -> str:
    """One pydantic error as one line: the dotted key path, what is allowed, what was given."""
    key = _key_path(err["loc"])
    kind, given, ctx = err["type"], err.get("input"), err.get("ctx") or {}
    if kind == "extra_forbidden":
        return f"unknown key '{key}'"
    if kind == "finite_number" or (kind in _BOUNDS and _non_finite(given)):  # nan fails `gt`
        return f"key '{key}' must be a finite number, got {given!r}"
    if kind in _BOUNDS:
        return f"key '{key}' must be {_BOUNDS[kind].format(**ctx)}, got {given!r}"
    if kind == "literal_error":
        allowed = ctx.get("expected", "").replace("'", "").replace(" or ", ", ")
        return f"key '{key}' must be one of {allowed}, got {given!r}"
    if kind == "value_error":
        return f"key '{key}' must be {ctx.get('error', err['msg'])}, got {given!r}"
    base = kind.split("_")[0]
    if base in _TYPES:
        return f"key '{key}' must be {_TYPES[base]}, got {given!r}"
    return f"key '{key}': {err['msg']}, got {given!r}"


def _non_finite(value: Any) -> bool:
    try:
        return isinstance(value, float | str) and not math.isfinite(float(value))
    except ValueError:
        return False


def _key_path(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part not in ("function-after", "function-before") and not str(part).startswith(
            "function-"
        ):
            out += f".{part}" if out else str(part)
    return out or "<top>"
