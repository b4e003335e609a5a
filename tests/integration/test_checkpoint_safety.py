"""A checkpoint file that needs more than tensors and plain data to unpickle is refused
before anything reads it (job.train.safe_load): exit 2, one line naming the file, and
nothing in it runs, even with its sha256 in COMMITTED.json recomputed (the checksum sits
in the same bucket, so whoever plants a payload can rewrite it too).

Before: DeepSpeed loaded `mp_rank_00_model_states.pt` (and the optimizer states, and
ds_to_universal its inputs) with weights_only=False, so a planted payload ran on resume and
the run went on (exit 0); a planted `random_states_0.pkl` of a DDP run was refused by
accelerate silently (an info line) and the run resumed without its RNG states."""

import hashlib
import json
import os
import pickle
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support.cli import mlmjob, write_config
from support.data import ROOT
from support.once import shared_dir
from support.training import train_here

from job.train import safe_load

SAMPLE = ROOT / "job" / "sample"
TINY = """
run:
  output: '{run}'
  lease_ttl_seconds: 10  # a killed run's lease expires in seconds, not a minute
  seed: 42
data:
  sources: ['{sample}/eli5-sample.jsonl']
  test_size: 0.2
  block_size: 64
  output: '{data}'
model:
  name_or_path: '{sample}/tokenizer'
  from_scratch: true
  config_overrides: {{hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2,
                     intermediate_size: 64, max_position_embeddings: 130, type_vocab_size: 1}}
train:
  max_steps: 2
  per_device_batch_size: 2
  learning_rate: 1.0e-3
  warmup_steps: 1
  eval_every_steps: 100
  checkpoint_every_steps: 2
  log_every_steps: 1
"""
ZERO2 = "train.deepspeed=configs/deepspeed/zero2.json"
MODEL_STATES = "pytorch_model/mp_rank_00_model_states.pt"
OPTIM_STATES = "pytorch_model/zero_pp_rank_0_mp_rank_00_optim_states.pt"
SYSTEM = f"{os.system.__module__}.{os.system.__name__}"  # posix.system


class Payload:
    """What a malicious writer plants: unpickling it runs a shell command (here, one that
    creates `marker`)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def plant(checkpoint: Path, rel: str, marker: Path) -> None:
    """Add a Payload to one file of a committed checkpoint, its other contents kept, and
    recompute its size and sha256 in COMMITTED.json, as an attacker with write access to
    the bucket would."""
    path = checkpoint / rel
    honest = torch.load(path, map_location="cpu", weights_only=False)  # the test's own file
    torch.save({**honest, "extra": Payload(marker)}, path)
    commit = checkpoint / "COMMITTED.json"
    listing = json.loads(commit.read_text())
    listing["files"][rel] = {
        "size": path.stat().st_size,
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
    }
    commit.write_text(json.dumps(listing))


# ---- direct: the allowlist and the switch that DeepSpeed's own loads obey ---------------


def deepspeed_here() -> None:
    """Before DeepSpeed is first imported in this process: on a machine without a GPU, the
    CPU accelerator, as build_accelerator chooses it (else DeepSpeed warns that it guessed)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def test_refusal_accepts_what_checkpoints_hold_and_names_a_payload(tmp_path):
    import numpy as np

    deepspeed_here()
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    ckpt = tmp_path / "step-2"
    (ckpt / "pytorch_model").mkdir(parents=True)
    np.random.seed(0)
    rng = {"numpy_random_seed": np.random.get_state(), "torch_manual_seed": torch.get_rng_state()}
    torch.save(rng, ckpt / "random_states_0.pkl")
    optim = {
        "zero_stage": ZeroStageEnum.gradients,
        "loss_scaler": LossScaler(1.0),
        "param_slice_mappings": [{"w": fragment_address(numel=4, start=0)}],
    }
    torch.save(optim, ckpt / OPTIM_STATES)
    assert safe_load.refusal(ckpt, "s3://b/run/checkpoints/step-2") is None

    marker = tmp_path / "PWNED"
    torch.save({"module": {}, "extra": Payload(marker)}, ckpt / MODEL_STATES)
    assert safe_load.refusal(ckpt, "s3://b/run/checkpoints/step-2") == (
        f"s3://b/run/checkpoints/step-2/{MODEL_STATES}: refused: it needs {SYSTEM}, which a "
        "checkpoint never holds; nothing in it was run"
    )
    assert not marker.exists()


def test_deepspeeds_weights_only_false_loads_are_made_safe(tmp_path):
    """DeepSpeed's checkpoint engine passes weights_only=False: outside `enforced` the
    payload runs (the test's payload is live), inside it is refused and nothing runs."""
    deepspeed_here()
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    engine = TorchCheckpointEngine()
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.pt"
    torch.save({"module": {}, "extra": Payload(marker)}, evil)
    with safe_load.enforced(), pytest.raises(pickle.UnpicklingError, match=SYSTEM):
        engine.load(str(evil), map_location="cpu")
    assert not marker.exists()
    assert safe_load.FORCE not in os.environ  # restored on the way out

    engine.load(str(evil), map_location="cpu")
    assert marker.exists()


# ---- end to end: a resumed run through the pod launch script -------------------------------


def config(tmp_path: Path, data_dir: Path, run: Path) -> Path:
    return write_config(tmp_path / "c.yaml", TINY.format(run=run, data=data_dir, sample=SAMPLE))


def launch(cfg: Path, *sets: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "job.launch", "train", "-c", str(cfg)]
    for s in sets:
        args += ["--set", s]
    env = {**os.environ, "MLMJOB_NPROC_PER_NODE": "1"}
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    def make(out: Path) -> None:
        mlmjob("preprocess", "-c", config(out, out, out / "unused"), check=True)

    return shared_dir(tmp_path_factory, "safety-data", make)


def trained(tmp_path_factory, data_dir, name: str, *sets) -> Path:
    """A finished 2-step run with its step-2 checkpoint, never to be modified."""

    def make(tmp: Path) -> None:  # honest runs: in this process unless DeepSpeed's
        proc = train_here(config(tmp, data_dir, tmp / "run"), *sets)
        assert proc.returncode == 0, proc.stderr[-3000:]

    return shared_dir(tmp_path_factory, name, make) / "run"


@pytest.fixture(scope="module")
def zero2_run(tmp_path_factory, data_dir):
    return trained(tmp_path_factory, data_dir, "safety-zero2", ZERO2)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, data_dir):
    return trained(tmp_path_factory, data_dir, "safety-ddp")


def resumable(run: Path, tmp_path: Path, data_dir: Path) -> tuple[Path, Path]:
    """A copy of a finished run that resumes from step-2 (up to step 4): (config, run)."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "summary.json").unlink()
    return config(tmp_path, data_dir, copy), copy


def assert_refused(proc, marker: Path, name: str) -> None:
    assert not marker.exists(), "the planted payload ran"
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("mlmjob: error:")]
    want = f"mlmjob: error: {name}: refused: it needs {SYSTEM}, which a checkpoint never holds; nothing in it was run"
    # the worker's line, repeated by the launcher as the log's last line
    assert set(errors) == {want}, proc.stderr[-3000:]
    assert proc.stderr.rstrip().splitlines()[-1] == want
    assert "resuming from" not in proc.stderr  # refused before anything read it


@pytest.mark.slow
def test_payload_planted_in_zero2_model_states_is_refused(zero2_run, tmp_path, data_dir):
    """Before: the payload ran (DeepSpeed's torch.load, weights_only=False) and the run
    resumed, exit 0."""
    cfg, run = resumable(zero2_run, tmp_path, data_dir)
    marker = tmp_path / "PWNED"
    plant(run / "checkpoints" / "step-2", MODEL_STATES, marker)
    proc = launch(cfg, ZERO2, "train.max_steps=4")
    assert_refused(proc, marker, f"{run}/checkpoints/step-2/{MODEL_STATES}")


@pytest.mark.slow
def test_honest_zero2_checkpoint_still_resumes(zero2_run, tmp_path, data_dir):
    cfg, run = resumable(zero2_run, tmp_path, data_dir)
    proc = launch(cfg, ZERO2, "train.max_steps=4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming from {run}/checkpoints/step-2" in proc.stderr
    assert json.loads((run / "summary.json").read_text())["global_step"] == 4


@pytest.mark.slow
def test_universal_conversion_never_unpickles_a_payload(zero2_run, tmp_path):
    """ds_to_universal loads every file with weights_only=False: in to_universal it may not
    (defence in depth: fetch refuses such a checkpoint before the conversion)."""
    deepspeed_here()
    from job.train import checkpoint

    local = tmp_path / "resume"
    shutil.copytree(zero2_run / "checkpoints" / "step-2", local)
    marker = tmp_path / "PWNED"
    plant(local, OPTIM_STATES, marker)
    with pytest.raises(pickle.UnpicklingError, match=SYSTEM):
        checkpoint.to_universal(local)
    assert not marker.exists()


@pytest.mark.slow
def test_payload_planted_in_ddp_random_states_is_refused(ddp_run, tmp_path, data_dir):
    """Before: accelerate refused it silently (an info line, "Could not load random
    states") and the run resumed without its RNG states, exit 0."""
    cfg, run = resumable(ddp_run, tmp_path, data_dir)
    marker = tmp_path / "PWNED"
    plant(run / "checkpoints" / "step-2", "random_states_0.pkl", marker)
    proc = launch(cfg, "train.max_steps=4")
    assert_refused(proc, marker, f"{run}/checkpoints/step-2/random_states_0.pkl")
