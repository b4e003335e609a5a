import pytest
import yaml
from conftest import ROOT, mlmjob, write_config

from job.config import SourceConfig, load_config
from job.errors import BadInput


def test_shipped_configs_load():
    for name in ("demo", "eli5-askscience", "eli5-full"):
        cfg = load_config(ROOT / "configs" / f"{name}.yaml")
        assert cfg.data.sources
    ask = load_config(ROOT / "configs" / "eli5-askscience.yaml")
    assert ask.data.max_records == 5000 and ask.data.test_size == 0.2
    assert ask.model.name_or_path == "distilroberta-base"
    assert ask.train.learning_rate == 2e-5 and ask.train.weight_decay == 0.01
    assert ask.train.epochs == 3 and ask.data.block_size == 128


def test_overrides_are_parsed_as_yaml(tmp_path):
    cfg = load_config(
        ROOT / "configs" / "demo.yaml",
        [
            "train.epochs=5",
            "train.learning_rate=3e-4",
            "model.config_overrides={hidden_size: 64}",
            "data.sources=[a.json, {hf: eli5, split: train_asks}]",
            "storage.endpoint_url=http://127.0.0.1:9000",
        ],
    )
    assert cfg.train.epochs == 5
    assert cfg.train.learning_rate == 3e-4
    assert cfg.model.config_overrides == {"hidden_size": 64}
    assert cfg.data.sources == [
        SourceConfig(uri="a.json"),
        SourceConfig(hf="eli5", split="train_asks"),
    ]
    assert cfg.storage.endpoint_url == "http://127.0.0.1:9000"


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lerning_rate=1", "unknown key 'train.lerning_rate'"),
        ("data.sources=[{url: x}]", "unknown key 'data.sources[0].url'"),
        ("train.epochs=three", "key 'train.epochs' must be int, got 'three'"),
        ("train.epochs=true", "key 'train.epochs' must be int, got True"),
        (
            "data.text_fields=answers.text",
            "key 'data.text_fields' must be a list, got 'answers.text'",
        ),
        ("run=5", "key 'run' must be a mapping"),
    ],
)
def test_bad_keys_name_the_file_and_key(override, message):
    with pytest.raises(BadInput) as e:
        load_config(ROOT / "configs" / "demo.yaml", [override])
    assert str(e.value) == f"{ROOT / 'configs' / 'demo.yaml'}: {message}"


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
