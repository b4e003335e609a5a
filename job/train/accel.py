"""The accelerator (DDP or DeepSpeed, CPU or GPU) and preemption handling."""

from __future__ import annotations

import json
import os
import signal
import sys
from contextlib import contextmanager
from datetime import timedelta

from job import device as job_device
from job import env, storage
from job.config import Config
from job.errors import BadInput
from job.log import log
from job.train.dist import any_rank


def precision_of(cfg: Config, device: str) -> str:
    p = cfg.train.precision
    return p if p != "auto" else ("bf16" if device == "cuda" else "fp32")


def build_accelerator(cfg: Config, universal: bool = False, tracking_dir=None):
    """`universal`: the DeepSpeed checkpoint to resume from is a universal one (written for
    another number of processes, converted by checkpoint.to_universal). `tracking_dir`:
    where file-based trackers (TensorBoard) write (job.train.tracking starts them).
    `run.device: cuda` where CUDA cannot serve this node's processes exits 2 here."""
    from accelerate import Accelerator

    device = job_device.resolve(cfg.run.device)
    precision = precision_of(cfg, device)
    # A bad DeepSpeed JSON is bad input before anything changes this process: its
    # environment (rank 0 of a process group, see `_alone`) and DeepSpeed's import.
    ds = deepspeed_config(cfg, precision) if cfg.train.deepspeed else None
    _environment(device, ds is not None)
    return Accelerator(**accelerator_kwargs(cfg, device, precision, tracking_dir, ds)), precision


def _environment(device: str, deepspeed: bool) -> None:
    """What accelerate and DeepSpeed read from the environment to pick the device."""
    if device == "cpu":
        # Also without train.deepspeed, should anything import the installed DeepSpeed:
        # its auto-detection would pick a GPU beside (or warn "Setting accelerator to CPU"
        # on every CPU-only run).
        os.environ["DS_ACCELERATOR"] = "cpu"
        if deepspeed:  # accelerate(cpu=True) skips DeepSpeed: the device is named instead
            os.environ["ACCELERATE_TORCH_DEVICE"] = "cpu"
    if deepspeed:
        _import_deepspeed()  # after DS_ACCELERATOR: DeepSpeed picks its accelerator then
        if device == "cpu":
            _no_shm_comm()
        os.environ.setdefault("ACCELERATE_USE_DEEPSPEED", "true")
        if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
            _alone()
    if "RANK" in os.environ and "MASTER_PORT" not in os.environ:
        # job.launch's single worker, or `_alone`: its process group's store on a port picked
        # here, just before the group binds it (picked at launch, minutes of data wait and
        # downloads before, a connection of this process could have taken it)
        os.environ["MASTER_PORT"] = str(free_port())
    _deepspeed_visible(deepspeed)


def _import_deepspeed() -> None:
    """DeepSpeed, imported without mlflow. Its autotuner (`deepspeed --autotuning`, which
    this job never runs) imports mlflow whenever it is installed, only to log its trials:
    mlflow brings pandas, scipy and fastapi, about 3 s of every DeepSpeed process's
    start-up. A `None` in sys.modules makes that one import fail, as Python documents;
    removed right after, so that train.report_to's mlflow imports as ever."""
    if "deepspeed" in sys.modules or "mlflow" in sys.modules:
        return
    sys.modules["mlflow"] = None  # type: ignore[assignment]
    try:
        import deepspeed  # noqa: F401
    finally:
        del sys.modules["mlflow"]


def _no_shm_comm() -> None:
    """DeepSpeed's CPU backend compiles its shared-memory all-reduce (C++, through ninja)
    when its comm starts: about a minute of a fresh machine's or pod's first CPU run,
    which every DeepSpeed process of the run then waits for. Only DeepSpeed inference's
    all-reduce uses it; training's collectives go through gloo. So it is marked as not
    buildable (the probe's dict is cached in deepspeed.ops, which reads it at
    comm/torch.py `build_shm_op`): DeepSpeed then starts without it."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def _deepspeed_visible(visible: bool) -> None:
    """accelerate's unwrap (transformers' save_pretrained calls it too) imports DeepSpeed
    whenever it is installed, only to test for its engine, which no module can be without
    train.deepspeed: about 0.9 s of every run's start-up, mlflow with it. Without it, this
    process tells accelerate that DeepSpeed is not there (the flag is all it reads)."""
    from accelerate.utils import imports, other

    other.is_deepspeed_available = imports.is_deepspeed_available if visible else _no_deepspeed


def _no_deepspeed() -> bool:
    return False


def accelerator_kwargs(
    cfg: Config, device: str, precision: str, tracking_dir=None, ds: dict | None = None
) -> dict:
    """Accelerator(**these) for `device` ("cuda" or "cpu", job.device's answer); `ds`: the
    DeepSpeed settings (`deepspeed_config`), when already read."""
    from accelerate.utils import (
        DeepSpeedPlugin,
        DistributedDataParallelKwargs,
        ProjectConfiguration,
    )

    t = cfg.train
    # gloo on the CPU (else DeepSpeed on CPU thinks each process is alone), only where
    # there is a process group (a backend makes accelerate ask torch.distributed for the
    # world size); on CUDA accelerate picks NCCL itself
    grouped = env.world_size() > 1 or bool(t.deepspeed)
    backend = "gloo" if device == "cpu" and grouped else None
    kwargs = {
        "mixed_precision": "bf16" if precision == "bf16" else "no",
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        # cpu=True would make accelerate skip DeepSpeed (see _environment)
        "cpu": device == "cpu" and not t.deepspeed,
        "kwargs_handlers": [
            process_group_kwargs(backend, t.collective_timeout_seconds),
            # No module changes a buffer in training (no BatchNorm): DDP's default re-sends
            # every buffer from rank 0 before each forward for nothing. (DeepSpeed's engine
            # is not DDP: it ignores this.)
            DistributedDataParallelKwargs(broadcast_buffers=False),
        ],
    }
    if tracking_dir is not None:
        kwargs["project_config"] = ProjectConfiguration(str(tracking_dir), str(tracking_dir))
    if t.deepspeed:
        ds = ds or deepspeed_config(cfg, precision)
        kwargs["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=ds)
    return kwargs


def process_group_kwargs(backend: str | None, seconds: float):
    """The process group's backend (None: accelerate's choice) and the collective timeout,
    for every backend: torch.distributed.init_process_group (DDP) or, with DeepSpeed,
    deepspeed.comm.init_distributed, to which accelerate passes the same keywords."""
    from accelerate.utils import InitProcessGroupKwargs

    handler = InitProcessGroupKwargs(backend=backend, timeout=timedelta(seconds=seconds))
    # accelerate passes on only the fields that differ from InitProcessGroupKwargs()'s
    # (nccl, 600 s): a configured 600 s would be dropped, and gloo and DeepSpeed would
    # then wait their own 30 minutes. Always passed.
    kwargs = {**handler.to_kwargs(), "timeout": handler.timeout}
    handler.to_kwargs = lambda: dict(kwargs)
    return handler


def free_port() -> int:
    """A free loopback port, released at once: the process group binds it next."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alone() -> None:
    """Plain `mlmjob train` (no torchrun) with DeepSpeed: DeepSpeed needs a process group
    even for one process, so this process becomes rank 0 of 1 as job.launch's single
    worker does, its rendezvous on loopback (MASTER_ADDR/PORT from a pod's environment name
    another process's rendezvous; `_environment` picks the port)."""
    from job.launch import SINGLE_WORKER

    os.environ.pop("MASTER_PORT", None)
    os.environ.update(SINGLE_WORKER)
    log.info("DeepSpeed without a launcher: one process (rank 0 of 1, rendezvous on loopback)")


def load_universal(accelerator) -> None:
    """Make the DeepSpeed engine that `prepare` builds read a universal checkpoint."""
    accelerator.state.deepspeed_plugin.deepspeed_config["checkpoint"] = {"load_universal": True}


def deepspeed_config(cfg: Config, precision: str) -> dict:
    t = cfg.train
    try:
        ds = json.loads(storage.read_text(t.deepspeed))
    except FileNotFoundError:
        raise BadInput(f"train.deepspeed: '{t.deepspeed}' does not exist") from None
    except IsADirectoryError:
        raise BadInput(f"train.deepspeed: '{t.deepspeed}' is a folder, not a JSON file") from None
    except json.JSONDecodeError as e:
        raise BadInput(f"{t.deepspeed}:{e.lineno}: invalid JSON: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise BadInput(
            f"train.deepspeed: '{t.deepspeed}' is not UTF-8 text (byte offset {e.start})"
        ) from None
    if not isinstance(ds, dict):
        raise BadInput(
            f"train.deepspeed: '{t.deepspeed}' holds a JSON "
            f"{type(ds).__name__}, not an object of DeepSpeed settings"
        )
    ds["train_micro_batch_size_per_gpu"] = t.per_device_batch_size
    ds["gradient_accumulation_steps"] = t.gradient_accumulation_steps
    ds["train_batch_size"] = (
        t.per_device_batch_size * t.gradient_accumulation_steps * (env.world_size())
    )
    ds["gradient_clipping"] = t.max_grad_norm
    ds["bf16"] = {"enabled": precision == "bf16"}
    ds["zero_allow_untested_optimizer"] = True  # torch's (fused) AdamW as the client optimizer
    return ds


class Preempted(BaseException):
    """A SIGTERM while start-up waits for its input (Preemption.interruptible): nothing is
    written yet, so `mlmjob train` exits 3 at once. A BaseException, as KeyboardInterrupt
    is: no `except Exception` on the way swallows it."""


class Preemption:
    """SIGTERM sets a flag; ranks agree on it with an all-reduce (see `agreed`).

    One per process, installed (`install`) first thing in `mlmjob train`, before the data,
    model and accelerator are built: a SIGTERM during start-up is a preemption like any
    other (exit 3), not a kill (143). Training checks the flag at the end of start-up and
    every few steps; only while start-up waits for its input does it stop at once."""

    _installed: Preemption | None = None

    def __init__(self):
        self.requested = False
        self._interruptible = False
        signal.signal(signal.SIGTERM, self._handler)

    @classmethod
    def install(cls) -> Preemption:
        """This process's handler: installed by the first call, returned by the others (a
        SIGTERM received in between is kept)."""
        if cls._installed is None:
            cls._installed = cls()
        return cls._installed

    @contextmanager
    def interruptible(self):
        """While only waiting (nothing written, no other rank waiting for this one), a
        SIGTERM, now or before, raises Preempted."""
        self._interruptible = True
        try:
            if self.requested:
                raise Preempted
            yield
        finally:
            self._interruptible = False

    def _handler(self, signum, frame):
        if not self.requested:
            log.warning(
                "SIGTERM: stopping at the next safe point (a checkpoint once training runs)"
            )
        self.requested = True
        if self._interruptible:
            raise Preempted

    def agreed(self, accelerator) -> bool:
        """Collective: a SIGTERM on any rank stops every rank."""
        return any_rank(accelerator, self.requested)
