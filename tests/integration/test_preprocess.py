"""Preprocessing on generated ELI5-format records and a RoBERTa-style tokenizer trained on
them (conftest's `synthetic`); the data layer checks the real ELI5 file and roberta-base."""

import gzip
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from support.cli import mlmjob, write_config
from support.data import DEMO_TOKENIZER, ROOT, Inputs
from support.once import shared_dir

from job import storage
from job.config import load_config
from job.data.preprocess import preprocess

ELI5_TOKENS = 874_594  # the tutorial's preprocess_function on every record of the real ELI5
ELI5_RECORDS = {"train": 1900, "test": 475}  # its 2,375 questions, split 80/20


def eli5_config(
    src: Inputs, tmp_path: Path, output: str, extra: str = "", shard_blocks: int = 100
) -> Path:
    return write_config(
        tmp_path / "eli5.yaml",
        f"""
data:
  sources: ['{src.eli5}']
  output: '{output}'
  shard_blocks: {shard_blocks}
{extra}
model:
  name_or_path: '{src.tokenizer}'
""",
    )


def run_ok(*args):
    return mlmjob(*args, check=True)


def dataset_dir(output) -> Path:
    (manifest,) = Path(output).glob("*/manifest.json")
    return manifest.parent


def read_blocks(root: Path, split: str) -> np.ndarray:
    manifest = json.loads((root / "manifest.json").read_text())
    arrays = [np.load(root / s["path"]) for s in manifest["splits"][split]["shards"]]
    return np.concatenate(arrays)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, synthetic):
    """One single-worker run on a local folder that other tests compare against."""

    def make(tmp: Path) -> None:
        run_ok("preprocess", "-c", eli5_config(synthetic, tmp, tmp / "data"))

    return dataset_dir(shared_dir(tmp_path_factory, "preprocess-reference", make) / "data")


def tutorial_ids_per_split(src: Inputs, seed=42):
    """The tutorial's pipeline with `datasets`: split, flatten, preprocess_function."""
    import datasets
    from transformers import AutoTokenizer

    records = json.loads(gzip.decompress(src.eli5.read_bytes()))
    rows = [{"q_id": r["q_id"], "answers": {"text": r["answers"]["text"]}} for r in records]
    eli5 = datasets.Dataset.from_list(rows).train_test_split(test_size=0.2, seed=seed)
    eli5 = eli5.flatten()
    tokenizer = AutoTokenizer.from_pretrained(src.tokenizer)

    def preprocess_function(examples):
        return tokenizer([" ".join(x) for x in examples["answers.text"]])

    tokenized = eli5.map(
        preprocess_function, batched=True, remove_columns=eli5["train"].column_names
    )
    return {split: tokenized[split]["input_ids"] for split in ("train", "test")}


def assert_blocks_equal_the_tutorials_ids_cut_per_split(root: Path, src: Inputs) -> dict:
    """Returns the manifest; its figures are the tutorial's."""
    tutorial = tutorial_ids_per_split(src)
    manifest = json.loads((root / "manifest.json").read_text())
    total = 0
    for split, docs in tutorial.items():
        flat = [t for doc in docs for t in doc]
        n = len(flat) // 128
        expected = np.asarray(flat[: n * 128]).reshape(n, 128)
        blocks = read_blocks(root, split)
        assert blocks.dtype == np.uint16 and manifest["dtype"] == "uint16"
        assert blocks.shape == expected.shape
        np.testing.assert_array_equal(blocks, expected)
        info = manifest["splits"][split]
        assert info["tokens"] == len(flat)
        assert info["blocks"] == n == sum(s["blocks"] for s in info["shards"])
        assert info["records"] == len(docs)
        total += len(flat)
    assert total == sum(manifest["splits"][split]["tokens"] for split in tutorial)
    return manifest


def test_blocks_equal_the_tutorials_ids_cut_per_split(reference, synthetic):
    manifest = assert_blocks_equal_the_tutorials_ids_cut_per_split(reference, synthetic)
    assert {k: v["records"] for k, v in manifest["splits"].items()} == {"train": 320, "test": 80}


@pytest.fixture(scope="module")
def real_reference(tmp_path_factory, real_data):
    tmp = tmp_path_factory.mktemp("real")
    run_ok("preprocess", "-c", eli5_config(real_data, tmp, tmp / "data", shard_blocks=1000))
    return dataset_dir(tmp / "data")


@pytest.mark.data
def test_real_eli5_blocks_equal_the_tutorials_ids_cut_per_split(real_reference, real_data):
    """The real file and roberta-base: the tutorial's figures, to the token."""
    manifest = assert_blocks_equal_the_tutorials_ids_cut_per_split(real_reference, real_data)
    assert sum(manifest["splits"][split]["tokens"] for split in ELI5_RECORDS) == ELI5_TOKENS
    assert {k: v["records"] for k, v in manifest["splits"].items()} == ELI5_RECORDS
    assert manifest["tokenizer"] == str(real_data.tokenizer) and manifest["vocab_size"] == 50265


def test_manifest_contract(reference, synthetic):
    m = json.loads((reference / "manifest.json").read_text())
    assert m["dataset_id"] == reference.name
    assert m["tokenizer"] == str(synthetic.tokenizer) and m["block_size"] == 128
    for split in ("train", "test"):
        for shard in m["splits"][split]["shards"]:
            import hashlib

            data = (reference / shard["path"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == shard["sha256"]
    assert not (reference / "_work").exists()


def test_local_and_s3_give_identical_datasets(reference, synthetic, s3_prefix, tmp_path):
    run_ok("preprocess", "-c", eli5_config(synthetic, tmp_path, f"{s3_prefix}/data"))
    uri = f"{s3_prefix}/data/{reference.name}"
    s3_manifest = json.loads(storage.read_text(f"{uri}/manifest.json"))
    assert s3_manifest == json.loads((reference / "manifest.json").read_text())
    for shard in s3_manifest["splits"]["train"]["shards"][:2]:
        assert (
            storage.read_bytes(f"{uri}/{shard['path']}") == (reference / shard["path"]).read_bytes()
        )


def test_sources_read_from_s3(reference, synthetic, s3_prefix, tmp_path):
    storage.configure()
    storage.upload_file(synthetic.eli5, f"{s3_prefix}/in/eli5.json.gz")
    cfg = eli5_config(synthetic, tmp_path, tmp_path / "out")
    run_ok("preprocess", "-c", cfg, "--set", f"data.sources=['{s3_prefix}/in/*.json.gz']")
    got = json.loads((dataset_dir(tmp_path / "out") / "manifest.json").read_text())
    want = json.loads((reference / "manifest.json").read_text())
    assert got["splits"] == want["splits"]


def test_second_run_does_no_work(reference, synthetic, tmp_path):
    out = tmp_path / "data"
    cfg = eli5_config(synthetic, tmp_path, out)
    run_ok("preprocess", "-c", cfg)
    root = dataset_dir(out)
    mtimes = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    proc = run_ok("preprocess", "-c", cfg)
    assert "nothing to do" in proc.stderr
    assert proc.stdout.strip() == str(root)
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == mtimes


def test_killed_mid_write_leaves_no_manifest_and_rerun_completes(reference, synthetic, tmp_path):
    out = tmp_path / "data"
    cfg = eli5_config(synthetic, tmp_path, out)
    # Tiny shards make the write phase long enough to be killed inside it; a short lease, so
    # that the rerun takes the killed finalizer's over in seconds, not a minute.
    args = [
        "preprocess",
        "-c",
        cfg,
        "--set",
        "data.shard_blocks=2",
        "--set",
        "run.lease_ttl_seconds=5",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "job", *map(str, args)],
        cwd=ROOT,
        stderr=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not list(out.glob("*/train/shard-0000*.npy")):
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(out.glob("*/train/shard-*.npy")), "was not killed during the write phase"
    assert not list(out.glob("*/manifest.json"))
    run_ok(*args)
    root = dataset_dir(out)
    np.testing.assert_array_equal(read_blocks(root, "train"), read_blocks(reference, "train"))
    np.testing.assert_array_equal(read_blocks(root, "test"), read_blocks(reference, "test"))


def test_three_workers_give_the_same_dataset(reference, synthetic, tmp_path):
    out = tmp_path / "data"
    cfg = eli5_config(synthetic, tmp_path, out)
    for worker in range(3):
        assert not list(out.glob("*/manifest.json"))  # only the last worker commits
        run_ok("preprocess", "-c", cfg, "--worker-index", worker, "--num-workers", 3)
    root = dataset_dir(out)
    assert (root / "manifest.json").read_bytes() == (reference / "manifest.json").read_bytes()
    for path in reference.rglob("*.npy"):
        assert (root / path.relative_to(reference)).read_bytes() == path.read_bytes()


def test_workers_from_indexed_job_environment(tmp_path):
    """A pod of an Indexed Job gets its index from JOB_COMPLETION_INDEX."""
    out = tmp_path / "data"
    sample = ROOT / "job" / "sample" / "eli5-sample.jsonl"
    cfg = write_config(
        tmp_path / "c.yaml",
        f"data:\n  sources: ['{sample}']\n  output: '{out}'\n"
        f"model:\n  name_or_path: '{DEMO_TOKENIZER}'\n",
    )
    mlmjob(
        "preprocess",
        "-c",
        cfg,
        env={"JOB_COMPLETION_INDEX": "1", "MLMJOB_NUM_WORKERS": "2"},
        check=True,
    )
    assert list(out.glob("*/_work/part-00001-of-00002.npz"))
    assert not list(out.glob("*/manifest.json"))
    mlmjob(
        "preprocess",
        "-c",
        cfg,
        env={"JOB_COMPLETION_INDEX": "0", "MLMJOB_NUM_WORKERS": "2"},
        check=True,
    )
    assert list(out.glob("*/manifest.json"))


@pytest.mark.unit
def test_subreddit_filter_and_max_records(tmp_path, synthetic):
    cfg = load_config(eli5_config(synthetic, tmp_path, tmp_path / "o", "  max_records: 100"))
    root = preprocess(cfg)
    m = json.loads(storage.read_text(f"{root}/manifest.json"))
    assert m["splits"]["train"]["records"] == 80 and m["splits"]["test"]["records"] == 20
    cfg.data.subreddits = ["askscience"]  # ELI5-Category holds only explainlikeimfive
    with pytest.raises(Exception, match="hold no records"):
        preprocess(cfg)


# ---- bad input ------------------------------------------------------------------------

GOOD = {"q_id": "g", "subreddit": "askscience", "answers": {"text": ["A fine answer here."]}}


def jsonl_config(tmp_path, lines: list[bytes], extra="") -> tuple[Path, Path]:
    data = tmp_path / "in.jsonl"
    data.write_bytes(b"\n".join(lines) + b"\n")
    cfg = write_config(
        tmp_path / "c.yaml",
        f"data:\n  sources: ['{data}']\n  output: '{tmp_path}/out'\n{extra}"
        f"model:\n  name_or_path: '{DEMO_TOKENIZER}'\n",
    )
    return cfg, data


def good(n: int) -> list[bytes]:
    return [json.dumps(GOOD).encode()] * n


@pytest.mark.parametrize(
    "bad_line, reason",
    [
        (
            b'{"q_id": "x", "answers": {"text": ["unterminated}',
            "invalid JSON: Unterminated string starting at (column 36)",
        ),
        (b'{"q_id": "x", "title": "no answers"}', "record has no answers"),
        (b'{"q_id": "x", "answers": {"text": []}}', "record has no answers"),
        (b'{"q_id": "x", "answers": {"text": ["  ", ""]}}', "empty text"),
        (b'{"q_id": "x", "answers": {"text": ["caf\xe9"]}}', "invalid UTF-8 (column 40)"),
        (b'["not", "an", "object"]', "expected a JSON object, got list"),
    ],
)
def test_malformed_record_above_fraction_fails_naming_file_and_line(tmp_path, bad_line, reason):
    cfg, data = jsonl_config(tmp_path, good(3) + [bad_line] + good(6))
    proc = mlmjob("preprocess", "-c", cfg)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(
        "mlmjob: error: 1 of 10 records malformed (10.0% > data.max_bad_fraction"
    )
    assert last.endswith(f"first: {data}:4: {reason}")
    assert f"skipping {data}:4: {reason}" in proc.stderr
    assert not list((tmp_path / "out").glob("*/manifest.json"))


def test_malformed_records_below_fraction_are_skipped_and_counted(tmp_path):
    cfg, data = jsonl_config(tmp_path, good(5) + [b"{oops"] + good(4), "  max_bad_fraction: 0.2\n")
    proc = mlmjob("preprocess", "-c", cfg, check=True)
    (manifest,) = (tmp_path / "out").glob("*/manifest.json")
    m = json.loads(manifest.read_text())
    assert m["malformed_records"] == 1
    assert m["malformed_examples"] == [
        f"{data}:6: invalid JSON: Expecting property name enclosed in double quotes (column 2)"
    ]
    assert m["splits"]["train"]["records"] + m["splits"]["test"]["records"] == 9
    assert "skipping" in proc.stderr


@pytest.mark.parametrize(
    "content, message",
    [
        (
            b'[{"a": 1},\n {"b": 2\n]',
            "{path}: invalid JSON: parse error: after key and value, inside map, I expect ',' "
            "or '}}' (detected in bytes 0-21; after 1 records)",  # '}}': str.format
        ),
        (
            b'[{"answers": {"text": ["\xff"]}}]',
            "{path}: invalid JSON: lexical error: invalid bytes in UTF8 string (detected in "
            "bytes 0-30; after 0 records)",
        ),
        (b"\x1f\x8b\x08\x00garbage", "{path}: cannot read: "),
    ],
)
def test_unreadable_files_fail_with_one_line(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    cfg = write_config(
        tmp_path / "c.yaml",
        f"data:\n  sources: ['{path}']\n  output: '{tmp_path}/out'\n"
        f"model:\n  name_or_path: '{DEMO_TOKENIZER}'\n",
    )
    proc = mlmjob("preprocess", "-c", cfg)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("mlmjob: error: " + message.format(path=path)), lines[-1]
    assert "Traceback" not in proc.stderr


def test_missing_source_and_tokenizer_without_mask(tmp_path):
    cfg, _ = jsonl_config(tmp_path, good(3))
    proc = mlmjob("preprocess", "-c", cfg, "--set", f"data.sources=['{tmp_path}/none*.json']")
    assert proc.returncode == 2
    assert proc.stderr.strip().endswith(f"data.sources[0]: '{tmp_path}/none*.json' matches no file")

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]").save_pretrained(
        tmp_path / "tok"
    )
    proc = mlmjob("preprocess", "-c", cfg, "--set", f"model.name_or_path={tmp_path}/tok")
    assert proc.returncode == 2
    assert proc.stderr.strip().endswith(f"'{tmp_path}/tok' has no mask token; MLM needs one")


def test_parquet_and_hugging_face_sources_give_the_same_dataset(reference, synthetic, tmp_path):
    """Parquet through pyarrow, and the production path `datasets.load_dataset` (here on a
    local folder, since no hub is reachable): both give the JSON file's blocks."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = json.loads(gzip.decompress(synthetic.eli5.read_bytes()))
    rows = [
        {"q_id": r["q_id"], "subreddit": r["subreddit"], "answers": {"text": r["answers"]["text"]}}
        for r in records
    ]
    folder = tmp_path / "hf-eli5"
    folder.mkdir()
    half = len(rows) // 2
    pq.write_table(pa.Table.from_pylist(rows[:half]), folder / "train-00000.parquet")
    pq.write_table(pa.Table.from_pylist(rows[half:]), folder / "train-00001.parquet")
    want = json.loads((reference / "manifest.json").read_text())["splits"]
    for n, source in enumerate([f"['{folder}/*.parquet']", f"[{{hf: '{folder}', split: train}}]"]):
        out = tmp_path / f"out{n}"
        cfg = eli5_config(synthetic, tmp_path, out)
        run_ok("preprocess", "-c", cfg, "--set", f"data.sources={source}")
        got = json.loads((dataset_dir(out) / "manifest.json").read_text())["splits"]
        assert got == want, source
