"""Typed job configuration: YAML plus `--set key.path=value` overrides.

Every key is checked against the dataclasses below; an unknown key or a wrong type is a
BadInput naming the file and the dotted key path.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from job.errors import BadInput


@dataclass
class SourceConfig:
    """One input: a storage URI or glob (`uri`), or a Hugging Face dataset (`hf` + `split`)."""

    uri: str | None = None
    hf: str | None = None
    hf_config: str | None = None
    split: str | None = None


@dataclass
class RunConfig:
    output: str = "out/run"
    seed: int = 42
    name: str = "mlmjob"


@dataclass
class StorageConfig:
    endpoint_url: str | None = None  # S3-compatible store; else AWS_ENDPOINT_URL or AWS
    region: str | None = None


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=list)
    name: str = "eli5"
    max_records: int | None = None  # the tutorial's `train_asks[:5000]`
    subreddits: list[str] | None = None  # keep only these subreddits
    text_fields: list[str] = field(default_factory=lambda: ["answers.text"])
    test_size: float = 0.2
    block_size: int = 128
    output: str = "out/data"
    shard_blocks: int = 65536
    max_bad_fraction: float = 0.01
    cache_dir: str | None = None  # node-local cache for shards; default ~/.cache/mlmjob
    dataset: str | None = None  # train on this dataset folder instead of the derived one


@dataclass
class ModelConfig:
    name_or_path: str = "distilroberta-base"
    tokenizer: str | None = None  # defaults to name_or_path
    from_scratch: bool = False
    config_overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainConfig:
    epochs: int = 3
    max_steps: int | None = None
    per_device_batch_size: int = 8
    eval_batch_size: int | None = None
    gradient_accumulation_steps: int = 1
    learning_rate: float = 2e-5
    weight_decay: float = 0.01
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    mlm_probability: float = 0.15
    eval_every_steps: int | None = None  # None: at each epoch's end
    checkpoint_every_steps: int = 500
    keep_checkpoints: int = 2
    log_every_steps: int = 10
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU), bf16, fp32
    deepspeed: str | None = None  # path to a DeepSpeed JSON (configs/deepspeed/zero2.json)
    compile: bool = False
    num_threads: int | None = None  # CPU threads per process


@dataclass
class InferConfig:
    model: str | None = None  # defaults to {run.output}/model
    inputs: list[str] = field(default_factory=list)
    output: str = "out/infer"
    text_field: str = "text"
    top_k: int = 3
    batch_size: int = 64
    lines_per_part: int = 100000
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU), bf16, fp32 (= the pipeline)

    PRECISIONS = ("auto", "bf16", "fp32")  # not annotated: a constant, not a config key

    def __post_init__(self):
        # Checked here, at load time, so that `mlmjob validate` refuses a bad value too.
        if self.precision not in self.PRECISIONS:
            raise BadInput(
                f"key 'infer.precision' must be one of {', '.join(self.PRECISIONS)}, "
                f"got {self.precision!r}"
            )


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    infer: InferConfig = field(default_factory=InferConfig)

    @property
    def tokenizer(self) -> str:
        return self.model.tokenizer or self.model.name_or_path

    @property
    def cache_dir(self) -> Path:
        """Node-local cache for shards, tokenizers and models fetched from S3."""
        default = os.environ.get("MLMJOB_CACHE", "~/.cache/mlmjob")
        return Path(self.data.cache_dir or default).expanduser()


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    """Read a YAML file, apply `key.path=value` overrides, and type-check the result."""
    path = str(path)
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as e:
        raise BadInput(f"{path}: cannot read config: {e.strerror}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else path
        raise BadInput(f"{where}: invalid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(raw, dict):
        raise BadInput(f"{path}: the top level must be a mapping")
    for item in overrides:
        apply_override(raw, item, path)
    return from_dict(Config, raw, path)


def apply_override(raw: dict, item: str, path: str) -> None:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise BadInput(f"--set {item!r}: expected key.path=value")
    try:
        parsed = yaml.safe_load(value)
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


def from_dict(cls: type, raw: Any, path: str, prefix: str = "") -> Any:
    if not isinstance(raw, dict):
        raise BadInput(f"{path}: key '{prefix.rstrip('.') or '<top>'}' must be a mapping")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        key_path = f"{prefix}{key}"
        if key not in names:
            raise BadInput(f"{path}: unknown key '{key_path}'")
        kwargs[key] = _coerce(hints[key], value, path, key_path)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, path: str, key_path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, path, key_path)
    if dataclasses.is_dataclass(tp):
        if tp is SourceConfig and isinstance(value, str):
            value = {"uri": value}
        return from_dict(tp, value, path, key_path + ".")
    if origin is list:
        if not isinstance(value, list):
            raise BadInput(f"{path}: key '{key_path}' must be a list, got {value!r}")
        return [_coerce(args[0], v, path, f"{key_path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise BadInput(f"{path}: key '{key_path}' must be a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads 2e-5 as a string
            return float(value)
        except ValueError:
            pass
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise BadInput(f"{path}: key '{key_path}' must be {tp.__name__}, got {value!r}")
    return value


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
