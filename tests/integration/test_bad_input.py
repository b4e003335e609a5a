"""Bad input exits 2 with one line naming the file or key, never 1 with a traceback (which
the pod failure policy would retry, on GPU pods for train and infer): damaged weights, a
config that is not UTF-8, an output that is a file, a bad DeepSpeed JSON, a manifest without
its keys, a shard that fails its checksum twice, infer.top_k over the vocabulary, a seed
numpy cannot take, wrongly typed config overrides; and plain `mlmjob train` with DeepSpeed
runs as one process instead of failing on a missing process group.

Every case runs the CLI as a user does (support.cli.mlmjob: in this process where a fresh
one would add nothing), on a tiny dataset and a tiny trained model made once for the module
(conftest's `synthetic` records and tokenizer).
"""

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from support.cli import mlmjob, write_config
from support.data import ROOT
from support.once import shared_dir

from job import storage

pytestmark = pytest.mark.slow

CONFIG = """
run: {{output: '{run}'}}
data: {{sources: ['{eli5}'], output: '{data}', max_records: 100, block_size: 32,
        cache_dir: '{cache}'}}
model:
  name_or_path: '{tok}'
  from_scratch: true
  config_overrides: {{hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2,
                     intermediate_size: 64}}
train: {{max_steps: 2, per_device_batch_size: 2, learning_rate: 1.0e-3}}
infer: {{inputs: ['{inputs}'], output: '{out}', top_k: 3}}
"""


@dataclass
class Tiny:
    config: Path  # the config the dataset and the model were made with
    data: Path  # data.output: one dataset
    model: Path  # a trained run's model/ (config.json, model.safetensors, tokenizer)

    @property
    def manifest(self) -> Path:
        return next(self.data.glob("*/manifest.json"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, synthetic) -> Tiny:

    def make(root: Path) -> None:
        (root / "in.txt").write_text("The sky is <mask>.\n")
        text = CONFIG.format(
            run=root / "run",
            eli5=synthetic.eli5,
            data=root / "data",
            cache=root / "cache",
            tok=synthetic.tokenizer,
            inputs=root / "in.txt",
            out=root / "infer",
        )
        cfg = write_config(root / "c.yaml", text)
        mlmjob("preprocess", "-c", cfg, check=True)
        mlmjob("train", "-c", cfg, check=True)

    root = shared_dir(tmp_path_factory, "bad-input-tiny", make)
    return Tiny(config=root / "c.yaml", data=root / "data", model=root / "run" / "model")


def run(
    command: str,
    tiny: Tiny,
    tmp_path: Path,
    *sets: str,
    config: Path | None = None,
    process: bool | None = None,
):
    """`mlmjob COMMAND` on the module's config, with this test's own outputs and cache
    (`process`: as support.cli.mlmjob's)."""
    own = [
        f"run.output={tmp_path}/run",
        f"infer.output={tmp_path}/infer",
        f"data.cache_dir={tmp_path}/cache",
    ]
    args = ["--preflight"] if command == "preflight" else []
    command = "validate" if command == "preflight" else command
    for s in (*own, *sets):
        args += ["--set", s]
    return mlmjob(command, "-c", config or tiny.config, *args, process=process)


def refused(proc, line: str | re.Pattern) -> None:
    """Exit 2, no traceback, and exactly one error line: `line`, or one it fully matches."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [x for x in proc.stderr.splitlines() if "mlmjob: error:" in x]
    assert len(errors) == 1, proc.stderr[-3000:]
    got = errors[0].removeprefix("mlmjob: error: ")
    if isinstance(line, re.Pattern):
        assert line.fullmatch(got), got
    else:
        assert got == line


# ---- 1: a damaged model.safetensors ------------------------------------------------------


def damaged_model(tiny: Tiny, tmp_path: Path, damage: str) -> tuple[Path, str]:
    """A copy of the model with a truncated or a garbage model.safetensors, and the reason
    the line gives (from the size and the header's first 8 bytes)."""
    folder = tmp_path / f"model-{damage}"
    shutil.copytree(tiny.model, folder)
    weights = folder / "model.safetensors"
    whole = weights.read_bytes()
    if damage == "truncated":
        weights.write_bytes(whole[: len(whole) // 2])
        reason = f"{len(whole) // 2:,} bytes, its header says {len(whole):,}"
    else:
        junk = bytes(range(256)) * 20
        weights.write_bytes(junk)
        length = int.from_bytes(junk[:8], "little")
        reason = f"header length {length:,} is past the end of the file's {len(junk):,} bytes"
    return folder, reason


@pytest.mark.parametrize(
    "command, damage",
    [
        ("train", "truncated"),
        ("infer", "garbage"),
        ("evaluate", "truncated"),
        ("preflight", "garbage"),
        ("preflight-infer", "truncated"),
    ],
)
def test_a_damaged_safetensors_file_is_named(tiny, tmp_path, synthetic, command, damage):
    """Before: safetensors' SafetensorError went up as a traceback (exit 1) from train,
    infer and evaluate, and `validate --preflight` said ok."""
    folder, reason = damaged_model(tiny, tmp_path, damage)
    if command in ("train", "preflight"):
        key = "model.name_or_path"
        sets = [
            f"model.name_or_path={folder}",
            "model.from_scratch=false",
            f"model.tokenizer={synthetic.tokenizer}",
        ]
    else:
        key, sets = "infer.model", [f"infer.model={folder}"]
    proc = run(command.removesuffix("-infer"), tiny, tmp_path, *sets)
    refused(
        proc,
        f"{key}: '{folder}/model.safetensors' is not a complete safetensors file "
        f"({reason}); save or upload the model again",
    )


# ---- 2: a config that is not UTF-8 ------------------------------------------------------


@pytest.mark.parametrize("command", ["validate", "train"])
def test_a_config_that_is_not_utf8_is_named_with_the_offset(tiny, tmp_path, command):
    """Before: UnicodeDecodeError, a traceback."""
    text = tiny.config.read_bytes() + "# café\n".encode("latin-1")
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(text)
    proc = mlmjob(command, "-c", latin)
    offset = text.index(b"\xe9")
    refused(
        proc, f"{latin}: not UTF-8 text: byte 0xe9 at offset {offset} (save the config as UTF-8)"
    )


# ---- 3: an output that is a file --------------------------------------------------------


@pytest.mark.parametrize(
    "command, key, below",
    [
        ("preprocess", "data.output", False),
        ("train", "run.output", False),
        ("train", "run.output", True),
        ("infer", "infer.output", False),
        ("evaluate", "run.output", False),
    ],
)
def test_an_output_that_is_a_file_is_named(tiny, tmp_path, command, key, below):
    """Before: NotADirectoryError from the lease or the first folder made (exit 1)."""
    afile = tmp_path / "afile"
    afile.write_text("not a folder\n")
    output = afile / "out" if below else afile
    sets = [f"{key}={output}"] + ([f"infer.model={tiny.model}"] if command == "evaluate" else [])
    proc = run(command, tiny, tmp_path, *sets)
    if below:
        refused(proc, f"{key}: cannot write to '{output}': '{afile}' is a file")
    else:
        refused(proc, f"{key}: '{output}' is a file; an output must be a folder")


# ---- 4: train.deepspeed that is not a DeepSpeed JSON file -------------------------------


def deepspeed_case(tmp_path: Path, case: str) -> tuple[Path, str]:
    path = tmp_path / f"ds-{case}.json"
    if case == "folder":
        path.mkdir()
        return path, f"train.deepspeed: '{path}' is a folder, not a JSON file"
    if case == "missing":
        return path, f"train.deepspeed: '{path}' does not exist"
    if case == "invalid":
        path.write_text('{"zero_optimization": \n')
        return path, f"{path}:2: invalid JSON: Expecting value"
    if case == "list":
        path.write_text("[1, 2]\n")
        return path, (
            f"train.deepspeed: '{path}' holds a JSON list, not an object of DeepSpeed settings"
        )
    path.write_bytes('{"name": "zéro"}\n'.encode("latin-1"))
    return path, f"train.deepspeed: '{path}' is not UTF-8 text (byte offset 11)"


@pytest.mark.parametrize(
    "command, case",
    [
        ("train", "folder"),
        ("preflight", "folder"),
        ("train", "missing"),
        ("train", "invalid"),
        ("train", "list"),
        ("train", "latin1"),
    ],
)
def test_a_deepspeed_path_that_is_no_json_file_is_named(tiny, tmp_path, command, case):
    """Before: a folder gave IsADirectoryError, a JSON list a TypeError, Latin-1 a
    UnicodeDecodeError: tracebacks, in train and in preflight."""
    path, line = deepspeed_case(tmp_path, case)
    # in this process: the JSON is read before DeepSpeed or a process group starts (one
    # that did start here would fail the test as surely as an exit other than 2)
    proc = run(command, tiny, tmp_path, f"train.deepspeed={path}", process=False)
    refused(proc, line)


# ---- 5: a manifest without its keys -----------------------------------------------------


@pytest.mark.parametrize(
    "key",
    [
        "block_size",
        "splits",
        "dtype",
        "tokenizer_sha256",
        "splits.test",
        "splits.train.shards[0].path",
        "splits.test.shards[0].sha256",
    ],
)
def test_a_manifest_without_a_required_key_is_named(tiny, tmp_path, key):
    """Before: KeyError (block_size, splits, dtype was never checked), a traceback."""
    data = tmp_path / "data"
    shutil.copytree(tiny.data, data)
    manifest = next(data.glob("*/manifest.json"))
    doc = json.loads(manifest.read_text())
    *parents, last = re.split(r"\.|\[(\d+)\]\.?", key)
    node = doc
    for part in filter(None, parents):
        node = node[int(part) if part.isdigit() else part]
    del node[last]
    manifest.write_text(json.dumps(doc))
    proc = run("train", tiny, tmp_path, f"data.output={data}")
    missing = f"no split '{key}'" if key == "splits.test" else f"missing key '{key}'"
    refused(
        proc,
        f"{manifest}: {missing}; not a manifest `mlmjob preprocess` wrote (rerun it "
        "into a fresh data.output)",
    )


# ---- 6: a shard that fails its checksum -------------------------------------------------


def damage_shard(data: bytes) -> bytes:
    return data[:-64] + bytes(64)  # the same size: only the checksum can tell


def test_a_damaged_local_shard_is_named(tiny, tmp_path):
    """Before: ValueError from load_shard, a traceback."""
    data = tmp_path / "data"
    shutil.copytree(tiny.data, data)
    shard = next(data.glob("*/train/shard-00000.npy"))
    shard.write_bytes(damage_shard(shard.read_bytes()))
    proc = run("train", tiny, tmp_path, f"data.output={data}")
    refused(
        proc,
        f"{shard}: checksum mismatch: the dataset is damaged; rerun preprocess into "
        "a fresh data.output",
    )


def test_a_shard_damaged_on_s3_is_named_after_two_downloads(tiny, tmp_path, s3_prefix):
    """Before: one download, then ValueError from load_shard (exit 1: every retry of the
    pod downloads the same damaged shard)."""
    data = f"{s3_prefix}/data"
    storage.upload_dir(tiny.data, data)
    dataset = tiny.manifest.parent.name
    shard = f"{data}/{dataset}/train/shard-00000.npy"
    storage.write_bytes(shard, damage_shard(storage.read_bytes(shard)))
    proc = run("train", tiny, tmp_path, f"data.output={data}")
    refused(
        proc,
        f"{shard}: checksum mismatch after downloading it twice: the dataset is "
        "damaged; rerun preprocess into a fresh data.output",
    )
    assert f"{shard}: checksum mismatch after downloading it; downloading it again" in proc.stderr


# ---- 7: infer.top_k over the vocabulary -------------------------------------------------


def test_a_top_k_over_the_vocabulary_is_named(tiny, tmp_path):
    """Before: torch's topk raised 'selected index k out of range', a traceback."""
    vocab = json.loads((tiny.model / "config.json").read_text())["vocab_size"]
    proc = run("infer", tiny, tmp_path, f"infer.model={tiny.model}", f"infer.top_k={vocab + 1}")
    refused(
        proc,
        f"infer.top_k: {vocab + 1} is more than the vocabulary of '{tiny.model}' "
        f"({vocab:,} tokens)",
    )
    assert not list((tmp_path / "infer").glob("part-*"))


# ---- 8: a seed numpy cannot take --------------------------------------------------------


def test_a_seed_of_2_to_the_32_is_refused_by_the_config(tiny, tmp_path):
    """Before: accepted, then numpy's seeding failed in preprocess and train (exit 1)."""
    refused(
        run("validate", tiny, tmp_path, f"run.seed={2**32}"),
        f"{tiny.config}: key 'run.seed' must be < 4294967296, got 4294967296",
    )
    assert run("validate", tiny, tmp_path, f"run.seed={2**32 - 1}").returncode == 0


# ---- 9: wrongly typed config overrides --------------------------------------------------

OVERRIDES = {
    "type": (
        "{hidden_size: big}",
        "model.config_overrides.hidden_size: 'big' is refused by the roberta config: "
        "Field 'hidden_size' expected int, got str (value: 'big')",
    ),
    "heads": (
        "{hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 3}",
        "model.config_overrides: cannot build the roberta model: The hidden size (32) is "
        "not a multiple of the number of attention heads (3)",
    ),
    "unknown": ("{hiden_size: 32}", "model.config_overrides: unknown key 'hiden_size' for roberta"),
}


@pytest.mark.parametrize("case", list(OVERRIDES))
@pytest.mark.parametrize("command", ["preflight", "train"])
def test_bad_config_overrides_are_named(tiny, tmp_path, command, case):
    """Before: transformers' StrictDataclassFieldValidationError (a wrong type) crashed
    preflight and train; heads that do not divide the hidden size passed preflight and
    crashed train with a ValueError."""
    value, line = OVERRIDES[case]
    refused(run(command, tiny, tmp_path, f"model.config_overrides={value}"), line)


# ---- 10: plain `mlmjob train` with DeepSpeed --------------------------------------------


def test_plain_train_with_deepspeed_runs_as_one_process(tiny, tmp_path):
    """Before: 'Default process group has not been initialized' (exit 1): only torchrun
    (job.launch) set up the process group DeepSpeed needs."""
    proc = run("train", tiny, tmp_path, f"train.deepspeed={ROOT}/configs/deepspeed/zero2.json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 1 and summary["global_step"] == 2
    assert "DeepSpeed without a launcher: one process" in proc.stderr
