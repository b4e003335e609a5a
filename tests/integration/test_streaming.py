"""Preprocessing in bounded memory: every input format streamed, N workers equal to one,
broken inputs named with their position, a broken S3 connection resumed, Hub failures
as one line. Data is generated here (tmp_path); the tokenizer is the bundled demo one."""

from __future__ import annotations

import gzip
import io
import json
import random
import re
import socket
from pathlib import Path

import ijson
import numpy as np
import pytest
from support.cli import mlmjob, write_config
from support.data import DEMO_TOKENIZER
from support.s3 import S3Proxy, _ProxyHandler, serve

from job import storage
from job.data.files import _iter_json_array
from job.data.sources import SKIPPED, iter_records
from job.errors import BadInput, TransientStorageError
from job.storage import stream

WORDS = (
    "the light star water cell energy heat because atoms move faster when it is hot "
    "and so pressure rises while air cools down at night the sun gives off radiation"
)
N_RECORDS = 3500  # 4 chunks of 1,000: with 3 workers, worker 0 owns two
BAD_AT = (17, 1500, 2999)  # stream positions of malformed records (workers 0, 1, 2)


def eli5_records(n: int = N_RECORDS, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        texts = [
            " ".join(rng.choices(WORDS.split(), k=rng.randint(5, 60)))
            for _ in range(rng.randint(1, 4))
        ]
        if i in BAD_AT:
            texts = []  # "record has no answers"
        subreddit = ("explainlikeimfive", "askscience")[i % 2]
        out.append(
            {
                "q_id": f"q{i}",
                "title": f"why {i}?",
                "subreddit": subreddit,
                "answers": {"a_id": [f"a{i}-{k}" for k in range(len(texts))], "text": texts},
            }
        )
    return out


def write_input(folder: Path, fmt: str, records: list[dict]) -> Path:
    path = folder / f"eli5.{fmt}"
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), path, row_group_size=700)
        return path
    lines = [json.dumps(r).encode() for r in records]
    if fmt in ("json", "json.gz"):
        data = b"[\n" + b",\n".join(lines) + b"\n]\n"
    else:
        data = b"\n".join(lines) + b"\n"
    path.write_bytes(gzip.compress(data) if fmt.endswith(".gz") else data)
    return path


def config(tmp_path: Path, source: str, out: Path, extra: str = "") -> Path:
    bad = "" if "max_bad_fraction" in extra else "  max_bad_fraction: 0.01\n"  # no duplicate
    return write_config(
        tmp_path / f"c-{out.name}.yaml",
        f"data:\n  sources: [{source}]\n  output: '{out}'\n  shard_blocks: 50\n"
        f"{bad}{extra}model:\n  name_or_path: '{DEMO_TOKENIZER}'\n",
    )


def run_workers(cfg: Path, n: int, env: dict | None = None) -> None:
    for w in range(n):
        mlmjob(
            "preprocess", "-c", cfg, "--worker-index", w, "--num-workers", n, env=env, check=True
        )


def dataset(out: Path) -> tuple[Path, dict]:
    (manifest,) = out.glob("*/manifest.json")
    return manifest.parent, json.loads(manifest.read_text())


def files_of(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def one_error_line(proc) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("mlmjob: error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0].removeprefix("mlmjob: error: ")


@pytest.fixture(scope="module")
def records():
    return eli5_records()


@pytest.fixture(scope="module")
def one_worker_shards(tmp_path_factory, records):
    """The JSON lines file preprocessed by one worker: shards every format must reproduce."""
    tmp = tmp_path_factory.mktemp("ref")
    src = write_input(tmp, "jsonl", records)
    run_workers(config(tmp, f"'{src}'", tmp / "out"), 1)
    root, manifest = dataset(tmp / "out")
    return {k: v for k, v in files_of(root).items() if k.endswith(".npy")}, manifest


@pytest.mark.parametrize("fmt", ["jsonl", "jsonl.gz", "json.gz", "parquet"])
def test_formats_and_worker_counts_give_byte_identical_datasets(
    tmp_path, records, fmt, one_worker_shards
):
    src = write_input(tmp_path, fmt, records)
    outs = {}
    for n in (1, 3):
        outs[n] = tmp_path / f"out{n}"
        run_workers(config(tmp_path, f"'{src}'", outs[n], "  max_bad_fraction: 0.001\n"), n)
    (root1, manifest), (root3, _) = dataset(outs[1]), dataset(outs[3])
    assert root1.name == root3.name
    assert files_of(root1) == files_of(root3)  # manifest and shards, byte for byte
    origin = {"jsonl": "{src}:{line}", "parquet": "{src} record {i}"}.get(
        fmt.removesuffix(".gz"), "{src} record {i}"
    )
    assert manifest["malformed_records"] == 3
    assert manifest["malformed_examples"] == [
        origin.format(src=src, line=i + 1, i=i) + ": record has no answers" for i in BAD_AT
    ]
    assert manifest["splits"]["train"]["records"] + manifest["splits"]["test"]["records"] == 3497
    shards, reference = one_worker_shards
    assert {k: v for k, v in files_of(root1).items() if k.endswith(".npy")} == shards
    assert manifest["splits"] == reference["splits"]


def test_filters_and_max_records_with_three_workers(tmp_path, records):
    """A subreddit filter makes every worker decode every record; max_records cuts the
    stream; both give the one-worker dataset."""
    src = write_input(tmp_path, "jsonl.gz", records)
    extra = "  subreddits: [askscience]\n  max_records: 1700\n"
    outs = {n: tmp_path / f"out{n}" for n in (1, 3)}
    for n, out in outs.items():
        run_workers(config(tmp_path, f"'{src}'", out, extra), n)
    (root1, m1), (root3, _) = dataset(outs[1]), dataset(outs[3])
    assert files_of(root1) == files_of(root3)
    # askscience is every odd record: 1,700 of them, 2 malformed (17 and 2999)
    assert m1["malformed_records"] == 2
    assert m1["splits"]["train"]["records"] + m1["splits"]["test"]["records"] == 1698


def test_keep_skips_decoding_other_workers_records(tmp_path, monkeypatch):
    """A worker does not parse the JSON lines of other workers' chunks, and does not read
    a Parquet row group that holds none of its records."""
    from job.config import DataConfig

    path = tmp_path / "in.jsonl"
    lines = [json.dumps({"answers": {"text": [f"text {i}"]}}) for i in range(30)]
    lines[3] = "{not json"  # in a chunk this worker does not own: never parsed
    path.write_text("\n".join(lines) + "\n")
    cfg = DataConfig(sources=[str(path)])
    got = list(iter_records(cfg, keep=lambda j: 10 <= j < 20))
    assert len(got) == 30
    assert all(r is SKIPPED for r in got[:10] + got[20:])
    assert [r.text for r in got[10:20]] == [f"text {i}" for i in range(10, 20)]
    assert next(iter_records(cfg)).text == "text 0" and list(iter_records(cfg))[3].error

    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist([{"answers": {"text": [f"t{i}"]}, "other": i} for i in range(30)])
    pq.write_table(table, tmp_path / "in.parquet", row_group_size=10)
    read = []
    real = pq.ParquetFile.iter_batches

    def spy(self, *args, **kwargs):
        read.append((kwargs["row_groups"], kwargs["columns"]))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    cfg = DataConfig(sources=[str(tmp_path / "in.parquet")])
    got = list(iter_records(cfg, keep=lambda j: 12 <= j < 15))
    assert [r.text for r in got[12:15]] == ["t12", "t13", "t14"] and len(got) == 30
    assert read == [([1], ["answers"])]  # one row group, one column


# ---- broken files: one line, the file and the position ---------------------------------


@pytest.mark.parametrize("fmt", ["jsonl.gz", "json.gz"])  # json.gz: the error passes ijson
def test_truncated_gzip_names_the_file_and_position(tmp_path, records, fmt):
    src = write_input(tmp_path, fmt, records)
    data = src.read_bytes()
    src.write_bytes(data[: len(data) // 2])
    line = one_error_line(mlmjob("preprocess", "-c", config(tmp_path, f"'{src}'", tmp_path / "o")))
    assert line.startswith(
        f"{src}: cannot read: truncated gzip: the compressed data ends at "
        f"byte {len(data) // 2} without the end-of-stream marker (after "
    )
    assert not list((tmp_path / "o").glob("*/manifest.json"))


def test_json_array_cut_mid_record_names_the_file_and_position(tmp_path, records):
    # the words are yajl's: the C backend is the one installed (and the fast one)
    assert ijson.backend == "yajl2_c"
    src = write_input(tmp_path, "json.gz", records)
    text = gzip.decompress(src.read_bytes())
    cut = text[: text.index(b'"q_id": "q3200"') + 5]  # inside record 3200, past 1 MiB
    assert len(cut) > 1 << 20
    src.write_bytes(gzip.compress(cut))
    line = one_error_line(mlmjob("preprocess", "-c", config(tmp_path, f"'{src}'", tmp_path / "o")))
    assert line == (
        f"{src}: invalid JSON: parse error: premature EOF (detected at uncompressed byte "
        f"{len(cut)}, the end of the data; after 3200 records)"
    )


def test_invalid_utf8_deep_in_a_json_array(tmp_path, records):
    src = write_input(tmp_path, "json", records)
    data = bytearray(src.read_bytes())
    at = data.index(b"q3000")
    data[at] = 0xFF
    src.write_bytes(bytes(data))
    line = one_error_line(mlmjob("preprocess", "-c", config(tmp_path, f"'{src}'", tmp_path / "o")))
    found = re.fullmatch(
        rf"{re.escape(str(src))}: invalid JSON: lexical error: invalid bytes in "
        r"UTF8 string \(detected in bytes (\d+)-(\d+); after 3000 records\)",
        line,
    )
    assert found, line
    start, end = map(int, found.groups())
    assert start <= at < end and end - start <= 1 << 16  # the chunk ijson was parsing


class _Trickle(io.RawIOBase):
    """At most 3 bytes a read: chunk boundaries inside numbers, escapes, UTF-8 sequences."""

    def __init__(self, data: bytes):
        self._data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        return self._data.read(min(n, 3) if n >= 0 else 3)


def _arrays(rng: random.Random):
    """JSON arrays with what a chunk boundary can split: numbers, literals, escapes,
    multi-byte UTF-8, nesting, odd whitespace."""
    values = [
        0,
        -12,
        3.5e-7,
        123456789012,
        True,
        False,
        None,
        "",
        'a\\"b\n\u00e9\u4e2d\U0001f600',
        {"k": [1, {"x": "\\u"}]},
        [],
        {},
        [[[]]],
        "\t",
    ]
    for _ in range(40):
        items = [rng.choice(values) for _ in range(rng.randint(0, 30))]
        text = json.dumps(items, ensure_ascii=rng.random() < 0.5)
        yield text.replace(", ", rng.choice([",", ", ", " ,\n\t", ",\r\n"]))


_WHERE = r"detected (at byte \d+, the end of the data|in bytes \d+-\d+)"


def _read_array(blob: bytes, into: list) -> list:
    """The elements the reader yields, fed 3 bytes a read; appended to `into` as they come,
    so that a test sees those yielded before an error."""
    for _, raw in _iter_json_array("f", _Trickle(blob), lambda a: True, False):
        into.append(raw)
    return into


@pytest.mark.parametrize("backend", ["yajl2_c", "python"])  # python: where no C one is built
def test_json_array_reader_equals_json_loads_values_and_errors(monkeypatch, backend):
    """The streaming reader against json.loads on the whole text: the same values (and
    types: int, float, never Decimal), or, where json.loads fails, one BadInput line with
    the position and the count of the records read before it."""
    monkeypatch.setattr(ijson, "items", ijson.get_backend(backend).items)
    rng = random.Random(7)
    cases = errors = 0
    for text in _arrays(rng):
        data = text.encode()
        variants = [data, data[: rng.randint(0, len(data))], data + b" x", b" \n" + data]
        pos = rng.randint(0, max(len(data) - 1, 0))
        variants.append(data[:pos] + rng.choice([b",", b"]", b"}", b'"', b":"]) + data[pos:])
        for blob in variants:
            cases += 1
            if not blob.lstrip(b" \t\r\n").startswith(b"["):
                continue  # not an array: the JSON lines reader takes it
            try:
                want = json.loads(blob.decode("utf-8"))
            except ValueError:  # invalid JSON, or a cut inside a multi-byte character
                errors += 1
                got: list = []
                with pytest.raises(BadInput) as e:
                    _read_array(blob, got)
                line = str(e.value)
                pattern = rf"f: invalid JSON: [^\n]+ \({_WHERE}; after {len(got)} records\)"
                assert re.fullmatch(pattern, line), (blob, line)
                assert int(re.findall(r"\d+", line)[-2]) <= len(blob), (blob, line)
                continue
            got = _read_array(blob, [])
            assert got == want and [type(v) for v in got] == [type(v) for v in want], blob
    assert cases == 200 and errors > 20
    if backend != "yajl2_c":
        return
    bad = '[\n"\u00e9",'.encode() + b'"\xe9"]'
    with pytest.raises(BadInput) as e:
        _read_array(bad, [])
    assert str(e.value) == (
        "f: invalid JSON: lexical error: invalid bytes in UTF8 string (detected in bytes 9-11; "
        "after 1 records)"
    )


def test_json_array_keeps_the_records_order_and_skips_others(tmp_path):
    """Other workers' elements come as SKIPPED in their place (parsed, then dropped)."""
    from job.config import DataConfig

    path = tmp_path / "in.json"
    path.write_text(json.dumps([{"answers": {"text": [f"text {i}"]}} for i in range(30)]))
    got = list(iter_records(DataConfig(sources=[str(path)]), keep=lambda j: 10 <= j < 20))
    assert len(got) == 30 and all(r is SKIPPED for r in got[:10] + got[20:])
    assert [(r.origin, r.text) for r in got[10:20]] == [
        (f"{path} record {i}", f"text {i}") for i in range(10, 20)
    ]


# ---- a broken S3 connection --------------------------------------------------------------


class _CutBody:
    """The handler's output: the status line and headers pass, then only `limit` bytes of
    the body, and the connection is shut: the client sees a body cut mid-way."""

    def __init__(self, handler, limit: int):
        self.handler, self.wfile, self.limit, self.writes = handler, handler.wfile, limit, 0

    def write(self, data: bytes) -> int:
        self.writes += 1
        if self.writes == 1:
            return self.wfile.write(data)
        self.wfile.write(data[: self.limit])
        self.handler.close_connection = True
        self.handler.connection.shutdown(socket.SHUT_RDWR)
        return len(data)

    @property
    def closed(self) -> bool:
        return self.wfile.closed

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.wfile.close()


class _CuttingHandler(_ProxyHandler):
    def _forward(self) -> None:
        proxy = self.server.proxy
        limit = proxy.cut_for(self.command, self.path, self.headers.get("Range"))
        if limit is not None:
            self.wfile = _CutBody(self, limit)
        super()._forward()

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward  # the base binds its own


class CuttingProxy(S3Proxy):
    """conftest's S3Proxy, plus: `cut(path, *limits)` cuts the bodies of the next GETs of
    `path` after that many bytes; `ranges` lists the Range header of every GET of it."""

    def __init__(self, upstream: str):
        super().__init__(upstream)
        self.server.RequestHandlerClass = _CuttingHandler
        self._cuts: dict[str, list[int]] = {}
        self.ranges: list[str | None] = []

    def cut(self, path: str, *limits: int) -> None:
        with self._lock:
            self._cuts.setdefault(path, []).extend(limits)

    def cut_for(self, method: str, raw_path: str, range_header: str | None) -> int | None:
        from urllib.parse import unquote, urlsplit

        path = unquote(urlsplit(raw_path).path)
        with self._lock:
            if method != "GET" or path not in self._cuts:
                return None
            self.ranges.append(range_header)
            return self._cuts[path].pop(0) if self._cuts[path] else None


@pytest.fixture
def cutting_proxy(s3):
    yield from serve(CuttingProxy(s3.endpoint))


def test_open_read_resumes_a_cut_body_and_gives_up_after_retries(
    s3_prefix, cutting_proxy, monkeypatch
):
    data = np.random.default_rng(0).bytes(3 << 20)
    uri = f"{s3_prefix}/blob.bin"
    storage.configure()
    storage.write_bytes(uri, data)
    storage.configure(endpoint_url=cutting_proxy.endpoint)
    monkeypatch.setattr(stream.time, "sleep", lambda s: None)
    path = "/" + uri.removeprefix("s3://")
    cutting_proxy.cut(path, 100_000, 1_500_000, 0)
    with storage.open_read(uri) as f:
        assert f.read() == data
    ranges = cutting_proxy.ranges
    assert ranges[0] == "bytes=0-" and len(ranges) == 4  # three cuts, three resumptions
    starts = [int(r.removeprefix("bytes=").rstrip("-")) for r in ranges]
    assert starts == sorted(starts) and starts[-1] > 100_000
    with storage.open_read(uri) as f:  # seeking reopens at the new offset
        f.seek(2_000_000)
        assert f.read(10) == data[2_000_000:2_000_010]
    cutting_proxy.cut(path, *[0] * (stream._READ_RETRIES + 1))
    with (
        pytest.raises(TransientStorageError, match="connection broke 6 times at byte 0"),
        storage.open_read(uri) as f,
    ):
        f.read()


def test_preprocess_resumes_a_broken_s3_read(
    tmp_path, s3_prefix, cutting_proxy, records, one_worker_shards
):
    """A connection cut mid-body while reading an input: the read resumes where it broke
    and the dataset is the one an unbroken read gives."""
    src = write_input(tmp_path, "jsonl.gz", records)
    uri = f"{s3_prefix}/in/eli5.jsonl.gz"
    storage.configure()
    storage.upload_file(src, uri)
    cutting_proxy.cut("/" + uri.removeprefix("s3://"), 200_000, 5)
    out = tmp_path / "out"
    proc = mlmjob(
        "preprocess", "-c", config(tmp_path, f"'{uri}'", out), env=cutting_proxy.env(), check=True
    )
    assert proc.stderr.count("resuming there") == 2
    assert len(cutting_proxy.ranges) == 3 and cutting_proxy.ranges[0] == "bytes=0-"
    assert all(int(r.removeprefix("bytes=").rstrip("-")) > 0 for r in cutting_proxy.ranges[1:])
    root, manifest = dataset(out)
    shards, reference = one_worker_shards
    assert {k: v for k, v in files_of(root).items() if k.endswith(".npy")} == shards
    assert manifest["splits"] == reference["splits"]


def test_s3_parts_and_shards_with_three_workers(tmp_path, s3_prefix, records, one_worker_shards):
    """Parts go to S3 as .npy files (upload_file) and come back through the node cache."""
    src = write_input(tmp_path, "parquet", records)
    out = f"{s3_prefix}/data"
    cfg = config(tmp_path, f"'{src}'", tmp_path / "unused", f"  cache_dir: '{tmp_path}/cache'\n")
    for w in range(3):
        mlmjob(
            "preprocess",
            "-c",
            cfg,
            "--set",
            f"data.output={out}",
            "--worker-index",
            w,
            "--num-workers",
            3,
            check=True,
        )
    storage.configure()
    (manifest_uri,) = [u for u in storage.list_files(out) if u.endswith("manifest.json")]
    root = manifest_uri.rsplit("/", 1)[0]
    manifest = json.loads(storage.read_text(manifest_uri))
    shards, reference = one_worker_shards
    got = {
        u[len(root) + 1 :]: storage.read_bytes(u)
        for u in storage.list_files(root)
        if u.endswith(".npy")
    }
    assert got == shards and manifest["splits"] == reference["splits"]
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file() and "part" in p.name]


# ---- Hugging Face sources ----------------------------------------------------------------


def test_hf_builder_with_data_files_and_streaming(tmp_path, records, one_worker_shards):
    """`hf: json` + `data_files` (+ `streaming`) reads the same records as the file."""
    src = write_input(tmp_path, "jsonl", records)
    _, reference = one_worker_shards
    for streaming in ("false", "true"):
        out = tmp_path / f"out-{streaming}"
        source = f"{{hf: json, data_files: ['{src}'], split: train, streaming: {streaming}}}"
        run_workers(config(tmp_path, source, out), 1)
        _, manifest = dataset(out)
        assert manifest["splits"] == reference["splits"]
        assert (
            manifest["malformed_examples"][0] == "hf:json[train] record 17: record has no answers"
        )


def test_script_based_dataset_is_one_line(tmp_path):
    folder = tmp_path / "eli5_like"
    folder.mkdir()
    (folder / "eli5_like.py").write_text("import datasets\n")  # a loading script
    line = one_error_line(
        mlmjob(
            "preprocess",
            "-c",
            config(tmp_path, f"{{hf: '{folder}', split: train}}", tmp_path / "o"),
        )
    )
    assert line.startswith(
        f"data.sources[0]: hf:{folder} split 'train': it is a script-based "
        "dataset (Dataset scripts are no longer supported, but found "
        "eli5_like.py)"
    )
    assert "revision: refs/convert/parquet" in line


@pytest.mark.parametrize(
    "source, expected",
    [
        ("{hf: json, data_files: ['{src}'], split: test}", 'no such split (Unknown split "test"'),
        ("{hf: json, data_files: ['{tmp}/none*.jsonl'], split: train}", "no data files found"),
        ("{hf: owner/name, split: train}", "the Hub cannot be reached"),
        ("{uri: 'hf://datasets/owner/name/data/*.parquet'}", "the Hub cannot be reached"),
    ],
)
def test_hf_failures_are_one_line(tmp_path, source, expected):
    src = write_input(tmp_path, "jsonl", eli5_records(10))
    source = source.replace("{src}", str(src)).replace("{tmp}", str(tmp_path))
    proc = mlmjob(
        "preprocess", "-c", config(tmp_path, source, tmp_path / "o"), env={"HF_HUB_OFFLINE": "1"}
    )
    line = one_error_line(proc)
    assert line.startswith("data.sources[0]") and expected in line, line
