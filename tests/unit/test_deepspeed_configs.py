"""The shipped DeepSpeed configs, as DeepSpeed reads them."""

import json
import os
from pathlib import Path

import pytest
import torch

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs" / "deepspeed").glob("*.json"))


@pytest.mark.unit
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_bf16_gradients_accumulate_and_travel_in_fp32(path):
    """Under DeepSpeed accelerate runs no autocast: with bf16 on, gradients would be
    accumulated and reduce-scattered in bf16 unless these say otherwise (DDP's autocast
    keeps fp32 gradients and an fp32 all-reduce)."""
    # here, not at the top: collecting the suite (each xdist worker, `pytest -m unit`)
    # would import DeepSpeed; and as the job imports it, without mlflow (seconds)
    from job.train import accel

    accel._import_deepspeed()
    from deepspeed.runtime import config as ds_config
    from deepspeed.runtime.constants import DATA_TYPES, GRAD_ACCUM_DTYPE

    params = json.loads(path.read_text())
    assert ds_config.get_communication_data_type(params) == torch.float32
    assert params.get(DATA_TYPES, {}).get(GRAD_ACCUM_DTYPE) == "fp32"
    assert len(CONFIGS) == 3


@pytest.mark.unit
def test_a_cpu_deepspeed_run_does_not_build_the_shared_memory_all_reduce(monkeypatch):
    """DeepSpeed compiles its CPU shared-memory all-reduce (C++) when its comm starts: a
    minute of a fresh machine's first run, for an op only DeepSpeed inference uses."""
    from accelerate.utils import other

    from job.train import accel

    accel._import_deepspeed()  # as the job imports it (without mlflow), whichever test is first
    import deepspeed.ops
    from deepspeed.comm.torch import build_shm_op

    for name in ("DS_ACCELERATOR", "ACCELERATE_TORCH_DEVICE", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(name, raising=False)  # put back as they were afterwards
    monkeypatch.setenv("RANK", "0")  # as under a launcher: no process group of one here
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setattr(other, "is_deepspeed_available", other.is_deepspeed_available)
    ops = deepspeed.ops.__compatible_ops__
    monkeypatch.setitem(ops, "deepspeed_shm_comm", ops["deepspeed_shm_comm"])
    accel._environment("cpu", deepspeed=True)
    assert build_shm_op() is None


@pytest.mark.unit
def test_a_bad_deepspeed_json_is_refused_before_the_process_changes(tmp_path, monkeypatch):
    """The JSON is read first: a bad one exits 2 before this process is made rank 0 of a
    process group (accel._alone) or told to use DeepSpeed."""
    from accelerate.utils import other

    from job.config import load_config
    from job.errors import BadInput
    from job.launch import SINGLE_WORKER
    from job.train import accel

    # Absent, and put back as they were even should the test fail (set, then deleted, so
    # that monkeypatch undoes what the wrong order would set): what the old order set.
    accelerate = ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_TORCH_DEVICE", "DS_ACCELERATOR")
    for name in (*SINGLE_WORKER, "MASTER_PORT", *accelerate):
        monkeypatch.setenv(name, "x")
        monkeypatch.delenv(name)
    monkeypatch.setattr(other, "is_deepspeed_available", other.is_deepspeed_available)
    (tmp_path / "c.yaml").write_text(
        f"run: {{output: '{tmp_path}/run', device: cpu}}\n"
        f"data: {{sources: ['{tmp_path}/in.jsonl'], output: '{tmp_path}/data'}}\n"
        f"train: {{deepspeed: '{tmp_path}'}}\n"
    )
    cfg = load_config(tmp_path / "c.yaml")
    before = dict(os.environ)
    with pytest.raises(BadInput, match="is a folder, not a JSON file"):
        accel.build_accelerator(cfg)
    assert dict(os.environ) == before
