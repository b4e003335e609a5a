"""A resubmitted run against the config it was started with (`{run.output}/config.yaml`).

A run continued from its checkpoint is the run that `config.yaml` describes: a changed
model, dataset, seed, optimizer or schedule would silently train something else under the
old run's name (or fail on a shape mismatch, exit 1, retried for ever). So `mlmjob train`
compares the resolved config with that file before anything expensive (no accelerator,
data or model yet):

- keys in SAFE may change (where and how fast the run goes, how long it goes on, what it
  logs): accepted, logged in one line, and `config.yaml` is rewritten once the checkpoint
  restored;
- every other changed key is refused with exit 2, one line per key with both values,
  unless `run.allow_changed` names it (or a section above it): a deliberate change.

Nothing is refused when there is nothing to resume (no committed checkpoint and no
`summary.json`): that run starts afresh and `config.yaml` is written anew.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import yaml
from pydantic import ValidationError

from job import storage
from job.config import Config, dump_yaml
from job.errors import BadInput
from job.log import log

CONFIG = "config.yaml"

# Keys (or whole sections) a resubmission may change: they decide where the run runs, how
# fast, for how long, and what it reports, not what it computes. Everything else is
# refused, so a key added to the config later is refused until it is listed here: add a
# key only when changing it mid-run cannot change the model that comes out (beyond the
# numerics of another process count). Also the keys the design names for later.
SAFE = (
    "run.output",  # a run folder copied or moved elsewhere
    "run.name",
    "run.device",
    "run.lease_wait_seconds",
    "run.lease_ttl_seconds",
    "run.allow_changed",
    "data.output",  # a dataset root moved: the dataset id (its folder) is the same
    "data.cache_dir",
    "data.max_bad_fraction",  # a preprocessing threshold; training reads the finished dataset
    "train.epochs",  # extend (or shorten) the run: the schedule is in samples
    "train.max_steps",
    # The global batch already changes with the process count, and that is allowed: the
    # schedule and epochs are in samples of the run's first global batch and the sample
    # order does not depend on the batch. The per-process split is the same kind of
    # change (a smaller GPU, or more accumulation to keep the global batch on fewer
    # nodes); with per-device x processes x accumulation unchanged the batches are the same.
    "train.per_device_batch_size",
    "train.gradient_accumulation_steps",
    "train.eval_batch_size",
    "train.eval_every_steps",
    "train.checkpoint_every_steps",
    "train.keep_checkpoints",
    "train.log_every_steps",
    "train.compile",
    "train.num_threads",
    "train.collective_timeout_seconds",
    "train.report_to",
    "train.push_to_hub",
    "infer",
)
# Not compared at all: endpoints and regions say where the bytes are, not what they are,
# and their URLs are written redacted (`***`).
IGNORED = ("storage",)


class _Unset:
    """A key one side does not have."""

    def __repr__(self) -> str:
        return "(not set)"


_UNSET = _Unset()


def _under(key: str, prefixes) -> bool:
    """`key` is one of `prefixes` or inside one (`model` covers `model.config_overrides.x`)."""
    return any(key == p or key.startswith(p + ".") for p in prefixes)


@dataclass(frozen=True)
class Change:
    key: str
    old: Any
    new: Any

    def describe(self) -> str:
        return f"{self.key} {_shown(self.old)} -> {_shown(self.new)}"


def _shown(value: Any) -> str:
    return repr(value) if value is _UNSET else json.dumps(value, default=str)


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    """Dotted key paths to values; lists are values, empty mappings have no keys."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def normalized(raw: dict) -> dict[str, Any]:
    """A config as written to `config.yaml`, read back through today's schema: keys added
    since are at their defaults and written the same way. One the schema no longer
    accepts is compared as it stands (with defaults for what it lacks)."""
    raw = {k: v for k, v in raw.items() if k not in IGNORED}
    try:
        cfg = Config.model_validate(raw)
    except ValidationError:
        return {**flatten(_written(Config())), **flatten(raw)}
    return flatten(_written(cfg))


def _written(cfg: Config) -> dict:
    return {k: v for k, v in yaml.safe_load(dump_yaml(cfg)).items() if k not in IGNORED}


def changes(old: dict, new: dict) -> list[Change]:
    """What differs between two configs (mappings as in `config.yaml`), by key path."""
    a, b = normalized(old), normalized(new)
    keys = list(a) + [k for k in b if k not in a]
    return [
        Change(k, a.get(k, _UNSET), b.get(k, _UNSET))
        for k in keys
        if a.get(k, _UNSET) != b.get(k, _UNSET)
    ]


@dataclass
class Verdict:
    safe: list[Change] = field(default_factory=list)
    allowed: list[Change] = field(default_factory=list)  # by run.allow_changed
    refused: list[Change] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.safe or self.allowed or self.refused)


def judge(found: list[Change], allow_changed: list[str]) -> Verdict:
    verdict = Verdict()
    for c in found:
        if _under(c.key, SAFE):
            verdict.safe.append(c)
        elif _under(c.key, allow_changed):
            verdict.allowed.append(c)
        else:
            verdict.refused.append(c)
    return verdict


def refusal(uri: str, refused: list[Change]) -> str:
    """One line per key: the key, both values, the ways out."""
    return "\n".join(
        f"{c.key}: {_shown(c.old)} in {uri}, now {_shown(c.new)}: a resumed run cannot "
        f"change it (keep it, use another run.output, or list {c.key} in run.allow_changed)"
        for c in refused
    )


def check(cfg: Config) -> Verdict | None:
    """Compare `cfg` with the run's `config.yaml`. Raises BadInput (exit 2) for changed
    keys outside SAFE and `run.allow_changed` when there is a run to resume; returns the
    accepted changes (for `record`), or None when nothing changed or nothing is resumed."""
    out = cfg.run.output
    uri = storage.join(out, CONFIG)
    if not storage.exists(uri):
        return None
    try:
        old = yaml.safe_load(storage.read_text(uri))
    except yaml.YAMLError as e:
        raise BadInput(f"{uri}: invalid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(old, dict):
        raise BadInput(f"{uri}: not a config (the top level must be a mapping)")
    verdict = judge(changes(old, yaml.safe_load(dump_yaml(cfg))), cfg.run.allow_changed)
    if not verdict:
        return None
    if verdict.refused and not _resumable(out):
        keys = ", ".join(c.key for c in verdict.refused)
        log.info(
            "%s differs in %s, but %s has no committed checkpoint: starting afresh", uri, keys, out
        )
        return None
    if verdict.refused:
        raise BadInput(refusal(uri, verdict.refused))
    if verdict.safe:
        log.info("changed since %s (safe to change): %s", uri, _listed(verdict.safe))
    if verdict.allowed:
        log.warning("changed since %s (run.allow_changed): %s", uri, _listed(verdict.allowed))
    return verdict


def _resumable(out: str) -> bool:
    from job.train import checkpoint

    return storage.exists(storage.join(out, "summary.json")) or bool(checkpoint.latest(out))


def record(cfg: Config, verdict: Verdict) -> None:
    """`config.yaml` becomes the config the run continues with (main process only)."""
    uri = storage.join(cfg.run.output, CONFIG)
    storage.write_text(uri, dump_yaml(cfg))
    log.info("rewrote %s: %s", uri, _listed(verdict.safe + verdict.allowed))


def _listed(found: list[Change]) -> str:
    return "; ".join(c.describe() for c in found)
