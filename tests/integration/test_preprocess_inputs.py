"""Preprocessing fingerprints its inputs (issue 17, item 7): the dataset id is keyed by the
versions of the files it reads (size + ETag on S3, size + mtime_ns locally; a Hub source's
commit), so an edited input gives a new dataset, its parts included, and a file that changes
while a worker reads it is one line, exit 2. The manifest's `inputs` lists those versions.

Each end-to-end test runs on a local folder and on the S3 server (inputs and output both).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from support.cli import mlmjob, write_config
from support.data import DEMO_TOKENIZER, ROOT

from job import storage
from job.config import DataConfig, load_config
from job.data import shards
from job.data.blocks import load_tokenizer
from job.data.inputs import resolve_inputs
from job.data.sources import iter_records
from job.errors import BadInput

WORDS = [
    "the",
    "light",
    "star",
    "water",
    "cell",
    "energy",
    "heat",
    "because",
    "atoms",
    "move",
    "faster",
    "when",
    "it",
    "is",
    "hot",
]


def record(i: int, answers: list[str] | None = None) -> dict:
    texts = (
        answers
        if answers is not None
        else [" ".join(WORDS[(i + k) % len(WORDS)] for k in range(9))]
    )
    return {"q_id": f"q{i}", "title": f"why {i}?", "answers": {"text": texts}}


def jsonl(records: list[dict]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


@dataclass
class Place:
    """Where a test's input and output live: a local folder or an S3 prefix."""

    root: str

    def uri(self, name: str) -> str:
        return storage.join(self.root, name)

    def files(self, prefix: str) -> dict[str, bytes]:
        return {u: storage.read_bytes(u) for u in storage.list_files(prefix)}


@pytest.fixture(params=["local", "s3"])
def place(request, tmp_path) -> Place:
    if request.param == "s3":
        prefix = request.getfixturevalue("s3_prefix")
        storage.configure()  # the S3 server's endpoint, from the environment
        return Place(prefix)
    return Place(str(tmp_path / "store"))


def config(tmp_path: Path, place: Place, extra: str = "") -> Path:
    shards = "" if "shard_blocks" in extra else "  shard_blocks: 4\n"  # no duplicate key
    return write_config(
        tmp_path / "c.yaml",
        f"data:\n  sources: ['{place.uri('in/eli5.jsonl')}']\n  output: '{place.uri('data')}'\n"
        f"{shards}{extra}model:\n  name_or_path: '{DEMO_TOKENIZER}'\n",
    )


def preprocess(cfg: Path, *args, code: int = 0):
    proc = mlmjob("preprocess", "-c", cfg, *args)
    assert proc.returncode == code, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc


def manifest(uri: str) -> dict:
    return json.loads(storage.read_text(storage.join(uri, "manifest.json")))


def records_in(m: dict) -> int:
    return sum(split["records"] for split in m["splits"].values())


def error_line(proc) -> str:
    errors = [line for line in proc.stderr.splitlines() if line.startswith("mlmjob: error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0].removeprefix("mlmjob: error: ")


def version_keys(place: Place) -> set[str]:
    return {"uri", "size", "etag" if storage.is_s3(place.root) else "mtime_ns"}


# ---- (a), (b): an edit gives a new dataset; no edit, no work -------------------------------


def test_edited_input_gives_a_new_dataset_and_leaves_the_old_one(tmp_path, place):
    src = place.uri("in/eli5.jsonl")
    storage.write_bytes(src, jsonl([record(i) for i in range(40)]))
    cfg = config(tmp_path, place)
    old = preprocess(cfg).stdout.strip()
    old_manifest = manifest(old)
    assert records_in(old_manifest) == 40
    (version,) = old_manifest["inputs"]
    assert set(version) == version_keys(place) and version["uri"] == src
    assert version["size"] == storage.size(src)
    old_files = place.files(old)

    # the user fixes a record and adds five
    storage.write_bytes(src, jsonl([record(i) for i in range(45)]))
    proc = preprocess(cfg)
    new = proc.stdout.strip()
    assert new != old and "nothing to do" not in proc.stderr
    new_manifest = manifest(new)
    assert records_in(new_manifest) == 45
    assert new_manifest["dataset_id"] == new.rsplit("/", 1)[1]
    assert new_manifest["inputs"] == [{"uri": src, **storage.fingerprint(src)}]
    assert place.files(old) == old_files  # the old dataset is untouched
    # what `mlmjob train` and preflight compute (job.data.manifest.dataset_manifest) finds it
    tok = load_tokenizer(str(DEMO_TOKENIZER), tmp_path / "cache")
    assert shards.dataset_uri(load_config(cfg), tok) == new


def test_unchanged_inputs_rerun_prints_the_same_dataset_and_does_no_work(tmp_path, place):
    storage.write_bytes(place.uri("in/eli5.jsonl"), jsonl([record(i) for i in range(40)]))
    cfg = config(tmp_path, place)
    first = preprocess(cfg).stdout.strip()
    before = place.files(place.uri("data"))
    local = not storage.is_s3(place.root)
    mtimes = {p: p.stat().st_mtime_ns for p in Path(place.root).rglob("*")} if local else None
    proc = preprocess(cfg)
    assert proc.stdout.strip() == first
    assert "complete, nothing to do" in proc.stderr
    assert place.files(place.uri("data")) == before
    if local:
        assert {p: p.stat().st_mtime_ns for p in Path(place.root).rglob("*")} == mtimes


# ---- (c): a malformed record, fixed ---------------------------------------------------------


def test_fixing_a_malformed_record_then_rerunning_succeeds(tmp_path, place):
    """Before: the failed run's part was reused ("part already written") and the rerun
    failed on the record that was gone."""
    src = place.uri("in/eli5.jsonl")
    rows = [record(i) for i in range(20)]
    broken = (
        jsonl(rows[:7]) + b'{"q_id": "q7", "answers": {"text": ["unterminated}\n' + jsonl(rows[8:])
    )
    storage.write_bytes(src, broken)
    cfg = config(tmp_path, place, "  max_bad_fraction: 0.01\n")
    proc = preprocess(cfg, code=2)
    assert error_line(proc).startswith(
        "1 of 20 records malformed (5.0% > data.max_bad_fraction 1.0%)"
    )
    assert f"{src}:8: invalid JSON" in error_line(proc)

    storage.write_bytes(src, jsonl(rows))  # the user fixes the record
    proc = preprocess(cfg)
    assert "part already written" not in proc.stderr
    m = manifest(proc.stdout.strip())
    assert records_in(m) == 20 and m["malformed_records"] == 0
    assert m["inputs"] == [{"uri": src, **storage.fingerprint(src)}]


# ---- (d): an input that changes between workers, or while one reads it ----------------------


def test_input_edited_between_workers_gives_each_its_own_dataset(tmp_path, place):
    """Worker 0 reads 2,500 records (its part: chunks 0 and 2, 1,500 records), then 1,000
    are dropped from the file before worker 1 starts. Before: worker 1 found worker 0's part,
    finalized, and crashed (exit 1, a traceback: `part 0 holds 1500 records, the stream
    gives it 1000`) on every retry. Now each worker fingerprints the file into its dataset
    id: different ids, nothing crashes, and a rerun of worker 0 completes the dataset of the
    file as it is."""
    src = place.uri("in/eli5.jsonl")
    storage.write_bytes(src, jsonl([record(i) for i in range(2500)]))
    cfg = config(tmp_path, place, "  shard_blocks: 100\n")
    w0 = preprocess(cfg, "--worker-index", 0, "--num-workers", 2)
    assert "1 part(s) still missing" in w0.stderr
    storage.write_bytes(src, jsonl([record(i) for i in range(1500)]))
    w1 = preprocess(cfg, "--worker-index", 1, "--num-workers", 2)
    assert "1 part(s) still missing" in w1.stderr
    assert w1.stdout.strip() != w0.stdout.strip()
    assert not [u for u in storage.list_files(place.uri("data")) if u.endswith("manifest.json")]

    again = preprocess(cfg, "--worker-index", 0, "--num-workers", 2)
    assert again.stdout.strip() == w1.stdout.strip()
    m = manifest(w1.stdout.strip())
    assert records_in(m) == 1500 and m["inputs"] == [{"uri": src, **storage.fingerprint(src)}]


# Runs the CLI with a reader that rewrites the input once it has yielded its first record:
# deterministic "the file changed while a worker was reading it".
HOOK = """
import sys
from job import storage
from job.data import files
from job.cli import main

real = files._iter_json_lines
new = open(sys.argv[1], "rb").read()

def rewritten_after_the_first_record(uri, stream, wants):
    for n, item in enumerate(real(uri, stream, wants)):
        yield item
        if n == 0:
            storage.write_bytes(uri, new)

files._iter_json_lines = rewritten_after_the_first_record
sys.exit(main(sys.argv[2:]))
"""


def test_input_edited_while_a_worker_reads_it_is_one_line_exit_2(tmp_path, place):
    """Before: the worker went on with what it had read, committed its part and the
    dataset, exit 0, named by a version of the file that no longer existed."""
    import subprocess

    src = place.uri("in/eli5.jsonl")
    storage.write_bytes(src, jsonl([record(i) for i in range(30)]))
    before = storage.fingerprint(src)
    (tmp_path / "new.jsonl").write_bytes(jsonl([record(i) for i in range(31)]))
    cfg = config(tmp_path, place)
    proc = subprocess.run(
        [sys.executable, "-c", HOOK, tmp_path / "new.jsonl", "preprocess", "-c", cfg],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    after = storage.fingerprint(src)
    line = error_line(proc)
    assert line.startswith(f"{src} changed while it was being read (")
    assert f"size {before['size']} → {after['size']}" in line
    assert line.endswith("; rerun once it is stable")
    left = storage.list_files(place.uri("data"))
    assert not [u for u in left if u.endswith((".npz", "manifest.json"))], left

    rerun = preprocess(cfg)  # once it is stable
    assert records_in(manifest(rerun.stdout.strip())) == 31


@pytest.mark.unit
def test_readers_check_the_versions_the_id_was_computed_from(tmp_path):
    """In process: a file that changed after it was fingerprinted is refused before it is
    read; one that changes mid-read (here: before the stream is cut at max_records) too."""
    src = tmp_path / "in.jsonl"
    src.write_bytes(jsonl([record(i) for i in range(10)]))
    cfg = DataConfig(sources=[str(src)])
    inputs = resolve_inputs(cfg)
    assert inputs == [[{"uri": str(src), **storage.fingerprint(str(src))}]]
    assert len(list(iter_records(cfg, inputs=inputs))) == 10

    src.write_bytes(jsonl([record(i) for i in range(11)]))
    with pytest.raises(
        BadInput, match=rf"^{src} changed while it was being read \(.*size \d+ → \d+"
    ):
        next(iter_records(cfg, inputs=inputs))

    cut = DataConfig(sources=[str(src)], max_records=3)
    inputs = resolve_inputs(cut)
    stream = iter_records(cut, inputs=inputs)
    assert next(stream).text
    src.write_bytes(jsonl([record(i) for i in range(12)]))
    with pytest.raises(BadInput, match="changed while it was being read"):
        list(stream)


@pytest.mark.unit
def test_dataset_id_is_keyed_by_the_input_versions(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_bytes(jsonl([record(i) for i in range(10)]))
    cfg = load_config(
        write_config(
            tmp_path / "c.yaml", f"data:\n  sources: ['{src}']\n  output: '{tmp_path}/o'\n"
        )
    )
    inputs = resolve_inputs(cfg.data)
    same = shards.dataset_id(cfg, "tok", resolve_inputs(cfg.data))
    assert shards.dataset_id(cfg, "tok", inputs) == same
    edited = [[{**inputs[0][0], "size": inputs[0][0]["size"] + 1}]]
    assert shards.dataset_id(cfg, "tok", edited) != same

    # a source that is gone: no dataset can be found, and train is told why, in one line
    gone = f"data:\n  sources: ['{tmp_path}/gone*.jsonl']\n  output: '{tmp_path}/o'\n"
    missing = load_config(write_config(tmp_path / "gone.yaml", gone))
    tok = load_tokenizer(str(DEMO_TOKENIZER), tmp_path / "cache")
    root = shards.dataset_uri(missing, tok)
    with pytest.raises(
        BadInput, match=rf"^data.sources\[0\]: '{tmp_path}/gone\*.jsonl' matches no file"
    ):
        shards.read_manifest(root)


@pytest.mark.unit
def test_parts_of_different_inputs_are_one_line_naming_the_part(tmp_path, monkeypatch):
    """Different inputs now give different dataset ids; should parts of two versions still
    meet (a file rewritten keeping its size and mtime), finalizing is one BadInput line
    naming the part, not a RuntimeError traceback."""
    from job.data import preprocess as pre

    monkeypatch.setattr(pre, "CHUNK", 4)
    src = tmp_path / "in.jsonl"
    cfg = load_config(
        write_config(
            tmp_path / "c.yaml",
            f"data:\n  sources: ['{src}']\n  output: '{tmp_path}/o'\n"
            f"  cache_dir: '{tmp_path}/cache'\nmodel:\n  name_or_path: '{DEMO_TOKENIZER}'\n",
        )
    )
    tok = load_tokenizer(str(DEMO_TOKENIZER), tmp_path / "cache")
    root = str(tmp_path / "o" / "ds")
    parts = [pre._part_uri(root, w, 2) for w in range(2)]
    for w, n in ((0, 10), (1, 6)):  # worker 0 reads 10 records (6 of them its), worker 1 six
        src.write_bytes(jsonl([record(i) for i in range(n)]))
        pre._tokenize_part(cfg, tok, w, 2, parts[w], resolve_inputs(cfg.data))
    with pytest.raises(BadInput) as e:
        pre.finalize(cfg, tok, root, parts, resolve_inputs(cfg.data))
    assert str(e.value) == (
        f"{parts[0]}: part 0 holds 6 records, the stream gives it 4: the parts were made from "
        f"different inputs; delete {root}/_work and rerun every worker"
    )
