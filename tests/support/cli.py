"""Running mlmjob as a user or a pod does: the CLI (in this process where nothing needs a
fresh one), polling, configs written from templates."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from support.data import ROOT
from support.once import shared_dir

# Commands that run in the test's own process unless a test asks for a fresh one: each
# fresh process would pay torch's and transformers' imports (seconds) again. What they
# leave process-wide is put back after each (`_in_process`): the SIGTERM handler, train's
# Preemption and accelerate's state (train's and evaluate's). DeepSpeed without a launcher
# makes this process rank 0 of a process group (accel._alone): in a process of its own.
IN_PROCESS = ("validate", "preprocess", "infer", "train", "evaluate")


# Environment read at call time (storage's client is made anew by each command's
# `storage.configure`; job.env reads Kubernetes' pod index when asked); anything else
# (HF_HUB_OFFLINE, read at import) needs a process, unless this process has that value.
_CALL_TIME_ENV = ("MLMJOB_", "AWS_", "JOB_COMPLETION_INDEX")


def mlmjob(
    *args,
    env: dict | None = None,
    check: bool = False,
    timeout: float = 600,
    process: bool | None = None,
):
    """Run the CLI as a user or a pod would: its exit status, stdout and stderr. In a fresh
    process when `process` is True or the command needs one (see IN_PROCESS), else in this
    one (the same `job.cli.main`, its output captured). `process=False`: in this one even
    with DeepSpeed named, for a command that must exit 2 before DeepSpeed starts (its
    JSON is read before anything changes the process)."""
    args = [str(a) for a in args]
    env = env or {}
    here = (
        process is not True
        and args[0] in IN_PROCESS
        and all(k.startswith(_CALL_TIME_ENV) or os.environ.get(k) == v for k, v in env.items())
        and (process is False or not _names_deepspeed(args))
    )
    if here:
        proc = _in_process(args, env)
    else:
        proc = subprocess.run(
            [sys.executable, "-m", "job", *args],
            cwd=ROOT,
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    if check and proc.returncode != 0:
        raise AssertionError(f"mlmjob {args} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def _names_deepspeed(args: list[str]) -> bool:
    """Whether the command's overrides or its config file mention DeepSpeed (which, without
    a launcher, makes the process rank 0 of a process group: a process of its own)."""
    config = args[args.index("-c") + 1] if "-c" in args else None
    text = Path(config).read_text(errors="replace") if config and Path(config).is_file() else ""
    return any("deepspeed" in a for a in args) or "deepspeed" in text


def _in_process(args: list[str], env: dict) -> subprocess.CompletedProcess:
    """`job.cli.main(args)` here, with `env` set for the call and stdout/stderr captured; an
    uncaught exception is exit 1 with its traceback on stderr, as the interpreter does."""
    import contextlib
    import io
    import traceback

    from job import cli, storage
    from job.log import log

    out, err = io.StringIO(), io.StringIO()
    saved_log = (log.handlers[:], log.level, log.propagate)  # cli.main sets them up
    saved_env = dict(os.environ)  # all of it: a command may set more than `env`
    saved_streams, cwd = (sys.stdout, sys.stderr), os.getcwd()
    saved_sigterm = signal.getsignal(signal.SIGTERM)
    os.environ.update(env)
    os.chdir(ROOT)
    sys.stdout, sys.stderr = out, err  # job.redact.install wraps these, as a pod's
    try:
        code = cli.main(args)
    except SystemExit as e:  # argparse
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:  # noqa: BLE001 (what the interpreter prints and exits 1 for)
        traceback.print_exc(file=err)
        code = 1
    finally:
        sys.stdout, sys.stderr = saved_streams
        log.handlers[:], log.level, log.propagate = saved_log
        signal.signal(signal.SIGTERM, saved_sigterm)
        if args[0] in ("train", "evaluate"):  # each makes an Accelerator
            _forget_training()
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        with contextlib.suppress(Exception):
            storage.configure()  # back to the session's environment
    return subprocess.CompletedProcess(["mlmjob", *args], code, out.getvalue(), err.getvalue())


def _forget_training() -> None:
    """What an in-process `train` leaves behind, undone: its Preemption (a SIGTERM flag)
    and accelerate's process-wide state (the next Accelerator starts anew)."""
    from accelerate.state import AcceleratorState, GradientState

    from job.train.accel import Preemption

    Preemption._installed = None
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def wait_for(predicate, timeout: float = 300, poll: float = 0.05) -> None:
    """Poll `predicate` until it holds; fail the test after `timeout` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(poll)
    raise AssertionError("timed out")


def preprocessed(tmp_path_factory, synthetic, template: str, name: str) -> Path:
    """A data folder holding the dataset that `template` (a config with {run}, {eli5},
    {data} and {tok} fields) preprocesses from the synthetic records, made once for the
    session's workers (support/once.py) under `name`: for session and module fixtures."""

    def make(out: Path) -> None:
        text = template.format(run="unused", eli5=synthetic.eli5, data=out, tok=synthetic.tokenizer)
        mlmjob("preprocess", "-c", write_config(out / "c.yaml", text), check=True)

    return shared_dir(tmp_path_factory, name, make)


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
