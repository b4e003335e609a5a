"""run.device from the outside: `cuda` where no GPU is visible exits 2 in one line from
`mlmjob` (train, evaluate, infer) and from the pod launcher before any worker starts;
the GPU manifests set it; and the collective timeout and DDP's buffer setting as two
real gloo processes see them (DDP and DeepSpeed).

A usable CUDA device cannot be made here: the refusal is what a CPU-only machine shows
(the GPU-side rule is tested as a pure function in tests/unit/test_device.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from support.cli import mlmjob
from support.data import ROOT
from support.kubelet import Cluster, render
from support.training import config, launch

# The refusals run in processes that see no GPU on any machine (on a GPU machine too):
# CUDA_VISIBLE_DEVICES="" is how a pod without a usable device looks to CUDA.
NO_GPU = {"CUDA_VISIBLE_DEVICES": ""}

REFUSAL = "mlmjob: error: run.device: cuda, but no CUDA device is usable for {n} process(es)"


def assert_one_line_refusal(proc, nproc: int = 1) -> None:
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if "error" in ln.lower()]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert errors[0].startswith(REFUSAL.format(n=nproc)), errors[0]
    assert errors[0] == proc.stderr.splitlines()[-1]  # the last line: why it stopped
    assert "Traceback" not in proc.stderr


def test_train_refuses_cuda_without_a_gpu(synthetic, data_dir, tmp_path):
    cfg = config(synthetic, tmp_path, data_dir)
    proc = mlmjob("train", "-c", cfg, "--set", "run.device=cuda", env=NO_GPU)
    assert_one_line_refusal(proc)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_evaluate_and_infer_refuse_cuda_without_a_gpu(synthetic, data_dir, tmp_path):
    cfg = config(synthetic, tmp_path, data_dir)
    sets = ["--set", "run.device=cuda", "--set", f"infer.model={tmp_path}/no-model"]
    assert_one_line_refusal(mlmjob("evaluate", "-c", cfg, *sets, env=NO_GPU))
    infer = [
        "--set",
        f"infer.inputs=[{ROOT}/job/sample/fill-mask.txt]",
        "--set",
        f"infer.output={tmp_path}/infer",
    ]
    assert_one_line_refusal(mlmjob("infer", "-c", cfg, *sets, *infer, env=NO_GPU))


@pytest.mark.parametrize("command", ["train", "infer", "evaluate"])
def test_the_launcher_refuses_cuda_before_any_worker_starts(command, synthetic, tmp_path):
    cfg = config(synthetic, tmp_path, tmp_path / "no-data")
    args = [sys.executable, "-m", "job.launch", command, "-c", str(cfg)]
    env = {**os.environ, "MLMJOB_NPROC_PER_NODE": "4", **NO_GPU}
    proc = subprocess.run(
        [*args, "--set", "run.device=cuda"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert_one_line_refusal(proc, nproc=4)
    assert proc.stderr.count("\n") == 1  # nothing else: torchrun never started


def test_the_launcher_counts_one_process_by_default(synthetic, tmp_path):
    cfg = config(synthetic, tmp_path, tmp_path / "no-data")
    proc = launch(cfg, "run.device=cuda", nproc="", env=NO_GPU)  # MLMJOB_NPROC_PER_NODE empty
    assert_one_line_refusal(proc, nproc=1)


# ---- the manifests ------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", ["askscience-5k", "full-eli5"])
def test_the_gpu_stages_run_with_run_device_cuda(overlay):
    docs = render(ROOT / "k8s" / "overlays" / overlay)
    cluster = Cluster.of(docs, {}, {})
    sets = {}
    for js in [d for d in docs if d["kind"] == "JobSet"]:  # one per stage
        for rjob in js["spec"]["replicatedJobs"]:
            (pod, *_) = cluster.pods(js, rjob)  # args expanded as the kubelet does
            sets[rjob["name"]] = [a for a in pod.argv if a.startswith("run.device=")]
    assert sets == {
        "preflight": [],
        "preprocess": [],
        "train": ["run.device=cuda"],
        "infer": ["run.device=cuda"],
    }


# ---- two real processes -------------------------------------------------------------------

PROBE = """
import importlib.util, json, sys
import torch
from torch.distributed.distributed_c10d import _get_default_group
from job.config import Config
from job.train.accel import build_accelerator

cfg = Config.model_validate(json.loads(sys.argv[1]))
acc, _ = build_accelerator(cfg)
group = _get_default_group()._get_backend(torch.device("cpu"))
seen = {
    "world": acc.num_processes,
    "backend": torch.distributed.get_backend(),
    "timeout": group.options._timeout.total_seconds(),
}
if not cfg.train.deepspeed:
    seen["broadcast_buffers"] = acc.prepare_model(torch.nn.Linear(2, 2)).broadcast_buffers
# DeepSpeed only where named, mlflow (which DeepSpeed's autotuner imports) not at all, and
# still importable (no None left in sys.modules)
seen["imported"] = sorted({"deepspeed", "mlflow"} & set(sys.modules))
seen["mlflow_importable"] = importlib.util.find_spec("mlflow") is not None
# one write of the whole line (a pipe takes it whole): print() writes the line and its end
# apart, and the two workers' lines interleaved
sys.stdout.write("PROBE " + json.dumps(seen) + "\\n")
sys.stdout.flush()
"""


@pytest.mark.parametrize("deepspeed", [None, "configs/deepspeed/zero1.json"])
def test_two_gloo_processes_get_the_collective_timeout(deepspeed, tmp_path):
    """What the process group of each of 2 torchrun workers was made with: the configured
    timeout (not gloo's or DeepSpeed's 30 minutes) and, for DDP, no buffer broadcasts."""
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    cfg = {"run": {"device": "cpu"}, "train": {"collective_timeout_seconds": 77}}
    cfg["train"]["deepspeed"] = deepspeed
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
        + [str(script), json.dumps(cfg)],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = [json.loads(ln[6:]) for ln in proc.stdout.splitlines() if ln.startswith("PROBE ")]
    want = {"world": 2, "backend": "gloo", "timeout": 77.0, "mlflow_importable": True}
    want["imported"] = ["deepspeed"] if deepspeed else []
    if not deepspeed:
        want["broadcast_buffers"] = False
    assert seen == [want, want]
