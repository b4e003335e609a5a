"""Preprocessing fingerprints its inputs (issue 17, item 7): the dataset id is keyed by the
versions of the files it reads (size + ETag on S3, size + mtime_ns locally; a Hub
source's commit), so an edited input gives a new dataset, its parts included, and a file
that changes while a worker reads it is  The direct tests: no process, no server (the
others are in tests/integration/test_preprocess_inputs.py)."""

from __future__ import annotations

import pytest

from job.config import DataConfig
from job.data.inputs import resolve_inputs


@pytest.mark.unit
def test_hub_sources_are_keyed_by_a_commit_given_as_revision_without_the_hub(monkeypatch):
    """A 40-hex revision is the commit: no Hub call (offline tests cannot reach it; the
    failure to resolve a branch is one line, see test_streaming's test_hf_failures_are_one_line)."""
    sha = "0123456789abcdef0123456789abcdef01234567"

    def no_hub(*args, **kwargs):
        raise AssertionError("the Hub was asked")

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", no_hub)
    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", no_hub)
    cfg = DataConfig(
        sources=[
            {"hf": "owner/name", "split": "train", "revision": sha},
            {"uri": f"hf://datasets/owner/name@{sha}/data/*.parquet"},
        ]
    )
    assert resolve_inputs(cfg) == [
        [{"uri": "hf:owner/name", "commit": sha}],
        [{"uri": f"hf://datasets/owner/name@{sha}/data/*.parquet", "commit": sha}],
    ]
