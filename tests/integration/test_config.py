import pytest
import yaml
from support.cli import mlmjob, write_config

from job.config import load_config
from job.errors import BadInput


def test_invalid_yaml_names_the_line(tmp_path):
    path = write_config(tmp_path / "bad.yaml", "run:\n  output: [unclosed\n")
    with pytest.raises(BadInput, match=r"bad.yaml:\d+: invalid YAML"):
        load_config(path)


def test_validate_prints_the_resolved_config():
    proc = mlmjob("validate", "-c", "configs/demo.yaml", "--set", "run.seed=7", check=True)
    resolved = yaml.safe_load(proc.stdout)
    assert resolved["run"]["seed"] == 7
    assert resolved["train"]["weight_decay"] == 0.01  # a default filled in


def test_validate_rejects_unknown_key_with_exit_2():
    proc = mlmjob("validate", "-c", "configs/demo.yaml", "--set", "nope.x=1")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "mlmjob: error: configs/demo.yaml: unknown key 'nope'"


def test_validate_names_each_bad_key_on_its_own_line():
    proc = mlmjob(
        "validate",
        "-c",
        "configs/demo.yaml",
        "--set",
        "train.precision=fp16",
        "--set",
        "data.test_size=1.5",
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "mlmjob: error: configs/demo.yaml: key 'data.test_size' must be < 1.0, got 1.5",
        "mlmjob: error: configs/demo.yaml: key 'train.precision' must be one of auto, bf16, "
        "fp32, got 'fp16'",
    ]
