"""One writer per output, tried as a team meets it: two `mlmjob train` on one run.output, a
SIGKILLed launcher whose workers would go on beside a resubmitted run, two `mlmjob
infer` on one output, another job's parts and a user's file in infer.output, keys and
manifest paths that lead out of the cache. The direct tests: no process, no server (the
others are in tests/integration/test_one_writer.py)."""

import fcntl
import os

import pytest

from job import storage
from job.errors import StorageError, TransientStorageError
from job.storage import transfer, versioned


@pytest.mark.unit
def test_keys_that_lead_out_of_the_cache_are_refused(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    with pytest.raises(StorageError, match=r"'test/models/m/\.\./\.\./\.\./\.\./tmp/x' leads out"):
        storage.to_local("s3://test/models/m/../../../../tmp/x", cache)
    # a listing that names a key with '..' below the folder asked for
    monkeypatch.setattr(transfer, "list_files", lambda uri: ["s3://test/m/../../../evil"])
    with pytest.raises(
        StorageError, match=r"s3://test/m/\.\./\.\./\.\./evil: '\.\./\.\./\.\./evil' leads outside"
    ):
        storage.download_dir("s3://test/m", tmp_path / "dest")
    assert not (tmp_path / "evil").exists() and not (tmp_path.parent / "evil").exists()


def test_a_folder_lock_held_past_its_deadline_is_a_transient_error(tmp_path, monkeypatch):
    """A process that hangs holding the folder's flock (stopped, frozen) makes the other
    writers fail after the deadline (exit 1, worth a retry) instead of waiting forever."""
    monkeypatch.setattr(versioned, "_LOCK_SECONDS", 0.2)
    holder = os.open(tmp_path, os.O_RDONLY)
    fcntl.flock(holder, fcntl.LOCK_EX)  # another open file: flock conflicts with it
    try:
        with pytest.raises(TransientStorageError, match=f"{tmp_path}: its lock has been held"):
            versioned.write_if(str(tmp_path / "_lease.json"), b"{}", None)
    finally:
        os.close(holder)
    assert versioned.write_if(str(tmp_path / "_lease.json"), b"{}", None) is not None
