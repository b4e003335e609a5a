"""Strict JSON for every file the project writes (metrics.jsonl, summary.json, eval results,
manifests, checkpoint markers and states, inference parts and markers).

`json.dumps` writes NaN and Infinity by default, which are not JSON (RFC 8259): jq, browsers,
Go and most other readers refuse the whole file. Here a non-finite number is a ValueError
naming where it is, raised before anything is written. Training stops on a non-finite loss
before logging it (job.train.loop) and caps perplexity (job.train.evaluate), so reaching
this is a bug.
"""

from __future__ import annotations

import json
import math
from typing import Any


def dumps(obj: Any, **kwargs) -> str:
    """`json.dumps(obj, **kwargs)` that refuses NaN and +-Infinity."""
    try:
        return json.dumps(obj, allow_nan=False, **kwargs)
    except ValueError:
        where = _non_finite(obj, "")
        if where is None:
            raise
        raise ValueError(f"not JSON: {where[0] or 'the value'} is {where[1]}") from None


def _non_finite(obj: Any, path: str) -> tuple[str, float] | None:
    if isinstance(obj, float) and not math.isfinite(obj):
        return path, obj
    if isinstance(obj, dict):
        items = ((f"{path}.{k}" if path else str(k), v) for k, v in obj.items())
    elif isinstance(obj, list | tuple):
        items = ((f"{path}[{i}]", v) for i, v in enumerate(obj))
    else:
        return None
    for key, value in items:
        found = _non_finite(value, key)
        if found:
            return found
    return None
