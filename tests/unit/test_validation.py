"""Validation gaps (issue 18, item 3): non-finite numbers in the config, a run whose loss
turns NaN or infinite, strict JSON in every file written, duplicate YAML keys, a 0-byte
`.gz` source, and a SIGTERM during start-up. The direct tests: no process, no server
(the others are in tests/integration/test_validation.py)."""

from __future__ import annotations

import gzip
import math
import os
import signal
import sys
import time

import pytest
from support.cli import write_config
from support.data import ROOT

from job.config import DataConfig, load_config
from job.data.sources import iter_records
from job.errors import BadInput
from job.train.accel import Preempted, Preemption
from job.train.evaluate import perplexity


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.learning_rate=.inf", "key 'train.learning_rate' must be a finite number, got inf"),
        ("train.learning_rate=inf", "key 'train.learning_rate' must be a finite number, got 'inf'"),
        ("train.learning_rate=.nan", "key 'train.learning_rate' must be a finite number, got nan"),
        (
            "train.max_grad_norm=-.inf",
            "key 'train.max_grad_norm' must be a finite number, got -inf",
        ),
        ("data.test_size=.nan", "key 'data.test_size' must be a finite number, got nan"),
        (
            "run.lease_wait_seconds=.inf",
            "key 'run.lease_wait_seconds' must be a finite number, got inf",
        ),
        (
            "model.config_overrides={layer_norm_eps: .inf}",
            "key 'model.config_overrides.layer_norm_eps' must be a finite number, got inf",
        ),
        (
            "model.config_overrides={rope_scaling: {factor: .nan}}",
            "key 'model.config_overrides.rope_scaling' must be a finite number, got {'factor': nan}",
        ),
    ],
)
@pytest.mark.unit
def test_non_finite_numbers_are_refused_naming_the_key(override, message):
    with pytest.raises(BadInput) as e:
        load_config(ROOT / "configs" / "demo.yaml", [override])
    assert str(e.value) == f"{ROOT / 'configs' / 'demo.yaml'}: {message}"


@pytest.mark.unit
def test_finite_numbers_still_load():
    cfg = load_config(
        ROOT / "configs" / "demo.yaml",
        [
            "train.learning_rate=1e-3",
            "model.config_overrides={layer_norm_eps: 1.0e-12, rope: [1.5]}",
        ],
    )
    assert cfg.train.learning_rate == 1e-3
    assert cfg.model.config_overrides == {"layer_norm_eps": 1e-12, "rope": [1.5]}


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "run:\n  output: a\ntrain:\n  epochs: 1\nrun:\n  seed: 1\n",
            "c.yaml:5: invalid YAML: duplicate key 'run' (first at line 1)",
        ),
        (
            "train: {learning_rate: 1.0e-3, learning_rate: 2.0e-3}\n",
            "c.yaml:1: invalid YAML: duplicate key 'train.learning_rate' (first at line 1)",
        ),
        (
            "train:\n  epochs: 1\n  max_steps: 2\n  epochs: 3\n",
            "c.yaml:4: invalid YAML: duplicate key 'train.epochs' (first at line 2)",
        ),
        (
            "data:\n  sources:\n  - {uri: a.json, uri: b.json}\n",
            "c.yaml:3: invalid YAML: duplicate key 'data.sources[0].uri' (first at line 3)",
        ),
    ],
)
@pytest.mark.unit
def test_duplicate_yaml_keys_are_refused_with_both_lines(tmp_path, text, message):
    path = write_config(tmp_path / "c.yaml", text)
    with pytest.raises(BadInput) as e:
        load_config(path)
    assert str(e.value) == f"{tmp_path}/{message}"


@pytest.mark.unit
def test_yaml_merge_keys_are_not_duplicates(tmp_path):
    text = "train:\n  <<: {epochs: 2, max_steps: 5}\n  epochs: 3\n"  # the key given wins
    cfg = load_config(write_config(tmp_path / "c.yaml", text))
    assert (cfg.train.epochs, cfg.train.max_steps) == (3, 5)


@pytest.mark.unit
def test_perplexity_overflow_is_capped_at_the_largest_double():
    assert perplexity(2.0) == pytest.approx(math.exp(2.0))
    assert perplexity(709.0) == math.exp(709.0)
    for huge in (710.0, 1e6, math.inf):  # math.exp raises OverflowError from 709.79 on
        assert perplexity(huge) == pytest.approx(sys.float_info.max)
        assert math.isfinite(perplexity(huge))
    assert math.isnan(perplexity(math.nan))  # NaN is refused by the callers


@pytest.mark.parametrize("name", ["empty.json.gz", "empty.jsonl.gz", "empty.parquet.gz"])
@pytest.mark.unit
def test_zero_byte_gz_source_counts_as_empty(tmp_path, caplog, name):
    good = tmp_path / "a.jsonl"
    good.write_text('{"q_id": "a", "answers": {"text": ["hello world"]}}\n')
    (tmp_path / name).write_bytes(b"")
    records = list(iter_records(DataConfig(sources=[str(tmp_path / name), str(good)])))
    assert [r.text for r in records] == ["hello world"]
    lines = [r.getMessage() for r in caplog.records if "0 bytes" in r.getMessage()]
    assert lines == [f"{tmp_path / name}: 0 bytes, not gzip data: counted as an empty source"]


@pytest.mark.unit
def test_gzip_of_nothing_is_still_empty_without_a_line(tmp_path, caplog):
    (tmp_path / "none.jsonl.gz").write_bytes(gzip.compress(b""))
    assert list(iter_records(DataConfig(sources=[str(tmp_path / "none.jsonl.gz")]))) == []
    assert "0 bytes" not in caplog.text


@pytest.mark.unit
def test_preemption_keeps_a_sigterm_from_before_training(monkeypatch):
    old = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(Preemption, "_installed", None)
    try:
        p = Preemption.install()
        assert Preemption.install() is p
        with pytest.raises(Preempted), p.interruptible():  # a wait is cut short
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)
        assert p.requested
        with pytest.raises(Preempted), p.interruptible():  # one from before, on entering
            pass
        os.kill(os.getpid(), signal.SIGTERM)  # outside a wait: only the flag
        assert p.requested
    finally:
        signal.signal(signal.SIGTERM, old)
