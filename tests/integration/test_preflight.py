"""`mlmjob validate` refuses every bad value; `--preflight` also what the run will touch.

Each case runs the CLI as a user (or the cluster's CPU-only preflight step) would and
asserts exit 2 and the exact line; several problems give one line each.
"""

import json
import shutil

import pytest
import yaml
from support.cli import mlmjob
from support.data import DEMO_TOKENIZER, ROOT
from support.s3 import S3_KEY

DEMO = "configs/demo.yaml"

# (override, the line after "mlmjob: error: configs/demo.yaml: ")
CONFIG_CASES = [
    ("train.learning_rate=-1", "key 'train.learning_rate' must be > 0.0, got -1"),
    ("data.block_size=0", "key 'data.block_size' must be >= 2, got 0"),
    ("data.test_size=1.5", "key 'data.test_size' must be < 1.0, got 1.5"),
    ("data.test_size=-0.1", "key 'data.test_size' must be >= 0.0, got -0.1"),
    ("train.per_device_batch_size=0", "key 'train.per_device_batch_size' must be >= 1, got 0"),
    ("train.eval_batch_size=0", "key 'train.eval_batch_size' must be >= 1, got 0"),
    (
        "train.gradient_accumulation_steps=0",
        "key 'train.gradient_accumulation_steps' must be >= 1, got 0",
    ),
    ("train.mlm_probability=1", "key 'train.mlm_probability' must be < 1.0, got 1"),
    ("train.mlm_probability=0", "key 'train.mlm_probability' must be > 0.0, got 0"),
    ("train.epochs=0", "key 'train.epochs' must be >= 1, got 0"),
    ("train.max_steps=0", "key 'train.max_steps' must be >= 1, got 0"),
    ("train.warmup_steps=-1", "key 'train.warmup_steps' must be >= 0, got -1"),
    ("train.weight_decay=-0.1", "key 'train.weight_decay' must be >= 0.0, got -0.1"),
    ("train.max_grad_norm=0", "key 'train.max_grad_norm' must be > 0.0, got 0"),
    ("train.checkpoint_every_steps=0", "key 'train.checkpoint_every_steps' must be >= 1, got 0"),
    ("train.keep_checkpoints=0", "key 'train.keep_checkpoints' must be >= 1, got 0"),
    ("train.log_every_steps=0", "key 'train.log_every_steps' must be >= 1, got 0"),
    ("train.eval_every_steps=0", "key 'train.eval_every_steps' must be >= 1, got 0"),
    ("train.num_threads=0", "key 'train.num_threads' must be >= 1, got 0"),
    ("train.precision=fp16", "key 'train.precision' must be one of auto, bf16, fp32, got 'fp16'"),
    ("infer.precision=half", "key 'infer.precision' must be one of auto, bf16, fp32, got 'half'"),
    ("infer.top_k=0", "key 'infer.top_k' must be >= 1, got 0"),
    ("infer.batch_size=0", "key 'infer.batch_size' must be >= 1, got 0"),
    ("data.max_bad_fraction=2", "key 'data.max_bad_fraction' must be <= 1.0, got 2"),
    ("data.shard_blocks=0", "key 'data.shard_blocks' must be >= 1, got 0"),
    ("data.max_records=0", "key 'data.max_records' must be >= 1, got 0"),
    ("run.seed=-1", "key 'run.seed' must be >= 0, got -1"),
    (
        "data.sources=[gs://b/x.json]",
        "key 'data.sources[0].uri' must be a local path or a file://, s3://, hf:// URI, got 'gs://b/x.json'",
    ),
    (
        "run.output=gs://b/run",
        "key 'run.output' must be a local path or a file://, s3:// URI, got 'gs://b/run'",
    ),
    (
        "infer.inputs=[az://c/x.txt]",
        "key 'infer.inputs[0]' must be a local path or a file://, s3:// URI, got 'az://c/x.txt'",
    ),
    (
        "data.sources=[{uri: a.json, hf: eli5}]",
        "key 'data.sources[0]' must be exactly one of 'uri' (a file, folder or glob) and 'hf' (a dataset), got {'uri': 'a.json', 'hf': 'eli5'}",
    ),
    (
        "data.sources=[{split: train}]",
        "key 'data.sources[0]' must be exactly one of 'uri' (a file, folder or glob) and 'hf' (a dataset), got {'split': 'train'}",
    ),
    (
        "data.sources=[{uri: a.json, streaming: true}]",
        "key 'data.sources[0]' must be without 'hf_config', 'split', 'data_files' and 'streaming' (they apply to 'hf' datasets), got {'uri': 'a.json', 'streaming': True}",
    ),
    ("infer.lines_per_part=0", "key 'infer.lines_per_part' must be >= 1, got 0"),
]


@pytest.mark.parametrize("override, message", CONFIG_CASES)
def test_validate_refuses_each_bad_value(override, message):
    proc = mlmjob("validate", "-c", DEMO, "--set", override)
    assert proc.returncode == 2, proc.stdout
    assert proc.stderr.strip() == f"mlmjob: error: {DEMO}: {message}"


def preflight(tmp_path, *sets, env=None):
    outputs = [
        f"run.output={tmp_path}/run",
        f"data.output={tmp_path}/data",
        f"infer.output={tmp_path}/infer",
        f"data.cache_dir={tmp_path}/cache",
    ]
    args = [a for s in (*outputs, *sets) for a in ("--set", s)]
    return mlmjob("validate", "-c", DEMO, "--preflight", *args, env=env)


def test_preflight_of_a_good_config_prints_the_plan(tmp_path):
    proc = preflight(tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "preflight: ok"
    assert "  tokenizer: job/sample/tokenizer (948 tokens, mask <mask>)" in lines
    assert (
        "  train: global batch 8 (8 x 1 processes x 1 accumulation), dataset not built yet" in lines
    )
    assert not list(tmp_path.iterdir()), "a preflight writes nothing"


def test_preflight_counts_the_steps_once_the_dataset_exists(tmp_path):
    sets = [f"data.output={tmp_path}/data", f"data.cache_dir={tmp_path}/cache"]
    mlmjob("preprocess", "-c", DEMO, *[a for s in sets for a in ("--set", s)], check=True)
    manifest = json.loads(next((tmp_path / "data").glob("*/manifest.json")).read_text())
    blocks = manifest["splits"]["train"]["blocks"]
    proc = preflight(tmp_path, "train.epochs=2", env={"MLMJOB_NNODES": "2"})
    assert proc.returncode == 0, proc.stderr
    steps = 2 * (blocks // 16)
    assert (
        f"  train: global batch 16 (8 x 2 processes x 1 accumulation), {blocks:,} train "
        f"blocks, {steps:,} steps"
    ) in proc.stdout.splitlines()


def no_mask_tokenizer(tmp_path):
    folder = tmp_path / "nomask"
    shutil.copytree(ROOT / DEMO_TOKENIZER, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["mask_token"]
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_preflight_names_each_problem_on_its_own_line(tmp_path):
    (tmp_path / "ds.json").write_text("{ not json")
    (tmp_path / "afile").write_text("x")
    proc = preflight(
        tmp_path,
        f"data.sources=[{tmp_path}/nothing/*.jsonl]",
        "model.config_overrides={hiden_size: 3}",
        f"train.deepspeed={tmp_path}/ds.json",
        f"run.output={tmp_path}/afile/run",
        f"infer.inputs=[{tmp_path}/none.txt]",
        "infer.model=job/sample",
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"mlmjob: error: data.sources[0]: '{tmp_path}/nothing/*.jsonl' matches no file",
        "mlmjob: error: model.config_overrides: unknown key 'hiden_size' for roberta",
        f"mlmjob: error: {tmp_path}/ds.json:1: invalid JSON: Expecting property name enclosed "
        "in double quotes",
        f"mlmjob: error: run.output: cannot write to '{tmp_path}/afile/run': '{tmp_path}/afile' "
        "is a file",
        f"mlmjob: error: infer.inputs: '{tmp_path}/none.txt' matches no file",
        "mlmjob: error: infer.model: no model in 'job/sample' (expected config.json and "
        "model.safetensors (or pytorch_model.bin); found build_tokenizer.py, eli5-sample.jsonl, "
        "fill-mask.txt)",
    ]


@pytest.mark.parametrize("case", ["no_mask", "no_weights", "small_vocab", "long_blocks"])
def test_preflight_checks_tokenizer_and_model(tmp_path, case):
    sets, line = {
        "no_mask": (
            [f"model.tokenizer={no_mask_tokenizer(tmp_path)}"],
            f"model.tokenizer: '{tmp_path}/nomask' has no mask token; MLM needs one",
        ),
        "no_weights": (
            ["model.from_scratch=false"],
            "model.name_or_path: no model in 'job/sample/tokenizer' (expected "
            "config.json and model.safetensors (or pytorch_model.bin); found "
            "tokenizer.json, tokenizer_config.json)",
        ),
        "small_vocab": (
            ["model.config_overrides={vocab_size: 100}"],
            "model.name_or_path: vocabulary 100 is smaller than the tokenizer's 948",
        ),
        "long_blocks": (
            [
                "model.from_scratch=false",
                f"model.name_or_path={trained_model(tmp_path)}",
                "data.block_size=600",
            ],
            "data.block_size: 600 tokens do not fit the model's 128 positions",
        ),
    }[case]
    proc = preflight(tmp_path, *sets)
    assert proc.returncode == 2, proc.stdout
    assert proc.stderr.strip() == f"mlmjob: error: {line}"


def trained_model(tmp_path):
    """A saved model folder (random weights), as a finished run leaves it."""
    from transformers import AutoTokenizer, RobertaConfig, RobertaForMaskedLM

    tok = AutoTokenizer.from_pretrained(ROOT / DEMO_TOKENIZER)
    config = RobertaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=130,
    )
    folder = tmp_path / "model"
    RobertaForMaskedLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_preflight_refuses_to_continue_a_run_of_another_model(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    saved = yaml.safe_load(mlmjob("validate", "-c", DEMO, check=True).stdout)
    saved["model"]["config_overrides"]["hidden_size"] = 64
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    proc = preflight(tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"mlmjob: error: run.output: '{run}' holds a run with model.config_overrides.hidden_size "
        "64, this config has 128; use another run.output to start afresh"
    )


def test_preflight_against_s3(s3, s3_prefix, tmp_path, monkeypatch):
    """Sources and outputs on the S3 server: a good config passes (its probe objects are
    gone afterwards); a missing object, an S3 model prefix without a model and wrong
    credentials are each named."""
    from job import storage

    env = s3.env()
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    storage.configure(s3.endpoint)
    src = f"{s3_prefix}/in/eli5.jsonl"
    storage.write_bytes(src, (ROOT / "job/sample/eli5-sample.jsonl").read_bytes())
    storage.write_bytes(f"{s3_prefix}/notamodel/data.json.gz", b"\x1f\x8b")
    outs = [
        f"run.output={s3_prefix}/run",
        f"data.output={s3_prefix}/data",
        f"infer.output={s3_prefix}/infer",
    ]
    good = preflight(tmp_path, f"data.sources=[{src}]", *outs, env=env)
    assert good.returncode == 0, good.stderr
    assert "  preprocess: 1 file(s), 0.0 MB to read" in good.stdout.splitlines()
    assert storage.list_files(s3_prefix) == [src, f"{s3_prefix}/notamodel/data.json.gz"]
    bad = preflight(
        tmp_path,
        f"data.sources=[{s3_prefix}/in/missing.jsonl]",
        *outs,
        f"infer.inputs=[{src}]",
        f"infer.model={s3_prefix}/notamodel",
        env=env,
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        f"mlmjob: error: data.sources[0]: '{s3_prefix}/in/missing.jsonl' matches no file",
        f"mlmjob: error: infer.model: no model in '{s3_prefix}/notamodel' (expected config.json "
        "and model.safetensors (or pytorch_model.bin); found data.json.gz)",
    ]
    wrong = preflight(
        tmp_path, f"data.sources=[{src}]", *outs, env={**env, "AWS_SECRET_ACCESS_KEY": "wrong"}
    )
    assert wrong.returncode == 2
    errors = wrong.stderr.strip().splitlines()
    assert errors and all(line.startswith("mlmjob: error: ") for line in errors)
    assert any(src in line or s3_prefix in line for line in errors), errors
    assert S3_KEY not in wrong.stderr  # no credentials in logs


def test_preflight_resolves_hub_uris(tmp_path):
    """An hf:// source is listed on the Hub at preflight; the Hub unreachable is one line."""
    proc = mlmjob(
        "validate",
        "--preflight",
        "-c",
        "configs/demo.yaml",
        "--set",
        "data.sources=[{uri: 'hf://datasets/owner/name/data/*.parquet'}]",
        "--set",
        f"run.output={tmp_path}/run",
        "--set",
        f"data.output={tmp_path}/d",
        env={"HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(
        "mlmjob: error: data.sources[0]: hf://datasets/owner/name/data/"
        "*.parquet: the Hub cannot be reached"
    )
