"""The README's config reference, generated from the schema's field descriptions
(`python -m job.config` prints it; a test keeps the README equal to it)."""

from __future__ import annotations

from typing import Any

import yaml

from job.config.schema import Config


def reference_table() -> str:
    """The README's config reference: every key, its default and its description."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for section, field in Config.model_fields.items():
        for name, info in field.annotation.model_fields.items():
            default = _shown(info.get_default(call_default_factory=True))
            rows.append(f"| `{section}.{name}` | {default} | {info.description} |")
    return "\n".join(rows) + "\n"


def _shown(default: Any) -> str:
    if default is None:
        return "none"
    if isinstance(default, list | dict):
        return f"`{yaml.safe_dump(default, default_flow_style=True).strip()}`"
    return f"`{str(default).lower() if isinstance(default, bool) else default}`"
