"""What `kubectl logs` of a train pod ends with (issue 18.4): the one line that says why it
stopped, not torchrun's report of a failed child, when the workers' exit explains it.
The direct tests: no process, no server (the others are in
tests/integration/test_launch_log.py)."""

import json

import pytest

from job.launch import explained, finished_cleanly, leave_exit, read_exits


@pytest.mark.unit
def test_the_lowest_rank_that_exited_with_the_pods_code_explains_it(tmp_path, monkeypatch):
    from job import launch

    for rank, code, lines in [
        (0, 0, []),
        (1, 3, ["mlmjob: preempted at step 6: ...; exit 3"]),
        (2, 3, ["mlmjob: preempted at step 6: (rank 2)"]),
        (3, 2, ["mlmjob: error: a", "mlmjob: error: b"]),
    ]:
        monkeypatch.setattr(launch, "_explanation", lines)
        leave_exit(str(tmp_path), rank, code)
    (tmp_path / "rank-4").write_text('{"code": 3, "li')  # torn: killed while writing
    exits = read_exits(str(tmp_path))
    assert sorted(exits) == [0, 1, 2, 3]
    assert json.loads((tmp_path / "rank-3").read_text())["lines"] == exits[3]["lines"]
    assert explained(exits, 2) == ["mlmjob: error: a", "mlmjob: error: b"]
    assert explained(exits, 3) == ["mlmjob: preempted at step 6: ...; exit 3"]
    assert explained(exits, 1) == [] and explained(exits, 0) == []  # torchrun's report stays
    no_line = {0: {"code": 3, "lines": []}}
    assert explained(no_line, 3) == ["mlmjob: a worker exited 3 (preempted); exit 3"]


def test_a_node_finished_cleanly_only_when_each_of_its_workers_reported_0():
    """A worker that died in teardown after reporting 0 leaves the pod at exit 0; a missing
    exit file (it died before its command ended) or any other code does not."""
    ok = {"code": 0, "lines": []}
    assert finished_cleanly({0: ok, 1: ok}, 2)
    assert not finished_cleanly({0: ok}, 2)  # rank 1 never reported: it died in its command
    assert not finished_cleanly({0: ok, 1: {"code": 3, "lines": ["preempted"]}}, 2)
    assert not finished_cleanly({0: ok, 1: {"code": 1, "lines": []}}, 2)
    assert not finished_cleanly({}, 1)
