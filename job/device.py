"""The one place that decides the torch device (`run.device`) and checks CUDA.

`auto` is today's rule: the GPUs when CUDA is usable, else the CPU. `cuda` refuses to run
(BadInput: exit 2, one line) when no CUDA device is usable or fewer are visible than this
node runs processes: without it a pod that holds GPUs it cannot use (a driver older than
the wheel's CUDA needs, a device plugin that mounted none) trains on its CPU without a
word. `cpu` is the CPU even beside a GPU. Training, `mlmjob evaluate` (job.train.accel),
inference (job.infer.fill_mask) and the pod launcher (job.launch) all ask here.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import warnings
from collections.abc import Mapping
from pathlib import Path

from job import env
from job.errors import BadInput

# What decides which GPUs a container sees: the CUDA runtime's mask, and the NVIDIA
# container runtime's (`void` or unset where the device plugin gave none).
VISIBLE_VARS = ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES")


def problem(
    visible: int,
    nproc: int,
    cuda_version: str | None,
    driver: str | None,
    error: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> str | None:
    """Why `run.device: cuda` cannot run `nproc` processes on this node's `visible` CUDA
    devices, in one line naming what decides it; None when it can. `cuda_version` is
    torch.version.cuda (None: a CPU-only build), `driver` the NVIDIA driver's version
    (None: unknown), `error` torch's own reason when CUDA did not initialize."""
    nproc = max(1, nproc)
    if visible >= nproc:
        return None
    environ = os.environ if environ is None else environ
    facts = [", ".join(_shown(name, environ) for name in VISIBLE_VARS)]
    facts.append(f"torch built for CUDA {cuda_version}" if cuda_version else "torch without CUDA")
    facts.append(f"driver {driver}" if driver else "driver version unknown")
    if error:
        facts.append(f"torch: {error}")
    what = (
        "no CUDA device is usable" if visible == 0 else f"only {visible} CUDA device(s) are visible"
    )
    return (
        f"run.device: cuda, but {what} for {nproc} process(es) per node "
        f"({'; '.join(facts)}); run.device auto or cpu runs on the CPU"
    )


def _shown(name: str, environ: Mapping[str, str]) -> str:
    return f"{name}={environ[name]!r}" if name in environ else f"{name} unset"


def check(
    setting: str,
    visible: int,
    nproc: int,
    cuda_version: str | None = None,
    driver: str | None = None,
    error: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> str:
    """The device ("cuda" or "cpu") that `setting` picks on a node with `visible` usable
    CUDA devices for `nproc` processes; `cuda` that cannot be served raises BadInput."""
    if setting == "cpu":
        return "cpu"
    if setting == "auto":
        return "cuda" if visible else "cpu"
    line = problem(visible, nproc, cuda_version, driver, error, environ)
    if line:
        raise BadInput(line)
    return "cuda"


def resolve(setting: str, nproc: int | None = None) -> str:
    """This process's device for `run.device` = `setting`: "cuda" or "cpu". `nproc`: the
    processes this node runs (default: torchrun's LOCAL_WORLD_SIZE, else 1)."""
    if setting == "cpu":  # CUDA is not even asked: nothing initializes on a GPU
        return "cpu"
    import torch

    nproc = env.local_world_size() if nproc is None else nproc
    visible, error = _usable(setting == "cuda")
    short = setting == "cuda" and visible < max(1, nproc)
    driver = driver_version() if short else None  # a subprocess: only for the message
    return check(setting, visible, nproc, torch.version.cuda, driver, error)


def _usable(why: bool) -> tuple[int, str | None]:
    """The CUDA devices this process can use and, when there are none and `why` is set,
    torch's own reason (its first sentence: "The NVIDIA driver on your system is too old
    (found version 12020)", "Torch not compiled with CUDA enabled", ...)."""
    import torch

    with warnings.catch_warnings():
        # torch warns "CUDA initialization: ..." over several lines; the reason is kept
        # below, in the one line that names it
        warnings.simplefilter("ignore")
        if torch.cuda.is_available():
            return torch.cuda.device_count(), None
        if not why:
            return 0, None
        try:
            torch.cuda.init()
        except (AssertionError, RuntimeError) as e:
            return 0, " ".join(str(e).split()).split(". ")[0]
    return 0, None


def torch_device(setting: str) -> str:
    """The torch device string of this rank: `cuda:<local rank>` or `cpu`."""
    return f"cuda:{env.local_rank()}" if resolve(setting) == "cuda" else "cpu"


def driver_version() -> str | None:
    """The NVIDIA driver's version: nvidia-smi's when on PATH, else the kernel module's
    (/proc/driver/nvidia/version, visible in a container), else None."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run(
                [smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            )
        except (OSError, subprocess.TimeoutExpired):
            out = None
        if out is not None and out.returncode == 0 and out.stdout.strip():
            return out.stdout.split()[0]
    try:
        return kernel_module_version(Path("/proc/driver/nvidia/version").read_text())
    except OSError:
        return None


def kernel_module_version(text: str) -> str | None:
    """The version in /proc/driver/nvidia/version: `NVRM version: NVIDIA UNIX x86_64
    Kernel Module  535.104.05  ...` or, for the open modules, `... Open Kernel Module for
    x86_64  580.65.06  Release Build ...`."""
    m = re.search(r"Kernel Module(?: for \S+)?\s+(\d+\.\d+(?:\.\d+)?)", text)
    return m.group(1) if m else None
