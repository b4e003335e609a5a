"""Batch fill-mask against pipeline("fill-mask"), on a model saved by a training run."""

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ELI5, ROOT, TOKENIZER, mlmjob, write_config

from job import storage

CONFIG = """
run: {{output: '{run}'}}
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


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("model")
    cfg = write_config(tmp / "c.yaml", CONFIG.format(run=tmp / "run", eli5=ELI5, data=tmp / "data",
                                                     tok=TOKENIZER, inputs="[]", out=tmp / "o"))  # fmt: skip
    mlmjob("preprocess", "-c", cfg, check=True)
    mlmjob("train", "-c", cfg, check=True)
    return tmp / "run" / "model"


def config(tmp_path, model_dir, inputs, out=None, name="infer.yaml"):
    out = out or tmp_path / "out"
    text = CONFIG.format(run=model_dir.parent, eli5=ELI5, data=tmp_path / "data", tok=TOKENIZER,
                         inputs=json.dumps([str(i) for i in inputs]), out=out)  # fmt: skip
    return write_config(tmp_path / name, text)


def read_parts(out: Path) -> list[dict]:
    return [
        json.loads(line)
        for p in sorted(out.glob("part-*.jsonl"))
        for line in p.read_text().splitlines()
    ]


def test_results_equal_the_pipeline(tmp_path, model_dir):
    from transformers import pipeline

    too_long = "word " * 600 + "<mask>"
    lines = [*GOOD, "no mask here", "", too_long]
    src = tmp_path / "lines.txt"
    src.write_bytes("\n".join(lines).encode() + b"\n" + b"caf\xe9 <mask>\n")
    proc = mlmjob("infer", "-c", config(tmp_path, model_dir, [src]), check=True)
    assert "1 parts written, 0 skipped, 9 lines (4 errors)" in proc.stderr
    out = read_parts(tmp_path / "out")
    assert [(r["file"], r["line"]) for r in out] == [(str(src), n) for n in range(1, 10)]

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
        8: "603 tokens, the model takes at most 510",  # 512 positions, 2 reserved by RoBERTa
        9: "invalid UTF-8 at column 4",
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
    for i, src in enumerate(sorted(inputs)):
        part = [json.loads(x) for x in (out / f"part-{i}.jsonl").read_text().splitlines()]
        assert [(r["file"], r["line"]) for r in part] == [
            (str(src), n) for n in range(1, lines + 1)
        ]
        assert json.loads((out / f"part-{i}.done").read_text())["lines"] == lines


def test_interrupted_job_resumes_without_loss_or_repeats(tmp_path, model_dir):
    inputs = make_inputs(tmp_path / "in", lines=1500)
    out = tmp_path / "out"
    cfg = config(tmp_path, model_dir, [tmp_path / "in" / "*.txt"])
    proc = subprocess.Popen([sys.executable, "-m", "job", "infer", "-c", str(cfg)], cwd=ROOT,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 300
    while not (out / "part-0.done").exists() and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / "part-0.done").exists() and not (out / "part-2.done").exists()
    committed = (out / "part-0.jsonl").stat().st_mtime_ns
    (out / "part-1.jsonl").write_text('{"half": "written"}\n')  # a crash mid-part, uncommitted
    again = mlmjob("infer", "-c", cfg, check=True)
    assert "1 part(s) already committed" in again.stderr
    assert (out / "part-0.jsonl").stat().st_mtime_ns == committed
    assert_complete(out, inputs, 1500)


def test_workers_split_parts_deterministically(tmp_path, model_dir):
    inputs = make_inputs(tmp_path / "in", files=3, lines=20)
    cfg = config(tmp_path, model_dir, inputs)
    mlmjob("infer", "-c", cfg, "--worker-index", 1, "--num-workers", 2, check=True)
    assert sorted(p.name for p in (tmp_path / "out").glob("*.done")) == ["part-1.done"]
    mlmjob("infer", "-c", cfg, "--worker-index", 0, "--num-workers", 2, check=True)
    assert_complete(tmp_path / "out", inputs, 20)


def test_processes_per_node_through_the_launcher(tmp_path, model_dir):
    inputs = make_inputs(tmp_path / "in", files=3, lines=20)
    cfg = config(tmp_path, model_dir, inputs)
    env = {**os.environ, "MLMJOB_NPROC_PER_NODE": "2"}
    proc = subprocess.run([sys.executable, "-m", "job.launch", "infer", "-c", str(cfg)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "infer: 2 parts written" in proc.stderr  # rank 0 of 2 took parts 0 and 2 only
    assert_complete(tmp_path / "out", inputs, 20)


def test_end_to_end_through_s3(tmp_path, model_dir, s3_prefix):
    storage.configure()
    storage.upload_dir(model_dir, f"{s3_prefix}/model")
    for i, path in enumerate(make_inputs(tmp_path / "in", files=2, lines=10)):
        data = path.read_bytes()
        storage.write_bytes(f"{s3_prefix}/in/{path.name}.gz" if i else f"{s3_prefix}/in/{path.name}",
                            gzip.compress(data) if i else data)  # fmt: skip
    storage.write_bytes(f"{s3_prefix}/in/extra.jsonl",
                        b'{"text": "The <mask> is blue."}\n{"other": 1}\n')  # fmt: skip
    cfg = config(tmp_path, model_dir, [f"{s3_prefix}/in/*"], out=f"{s3_prefix}/out")
    mlmjob("infer", "-c", cfg, "--set", f"infer.model={s3_prefix}/model", check=True)
    files = storage.list_files(f"{s3_prefix}/out")
    assert sorted(f.rsplit("/", 1)[1] for f in files) == [
        "part-0.done",
        "part-0.jsonl",
        "part-1.done",
        "part-1.jsonl",
        "part-2.done",
        "part-2.jsonl",
    ]
    part0 = [json.loads(x) for x in storage.read_text(f"{s3_prefix}/out/part-0.jsonl").splitlines()]
    assert part0[0]["masks"][0][0]["sequence"].endswith(" is blue.")
    assert part0[1] == {"file": f"{s3_prefix}/in/extra.jsonl", "line": 2,
                        "error": "not a JSON object with a string 'text'"}  # fmt: skip
    assert len(storage.read_text(f"{s3_prefix}/out/part-2.jsonl").splitlines()) == 10


def test_missing_inputs_and_model_fail_with_one_line(tmp_path, model_dir):
    cfg = config(tmp_path, model_dir, [tmp_path / "nothing-*.txt"])
    proc = mlmjob("infer", "-c", cfg)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"mlmjob: error: infer.inputs[0]: '{tmp_path}/nothing-*.txt' matches no file"
    )
    cfg = config(tmp_path, model_dir, make_inputs(tmp_path / "in", files=1, lines=2))
    proc = mlmjob("infer", "-c", cfg, "--set", f"infer.model={tmp_path}/no-model")
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith(f"mlmjob: error: infer.model: cannot load '{tmp_path}/no-model'")
    )
