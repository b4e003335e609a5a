"""Typed job configuration: YAML plus `--set key.path=value` overrides.

The config owns its checks: types, ranges and allowed values are declared on the fields
(pydantic), so `mlmjob validate` refuses every bad value before a run starts, with the
file, the dotted key path and what is allowed. Each field's description is the README's
config reference (generated from here; a test keeps them equal).

`job.config` is the face the rest of the job imports from: the sections and `Config` live
in `schema`, reading and writing configs in `load`, the one-line error messages in
`messages`, the README table in `reference` (`python -m job.config` prints it).
"""

from job.config.load import apply_override, dump_yaml, load_config, to_dict
from job.config.messages import describe
from job.config.reference import reference_table
from job.config.schema import (
    Config,
    DataConfig,
    InferConfig,
    ModelConfig,
    PushToHubConfig,
    RunConfig,
    SourceConfig,
    StorageConfig,
    TrainConfig,
)

__all__ = [
    "Config",
    "DataConfig",
    "InferConfig",
    "ModelConfig",
    "PushToHubConfig",
    "RunConfig",
    "SourceConfig",
    "StorageConfig",
    "TrainConfig",
    "apply_override",
    "describe",
    "dump_yaml",
    "load_config",
    "reference_table",
    "to_dict",
]
