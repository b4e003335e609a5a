"""Reading a config: YAML (a key given twice refused), `--set key.path=value` overrides,
then the schema's checks, each failure one line with the file and the dotted key path;
and writing one back out (redacted) as data or YAML.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from job.config.messages import describe
from job.config.schema import Config
from job.errors import BadInput
from job.redact import redact_all


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping, which YAML forbids but
    PyYAML accepts, keeping the last (a second `run:` would silently replace the first).
    Hand-written: PyYAML has no option for it (yaml/pyyaml#165), and ruamel.yaml, which
    refuses duplicates, would be a second YAML library for this one check."""

    def construct_document(self, node):
        self._check_unique(node, "", set())
        return super().construct_document(node)

    def _check_unique(self, node, path: str, seen: set[int]) -> None:
        if id(node) in seen:  # an alias: checked where its anchor is
            return
        seen.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            for i, child in enumerate(node.value):
                self._check_unique(child, f"{path}[{i}]", seen)
        elif isinstance(node, yaml.MappingNode):
            lines: dict = {}
            for key_node, value_node in node.value:
                merge = key_node.tag == "tag:yaml.org,2002:merge"  # `<<: *base`
                scalar = isinstance(key_node, yaml.ScalarNode) and not merge
                key = self.construct_object(key_node) if scalar else None
                dotted = f"{path}.{key}" if path else str(key)
                if scalar and key in lines:
                    problem = f"duplicate key '{dotted}' (first at line {lines[key]})"
                    mark = key_node.start_mark
                    raise yaml.constructor.ConstructorError(None, None, problem, mark)
                if scalar:
                    lines[key] = key_node.start_mark.line + 1
                self._check_unique(value_node, dotted if scalar else path, seen)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: no arbitrary objects


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    """Read a YAML file, apply `key.path=value` overrides, and check the result."""
    path = str(path)
    try:
        raw = _load_yaml(Path(path).read_text()) or {}
    except OSError as e:
        raise BadInput(f"{path}: cannot read config: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise BadInput(
            f"{path}: not UTF-8 text: byte 0x{e.object[e.start]:02x} at offset "
            f"{e.start} (save the config as UTF-8)"
        ) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else path
        detail = getattr(e, "problem", None) or " ".join(str(e).split())  # one line
        raise BadInput(f"{where}: invalid YAML: {detail}") from None
    if not isinstance(raw, dict):
        raise BadInput(f"{path}: the top level must be a mapping")
    for item in overrides:
        apply_override(raw, item, path)
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise BadInput("\n".join(f"{path}: {describe(err)}" for err in e.errors())) from None


def apply_override(raw: dict, item: str, path: str) -> None:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise BadInput(f"--set {item!r}: expected key.path=value")
    try:
        parsed = _load_yaml(value)
    except yaml.YAMLError:
        raise BadInput(f"--set {key}: value is not valid YAML: {value!r}") from None
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise BadInput(f"{path}: --set {key}: '{part}' is not a mapping")
        node = child
    node[parts[-1]] = parsed


def to_dict(cfg: Config, redacted: bool = True) -> dict:
    """The config as plain data. `redacted` (the default: what is written out, to
    config.yaml, tracker params, the model card, `mlmjob validate`) masks the userinfo and
    secret query parameters of every URL in it (job.redact): `http://***@host`."""
    data = cfg.model_dump()
    return redact_all(data) if redacted else data


def dump_yaml(cfg: Config, redacted: bool = True) -> str:
    return yaml.safe_dump(to_dict(cfg, redacted), sort_keys=False)
