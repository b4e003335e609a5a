"""One writer per output, tried as a team meets it: two `mlmjob train` on one run.output, a
SIGKILLed launcher whose workers would go on beside a resubmitted run, two `mlmjob infer` on
one output, another job's parts and a user's file in infer.output, keys and manifest paths
that lead out of the cache. On a local folder and on the SeaweedFS server."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from support.cli import mlmjob, wait_for, write_config
from support.data import ROOT
from support.once import shared_dir

from job import storage
from job.train import checkpoint

pytestmark = pytest.mark.slow

CONFIG = """
run: {{output: '{run}', lease_wait_seconds: {wait}, lease_ttl_seconds: {ttl}}}
data: {{sources: ['{eli5}'], output: '{data}', max_records: 300}}
model:
  name_or_path: '{tok}'
  from_scratch: true
  config_overrides: {{hidden_size: 64, num_hidden_layers: 2, num_attention_heads: 2,
                     intermediate_size: 128}}
train:
  max_steps: {steps}
  per_device_batch_size: 4
  learning_rate: 1.0e-3
  checkpoint_every_steps: 10
  keep_checkpoints: 2
  log_every_steps: 1
infer: {{inputs: {inputs}, output: '{out}', batch_size: 16, lines_per_part: 50}}
"""


def config(
    tmp_path: Path,
    synthetic,
    data,
    run,
    name="c.yaml",
    wait=2,
    ttl=30,
    steps=60,
    inputs=(),
    out=None,
) -> Path:
    text = CONFIG.format(
        run=run,
        wait=wait,
        ttl=ttl,
        eli5=synthetic.eli5,
        data=data,
        tok=synthetic.tokenizer,
        steps=steps,
        inputs=json.dumps([str(i) for i in inputs]),
        out=out or tmp_path / "out",
    )
    return write_config(tmp_path / name, text)


@pytest.fixture(scope="module")
def data(tmp_path_factory, synthetic):

    def make(tmp: Path) -> None:
        mlmjob("preprocess", "-c", config(tmp, synthetic, tmp / "data", "unused"), check=True)

    return shared_dir(tmp_path_factory, "one-writer-data", make) / "data"


def start(*args, launcher=False):
    module = "job.launch" if launcher else "job"
    env = {**os.environ, "MLMJOB_NPROC_PER_NODE": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", module, *map(str, args)],
        cwd=ROOT,
        env=env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def events(run: str) -> list[dict]:
    try:
        text = storage.read_text(storage.join(run, "metrics.jsonl"))
    except FileNotFoundError:
        return []
    return [e for e in map(json.loads, text.splitlines()) if e["event"] == "train"]


def assert_each_step_once(run: str, steps: int) -> None:
    assert [e["step"] for e in events(run)] == list(range(1, steps + 1))
    found = checkpoint.committed(run)
    assert [s for s, _ in found] == [steps, steps - 10]  # keep_checkpoints 2, both intact
    summary = json.loads(storage.read_text(storage.join(run, "summary.json")))
    assert summary["global_step"] == steps


@pytest.mark.parametrize("where", ["local", "s3"])
def test_second_train_on_a_run_output_is_refused_naming_the_holder(
    where, synthetic, data, tmp_path, request
):
    run = str(tmp_path / "run") if where == "local" else request.getfixturevalue("s3_prefix")
    cfg = config(tmp_path, synthetic, data, run)
    first = start("train", "-c", cfg)
    wait_for(lambda: storage.exists(storage.join(run, "_lease.json")))
    second = mlmjob("train", "-c", cfg)
    assert second.returncode == 2, second.stderr[-3000:]
    errors = [x for x in second.stderr.splitlines() if x.startswith("mlmjob: error:")]
    assert errors == [
        f"mlmjob: error: {run} (run.output): another writer holds it (host "
        + errors[0].split("(host ", 1)[1]
    ]
    assert f"pid {first.pid}," in errors[0] and "last renewed" in errors[0]
    assert "waited 2 s (run.lease_wait_seconds)" in errors[0]
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    assert_each_step_once(run, 60)


def test_sigkilled_launchers_workers_stop_and_the_resubmission_takes_over(
    synthetic, data, tmp_path
):
    run = tmp_path / "run"
    cfg = config(tmp_path, synthetic, data, run, wait=120, ttl=4)
    first = start("train", "-c", cfg, launcher=True)
    step_10 = run / "checkpoints" / "step-10" / "COMMITTED.json"
    wait_for(lambda: len(events(str(run))) >= 12 and step_10.exists())
    (worker,) = psutil.Process(first.pid).children(recursive=True)  # one: no torchrun
    os.kill(first.pid, signal.SIGKILL)  # the launcher alone: its worker lives on, orphaned
    first.wait()
    gone, alive = psutil.wait_procs([worker], timeout=15)
    assert not alive, "the worker outlived its launcher"
    second = start("train", "-c", cfg, launcher=True)
    _, err = second.communicate(timeout=600)
    assert second.returncode == 0, err[-3000:]
    assert "took over an expired lease" in err
    assert "resuming from" in err
    assert_each_step_once(str(run), 60)


def test_holder_that_lost_its_lease_commits_nothing(synthetic, data, tmp_path):
    """A holder that stalled past its TTL (here: SIGSTOP) and was taken over stops at its
    next commit with exit 1; the new holder's files are untouched."""
    run = tmp_path / "run"
    cfg = config(tmp_path, synthetic, data, run, ttl=2, steps=400)
    first = start("train", "-c", cfg)
    wait_for(lambda: len(events(str(run))) >= 3)
    stop_outside_its_folder_lock(first.pid, run)
    time.sleep(3)  # past its TTL: the lease is up for takeover
    taker = lease_taken(str(run))
    os.kill(first.pid, signal.SIGCONT)
    _, err = first.communicate(timeout=600)
    assert first.returncode == 1, err[-3000:]
    assert "no longer holds its lease" in err
    assert storage.read_text(storage.join(str(run), "_lease.json")) == taker
    assert not storage.exists(storage.join(str(run), "summary.json"))


def stop_outside_its_folder_lock(pid: int, folder: Path) -> None:
    """SIGSTOP, but not inside the few milliseconds a lease renewal holds the run folder's
    flock (a stopped holder would keep it, and the taker would wait for the lock instead
    of the TTL): resumed and stopped again until /proc/locks shows it no lock on the folder."""
    inode = f":{os.stat(folder).st_ino} "
    for _ in range(100):
        os.kill(pid, signal.SIGSTOP)
        time.sleep(0.05)  # the stop takes effect
        locks = Path("/proc/locks").read_text().splitlines()
        if not any(f" {pid} " in line and inode in line for line in locks):
            return
        os.kill(pid, signal.SIGCONT)
        time.sleep(0.01)
    raise AssertionError(f"process {pid} kept a file lock in 100 tries")


def lease_taken(output: str) -> str:
    from job import lease

    mine = lease.Lease(output, ttl=600)
    mine.acquire(30, "run.output")
    return storage.read_text(mine.uri)


@pytest.fixture(scope="module")
def model(tmp_path_factory, synthetic, data):

    def make(tmp: Path) -> None:
        mlmjob("train", "-c", config(tmp, synthetic, data, tmp / "run", steps=4), check=True)

    return shared_dir(tmp_path_factory, "one-writer-model", make) / "run"


def write_lines(path: Path, n: int, word: str) -> Path:
    path.write_text("".join(f"{word} {i}: the <mask> is bright.\n" for i in range(n)))
    return path


@pytest.mark.parametrize("where", ["local", "s3"])
def test_second_infer_on_an_output_is_refused(where, synthetic, data, model, tmp_path, request):
    out = str(tmp_path / "out") if where == "local" else request.getfixturevalue("s3_prefix")
    src = write_lines(tmp_path / "a.txt", 2000, "a")
    cfg = config(tmp_path, synthetic, data, model, inputs=[src], out=out)
    first = start("infer", "-c", cfg)
    wait_for(lambda: storage.exists(storage.join(out, "_lease-worker-0.json")))
    second = mlmjob("infer", "-c", cfg)
    assert second.returncode == 2, second.stderr[-3000:]
    assert f"{out} (infer.output, worker 0): another writer holds it (host " in second.stderr
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    parts = [n for n in storage.list_names(out) if n.endswith(".jsonl")]
    lines = [
        json.loads(x) for p in parts for x in storage.read_text(storage.join(out, p)).splitlines()
    ]  # noqa: E501
    assert sorted(r["line"] for r in lines) == list(range(1, 2001))


def test_other_jobs_parts_and_user_files_survive(synthetic, data, model, tmp_path):
    out = tmp_path / "out"
    a = write_lines(tmp_path / "a.txt", 120, "a")
    b = write_lines(tmp_path / "b.txt", 30, "b")
    mlmjob("infer", "-c", config(tmp_path, synthetic, data, model, inputs=[a], out=out), check=True)
    job_a = {p.name: p.read_bytes() for p in out.glob("part-*")}
    assert len(job_a) == 6  # 3 parts of 50 lines, each with its marker
    user = out / "part-00000-c000.jsonl"  # Spark's naming, in the same folder
    user.write_text('{"mine": true}\n')
    cfg_b = config(tmp_path, synthetic, data, model, inputs=[b], out=out, name="b.yaml")
    mlmjob("infer", "-c", cfg_b, check=True)
    for name, content in job_a.items():
        assert (out / name).read_bytes() == content, f"{name} of the other job was touched"
    assert user.read_text() == '{"mine": true}\n'
    assert len(list(out.glob("part-b.txt-*.done"))) == 1
    # the same job with an input gone still tidies its own parts
    c = write_lines(tmp_path / "c.txt", 10, "c")
    src = tmp_path / "in"
    src.mkdir()
    a2, c2 = src / "a.txt", src / "c.txt"
    a2.write_bytes(a.read_bytes())
    c2.write_bytes(c.read_bytes())
    cfg_glob = config(
        tmp_path, synthetic, data, model, inputs=[src / "*.txt"], out=out, name="glob.yaml"
    )
    mlmjob("infer", "-c", cfg_glob, check=True)
    c2.unlink()
    mlmjob("infer", "-c", cfg_glob, check=True)
    assert not list(out.glob("part-c.txt-*"))
    assert len(list(out.glob("part-a.txt-*.done"))) == 6  # both jobs' a.txt parts
    assert user.exists()


def test_manifest_path_that_leads_out_is_refused(synthetic, data, tmp_path):
    copy = tmp_path / "data"
    import shutil

    shutil.copytree(data, copy)
    manifest = next(copy.glob("*/manifest.json"))
    doc = json.loads(manifest.read_text())
    doc["splits"]["train"]["shards"][0]["path"] = "../../../../tmp/evil.npy"
    manifest.write_text(json.dumps(doc))
    proc = mlmjob("train", "-c", config(tmp_path, synthetic, copy, tmp_path / "run"))
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [x for x in proc.stderr.splitlines() if x.startswith("mlmjob: error:")]
    assert errors == [
        f"mlmjob: error: {manifest}: splits.train shard path '../../../../tmp/evil.npy' leads "
        "outside the dataset folder; refused"
    ]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_workers_that_all_find_every_part_finalize_once(where, synthetic, tmp_path, request):
    """Four workers started together finish their parts at about the same time and all
    find every part there: one finalizes under the dataset's lease, the others wait for it
    and exit 0 (before: two finalized, and a third read a part the first had deleted)."""
    data = str(tmp_path / "data") if where == "local" else request.getfixturevalue("s3_prefix")
    cfg = config(tmp_path, synthetic, data, "unused", wait=120)
    procs = [
        start("preprocess", "-c", cfg, "--worker-index", i, "--num-workers", 4) for i in range(4)
    ]
    results = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err[-3000:]
        assert "Traceback" not in err
    finalizers = [err for _, err in results if "preprocess: " in err and " records (" in err]
    assert len(finalizers) == 1
    roots = {out.strip() for out, _ in results}
    assert len(roots) == 1
    root = roots.pop()
    assert storage.exists(storage.join(root, "manifest.json"))
    names = [u.rsplit("/", 1)[1] for u in storage.list_files(root)]
    assert not [n for n in names if n.startswith("_")], names  # no _work, no lease left
