"""The pod launch script as Kubernetes runs it: two pods of an Indexed Job on loopback."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support.cli import mlmjob, wait_for
from support.data import ROOT
from support.once import shared_dir
from support.s3 import free_port
from support.training import COMPARABLE, assert_same_as, config, events, kill_all, launch_cmd

from job import launch as launcher
from job.launch import exit_code, torchrun_command

DEMO = [
    "-c",
    "configs/demo.yaml",
    "--set",
    "run.lease_ttl_seconds=10",  # a killed run's lease expires in seconds, not a minute
    "--set",
    "train.epochs=4",
    "--set",
    "train.log_every_steps=1",
    "--set",
    "train.per_device_batch_size=4",
    "--set",
    "train.warmup_steps=0",
]


def pod_env(index: int, cache, port: int) -> dict:
    """What the train Job's manifest gives pod `index` (MASTER_ADDR: pod 0's address)."""
    return {
        **os.environ,
        "JOB_COMPLETION_INDEX": str(index),
        "MLMJOB_NNODES": "2",
        "MLMJOB_NPROC_PER_NODE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "MLMJOB_RDZV_ID": "test-job",
        "MLMJOB_CACHE": str(cache),
        # torchrun sets OMP_NUM_THREADS=1 only for nodes of more than one process: pinned
        # here so that 2 one-process nodes and 1 two-process node use the same thread count
        # (another count sums in another order: the weights drift apart in the last digits)
        "OMP_NUM_THREADS": "1",
    }


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):

    def make(out: Path) -> None:
        mlmjob("preprocess", *DEMO, "--set", f"data.output={out}/data", check=True)

    return shared_dir(tmp_path_factory, "launch-demo-data", make) / "data"


def test_two_pods_train_as_one_job_like_two_local_processes(tmp_path, synthetic, data_dir, ddp2):
    """Two one-process pods of an Indexed Job train as one job, as one node of two processes
    does (conftest's ddp2: the same config, through the launcher on one node)."""
    cfg = config(synthetic, tmp_path, data_dir, run=tmp_path / "two-nodes")
    port = free_port()
    pods = [
        subprocess.Popen(
            launch_cmd(cfg, *COMPARABLE),
            cwd=ROOT,
            env=pod_env(i, tmp_path / f"node{i}", port),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in (0, 1)
    ]
    logs = [p.communicate(timeout=600)[0] for p in pods]
    assert [p.returncode for p in pods] == [0, 0], "\n".join(log[-2000:] for log in logs)
    assert any("training mlmjob: 2 processes" in log for log in logs)
    assert len(events(tmp_path / "two-nodes")) == 12
    assert_same_as(tmp_path / "two-nodes", ddp2)


def test_torchrun_command_from_the_pod_environment():
    env = {
        "JOB_COMPLETION_INDEX": "3",
        "MLMJOB_NNODES": "4",
        "MLMJOB_NPROC_PER_NODE": "8",
        "MASTER_ADDR": "mlmjob-train-0.mlmjob-train",
        "MASTER_PORT": "29500",
        "MLMJOB_RDZV_ID": "uid-1",
    }
    cmd = torchrun_command(["train", "-c", "/config/run.yaml"], env)
    assert cmd[1:] == [
        "-m",
        "torch.distributed.run",
        "--nproc-per-node=8",
        "--nnodes=4",
        "--node-rank=3",
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=mlmjob-train-0.mlmjob-train:29500",
        "--rdzv-id=uid-1",
        "--max-restarts=0",
        "-m",
        "job",
        "train",
        "-c",
        "/config/run.yaml",
    ]
    single = torchrun_command(["infer", "-c", "x.yaml"], {"MLMJOB_NPROC_PER_NODE": "2"})
    assert "--standalone" in single and "--nproc-per-node=2" in single


def test_one_worker_on_one_node_runs_without_torchrun():
    args = ["train", "-c", "c.yaml"]
    alone = launcher.worker_command(args, {"MLMJOB_NPROC_PER_NODE": "1"})
    assert alone == [sys.executable, "-m", "job", *args]
    for env in ({"MLMJOB_NPROC_PER_NODE": "2"}, {"MLMJOB_NNODES": "2"}):
        assert launcher.worker_command(args, env)[1:4] == ["-m", "job.launch", "torchrun"]
    pod = {"MASTER_ADDR": "mlmjob-train-0.mlmjob-train", "MASTER_PORT": "29500", "HOME": "/h"}
    assert launcher.single_worker_env(pod) == {
        "HOME": "/h",
        "RANK": "0",
        "LOCAL_RANK": "0",
        "GROUP_RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",  # no MASTER_PORT: the worker picks one (accel)
    }


def test_a_single_workers_exit_is_what_torchrun_would_make_of_it(tmp_path):
    def outcome(rc: int, *exits: tuple[int, list[str]]) -> tuple[int, list[str]]:
        folder = tmp_path / f"exits-{rc}-{len(exits)}"
        folder.mkdir()
        for code, lines in exits:
            (folder / "rank-0").write_text(json.dumps({"code": code, "lines": lines}))
        return launcher.single_outcome(rc, str(folder))

    assert outcome(0, (0, [])) == (0, [])
    preempted = ["mlmjob: preempted at step 7: checkpoint committed (s3://b/r); exit 3"]
    assert outcome(3, (3, preempted)) == (3, preempted)
    assert outcome(2, (2, [])) == (2, ["mlmjob: a worker exited 2 (bad input); exit 2"])
    assert outcome(-9) == (1, ["mlmjob: the worker was killed by SIGKILL; exit 1"])
    assert outcome(1) == (1, [])  # a crash: its traceback is the log's end
    assert outcome(-6, (0, [])) == (0, [launcher.DIED_AFTER_FINISHING])
    assert outcome(-40) == (1, ["mlmjob: the worker was killed by signal 40; exit 1"])


def test_exit_codes_survive_torchrun():
    assert exit_code(1, [2, 0]) == 2  # bad input on one rank: fail the Job
    assert exit_code(1, [3, 3]) == 3  # preempted after a checkpoint
    assert exit_code(0, [0, 0]) == 0
    assert exit_code(1, []) == 1  # a crash: retry


def test_bad_config_exits_2_through_the_launcher(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "job.launch",
            "train",
            "-c",
            "configs/demo.yaml",
            "--set",
            "train.epochz=1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "MLMJOB_NPROC_PER_NODE": "1"},
    )
    assert proc.returncode == 2
    assert "mlmjob: error: configs/demo.yaml: unknown key 'train.epochz'" in proc.stderr


def test_resume_from_an_epoch_end_checkpoint_matches_uninterrupted(tmp_path, demo_data):
    """Checkpoints only at epoch ends (7 steps of 4 blocks each): the resumed run starts
    the next epoch exactly as the uninterrupted one, evaluations included, none twice."""

    sets = [
        *DEMO,
        "--set",
        f"data.output={demo_data}",
        "--set",
        "train.epochs=3",
        "--set",
        "train.checkpoint_every_steps=1000",
        "--set",
        "train.eval_every_steps=null",
    ]
    env = {**os.environ, "MLMJOB_NPROC_PER_NODE": "1"}
    cmd = [sys.executable, "-m", "job.launch", "train", *sets]
    ref = mlmjob("train", *sets, "--set", f"run.output={tmp_path}/ref")  # in this process
    assert ref.returncode == 0, ref.stderr[-2000:]
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [*cmd, "--set", f"run.output={run}"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for(lambda: (run / "checkpoints" / "step-7" / "COMMITTED.json").exists())
    kill_all(proc)
    again = mlmjob("train", *sets, "--set", f"run.output={run}")  # in this process too
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming from" in again.stderr
    assert_same_as(run, tmp_path / "ref")
    import json

    evals = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals if e["event"] == "eval"] == [7, 14, 21]
