"""The config's schema: its sections, their fields and the checks on them.

Types, ranges and allowed values are declared on the fields (pydantic), so `mlmjob
validate` refuses every bad value before a run starts. Each field's description is the
README's config reference (job.config.reference; a test keeps them equal). The keys are a
contract (DESIGN.md): configs, `config.yaml` of past runs and dataset ids depend on them.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AllowInfNan,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError


def _no_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("a number, not a boolean")
    return value


Int = Annotated[int, Strict()]  # YAML `true` is not a number of steps
# Lax on purpose: YAML 1.1 reads `2e-5` as a string, which pydantic turns into a float.
# Finite: `.inf` and `.nan` (or "inf") would train to NaN and write NaN into summary.json.
Float = Annotated[float, BeforeValidator(_no_bool), AllowInfNan(False)]


def _finite(value: Any) -> Any:
    """A free-form value (config_overrides) with no NaN or infinity anywhere in it."""
    if isinstance(value, float) and not math.isfinite(value):
        raise PydanticCustomError("finite_number", "Input should be a finite number")
    if isinstance(value, dict | list):
        for item in value.values() if isinstance(value, dict) else value:
            _finite(item)
    return value


Precision = Literal["auto", "bf16", "fp32"]
Device = Literal["auto", "cuda", "cpu"]

_SCHEMES = ("file", "s3")  # what job.storage reads and writes


def _storage_uri(value: str, schemes: tuple[str, ...] = _SCHEMES) -> str:
    scheme, sep, _ = value.partition("://")
    if sep and scheme not in schemes:
        raise ValueError(f"a local path or a {', '.join(s + '://' for s in schemes)} URI")
    return value


Uri = Annotated[str, AfterValidator(_storage_uri)]  # local path, file:// or s3://
# Sources may also be files on the Hub, streamed through its fsspec file system.
SourceUri = Annotated[str, AfterValidator(lambda v: _storage_uri(v, (*_SCHEMES, "hf")))]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SourceConfig(_Section):
    """One input: a storage URI or glob (`uri`), or a Hugging Face dataset (`hf` + `split`)."""

    uri: SourceUri | None = Field(
        None,
        description="a file, folder or glob: local, `s3://bucket/...`, or "
        "`hf://datasets/OWNER/NAME/PATH` (Hub files, streamed)",
    )
    hf: str | None = Field(
        None,
        description="a `datasets.load_dataset` path: a Hub id, a local folder, or a "
        "builder (`json`, `parquet`) with `data_files`",
    )
    hf_config: str | None = Field(None, description="the dataset's config (subset) name")
    split: str | None = Field(None, description="the split to read (default `train`)")
    revision: str | None = Field(
        None,
        description="Hub branch, tag or commit, e.g. `refs/convert/parquet` (the Hub's "
        "Parquet export of a script-based dataset); also for `hf://` URIs",
    )
    data_files: str | list[str] | dict[str, str | list[str]] | None = Field(
        None,
        description="`load_dataset`'s `data_files`: paths or globs, or a mapping of split to them",
    )
    streaming: bool = Field(
        False,
        description="`load_dataset(streaming=True)`: read as it downloads, no local "
        "Arrow copy of the whole split",
    )

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return {"uri": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _one_kind(self):
        if (self.uri is None) == (self.hf is None):
            raise ValueError("exactly one of 'uri' (a file, folder or glob) and 'hf' (a dataset)")
        hf_only = self.hf_config, self.split, self.data_files, self.streaming or None
        if self.uri is not None and any(v is not None for v in hf_only):
            raise ValueError(
                "without 'hf_config', 'split', 'data_files' and 'streaming' (they apply to "
                "'hf' datasets)"
            )
        return self

    @model_serializer(mode="wrap")
    def _omit_unset_new_keys(self, handler) -> dict:
        """Keys added after datasets were first made are left out at their defaults: the
        dump feeds the dataset id, which must not change for an unchanged config."""
        data = handler(self)
        for key, default in (("revision", None), ("data_files", None), ("streaming", False)):
            if data.get(key) == default:
                data.pop(key, None)
        return data


class RunConfig(_Section):
    output: Uri = Field(
        "out/run", description="where checkpoints, metrics, summary and the model go"
    )
    seed: Int = Field(42, ge=0, lt=2**32, description="split, sample order, masks, initial weights")
    name: str = Field("mlmjob", description="shown in logs and `summary.json` (`run_name`)")
    device: Device = Field(
        "auto",
        description="`auto`: the GPUs when CUDA is usable, else the CPU; `cuda`: exit 2 in one "
        "line when no CUDA device is usable or fewer are visible than processes per node (the "
        "GPU manifests set it); `cpu`: the CPU even beside a GPU",
    )
    lease_wait_seconds: Float = Field(
        900.0,
        ge=0,
        description="how long a second writer of an output waits for its holder to let go "
        "(a terminating pod's grace period), then exits 2 naming the holder",
    )
    lease_ttl_seconds: Float = Field(
        60.0,
        gt=0,
        description="a lease not renewed for this long is taken over (its holder was killed); "
        "renewed every quarter of it",
    )
    allow_changed: list[str] = Field(
        default_factory=list,
        description="keys a resubmitted run may change against its `{run.output}/config.yaml` "
        "although they change what the run is (e.g. `[train.learning_rate]`; a section such as "
        "`model` covers its keys); other such changes exit 2 (see Resuming with a changed config)",
    )


class StorageConfig(_Section):
    endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint; else `AWS_ENDPOINT_URL(_S3)`, else AWS"
    )
    region: str | None = Field(
        None, description="else `AWS_REGION` / `AWS_DEFAULT_REGION`, else `us-east-1`"
    )
    retry_seconds: Float = Field(
        300.0,
        ge=0,
        description="how long a storage call retries transient errors (connection lost, "
        "timeouts, 5xx, `SlowDown`) with backoff before the command exits 1",
    )


class DataConfig(_Section):
    sources: list[SourceConfig] = Field(
        default_factory=list,
        description="URIs/globs (`.json` array, JSON lines, `.parquet`, any of them gzipped; "
        "local or S3) or `{hf: NAME, split: SPLIT, hf_config: ...}` for `datasets.load_dataset`",
    )
    name: str = Field("eli5", description="prefix of the dataset id")
    max_records: Int | None = Field(
        None, ge=1, description="first N records (the tutorial's `train_asks[:5000]`)"
    )
    subreddits: list[str] | None = Field(None, description="keep only these subreddits")
    text_fields: list[str] = Field(
        default_factory=lambda: ["answers.text"],
        description="dotted fields, flattened and joined with a space (add `title`, `selftext`)",
    )
    test_size: Float = Field(
        0.2,
        ge=0,
        lt=1,
        description="held-out fraction; the split equals `datasets`' "
        "`train_test_split(test_size, seed=run.seed)`",
    )
    block_size: Int = Field(128, ge=2, description="tokens per block")
    output: Uri = Field("out/data", description="dataset root")
    shard_blocks: Int = Field(65536, ge=1, description="blocks per `.npy` shard")
    max_bad_fraction: Float = Field(
        0.01, ge=0, le=1, description="malformed records above this fraction fail the run (exit 2)"
    )
    cache_dir: str | None = Field(
        None,
        description="node-local cache (shards, models, tokenizers from S3; checkpoint "
        "staging); default `$MLMJOB_CACHE` or `~/.cache/mlmjob`",
    )
    dataset: str | None = Field(
        None, description="train on this dataset folder instead of the one the config derives"
    )


class ModelConfig(_Section):
    name_or_path: str = Field("distilroberta-base", description="hub id, local folder or S3 URI")
    tokenizer: str | None = Field(
        None,
        description="hub id, local folder or S3 URI (default: `name_or_path`); must have "
        "a mask token",
    )
    from_scratch: bool = Field(
        False, description="random weights from the model's config (RoBERTa defaults if none)"
    )
    config_overrides: dict[str, Annotated[Any, AfterValidator(_finite)]] = Field(
        default_factory=dict, description="applied to the model config, e.g. `{hidden_size: 256}`"
    )


class PushToHubConfig(_Section):
    """Where `mlmjob push` (and a finished training run) uploads `model/`."""

    repo_id: str = Field(description="`OWNER/NAME` on the Hub (token: `HF_TOKEN`)")
    private: bool = Field(True, description="a new repo is private")
    revision: str | None = Field(None, description="branch to push to (default `main`)")


class TrainConfig(_Section):
    epochs: Int = Field(3, ge=1, description="passes over the train split")
    max_steps: Int | None = Field(
        None, ge=1, description="steps of the run's first global batch; wins over `epochs`"
    )
    per_device_batch_size: Int = Field(8, ge=1, description="blocks per process per micro-step")
    eval_batch_size: Int | None = Field(None, ge=1, description="default: per-device batch")
    gradient_accumulation_steps: Int = Field(
        1, ge=1, description="global batch = per-device x processes x this"
    )
    learning_rate: Float = Field(2e-5, gt=0, description="AdamW (fused) peak learning rate")
    weight_decay: Float = Field(
        0.01, ge=0, description="none on biases and LayerNorm weights, as the Trainer"
    )
    warmup_steps: Int = Field(
        0, ge=0, description="linear warmup, then linear decay to 0 (the Trainer's schedule)"
    )
    warmup_ratio: Float = Field(
        0.0,
        ge=0,
        lt=1,
        description="warm up over this fraction of the run's steps instead (the Trainer's); "
        "`warmup_steps` wins when set",
    )
    max_grad_norm: Float = Field(1.0, gt=0, description="gradient clipping")
    mlm_probability: Float = Field(
        0.15, gt=0, lt=1, description="masked fraction (80% `<mask>`, 10% random, 10% kept)"
    )
    eval_every_steps: Int | None = Field(
        None, ge=1, description="default: evaluate at each epoch's end (and at the end)"
    )
    checkpoint_every_steps: Int = Field(
        500, ge=1, description="also at each epoch's end and on SIGTERM"
    )
    keep_checkpoints: Int = Field(2, ge=1, description="committed checkpoints kept")
    log_every_steps: Int = Field(10, ge=1, description="metrics.jsonl and progress bar")
    precision: Precision = Field("auto", description="`auto`: bf16 on GPU, fp32 on CPU")
    deepspeed: str | None = Field(
        None,
        description="a DeepSpeed JSON (`configs/deepspeed/zero2.json`); `auto` fields "
        "are filled from `train.*`",
    )
    compile: bool = Field(
        False,
        description="`torch.compile` the whole step with static shapes (masked positions "
        "padded to fixed buckets): compiled once; evaluations run eagerly",
    )
    num_threads: Int | None = Field(None, ge=1, description="CPU threads per process")
    collective_timeout_seconds: Float = Field(
        1800.0,
        gt=0,
        description="how long a rank waits in a collective (NCCL, gloo) for the others, e.g. "
        "while one process per node downloads the model, before the run fails",
    )
    report_to: list[Literal["mlflow", "tensorboard", "wandb"]] = Field(
        default_factory=list,
        description="trackers (accelerate's): `[mlflow, tensorboard, "
        "wandb]`; servers and tokens from `MLFLOW_TRACKING_URI`, `WANDB_API_KEY`/`WANDB_MODE`",
    )
    push_to_hub: PushToHubConfig | None = Field(
        None,
        description="`{repo_id, private, revision}`: push `model/` with a model card "
        "when the run ends (a failed push is a warning; rerun `mlmjob push`)",
    )


class InferConfig(_Section):
    model: str | None = Field(
        None, description="any masked LM folder, hub id or URI (default: `{run.output}/model`)"
    )
    inputs: list[Uri] = Field(
        default_factory=list,
        description="URIs/globs of `.txt` (a text per line) or `.jsonl` "
        "(`infer.text_field`), optionally `.gz`",
    )
    output: Uri = Field("out/infer", description="where the parts go")
    text_field: str = Field("text", description="the field read from JSON lines inputs")
    top_k: Int = Field(3, ge=1, description="candidates per `<mask>`")
    batch_size: Int = Field(64, ge=1, description="lines per forward")
    lines_per_part: Int = Field(
        100_000,
        ge=1,
        description="a file is split into parts of this many lines, each "
        "committed on its own: workers share a big file and a rerun resumes inside it",
    )
    precision: Precision = Field(
        "auto",
        description='`auto`: bf16 on GPU, fp32 on CPU. `fp32` equals `pipeline("fill-mask")`; '
        "bf16 is faster on a GPU and may reorder near-tied candidates",
    )


class Config(_Section):
    run: RunConfig = Field(default_factory=RunConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    infer: InferConfig = Field(default_factory=InferConfig)

    @property
    def tokenizer(self) -> str:
        return self.model.tokenizer or self.model.name_or_path

    @property
    def cache_dir(self) -> Path:
        """Node-local cache for shards, tokenizers and models fetched from S3."""
        default = os.environ.get("MLMJOB_CACHE", "~/.cache/mlmjob")
        return Path(self.data.cache_dir or default).expanduser()
