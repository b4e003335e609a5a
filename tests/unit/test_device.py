"""run.device (job.device) and what the accelerator is built with (job.train.accel): the
CUDA check's rule and its one line, the collective timeout for every backend, DDP
without buffer broadcasts.

This machine has no GPU, and a usable CUDA device cannot be faked: `check` is the pure
rule (the device counts, versions and environment given to it), tested here for every
case; `resolve`, which feeds it this machine's real answers, is tested for what a
CPU-only machine gives. The usable-GPU path runs only on a GPU machine."""

from __future__ import annotations

import os
from datetime import timedelta

import pytest
import torch

from job import device
from job.config import Config
from job.errors import BadInput
from job.train import accel

POD = {"NVIDIA_VISIBLE_DEVICES": "all"}  # what a GPU pod's container runtime sets


def test_cuda_without_a_usable_device_is_one_line_naming_what_decides_it():
    with pytest.raises(BadInput) as e:
        device.check(
            "cuda",
            visible=0,
            nproc=4,
            cuda_version="13.0",
            driver="535.104.05",
            error="The NVIDIA driver on your system is too old (found version 12020)",
            environ=POD,
        )
    assert str(e.value) == (
        "run.device: cuda, but no CUDA device is usable for 4 process(es) per node "
        "(CUDA_VISIBLE_DEVICES unset, NVIDIA_VISIBLE_DEVICES='all'; torch built for CUDA "
        "13.0; driver 535.104.05; torch: The NVIDIA driver on your system is too old (found "
        "version 12020)); run.device auto or cpu runs on the CPU"
    )


def test_cuda_with_fewer_devices_than_processes():
    with pytest.raises(BadInput) as e:
        device.check(
            "cuda",
            visible=2,
            nproc=8,
            cuda_version="13.0",
            driver="580.65.06",
            environ={"CUDA_VISIBLE_DEVICES": "0,1", **POD},
        )
    assert str(e.value) == (
        "run.device: cuda, but only 2 CUDA device(s) are visible for 8 process(es) per node "
        "(CUDA_VISIBLE_DEVICES='0,1', NVIDIA_VISIBLE_DEVICES='all'; torch built for CUDA 13.0; "
        "driver 580.65.06); run.device auto or cpu runs on the CPU"
    )


def test_cuda_on_a_cpu_build_with_an_unknown_driver():
    line = device.problem(0, 1, None, None, environ={"NVIDIA_VISIBLE_DEVICES": "void"})
    assert line == (
        "run.device: cuda, but no CUDA device is usable for 1 process(es) per node "
        "(CUDA_VISIBLE_DEVICES unset, NVIDIA_VISIBLE_DEVICES='void'; torch without CUDA; "
        "driver version unknown); run.device auto or cpu runs on the CPU"
    )


@pytest.mark.parametrize(
    "setting, visible, nproc, expected",
    [
        ("cuda", 8, 8, "cuda"),
        ("cuda", 8, 2, "cuda"),  # more GPUs than processes: each rank takes its own
        ("cuda", 1, 0, "cuda"),  # no count known: one process
        ("auto", 0, 4, "cpu"),  # today's rule, without a word
        ("auto", 2, 4, "cuda"),
        ("cpu", 8, 8, "cpu"),  # the CPU even beside GPUs
    ],
)
def test_the_rule(setting, visible, nproc, expected):
    assert device.check(setting, visible, nproc, "13.0", "580.65.06", environ={}) == expected


@pytest.fixture
def no_gpu(monkeypatch):
    """A node without a usable CUDA device: this machine as it is (the CPU wheel); on one
    with a GPU, torch says none is available (a test that cannot skip anywhere)."""
    if torch.cuda.is_available():
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_cuda_here_refuses_with_this_machines_facts(monkeypatch, no_gpu):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("NVIDIA_VISIBLE_DEVICES", "void")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # a torchrun worker of 2 on this node
    with pytest.raises(BadInput) as e:
        device.resolve("cuda")
    line = str(e.value)
    assert line.startswith(
        "run.device: cuda, but no CUDA device is usable for 2 process(es) per node "
        "(CUDA_VISIBLE_DEVICES unset, NVIDIA_VISIBLE_DEVICES='void'; "
    )
    if torch.version.cuda is None:  # this project's CPU wheel
        assert "; torch without CUDA; " in line
        assert "; torch: Torch not compiled with CUDA enabled)" in line
    assert "\n" not in line


def test_auto_and_cpu_here(no_gpu):
    assert device.resolve("auto") == "cpu" and device.resolve("cpu") == "cpu"
    assert device.torch_device("auto") == "cpu" == device.torch_device("cpu")


def test_the_driver_version_of_the_kernel_module():
    proprietary = (
        "NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 01:15:15 UTC "
        "2023\nGCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n"
    )
    open_modules = (
        "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  Release Build  "
        "(dvs-builder@U16-I3-B03-4-3)  Sun Jul 27 07:09:19 UTC 2025\n"
    )
    assert device.kernel_module_version(proprietary) == "535.104.05"
    assert device.kernel_module_version(open_modules) == "580.65.06"
    assert device.kernel_module_version("") is None


# ---- what the accelerator gets -----------------------------------------------------------


def handlers(kwargs: dict) -> dict[str, dict]:
    return {type(h).__name__: h.to_kwargs() for h in kwargs["kwargs_handlers"]}


@pytest.mark.parametrize("seconds", [77.0, 600.0, 1800.0])
def test_the_collective_timeout_reaches_every_backend(seconds, monkeypatch):
    """600 s is accelerate's own default for InitProcessGroupKwargs: it would leave it out
    of the keywords (and gloo and DeepSpeed would wait 30 minutes)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = Config.model_validate({"train": {"collective_timeout_seconds": seconds}})
    timeout = timedelta(seconds=seconds)
    cpu = accel.accelerator_kwargs(cfg, "cpu", "fp32")
    assert handlers(cpu)["InitProcessGroupKwargs"] == {"backend": "gloo", "timeout": timeout}
    assert cpu["cpu"] is True
    cuda = accel.accelerator_kwargs(cfg, "cuda", "bf16")  # NCCL: accelerate's choice
    assert handlers(cuda)["InitProcessGroupKwargs"] == {"backend": None, "timeout": timeout}
    assert cuda["cpu"] is False and cuda["mixed_precision"] == "bf16"


def test_ddp_does_not_broadcast_buffers():
    kwargs = accel.accelerator_kwargs(Config(), "cpu", "fp32")
    assert handlers(kwargs)["DistributedDataParallelKwargs"] == {"broadcast_buffers": False}


def test_precision_follows_the_device():
    assert accel.precision_of(Config(), "cuda") == "bf16"
    assert accel.precision_of(Config(), "cpu") == "fp32"


@pytest.fixture
def accelerator_state(monkeypatch):
    """accelerate's process-wide state, reset after the test; the variables
    build_accelerator sets, restored."""
    from accelerate.state import AcceleratorState, GradientState

    for name in ("DS_ACCELERATOR", "ACCELERATE_TORCH_DEVICE", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(name, raising=False)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def test_the_built_accelerator_carries_them(accelerator_state):
    cfg = Config.model_validate(
        {"run": {"device": "cpu"}, "train": {"collective_timeout_seconds": 600}}
    )
    acc, precision = accel.build_accelerator(cfg)
    assert acc.device.type == "cpu" and precision == "fp32"
    assert acc.init_handler.to_kwargs()["timeout"] == timedelta(seconds=600)
    assert acc.ddp_handler.to_kwargs() == {"broadcast_buffers": False}


def test_the_launchers_process_count():
    from job.launch import processes_per_node, torchrun_command

    assert processes_per_node({"MLMJOB_NPROC_PER_NODE": "4"}, "cuda") == "4"
    assert processes_per_node({}, "cpu") == "1"  # the CPU: one process, GPUs or not
    assert "--nproc-per-node=1" in torchrun_command(["train", "-c", "c.yaml"], {}, "cpu")


def test_a_single_worker_picks_its_store_port_when_its_accelerator_is_built(monkeypatch):
    """job.launch's single worker comes without MASTER_PORT: one picked at launch could be
    taken by the time the process group binds it (after the data wait and downloads)."""
    from accelerate.utils import other

    monkeypatch.setattr(other, "is_deepspeed_available", other.is_deepspeed_available)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # put back afterwards, as the others
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("MASTER_PORT", "0")  # so that what is set below is undone too
    monkeypatch.delenv("MASTER_PORT")
    accel._environment("cpu", deepspeed=False)
    port = int(os.environ["MASTER_PORT"])
    assert 0 < port < 65536
    monkeypatch.setenv("MASTER_PORT", "29500")  # torchrun's workers: theirs stays
    accel._environment("cpu", deepspeed=False)
    assert os.environ["MASTER_PORT"] == "29500"
