"""`mlmjob` command line: parse arguments, call one function, map errors to exit codes."""

from __future__ import annotations

import argparse
import importlib
import signal
import sys

from job import env, launch, orphan, redact, storage
from job.config import load_config
from job.errors import EXIT_BAD_INPUT, EXIT_RETRY, BadInput, StorageError, TransientStorageError
from job.log import setup_logging

# Each command is one module, job/commands/<command>.py, with a `main`. They import torch
# (seconds): each is imported when its command runs, so that `mlmjob validate` answers at once.


# The commands that split their work over `--worker-index` x torchrun's ranks.
SHARDED = ("preprocess", "infer")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlmjob", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in [
        ("validate", "print the resolved config"),
        ("preprocess", "ELI5 -> sharded block dataset"),
        ("train", "train on the block dataset"),
        ("infer", "batch fill-mask over text files"),
        ("evaluate", "perplexity of a masked LM (infer.model) on the test split"),
        ("push", "a finished run's model/ to the Hugging Face Hub, with a model card"),
    ]:
        s = sub.add_parser(name, help=help_)
        s.add_argument("-c", "--config", required=True, help="YAML config file")
        s.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY.PATH=VALUE",
            help="override a config key (value parsed as YAML); repeatable",
        )
        if name == "validate":
            what = "also check sources, model, tokenizer, outputs and credentials"
            s.add_argument("--preflight", action="store_true", help=what)
        if name in SHARDED:
            s.add_argument("--worker-index", type=int, default=None)
            s.add_argument("--num-workers", type=int, default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    # Before anything can print: every line this process writes (logs of mlmjob and of the
    # libraries, warnings, tracebacks, progress bars, error lines) passes through
    # job.redact, so no URL's password or signature reaches a pod's log.
    redact.install()
    args = _parser().parse_args(argv)
    setup_logging()
    orphan.exit_with_parent()
    _take_sigterm(args.command)
    try:
        code = _run(args)
    except (BadInput, StorageError) as e:
        # A config can have several bad keys: one line each.
        lines = [f"mlmjob: error: {line}" for line in str(e).splitlines()]
        for line in lines:
            print(line, file=sys.stderr)
        launch.explain(*lines)
        code = EXIT_BAD_INPUT
    except TransientStorageError as e:  # one line, not a traceback; the pod is retried
        print(f"mlmjob: error: {e}", file=sys.stderr)
        code = EXIT_RETRY
    _report(code)
    return code


def _report(code: int) -> None:
    """Under job.launch, leave the exit code where the launcher reads it (torchrun hides it),
    with the line(s) that explain it (`launch.explain`), which the launcher prints last."""
    if env.exit_dir():
        launch.leave_exit(env.exit_dir(), env.rank(), code)


# The output each command writes: a local one that is a file is named before it starts.
OUTPUT_KEY = {
    "preprocess": "data.output",
    "train": "run.output",
    "infer": "infer.output",
    "evaluate": "run.output",
}


def _take_sigterm(command: str) -> None:
    """`train` handles SIGTERM as a preemption from now on (before torch is imported);
    then SIGTERM is unblocked (job.launch starts workers with it blocked, so that one sent
    in their first seconds waits for this point instead of killing them)."""
    if command == "train":
        from job.train.accel import Preemption

        Preemption.install()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


def _run(args) -> int:
    cfg = load_config(args.config, args.overrides)
    storage.configure(cfg.storage.endpoint_url, cfg.storage.region, cfg.storage.retry_seconds)
    if args.command in ("train", "evaluate", "infer"):
        from job import device

        device.resolve(cfg.run.device)  # GPUs this node cannot use: exit 2 before any work
    if args.command == "validate":
        from job.commands import validate

        return validate.main(cfg, args.preflight)
    key = OUTPUT_KEY.get(args.command)
    if key:  # before the first write (a lease, a cache folder)
        from job.preflight import check_output

        section, name = key.split(".")
        check_output(key, getattr(getattr(cfg, section), name))
    command = importlib.import_module(f"job.commands.{args.command}")
    if args.command in SHARDED:
        return command.main(cfg, *env.worker(args.worker_index, args.num_workers))
    return command.main(cfg)


if __name__ == "__main__":
    raise SystemExit(main())
