"""Checkpoints off the critical path (issue 20.7): a checkpoint blocks training only while
it is written to the node-local staging folder; its hashing and upload go on in the
background and it is committed once uploaded. Through an S3 proxy that takes uploads in
at 1.5 MB/s (a tiny run's checkpoint, about 2.8 MB, takes about 2 s), in front of SeaweedFS.
"""

import hashlib
import os
import re
import signal
import subprocess
import time

import pytest
from support.cli import wait_for
from support.data import ROOT
from support.training import assert_same_as, config, launch_cmd, train_here

from job import storage
from job.errors import TransientStorageError
from job.train import checkpoint
from job.train.upload import Upload

RATE = 1.5e6  # bytes/s into the store
# Three epochs of the tiny dataset (95 steps each), a checkpoint at each epoch's end: 95
# steps (4 s on an idle machine, several times that on a busy one) to hide an upload behind;
# an evaluation at each too (not every 12 steps: 24 evaluations, 40% of each run's CPU).
SETS = ("train.max_steps=285", "train.checkpoint_every_steps=95", "train.eval_every_steps=95")
COMMITTED = re.compile(
    r"checkpoint (\S+/step-(\d+)) committed ([\d.]+) s after its save began "
    r"\(hash and upload ([\d.]+) s\); training waited ([\d.]+) s of it"
)


def commits(log: str) -> dict[int, tuple[float, float, float]]:
    """step -> (total, upload, blocking) seconds, from the run's log lines."""
    return {int(m[2]): tuple(map(float, m.groups()[2:])) for m in COMMITTED.finditer(log)}


def uploading(run: str, step: int) -> bool:
    """Some file of checkpoint `step` is in the store, its COMMITTED.json not yet."""
    files = storage.list_files(checkpoint.step_uri(run, step))
    return bool(files) and not any(f.endswith(checkpoint.COMMIT) for f in files)


def preempted_while_uploading(cfg, run: str, proxy, log) -> int:
    """Train through the slow proxy; SIGTERM it while the step-190 checkpoint uploads (the
    step-95 one committed). Returns the step it stopped at, after checking it exits 3."""
    env = {**os.environ, "MLMJOB_NPROC_PER_NODE": "1", **proxy.env()}
    with open(log, "w") as err:
        proc = subprocess.Popen(
            launch_cmd(cfg, *SETS), cwd=ROOT, env=env, stderr=err, start_new_session=True
        )
    try:
        # the test's own storage calls go to the server, past the proxy and its limit
        wait_for(lambda: 95 in commits(log.read_text()), timeout=900, poll=0.2)
        wait_for(lambda: uploading(run, 190), timeout=600, poll=0.1)
        proc.send_signal(signal.SIGTERM)  # while step 190's upload runs: it must commit
        assert proc.wait(timeout=300) == 3, log.read_text()[-3000:]
    finally:
        proc.kill()
    return int(re.search(r"preempted at step (\d+): checkpoint committed", log.read_text())[1])


@pytest.mark.slow
def test_slow_upload_blocks_little_sigterm_commits_it_and_resume_matches(
    synthetic, tmp_path, data_dir, s3_proxy, s3_prefix
):
    reference = train_here(
        config(synthetic, tmp_path, data_dir, tmp_path / "ref", "ref.yaml"), *SETS
    )
    assert reference.returncode == 0, reference.stderr[-3000:]
    run = f"{s3_prefix}/run"
    cfg = config(synthetic, tmp_path, data_dir, run=run)
    s3_proxy.limit(RATE)
    stopped = preempted_while_uploading(cfg, run, s3_proxy, tmp_path / "first.log")
    text = (tmp_path / "first.log").read_text()
    total, upload, blocking = commits(text)[95]
    assert upload > 1.0 and total >= upload  # about 2.8 MB at RATE
    assert blocking < 0.25 * total, (blocking, total)
    assert 190 < stopped < 285
    # each committed, the one in flight at the SIGTERM too, then the preemption's own
    assert sorted(commits(text)) == [95, 190, stopped]
    assert f"checkpoint committed ({run}/checkpoints/step-{stopped})" in text
    assert [s for s, _ in checkpoint.committed(run)] == [stopped, 190]  # keep_checkpoints 2

    s3_proxy.limit(0)
    again = train_here(cfg, *SETS, env=s3_proxy.env())
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming from {run}/checkpoints/step-{stopped}" in again.stderr
    assert sorted(commits(again.stderr)) == [285]
    local = tmp_path / "downloaded"
    for name in ("metrics.jsonl", "model/model.safetensors"):
        storage.download_file(f"{run}/{name}", local / name)
    assert_same_as(local, tmp_path / "ref")


def test_a_failed_upload_is_raised_by_the_training_thread(tmp_path):
    """What the background thread met waits for the training thread: the node that failed
    raises it as its own, every other rank a TransientStorageError (exit 1)."""
    staged = tmp_path / "staging" / "step-6"
    staged.mkdir(parents=True)
    (staged / "model.safetensors").write_bytes(b"w" * 1000)
    blocked = tmp_path / "run" / "checkpoints" / "step-6"
    blocked.parent.mkdir(parents=True)
    blocked.write_text("a file where the checkpoint's folder goes")
    upload = Upload(6, str(blocked), started=0.0)
    upload.start(staged)
    upload.join()
    assert upload.failed and not upload.busy
    with pytest.raises(OSError) as raised:
        upload.raise_failure()
    assert raised.value is upload.error
    assert staged.exists()  # kept: nothing was uploaded
    other = Upload(6, str(blocked), started=0.0)  # another rank's view: no thread, no error
    with pytest.raises(TransientStorageError, match="upload failed on another node"):
        other.raise_failure()


def test_upload_lists_what_it_uploaded_and_frees_the_staging_folder(tmp_path):
    staged = tmp_path / "staging" / "step-6"
    (staged / "sub").mkdir(parents=True)
    (staged / "random_states_0.pkl").write_bytes(b"r" * 10)
    (staged / "sub" / "optimizer.bin").write_bytes(b"o" * 20)
    target = str(tmp_path / "run" / "checkpoints" / "step-6")
    abandoned = Upload(6, target, started=0.0)
    abandoned.cancel()  # the run failed: it stops before its next file
    abandoned.start(staged)
    abandoned.join()
    assert "upload abandoned" in str(abandoned.error) and not (tmp_path / "run").exists()
    upload = Upload(6, target, started=0.0)
    upload.start(staged)
    upload.join()
    assert upload.error is None and not staged.exists()
    assert upload.files == {
        "random_states_0.pkl": {"size": 10, "sha256": hashlib.sha256(b"r" * 10).hexdigest()},
        "sub/optimizer.bin": {"size": 20, "sha256": hashlib.sha256(b"o" * 20).hexdigest()},
    }
    assert (tmp_path / "run" / "checkpoints" / "step-6" / "sub" / "optimizer.bin").read_bytes() == (
        b"o" * 20
    )


def test_proxy_limit_holds_uploads_to_its_rate(s3_proxy, s3_prefix):
    storage.configure(endpoint_url=s3_proxy.endpoint)  # serve() points it back afterwards
    s3_proxy.limit(1e6)
    began = time.monotonic()
    storage.write_bytes(f"{s3_prefix}/x.bin", b"x" * 500_000)
    assert time.monotonic() - began >= 0.45  # 500 kB at 1 MB/s
    assert storage.read_bytes(f"{s3_prefix}/x.bin") == b"x" * 500_000
