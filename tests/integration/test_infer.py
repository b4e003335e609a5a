"""Batch fill-mask against pipeline("fill-mask"), on a model saved by a training run (on
generated ELI5-format records and a RoBERTa-style tokenizer: conftest's `synthetic`)."""

import gzip
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from support.cli import mlmjob, write_config
from support.data import ROOT, Inputs
from support.once import shared_dir

from job import storage

CONFIG = """
run: {{output: '{run}', lease_ttl_seconds: 6}}  # a killed worker's lease: 6 s
data: {{sources: ['{eli5}'], output: '{data}', max_records: 200}}
model:
  name_or_path: '{tok}'
  from_scratch: true
  config_overrides: {{hidden_size: 64, num_hidden_layers: 2, num_attention_heads: 2,
                     intermediate_size: 128}}
train: {{max_steps: 4, per_device_batch_size: 4, learning_rate: 1.0e-3}}
infer:
  inputs: {inputs}
  output: '{out}'
  top_k: 3
  batch_size: 16
"""

GOOD = [
    "The Milky Way is a <mask> galaxy.",
    "Why is the sky <mask>?",
    "The <mask> sat on the <mask> and <mask> loudly.",
    "<mask>",
    "A much longer line about stars, planets and galaxies, where the <mask> is near the end of it all.",
]


pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, synthetic):

    def make(tmp: Path) -> None:
        cfg = write_config(
            tmp / "c.yaml",
            CONFIG.format(
                run=tmp / "run",
                eli5=synthetic.eli5,
                data=tmp / "data",
                tok=synthetic.tokenizer,
                inputs="[]",
                out=tmp / "o",
            ),
        )
        mlmjob("preprocess", "-c", cfg, check=True)
        mlmjob("train", "-c", cfg, check=True)

    return shared_dir(tmp_path_factory, "infer-model", make) / "run" / "model"


def config(src: Inputs, tmp_path, model_dir, inputs, out=None, name="infer.yaml"):
    out = out or tmp_path / "out"
    text = CONFIG.format(
        run=model_dir.parent,
        eli5=src.eli5,
        data=tmp_path / "data",
        tok=src.tokenizer,
        inputs=json.dumps([str(i) for i in inputs]),
        out=out,
    )
    return write_config(tmp_path / name, text)


def part_stem(uri, first: int = 1, last: int = 100_000) -> str:
    """The storage layout's contract: a part is named by its input URI, never by its
    position in the input list, and by its line range (infer.lines_per_part lines, 100,000
    by default; the last part of a file holds fewer)."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", str(uri).rsplit("/", 1)[-1])
    return f"part-{base}-{hashlib.sha256(str(uri).encode()).hexdigest()[:12]}-lines-{first}-{last}"


def part_stems(uri, per_part: int, parts: int) -> list[str]:
    return [part_stem(uri, k * per_part + 1, (k + 1) * per_part) for k in range(parts)]


def in_order(path: Path) -> tuple[str, int]:
    """Parts sorted by input, then by first line (as numbers: lines-11-20 after lines-1-10)."""
    stem, _, lines = path.stem.rpartition("-lines-")
    return stem, int(lines.split("-")[0])


def read_parts(out: Path) -> list[dict]:
    return [
        json.loads(line)
        for p in sorted(out.glob("part-*.jsonl"), key=in_order)
        for line in p.read_text().splitlines()
    ]


def test_results_equal_the_pipeline(synthetic, tmp_path, model_dir):
    from transformers import AutoTokenizer, pipeline

    too_long = "word " * 600 + "<mask>"
    lines = [*GOOD, "no mask here", "", too_long]
    src = tmp_path / "lines.txt"
    huge = b"x" * (2 << 20) + b" <mask>\n"  # read past in pieces, never held whole
    src.write_bytes("\n".join(lines).encode() + b"\n" + b"caf\xe9 <mask>\n" + huge)
    # fp32 explicitly: the default (auto) is bf16 on a GPU, which the fp32 pipeline is not
    cfg = config(synthetic, tmp_path, model_dir, [src])
    proc = mlmjob("infer", "-c", cfg, "--set", "infer.precision=fp32", check=True)
    assert "1 parts written, 0 skipped, 10 lines (5 errors)" in proc.stderr
    assert "precision fp32" in proc.stderr
    out = read_parts(tmp_path / "out")
    assert [(r["file"], r["line"]) for r in out] == [(str(src), n) for n in range(1, 11)]

    n_long = len(AutoTokenizer.from_pretrained(model_dir)(too_long)["input_ids"])
    assert n_long > 510
    fill = pipeline("fill-mask", model=str(model_dir), top_k=3)
    for line, record in zip(GOOD, out, strict=False):
        expected = fill(line)
        if line.count("<mask>") == 1:
            expected = [expected]
        got = record["masks"]
        assert len(got) == len(expected) == line.count("<mask>")
        for got_row, want_row in zip(got, expected, strict=True):
            assert [c["token"] for c in got_row] == [c["token"] for c in want_row]
            assert [c["token_str"] for c in got_row] == [c["token_str"] for c in want_row]
            assert [c["sequence"] for c in got_row] == [c["sequence"] for c in want_row]
            for g, w in zip(got_row, want_row, strict=True):
                assert abs(g["score"] - w["score"]) < 1e-4
    errors = {r["line"]: r["error"] for r in out if "error" in r}
    assert errors == {
        6: "no <mask> in the line",
        7: "empty line",
        # 512 positions, 2 reserved by RoBERTa (roberta-base's tokenizer makes 603 tokens)
        8: f"{n_long} tokens, the model takes at most 510",
        9: "invalid UTF-8 at column 4",
        10: "longer than 1 MiB",
    }


def make_inputs(folder: Path, files=3, lines=400) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for f in range(files):
        p = folder / f"in-{f}.txt"
        p.write_text(
            "".join(f"Line {f}-{n}: the <mask> is bright tonight.\n" for n in range(lines))
        )
        paths.append(p)
    return paths


def assert_complete(out: Path, inputs: list[Path], lines: int):
    records = read_parts(out)
    keys = [(r["file"], r["line"]) for r in records]
    assert len(keys) == len(set(keys)) == len(inputs) * lines  # none lost, none twice
    for src in inputs:
        stem = part_stem(src)
        part = [json.loads(x) for x in (out / f"{stem}.jsonl").read_text().splitlines()]
        assert [(r["file"], r["line"]) for r in part] == [
            (str(src), n) for n in range(1, lines + 1)
        ]
        marker = json.loads((out / f"{stem}.done").read_text())
        assert (marker["input"], marker["lines"]) == (str(src), lines)


def test_interrupted_job_resumes_without_loss_or_repeats(synthetic, tmp_path, model_dir):
    inputs = make_inputs(tmp_path / "in", lines=300)  # a part each: seconds of work
    out = tmp_path / "out"
    cfg = config(synthetic, tmp_path, model_dir, [tmp_path / "in" / "*.txt"])
    proc = subprocess.Popen(
        [sys.executable, "-m", "job", "infer", "-c", str(cfg)], cwd=ROOT, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    first = out / f"{part_stem(inputs[0])}.done"
    while not first.exists() and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert [p.name for p in out.glob("*.done")] == [first.name]
    committed = (out / f"{part_stem(inputs[0])}.jsonl").stat().st_mtime_ns
    # a crash mid-part leaves it uncommitted
    (out / f"{part_stem(inputs[1])}.jsonl").write_text('{"half": "written"}\n')
    again = mlmjob("infer", "-c", cfg, check=True)
    assert "1 part(s) already committed" in again.stderr
    assert (out / f"{part_stem(inputs[0])}.jsonl").stat().st_mtime_ns == committed
    assert_complete(out, inputs, 300)


def test_workers_split_parts_deterministically(synthetic, tmp_path, model_dir):
    inputs = make_inputs(tmp_path / "in", files=3, lines=20)
    cfg = config(synthetic, tmp_path, model_dir, inputs)
    mlmjob("infer", "-c", cfg, "--worker-index", 1, "--num-workers", 2, check=True)
    done = sorted(p.name for p in (tmp_path / "out").glob("*.done"))
    assert done == [f"{part_stem(inputs[1])}.done"]  # round-robin over the sorted inputs
    mlmjob("infer", "-c", cfg, "--worker-index", 0, "--num-workers", 2, check=True)
    assert_complete(tmp_path / "out", inputs, 20)


def test_processes_per_node_through_the_launcher(synthetic, tmp_path, model_dir):
    inputs = make_inputs(tmp_path / "in", files=3, lines=20)
    cfg = config(synthetic, tmp_path, model_dir, inputs)
    env = {**os.environ, "MLMJOB_NPROC_PER_NODE": "2"}
    proc = subprocess.run(
        [sys.executable, "-m", "job.launch", "infer", "-c", str(cfg)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "infer: 2 parts written" in proc.stderr  # rank 0 of 2 took parts 0 and 2 only
    assert_complete(tmp_path / "out", inputs, 20)


def test_end_to_end_through_s3(synthetic, tmp_path, model_dir, s3_prefix, s3_proxy):
    storage.configure()
    storage.upload_dir(model_dir, f"{s3_prefix}/model")
    for i, path in enumerate(make_inputs(tmp_path / "in", files=2, lines=10)):
        data = path.read_bytes()
        storage.write_bytes(
            f"{s3_prefix}/in/{path.name}.gz" if i else f"{s3_prefix}/in/{path.name}",
            gzip.compress(data) if i else data,
        )
    storage.write_bytes(
        f"{s3_prefix}/in/extra.jsonl", b'{"text": "The <mask> is blue."}\n{"other": 1}\n'
    )
    cfg = config(synthetic, tmp_path, model_dir, [f"{s3_prefix}/in/*"], out=f"{s3_prefix}/out")
    mlmjob("infer", "-c", cfg, "--set", f"infer.model={s3_prefix}/model", check=True)
    files = storage.list_files(f"{s3_prefix}/out")
    inputs = [f"{s3_prefix}/in/{n}" for n in ("extra.jsonl", "in-0.txt", "in-1.txt.gz")]
    stems = [part_stem(u) for u in inputs]
    assert sorted(f.rsplit("/", 1)[1] for f in files) == sorted(
        f"{stem}{ext}" for stem in stems for ext in (".done", ".jsonl")
    )
    extra = [
        json.loads(x) for x in storage.read_text(f"{s3_prefix}/out/{stems[0]}.jsonl").splitlines()
    ]
    assert extra[0]["masks"][0][0]["sequence"].endswith(" is blue.")
    assert extra[1] == {
        "file": inputs[0],
        "line": 2,
        "error": "not a JSON object with a string 'text'",
    }
    assert len(storage.read_text(f"{s3_prefix}/out/{stems[2]}.jsonl").splitlines()) == 10
    marker = json.loads(storage.read_text(f"{s3_prefix}/out/{stems[2]}.done"))
    head = storage.client().head_object(Bucket="test", Key=inputs[2][len("s3://test/") :])
    assert marker["fingerprint"] == {"size": head["ContentLength"], "etag": head["ETag"]}
    assert marker["last"] is True
    # a rerun of a finished job: every marker matches and says its file ends there, so no
    # input is read (HEADs for the fingerprints only) and the model is not loaded
    again = mlmjob(
        "infer",
        "-c",
        cfg,
        "--set",
        f"infer.model={s3_prefix}/model",
        env=s3_proxy.env(),
        check=True,
    )
    assert "3 part(s) already committed" in again.stderr
    assert [path for method, path in s3_proxy.counts if method == "GET" and "/in/" in path] == []
    assert not any("/model/" in path for _, path in s3_proxy.counts)


def test_missing_inputs_and_model_fail_with_one_line(synthetic, tmp_path, model_dir):
    cfg = config(synthetic, tmp_path, model_dir, [tmp_path / "nothing-*.txt"])
    proc = mlmjob("infer", "-c", cfg)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"mlmjob: error: infer.inputs[0]: '{tmp_path}/nothing-*.txt' matches no file"
    )
    cfg = config(synthetic, tmp_path, model_dir, make_inputs(tmp_path / "in", files=1, lines=2))
    proc = mlmjob("infer", "-c", cfg, "--set", f"infer.model={tmp_path}/no-model")
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith(f"mlmjob: error: infer.model: cannot load '{tmp_path}/no-model'")
    )
    cut = tmp_path / "in" / "cut.txt.gz"  # a gzip that ends early: found mid-stream
    cut.write_bytes(gzip.compress(b"The <mask> is blue.\n" * 5000)[:-20])
    proc = mlmjob("infer", "-c", config(synthetic, tmp_path, model_dir, [cut]))
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith(
            f"mlmjob: error: {cut}: cannot read: truncated gzip: the compressed data ends at byte "
        )
    )
    assert not list((tmp_path / "out").glob("*"))  # nothing of the broken part is visible


def write_lines(path: Path, n: int, tag: str) -> None:
    path.write_text("".join(f"{tag} line {i}: the <mask> is bright.\n" for i in range(n)))


def test_parts_follow_inputs_added_removed_and_changed(synthetic, tmp_path, model_dir):
    """A part is keyed by its input (URI + fingerprint), not by its place in the list."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for name, n in [("b", 5), ("c", 6), ("d", 7)]:
        write_lines(src / f"{name}.txt", n, name)
    cfg = config(synthetic, tmp_path, model_dir, [src / "*.txt"])
    mlmjob("infer", "-c", cfg, check=True)
    b_part = out / f"{part_stem(src / 'b.txt')}.jsonl"
    b_mtime = b_part.stat().st_mtime_ns

    write_lines(src / "a.txt", 3, "a")  # added: sorts first, shifting every position
    (src / "d.txt").unlink()  # removed
    write_lines(src / "c.txt", 9, "c2")  # changed
    # two workers: b moves from worker 0 to worker 1, which must find it committed
    runs = [
        mlmjob("infer", "-c", cfg, "--worker-index", i, "--num-workers", 2, check=True)
        for i in (1, 0)
    ]
    assert "worker 1: 1 part(s) already committed" in runs[0].stderr

    records = read_parts(out)
    lines = Counter(r["file"] for r in records)
    assert lines == {str(src / "a.txt"): 3, str(src / "b.txt"): 5, str(src / "c.txt"): 9}
    assert len({(r["file"], r["line"]) for r in records}) == len(records)  # none twice
    assert all(
        r["masks"][0][0]["sequence"].startswith("c2 ")
        for r in records
        if r["file"] == str(src / "c.txt")
    )
    current = {part_stem(src / f"{x}.txt") for x in "abc"}
    assert {p.stem for p in out.glob("*.jsonl")} == {p.stem for p in out.glob("*.done")} == current
    markers = [json.loads(p.read_text()) for p in out.glob("*.done")]
    assert sorted(m["input"] for m in markers) == [str(src / f"{x}.txt") for x in "abc"]
    assert b_part.stat().st_mtime_ns == b_mtime  # unchanged and committed: not rewritten


def mixed_lines(n: int) -> list[str]:
    """n lines of varied lengths, some of them bad: batches and windows differ by the cut."""
    lines = []
    for i in range(n):
        if i % 17 == 5:
            lines.append("no mask here")
        elif i % 23 == 7:
            lines.append("")
        else:
            lines.append(f"Line {i}: the <mask> is " + "very " * (i % 9) + "bright tonight.")
    return lines


def assert_same_results(got: list[dict], want: list[dict]) -> None:
    """Equal line for line; scores up to float noise (the lines that share a padded batch
    depend on where parts and windows are cut)."""
    assert [(r["file"], r["line"], r.get("error")) for r in got] == [
        (r["file"], r["line"], r.get("error")) for r in want
    ]
    for g, w in zip(got, want, strict=True):
        for row_g, row_w in zip(g.get("masks", []), w.get("masks", []), strict=True):
            keys = ("token", "token_str", "sequence")
            assert [[c[k] for k in keys] for c in row_g] == [[c[k] for k in keys] for c in row_w]
            assert all(
                abs(a["score"] - b["score"]) < 1e-5 for a, b in zip(row_g, row_w, strict=True)
            )


def test_split_file_equals_the_unsplit_run(synthetic, tmp_path, model_dir):
    src = tmp_path / "in" / "big.txt.gz"  # gzip too: parts are cut from one decompressed stream
    src.parent.mkdir()
    src.write_bytes(gzip.compress(("\n".join(mixed_lines(95)) + "\n").encode()))
    whole, split = tmp_path / "whole", tmp_path / "split"
    cfg = config(synthetic, tmp_path, model_dir, [src], out=whole, name="whole.yaml")
    # batch_size 2: windows of 64 lines, so the unsplit part is written in two of them
    mlmjob("infer", "-c", cfg, "--set", "infer.batch_size=2", check=True)
    cfg = config(synthetic, tmp_path, model_dir, [src], out=split, name="split.yaml")
    proc = mlmjob("infer", "-c", cfg, "--set", "infer.lines_per_part=20", check=True)
    assert "infer: 5 parts written, 0 skipped, 95 lines" in proc.stderr
    stems = part_stems(src, 20, 5)
    assert sorted(p.name for p in split.iterdir()) == sorted(
        f"{stem}{ext}" for stem in stems for ext in (".done", ".jsonl")
    )
    assert [p.name for p in whole.iterdir() if p.suffix == ".done"] == [f"{part_stem(src)}.done"]
    assert_same_results(read_parts(split), read_parts(whole))
    assert [r["line"] for r in read_parts(split)] == list(range(1, 96))
    markers = [json.loads((split / f"{stem}.done").read_text()) for stem in stems]
    assert [(m["line_range"], m["lines"], m["last"]) for m in markers] == [
        ([1, 20], 20, False),
        ([21, 40], 20, False),
        ([41, 60], 20, False),
        ([61, 80], 20, False),
        ([81, 100], 15, True),
    ]


def test_two_workers_share_one_file_by_parts(synthetic, tmp_path, model_dir):
    (src,) = make_inputs(tmp_path / "in", files=1, lines=60)
    cfg = config(synthetic, tmp_path, model_dir, [src])
    out, cut, stems = tmp_path / "out", ["--set", "infer.lines_per_part=10"], part_stems(src, 10, 6)
    run = mlmjob("infer", "-c", cfg, *cut, "--worker-index", 1, "--num-workers", 2, check=True)
    assert "infer: 3 parts written, 0 skipped, 30 lines" in run.stderr
    assert sorted(p.name for p in out.glob("*.done")) == sorted(f"{s}.done" for s in stems[1::2])
    run = mlmjob("infer", "-c", cfg, *cut, "--worker-index", 0, "--num-workers", 2, check=True)
    assert "infer: 3 parts written, 0 skipped, 30 lines" in run.stderr
    assert sorted(p.name for p in out.glob("*.done")) == sorted(f"{s}.done" for s in stems)
    records = read_parts(out)  # every line exactly once, in input order
    assert [(r["file"], r["line"]) for r in records] == [(str(src), n) for n in range(1, 61)]


def test_killed_mid_file_resumes_inside_it(synthetic, tmp_path, model_dir):
    lines, per_part = 600, 60  # 10 parts of about a second each
    (src,) = make_inputs(tmp_path / "in", files=1, lines=lines)
    cfg = config(synthetic, tmp_path, model_dir, [src])
    out, cut, stems = (
        tmp_path / "out",
        ["--set", f"infer.lines_per_part={per_part}"],
        part_stems(src, per_part, 10),
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "job", "infer", "-c", str(cfg), *cut],
        cwd=ROOT,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while not (out / f"{stems[0]}.done").exists() and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = [p.stem for p in sorted(out.glob("*.done"), key=in_order)]
    n = len(done)
    assert 1 <= n < 10 and done == stems[:n]  # killed mid-file, its first parts committed
    committed = {p: p.stat().st_mtime_ns for s in stems[:n] for p in out.glob(f"{s}.*")}
    (out / f"{stems[n]}.jsonl").write_text('{"half": "written"}\n')  # killed mid-upload
    again = mlmjob("infer", "-c", cfg, *cut, check=True)
    assert f"{n} part(s) already committed" in again.stderr
    assert (
        f"infer: {10 - n} parts written, {n} skipped, {lines - per_part * n} lines" in again.stderr
    )
    assert {p: p.stat().st_mtime_ns for p in committed} == committed  # not rewritten
    records = read_parts(out)  # none lost, none twice, in input order
    assert [(r["file"], r["line"]) for r in records] == [(str(src), n) for n in range(1, lines + 1)]


def test_split_input_changed_then_cut_otherwise(synthetic, tmp_path, model_dir):
    src, out = tmp_path / "in.txt", tmp_path / "out"
    write_lines(src, 30, "v1")
    cfg = config(synthetic, tmp_path, model_dir, [src])
    mlmjob("infer", "-c", cfg, "--set", "infer.lines_per_part=10", check=True)
    write_lines(src, 15, "v2")  # changed and shorter: two parts now, not three
    proc = mlmjob("infer", "-c", cfg, "--set", "infer.lines_per_part=10", check=True)
    assert f"{src} changed since {part_stem(src, 1, 10)} was written: redoing it" in proc.stderr
    for ext in ("*.jsonl", "*.done"):
        assert sorted(p.stem for p in out.glob(ext)) == sorted(part_stems(src, 10, 2))
    records = read_parts(out)
    assert [r["line"] for r in records] == list(range(1, 16))
    assert all(r["masks"][0][0]["sequence"].startswith("v2 ") for r in records)
    mlmjob("infer", "-c", cfg, "--set", "infer.lines_per_part=4", check=True)  # the old cut goes
    for ext in ("*.jsonl", "*.done"):
        assert sorted(p.stem for p in out.glob(ext)) == sorted(part_stems(src, 4, 4))
    assert [r["line"] for r in read_parts(out)] == list(range(1, 16))


@pytest.mark.data
def test_too_long_line_counted_with_roberta_base(real_data, tmp_path):
    """roberta-base's tokenizer, on a small random RoBERTa with its vocabulary saved as
    distilroberta-base would be: 600 words make 603 tokens, over RoBERTa's 510."""
    from transformers import AutoTokenizer, RobertaConfig, RobertaForMaskedLM

    model_dir = tmp_path / "run" / "model"
    tok = AutoTokenizer.from_pretrained(real_data.tokenizer)
    config_ = RobertaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        pad_token_id=tok.pad_token_id,
    )
    RobertaForMaskedLM(config_).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    src = tmp_path / "lines.txt"
    src.write_text("word " * 600 + "<mask>\nThe Milky Way is a <mask> galaxy.\n")
    cfg = config(real_data, tmp_path, model_dir, [src])
    mlmjob("infer", "-c", cfg, "--set", "infer.precision=fp32", check=True)
    first, second = read_parts(tmp_path / "out")
    assert first["error"] == "603 tokens, the model takes at most 510"
    assert [len(row) for row in second["masks"]] == [3]


def test_bf16_runs_on_cpu(synthetic, tmp_path, model_dir):
    src = tmp_path / "lines.txt"
    src.write_text("\n".join(GOOD) + "\n")
    cfg = config(synthetic, tmp_path, model_dir, [src])
    proc = mlmjob("infer", "-c", cfg, "--set", "infer.precision=bf16", check=True)
    assert "precision bf16" in proc.stderr
    out = read_parts(tmp_path / "out")
    assert [(r["file"], r["line"]) for r in out] == [(str(src), n) for n in range(1, 6)]
    for line, record in zip(GOOD, out, strict=True):
        assert len(record["masks"]) == line.count("<mask>")
        for row in record["masks"]:
            assert [sorted(c) for c in row] == [["score", "sequence", "token", "token_str"]] * 3
            scores = [c["score"] for c in row]
            assert scores == sorted(scores, reverse=True) and 0 <= scores[-1] <= scores[0] <= 1


def test_bad_precision_is_refused_with_the_allowed_values(synthetic, tmp_path, model_dir):
    cfg = config(synthetic, tmp_path, model_dir, [tmp_path / "x.txt"])
    proc = mlmjob("infer", "-c", cfg, "--set", "infer.precision=fp16")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"mlmjob: error: {cfg}: key 'infer.precision' must be one of auto, bf16, fp32, got 'fp16'"
    )
