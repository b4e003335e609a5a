"""The accelerator (DDP or DeepSpeed, CPU or GPU) and preemption handling."""

from __future__ import annotations

import json
import os
import signal

from job import env, storage
from job.config import Config
from job.errors import BadInput
from job.log import log


def precision_of(cfg: Config) -> str:
    import torch

    p = cfg.train.precision
    return p if p != "auto" else ("bf16" if torch.cuda.is_available() else "fp32")


def build_accelerator(cfg: Config, universal: bool = False, tracking_dir=None):
    """`universal`: the DeepSpeed checkpoint to resume from is a universal one (written for
    another number of processes, converted by checkpoint.to_universal). `tracking_dir`:
    where file-based trackers (TensorBoard) write (job.train.tracking starts them)."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs, ProjectConfiguration

    t = cfg.train
    cuda = torch.cuda.is_available()
    precision = precision_of(cfg)
    if not cuda:
        # Also without train.deepspeed: accelerate imports the installed DeepSpeed when it
        # unwraps a model, and DeepSpeed's auto-detection then warns "Setting accelerator
        # to CPU" on every CPU-only run.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if t.deepspeed:
        os.environ.setdefault("ACCELERATE_USE_DEEPSPEED", "true")
    kwargs = {
        "mixed_precision": "bf16" if precision == "bf16" else "no",
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        # cpu=True would make accelerate skip DeepSpeed; on a CPU-only machine it picks the
        # CPU by itself (DS_ACCELERATOR=cpu, gloo below).
        "cpu": not cuda and not t.deepspeed,
    }
    if not cuda and (env.world_size() > 1 or t.deepspeed):
        # gloo: else DeepSpeed on CPU thinks each process is alone
        kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
    if tracking_dir is not None:
        kwargs["project_config"] = ProjectConfiguration(str(tracking_dir), str(tracking_dir))
    if t.deepspeed:
        ds = deepspeed_config(cfg, precision)
        kwargs["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=ds)
    return Accelerator(**kwargs), precision


def load_universal(accelerator) -> None:
    """Make the DeepSpeed engine that `prepare` builds read a universal checkpoint."""
    accelerator.state.deepspeed_plugin.deepspeed_config["checkpoint"] = {"load_universal": True}


def deepspeed_config(cfg: Config, precision: str) -> dict:
    t = cfg.train
    try:
        ds = json.loads(storage.read_text(t.deepspeed))
    except FileNotFoundError:
        raise BadInput(f"train.deepspeed: '{t.deepspeed}' does not exist") from None
    except json.JSONDecodeError as e:
        raise BadInput(f"{t.deepspeed}:{e.lineno}: invalid JSON: {e.msg}") from None
    ds["train_micro_batch_size_per_gpu"] = t.per_device_batch_size
    ds["gradient_accumulation_steps"] = t.gradient_accumulation_steps
    ds["train_batch_size"] = (
        t.per_device_batch_size * t.gradient_accumulation_steps * (env.world_size())
    )
    ds["gradient_clipping"] = t.max_grad_norm
    ds["bf16"] = {"enabled": precision == "bf16"}
    ds["zero_allow_untested_optimizer"] = True  # torch's (fused) AdamW as the client optimizer
    return ds


class Preemption:
    """SIGTERM sets a flag; ranks agree on it with an all-reduce (see `agreed`)."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum, frame):
        if not self.requested:
            log.warning("SIGTERM: finishing this step, then checkpointing")
        self.requested = True

    def agreed(self, accelerator) -> bool:
        import torch

        flag = torch.tensor([1.0 if self.requested else 0.0], device=accelerator.device)
        if accelerator.num_processes > 1:
            flag = accelerator.reduce(flag, reduction="sum")
        return bool(flag.item() > 0)
