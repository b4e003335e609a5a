"""`mlmjob validate --preflight`: check what a run will touch before any GPU is held.

The config's own checks (types, ranges, enumerations) ran when it loaded. Here: every
source resolves, the tokenizer and the model load (the model's config only, no weights
are downloaded), the DeepSpeed JSON parses, every output is writable, and an existing run
in `run.output` is one this config can continue. Every problem is collected, so one
preflight names all of them; on success it prints what the run will do.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from job import env, storage
from job.config import Config, TrainConfig, dump_yaml
from job.data import shards
from job.data.blocks import load_tokenizer
from job.data.hub import hub_files
from job.errors import BadInput, StorageError, TransientStorageError
from job.pretrained import check_weights, expect_files
from job.train.accel import deepspeed_config
from job.train.schedule import total_steps, warmup_steps


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    plan: list[str] = field(default_factory=list)

    def check(self, what: Callable[[], None]) -> None:
        """Run one check; a BadInput or storage refusal becomes a problem line."""
        try:
            what()
        except (BadInput, StorageError, TransientStorageError) as e:
            self.problems.extend(str(e).splitlines())


def preflight(cfg: Config) -> Report:
    report = Report()
    commands = ("preprocess", "train") + (("infer",) if cfg.infer.inputs else ())
    state: dict = {}
    if "preprocess" in commands:
        report.check(lambda: _sources(cfg, report))
    report.check(lambda: state.update(tok=_tokenizer(cfg, report)))
    if "train" in commands:
        report.check(lambda: _model(cfg, state.get("tok"), report))
        report.check(lambda: _deepspeed(cfg))
        report.check(lambda: _existing_run(cfg, state.get("tok"), report))
    outputs = {
        "preprocess": ("data.output", cfg.data.output),
        "train": ("run.output", cfg.run.output),
        "infer": ("infer.output", cfg.infer.output),
    }
    for command in commands:
        report.check(lambda key_uri=outputs[command]: _writable(*key_uri))
    if "infer" in commands:
        report.check(lambda: _infer_inputs(cfg, report))
        if cfg.infer.model:
            report.check(lambda: _has_weights(cfg.infer.model, "infer.model"))
    return report


def _sources(cfg: Config, report: Report) -> None:
    if not cfg.data.sources and not cfg.data.dataset:
        raise BadInput("data.sources: no sources configured")
    files, size = 0, 0
    for i, source in enumerate(cfg.data.sources):
        if source.hf:
            split = source.split or "train"
            report.plan.append(
                f"data.sources[{i}]: Hugging Face dataset {source.hf} "
                f"(split {split}), checked when it loads"
            )
            continue
        if (source.uri or "").startswith("hf://"):
            _, hub = hub_files(source, f"data.sources[{i}]")
            report.plan.append(f"data.sources[{i}]: {len(hub)} file(s) on the Hub")
            continue
        matched = storage.expand(source.uri or "")
        if not matched:
            raise BadInput(f"data.sources[{i}]: '{source.uri}' matches no file")
        files += len(matched)
        size += sum(storage.size(uri) for uri in matched)
    if files:
        report.plan.append(f"preprocess: {files} file(s), {size / 1e6:,.1f} MB to read")


def _tokenizer(cfg: Config, report: Report):

    tok = load_tokenizer(cfg.tokenizer, cfg.cache_dir)
    report.plan.append(f"tokenizer: {cfg.tokenizer} ({len(tok):,} tokens, mask {tok.mask_token})")
    return tok


def _model(cfg: Config, tok, report: Report) -> None:
    from job.train.model import from_config, model_config  # torch: not for `check_output`

    m = cfg.model
    if not m.from_scratch:
        _has_weights(m.name_or_path, "model.name_or_path")
    if tok is None:  # the tokenizer's problem is reported already
        return
    config = model_config(m, tok, cfg.cache_dir, cfg.data.block_size)
    from_config(config, meta=True)  # its values fit together (no memory, no weights)
    report.plan.append(
        f"model: {m.name_or_path} ({config.model_type}, {config.num_hidden_layers} "
        f"layers x {config.hidden_size}, vocab {config.vocab_size:,})"
    )


def _has_weights(uri: str, key: str) -> None:
    """A folder (local or S3) must hold a model whose safetensors files are whole (their
    headers are read, not the weights); a hub id is checked when it downloads."""
    if storage.is_s3(uri) or storage.local_path(uri).is_dir():
        expect_files(uri, uri, key, tokenizer=False)
        check_weights(uri, key)


def _deepspeed(cfg: Config) -> None:

    if cfg.train.deepspeed:
        deepspeed_config(cfg, "fp32")


def _writable(key: str, uri: str) -> None:
    if storage.is_s3(uri):  # a probe object written and deleted: the real permission
        probe = storage.join(uri, f".mlmjob-preflight-{uuid.uuid4().hex[:8]}")
        storage.write_text(probe, "probe\n")
        storage.delete(probe)
        return
    nearest = check_output(key, uri)
    if not os.access(nearest, os.W_OK):
        raise BadInput(f"{key}: cannot write to '{uri}': permission denied")


def check_output(key: str, uri: str) -> Path | None:
    """A local output that is (or lies under) a file is refused, naming its key: what each
    command checks before its first write, too (else a NotADirectoryError deep inside it).
    Returns the output's nearest existing folder; None on S3."""
    if storage.is_s3(uri):
        return None
    path = storage.local_path(uri)
    nearest = _nearest_folder(path)
    if nearest == path and not path.is_dir():
        raise BadInput(f"{key}: '{uri}' is a file; an output must be a folder")
    if not nearest.is_dir():
        raise BadInput(f"{key}: cannot write to '{uri}': '{nearest}' is a file")
    return nearest


def _nearest_folder(path: Path) -> Path:
    """The folder itself or, before the run creates it, its nearest existing parent."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


# Keys a run cannot change and still continue from its checkpoints.
FIXED = ("model.name_or_path", "model.from_scratch", "model.config_overrides", "data.block_size")


def _existing_run(cfg: Config, tok, report: Report) -> None:
    saved_uri = storage.join(cfg.run.output, "config.yaml")
    if not storage.exists(saved_uri):
        _train_plan(cfg, tok, report)
        report.plan.append(f"train: a new run in {cfg.run.output}")
        return
    import yaml

    saved, now = yaml.safe_load(storage.read_text(saved_uri)), yaml.safe_load(dump_yaml(cfg))
    for key in FIXED:
        section, name = key.split(".")
        for path, was, is_ in _differences(
            key, saved.get(section, {}).get(name), now[section][name]
        ):
            raise BadInput(
                f"run.output: '{cfg.run.output}' holds a run with {path} "
                f"{json.dumps(was)}, this config has {json.dumps(is_)}; use "
                "another run.output to start afresh"
            )
    _train_plan(cfg, tok, report)
    done = storage.exists(storage.join(cfg.run.output, "summary.json"))
    report.plan.append(
        f"train: {cfg.run.output} holds a "
        + ("finished run: train will do nothing" if done else "run to resume")
    )


def _infer_inputs(cfg: Config, report: Report) -> None:
    files = [uri for pattern in cfg.infer.inputs for uri in storage.expand(pattern)]
    missing = [p for p in cfg.infer.inputs if not storage.expand(p)]
    if missing:
        raise BadInput(f"infer.inputs: '{missing[0]}' matches no file")
    report.plan.append(
        f"infer: {len(files)} file(s) -> {cfg.infer.output} ({env.world_size()} process(es) here)"
    )


def _train_plan(cfg: Config, tok, report: Report) -> None:
    """The global batch on this many processes and, once the dataset exists, the steps."""

    t = cfg.train
    world = env.planned_world_size()
    batch = t.per_device_batch_size * world * t.gradient_accumulation_steps
    line = f"train: global batch {batch} ({t.per_device_batch_size} x {world} processes"
    line += f" x {t.gradient_accumulation_steps} accumulation)"
    root = cfg.data.dataset or (shards.dataset_uri(cfg, tok) if tok is not None else None)
    steps = t.max_steps
    if root and storage.exists(storage.join(root, shards.MANIFEST)):
        blocks = shards.read_manifest(root).blocks("train")
        steps = total_steps(t, blocks, batch)
        line += f", {blocks:,} train blocks, {steps:,} steps"
    else:
        line += ", dataset not built yet"
    report.plan.append(line)
    report.plan.extend(_warmup_plan(t, steps))


WARMUP_WARN = 0.2  # a warm-up longer than this share of the run is most likely a mistake


def _warmup_plan(t: TrainConfig, steps: int | None) -> list[str]:
    """The warm-up's share of the run, and a warning above WARMUP_WARN. The share needs
    the run's steps (train.max_steps, or the dataset's size), except for a ratio."""
    if not t.warmup_steps and not t.warmup_ratio:
        return ["train: no warm-up"]
    if steps is None and t.warmup_steps:
        return [f"train: warm-up {t.warmup_steps:,} steps (its share: once the dataset exists)"]
    if steps is None:
        share, line = t.warmup_ratio, f"train: warm-up {t.warmup_ratio:.0%} of the steps"
    else:
        warmup = warmup_steps(t, steps)
        share = warmup / max(1, steps)
        line = f"train: warm-up {warmup:,} of {steps:,} steps ({share:.0%})"
    if share <= WARMUP_WARN:
        return [line]
    key = "train.warmup_steps" if t.warmup_steps else "train.warmup_ratio"
    return [
        line,
        f"warning: train: the warm-up is {share:.0%} of the run (above {WARMUP_WARN:.0%}): "
        f"most steps run below the peak learning rate; lower {key}",
    ]


def _differences(key: str, was, is_) -> list[tuple[str, object, object]]:
    """(dotted key, saved value, current value) for each leaf that differs."""
    if isinstance(was, dict) and isinstance(is_, dict):
        return [
            d
            for k in sorted(set(was) | set(is_))
            for d in _differences(f"{key}.{k}", was.get(k), is_.get(k))
        ]
    return [] if was == is_ else [(key, was, is_)]
