"""The shipped DeepSpeed configs, as DeepSpeed reads them."""

import json
from pathlib import Path

import pytest
import torch
from deepspeed.runtime import config as ds_config
from deepspeed.runtime.constants import DATA_TYPES, GRAD_ACCUM_DTYPE

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs" / "deepspeed").glob("*.json"))


@pytest.mark.unit
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_bf16_gradients_accumulate_and_travel_in_fp32(path):
    """Under DeepSpeed accelerate runs no autocast: with bf16 on, gradients would be
    accumulated and reduce-scattered in bf16 unless these say otherwise (DDP's autocast
    keeps fp32 gradients and an fp32 all-reduce)."""
    params = json.loads(path.read_text())
    assert ds_config.get_communication_data_type(params) == torch.float32
    assert params.get(DATA_TYPES, {}).get(GRAD_ACCUM_DTYPE) == "fp32"
    assert len(CONFIGS) == 3
