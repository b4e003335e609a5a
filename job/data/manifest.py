"""The dataset a config names, as training and `mlmjob evaluate` read it."""

from __future__ import annotations

from job import env, storage
from job.config import Config
from job.data import shards
from job.data.blocks import tokenizer_sha256
from job.data.shards import Manifest, read_manifest
from job.errors import BadInput


def dataset_manifest(cfg: Config, tok) -> Manifest:
    """The config's dataset (waiting for it as a Job applied before preprocess does),
    refused when it was made with another tokenizer than `tok`."""
    data_uri = cfg.data.dataset or shards.dataset_uri(cfg, tok)
    storage.wait_for(storage.join(data_uri, "manifest.json"), env.wait_seconds(), "the dataset")
    manifest = read_manifest(data_uri)
    if manifest.data["tokenizer_sha256"] != tokenizer_sha256(tok):
        raise BadInput(
            f"model.tokenizer: '{cfg.tokenizer}' differs from the dataset's tokenizer "
            f"'{manifest.data['tokenizer']}' ({manifest.uri})"
        )
    return manifest
