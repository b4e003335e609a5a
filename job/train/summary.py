"""summary.json's figures: throughput, MFU, GPU-hours."""

from __future__ import annotations

from job.train.model import flops_per_token

# Dense bf16 peak per GPU (no sparsity), from the vendors' data sheets.
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10G": 125e12,
    "V100": 125e12,
}


def device_name(device) -> str:
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def peak_flops(name: str) -> float | None:
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def mfu(config, seq_len, mask_fraction, tokens_per_s, world, device) -> float | None:
    """Model FLOPs utilisation: the FLOPs the model needs (job.train.model.flops_per_token:
    what SparseMLM computes, not the full-head FLOPs) over the GPUs' dense bf16 peak."""

    peak = peak_flops(device_name(device))
    if peak is None:
        return None
    achieved = flops_per_token(config, seq_len, mask_fraction) * tokens_per_s
    return round(achieved / (peak * world), 4)
