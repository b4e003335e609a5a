"""The direct tests: no process, no server (the others are in
tests/integration/test_config.py)."""

import pytest
from support.data import ROOT

from job.config import Config, SourceConfig, load_config, reference_table
from job.errors import BadInput


@pytest.mark.unit
def test_shipped_configs_load():
    for name in ("demo", "eli5-askscience", "eli5-full"):
        cfg = load_config(ROOT / "configs" / f"{name}.yaml")
        assert cfg.data.sources
    ask = load_config(ROOT / "configs" / "eli5-askscience.yaml")
    assert ask.data.max_records == 5000 and ask.data.test_size == 0.2
    assert ask.model.name_or_path == "distilroberta-base"
    assert ask.train.learning_rate == 2e-5 and ask.train.weight_decay == 0.01
    assert ask.train.epochs == 3 and ask.data.block_size == 128


@pytest.mark.unit
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
        ("run=5", "key 'run' must be a mapping, got 5"),
        (
            "train.precision=fp16",
            "key 'train.precision' must be one of auto, bf16, fp32, got 'fp16'",
        ),
        (
            "infer.precision=fp16",
            "key 'infer.precision' must be one of auto, bf16, fp32, got 'fp16'",
        ),
        ("data.test_size=1", "key 'data.test_size' must be < 1.0, got 1"),
        ("data.block_size=1", "key 'data.block_size' must be >= 2, got 1"),
        ("data.shard_blocks=0", "key 'data.shard_blocks' must be >= 1, got 0"),
        ("train.learning_rate=0", "key 'train.learning_rate' must be > 0.0, got 0"),
        (
            "train.learning_rate=true",
            "key 'train.learning_rate' must be a number, not a boolean, got True",
        ),
        ("train.learning_rate=fast", "key 'train.learning_rate' must be float, got 'fast'"),
        ("data.sources=[3]", "key 'data.sources[0]' must be a mapping, got 3"),
        ("model.config_overrides=[1]", "key 'model.config_overrides' must be a mapping, got [1]"),
        ("model.from_scratch=maybe", "key 'model.from_scratch' must be bool, got 'maybe'"),
        ("run.output=[a]", "key 'run.output' must be str, got ['a']"),
    ],
)
@pytest.mark.unit
def test_bad_keys_name_the_file_and_key(override, message):
    with pytest.raises(BadInput) as e:
        load_config(ROOT / "configs" / "demo.yaml", [override])
    assert str(e.value) == f"{ROOT / 'configs' / 'demo.yaml'}: {message}"


@pytest.mark.unit
def test_every_field_type_is_coerced_as_yaml_reads_it():
    cfg = load_config(
        ROOT / "configs" / "demo.yaml",
        [
            "train.learning_rate=2e-5",  # YAML 1.1 reads this as a string
            "train.weight_decay=0",  # an int where a float is expected
            "train.max_steps=null",
            "train.eval_every_steps=7",
            "model.from_scratch=false",
            "data.subreddits=[askscience]",
            "data.sources=[s3://b/x.json.gz]",  # a bare string is a URI
            "infer.precision=fp32",
        ],
    )
    t = cfg.train
    assert (t.learning_rate, type(t.learning_rate)) == (2e-5, float)
    assert (t.weight_decay, type(t.weight_decay)) == (0.0, float)
    assert t.max_steps is None and t.eval_every_steps == 7
    assert cfg.model.from_scratch is False and cfg.data.subreddits == ["askscience"]
    assert cfg.data.sources == [SourceConfig(uri="s3://b/x.json.gz")]
    assert cfg.infer.precision == "fp32"


@pytest.mark.unit
def test_every_bad_key_is_reported_not_only_the_first():
    with pytest.raises(BadInput) as e:
        load_config(ROOT / "configs" / "demo.yaml", ["infer.top_k=0", "train.nope=1"])
    assert str(e.value).splitlines() == [
        f"{ROOT / 'configs' / 'demo.yaml'}: unknown key 'train.nope'",
        f"{ROOT / 'configs' / 'demo.yaml'}: key 'infer.top_k' must be >= 1, got 0",
    ]


@pytest.mark.unit
def test_readme_config_reference_is_generated_from_the_fields():
    readme = (ROOT / "README.md").read_text()
    start, end = "<!-- config-reference:start -->\n", "<!-- config-reference:end -->"
    shown = readme[readme.index(start) + len(start) : readme.index(end)]
    assert shown == reference_table(), "README out of date: paste `python -m job.config`"
    documented = {row.split("`")[1] for row in shown.splitlines()[2:]}
    assert len(documented) == sum(
        len(f.annotation.model_fields) for f in Config.model_fields.values()
    )
