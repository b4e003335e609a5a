"""`mlmjob` command line: parse arguments, call one function, map errors to exit codes."""

from __future__ import annotations

import argparse
import signal
import sys

from job import env, launch, orphan, redact, storage
from job.config import dump_yaml, load_config
from job.errors import EXIT_BAD_INPUT, EXIT_RETRY, BadInput, StorageError, TransientStorageError
from job.log import setup_logging

# The commands' modules import torch (seconds): each is imported when its command runs, so
# that `mlmjob validate` answers at once.


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
        if name in ("preprocess", "infer"):
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
    if args.command == "validate":
        return _validate(cfg, args.preflight)
    if args.command in OUTPUT_KEY:  # before the first write (a lease, a cache folder)
        from job.preflight import check_output

        key = OUTPUT_KEY[args.command]
        section, name = key.split(".")
        check_output(key, getattr(getattr(cfg, section), name))
    worker = env.worker(getattr(args, "worker_index", None), getattr(args, "num_workers", None))
    if args.command == "preprocess":
        from job.data.preprocess import preprocess

        print(preprocess(cfg, *worker))  # the dataset URI, for scripts
        return 0
    if args.command == "train":
        from job.train.loop import train

        return train(cfg)
    if args.command == "push":
        from job.push import push

        return push(cfg)
    if args.command == "evaluate":
        from job.train.evaluate import evaluate

        return evaluate(cfg)
    from job.infer import infer

    infer(cfg, *worker)
    return 0


def _validate(cfg, preflight: bool) -> int:
    if not preflight:
        print(dump_yaml(cfg), end="")
        return 0
    from job.preflight import preflight as run_preflight

    report = run_preflight(cfg)
    if report.problems:
        raise BadInput("\n".join(report.problems))
    print("preflight: ok")
    for line in report.plan:
        print(f"  {line}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
