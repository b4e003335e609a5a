"""The pod entrypoint: `python -m job.launch {train|infer|evaluate} -c CONFIG [--set ...]`.

Reads what Kubernetes (or a test, or a laptop) puts in the environment and starts
`torchrun` with one worker per GPU (one worker on one node: that worker alone, see
`single_worker`):

    MLMJOB_NNODES            nodes in the job (default 1)
    MLMJOB_NPROC_PER_NODE    workers per node (default: the GPU count, else 1; 1 when the
                             config's run.device is cpu)
    JOB_COMPLETION_INDEX     this pod's index in the Indexed Job = node rank (default 0)
    MASTER_ADDR, MASTER_PORT rendezvous endpoint: pod 0's stable DNS name (default loopback)
    MLMJOB_RDZV_ID           rendezvous id shared by the pods of one job (default mlmjob)
    MLMJOB_RDZV_BACKEND      c10d (default) or static: node rank = JOB_COMPLETION_INDEX, rank 0
                             hosts the store whatever its DNS record says, the others retry
                             MASTER_ADDR for MLMJOB_RDZV_TIMEOUT seconds (default 1800)

Before torchrun starts, the config's `run.device` is read: `cuda` exits 2 in one line
(job.device) when this node has no usable CUDA device or fewer than the workers; `cpu`
starts the workers with CUDA_VISIBLE_DEVICES empty.

Exit codes are the job's (0 done, 2 bad input, 3 preempted with a checkpoint, 1 retry):
torchrun itself reports every worker failure as 1, so workers leave their code in a
file that this launcher reads. On SIGTERM (what the kubelet sends PID 1 on preemption)
it signals the workers directly, so they checkpoint, and waits for them however long it
takes; torchrun would give them 30 s.

The pod's log ends with the line that says why it stopped. torchrun reports every worker
exit but 0 as a crash (`ChildFailedError` traceback, `job FAILED` banner); so torchrun
runs inside this module (`python -m job.launch torchrun ...`, see `agent`), which holds
its own lines from a worker's failure on, and drops them when the workers' exit files
explain the exit: 2 (bad input) or 3 (preempted). The launcher then prints, last, the
line(s) the workers left there (`mlmjob: error: ...`, `mlmjob: preempted at step N:
checkpoint committed (URI); exit 3`). Any other failure keeps torchrun's report. The
workers' own output never passes through either process: they write to the pod's
stderr directly, live, a terminal's progress bar included.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from job import redact
from job.errors import EXIT_BAD_INPUT, EXIT_OK, EXIT_PREEMPTED, EXIT_RETRY, BadInput

COMMANDS = ("train", "infer", "evaluate")  # the ones that run on every process
AGENT = "torchrun"  # internal: `python -m job.launch torchrun ARGS` is torchrun, quieter


def torchrun_command(args: list[str], env: dict, device: str = "auto") -> list[str]:
    nnodes = int(env.get("MLMJOB_NNODES", "1"))
    nproc = processes_per_node(env, device)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}"]
    if nnodes == 1:
        cmd += ["--standalone"]
    else:
        host = env.get("MASTER_ADDR", "127.0.0.1")
        port = env.get("MASTER_PORT", "29500")
        if env.get("MLMJOB_RDZV_BACKEND") == "static":  # k8s: pod 0 hosts, no DNS lookup
            return cmd + [
                f"--nnodes={nnodes}",
                f"--node-rank={env.get('JOB_COMPLETION_INDEX', '0')}",
                "--rdzv-backend=static",
                f"--rdzv-endpoint={host}:{port}",
                f"--rdzv-conf=timeout={env.get('MLMJOB_RDZV_TIMEOUT', '1800')}",
                "--max-restarts=0",
                "-m",
                "job",
                *args,
            ]
        cmd += [
            f"--nnodes={nnodes}",
            f"--node-rank={env.get('JOB_COMPLETION_INDEX', '0')}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={host}:{port}",
            f"--rdzv-id={env.get('MLMJOB_RDZV_ID', 'mlmjob')}",
            "--max-restarts=0",
        ]
    return cmd + ["-m", "job", *args]


def single_worker(env: dict, device: str = "auto") -> bool:
    """One worker on one node: the launcher starts it itself, with the environment torchrun
    would give it (`single_worker_env`). torchrun's agent would add nothing there but a
    process and torch's import (about 2 s of the pod's start-up)."""
    return int(env.get("MLMJOB_NNODES", "1")) == 1 and processes_per_node(env, device) == "1"


# What `torchrun --standalone --nproc-per-node=1` sets for its worker: rank 0 of 1, its
# process group's store on loopback. No MASTER_PORT (a pod's names pod 0's rendezvous): the
# worker picks a free one just before it binds it (accel._environment).
SINGLE_WORKER = {
    "RANK": "0",
    "LOCAL_RANK": "0",
    "GROUP_RANK": "0",
    "WORLD_SIZE": "1",
    "LOCAL_WORLD_SIZE": "1",
    "MASTER_ADDR": "127.0.0.1",
}


def single_worker_env(env: dict) -> dict:
    """`env` as a single worker gets it: SINGLE_WORKER, and no MASTER_PORT."""
    return {k: v for k, v in env.items() if k != "MASTER_PORT"} | SINGLE_WORKER


def worker_command(args: list[str], env: dict, device: str = "auto") -> list[str]:
    """What the launcher starts: the worker itself (one worker on one node), else torchrun
    through `agent`."""
    if single_worker(env, device):
        return [sys.executable, "-m", "job", *args]
    return agent_command(torchrun_command(args, env, device))


def agent_command(torchrun: list[str]) -> list[str]:
    """What the launcher runs for `torchrun`: the same arguments, to `agent` (below)."""
    python, _, _, *rest = torchrun  # python -m torch.distributed.run ARGS
    return [python, "-m", "job.launch", AGENT, *rest]


def processes_per_node(env: dict, device: str = "auto") -> str:
    """MLMJOB_NPROC_PER_NODE, else one per GPU (one process when `run.device` is cpu or
    no GPU is visible): torchrun's --nproc-per-node."""
    given = env.get("MLMJOB_NPROC_PER_NODE")
    if given:
        return given
    return "1" if device == "cpu" else str(_gpu_count() or 1)


def device_setting(args: list[str]) -> str:
    """`run.device` of the config the workers will load (`-c`, `--set`), checked here
    before torchrun starts; `cuda` that this node cannot serve raises BadInput (one line,
    job.device). A config that does not load is left to the workers, which report it."""
    import argparse

    from job.config import load_config

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("-c", "--config")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    known, _ = parser.parse_known_args(args[1:])
    if not known.config:
        return "auto"
    try:
        return load_config(known.config, known.overrides).run.device
    except BadInput:
        return "auto"


def check_device(args: list[str], env: dict) -> str:
    """The config's `run.device`, with `cuda` checked against this node's GPUs and the
    processes the launch will start (BadInput when it cannot run)."""
    from job import device

    setting = device_setting(args)
    nproc = processes_per_node(env, setting)
    if setting == "cuda":
        device.resolve(setting, int(nproc) if nproc.isdigit() else 1)
    return setting


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except ImportError:
        return 0


def exit_code(torchrun_rc: int, worker_codes: list[int]) -> int:
    """The pod's exit code, from what torchrun and the workers reported."""
    if EXIT_BAD_INPUT in worker_codes:
        return EXIT_BAD_INPUT
    if EXIT_PREEMPTED in worker_codes:
        return EXIT_PREEMPTED
    return EXIT_OK if torchrun_rc == 0 else EXIT_RETRY


# ---- the exit files: each worker's code and the line(s) that explain it ----------------

_explanation: list[str] = []


def explain(*lines: str) -> None:
    """In a worker: the line(s) that explain the code it is about to exit with (`mlmjob:
    error: ...`, `mlmjob: preempted at step N: ...`). job.cli leaves them in its exit file
    (`leave_exit`); the launcher prints them as the last lines of the pod's log."""
    _explanation[:] = lines


def leave_exit(exit_dir: str, rank: int, code: int) -> None:
    record = {"code": code, "lines": _explanation}
    Path(exit_dir, f"rank-{rank}").write_text(json.dumps(record))


def read_exits(exit_dir: str) -> dict[int, dict]:
    """rank -> {"code", "lines"} of each worker that reported (a torn file: none)."""
    exits = {}
    for p in Path(exit_dir).glob("rank-*"):
        try:
            exits[int(p.name.removeprefix("rank-"))] = json.loads(p.read_text())
        except ValueError:
            continue
    return exits


def explained(exits: dict[int, dict], code: int) -> list[str]:
    """The lines that explain the pod's exit `code` (2 or 3): those of the lowest rank that
    exited with it and left some, else one naming the code. None for 0 and 1 (for a crash
    torchrun's report says more)."""
    if code not in (EXIT_BAD_INPUT, EXIT_PREEMPTED):
        return []
    for rank in sorted(exits):
        if exits[rank]["code"] == code and exits[rank]["lines"]:
            return exits[rank]["lines"]
    what = "bad input" if code == EXIT_BAD_INPUT else "preempted"
    return [f"mlmjob: a worker exited {code} ({what}); exit {code}"]


def finished_cleanly(exits: dict[int, dict], workers: int) -> bool:
    """Every one of this node's `workers` left an exit file saying 0: each finished its
    command, whatever happened to its process after that."""
    return len(exits) == workers and all(e["code"] == EXIT_OK for e in exits.values())


def _outcome(torchrun_rc: int, exit_dir: str) -> tuple[int, list[str]]:
    exits = read_exits(exit_dir)
    code = exit_code(torchrun_rc, [e["code"] for e in exits.values()])
    return code, explained(exits, code)


def single_outcome(rc: int, exit_dir: str) -> tuple[int, list[str]]:
    """The pod's exit code and last line(s), from the one worker the launcher ran itself:
    what `agent` makes of torchrun's, for one worker."""
    if rc != 0 and finished_cleanly(read_exits(exit_dir), 1):
        return EXIT_OK, [DIED_AFTER_FINISHING]  # see `agent`
    code, lines = _outcome(rc, exit_dir)
    if code == EXIT_RETRY and rc < 0:  # torchrun would report the signal: say it here
        lines = [f"mlmjob: the worker was killed by {_signal_name(-rc)}; exit 1"]
    return code, lines


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:  # a real-time signal has no name
        return f"signal {number}"


DIED_AFTER_FINISHING = "mlmjob: a worker died after it had finished and reported 0; exit 0"


# ---- torchrun, quieter -----------------------------------------------------------------


class _HeldReport:
    """torchrun's log records from its first warning about its workers' processes on: once
    a worker exits but 0 it stops the others (`Sending process N closing signal SIGTERM`)
    and reports the first (`failed (exitcode: 3) local_rank: 0 ...`). Held back, on every
    handler, until `release` (any end but an explained one) or for good."""

    def __init__(self):
        self.held: list[tuple[logging.Handler, logging.LogRecord]] = []
        self.holding = self.released = False
        loggers = [logging.root, *logging.Logger.manager.loggerDict.values()]
        handlers = {h for lg in loggers for h in getattr(lg, "handlers", ())}
        for handler in [*handlers, logging.lastResort]:
            handler.addFilter(self._filter(handler))

    def _filter(self, handler: logging.Handler):
        def keep(record: logging.LogRecord) -> bool:
            if self.released:
                return True
            workers = record.name.startswith("torch.distributed.elastic.multiprocessing")
            self.holding |= workers and record.levelno >= logging.WARNING
            if self.holding:
                self.held.append((handler, record))
            return not self.holding

        return keep

    def release(self) -> None:
        self.released = True
        for handler, record in self.held:
            handler.handle(record)


def agent(torchrun_args: list[str]) -> int:
    """torchrun (`torch.distributed.run`) in this process, with its failure report (log
    lines and the ChildFailedError traceback) left out when the workers' exit files
    explain the failure. The workers inherit this process's stderr as they would
    torchrun's: their output is untouched."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, record
    from torch.distributed.run import parse_args, run

    report, lines = _HeldReport(), []
    parsed = parse_args(torchrun_args)
    try:
        record(lambda: run(parsed))()
    except ChildFailedError:
        exits = read_exits(os.environ["MLMJOB_EXIT_DIR"])
        workers = str(parsed.nproc_per_node)  # the launcher passes a number ("auto": never)
        if workers.isdigit() and finished_cleanly(exits, int(workers)):
            # Every worker had finished its command (outputs committed) and reported 0; one
            # then died in the interpreter's teardown (seen once: a C++ std::terminate in a
            # ZeRO-3 CPU worker after its exit file). Nothing is lost: a retry would find
            # the run complete. Say so in one line instead of failing the pod.
            report.release()  # torchrun's report of the dead worker, then this line last
            lines = [DIED_AFTER_FINISHING]
            print(lines[0], file=sys.stderr)
            return EXIT_OK
        code, lines = _outcome(EXIT_RETRY, os.environ["MLMJOB_EXIT_DIR"])
        if lines:
            return code  # the launcher prints `lines` last, in place of torchrun's report
        raise
    finally:
        if not lines:
            report.release()
    return EXIT_OK


class _Forwarder:
    """SIGTERM to every worker, also to those torchrun starts after the signal came (a
    SIGTERM in the first seconds of a pod), each once."""

    def __init__(self):
        self.proc: subprocess.Popen | None = None  # torchrun's agent, or the single worker
        self.single = False  # the worker itself: it is signalled too
        self.started = False

    def on_sigterm(self, signum, frame) -> None:
        if not self.started:
            self.started = True
            threading.Thread(target=self._forward, name="sigterm", daemon=True).start()

    def _forward(self) -> None:
        import psutil

        done: set[int] = set()
        while self.proc is None or self.proc.poll() is None:
            if self.proc is not None:
                try:
                    top = psutil.Process(self.proc.pid)
                    workers = ([top] if self.single else []) + top.children(recursive=True)
                except psutil.NoSuchProcess:
                    return
                for worker in workers:
                    if worker.pid not in done:
                        done.add(worker.pid)
                        with contextlib.suppress(psutil.NoSuchProcess):
                            worker.send_signal(signal.SIGTERM)
            time.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    redact.install()  # this process's lines; each worker (job.cli:main) redacts its own
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == [AGENT]:
        return agent(args[1:])
    if not args or args[0] not in COMMANDS:
        print(
            f"usage: python -m job.launch {{{'|'.join(COMMANDS)}}} -c CONFIG [--set ...]",
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT
    # Before the config check: it loads the config and may import torch to count GPUs
    # (a second or two). A SIGTERM meanwhile waits in the forwarder for the worker, which
    # then exits 3 as after any preemption, instead of killing this launcher (143).
    forward = _Forwarder()
    signal.signal(signal.SIGTERM, forward.on_sigterm)
    try:
        device = check_device(args, dict(os.environ))
    except BadInput as e:  # before any worker starts: the pod's log is this one line
        print(f"mlmjob: error: {e}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    with tempfile.TemporaryDirectory(prefix="mlmjob-exit-") as exit_dir:
        env = {**os.environ, "MLMJOB_EXIT_DIR": exit_dir}
        if device == "cpu":  # the workers see no GPU at all: nothing lands on one
            env["CUDA_VISIBLE_DEVICES"] = ""
        single = single_worker(env, device)
        if single:
            env = single_worker_env(env)
        forward.single = single
        # Children start with SIGTERM blocked: one that arrives before a worker has its
        # handler (importing torch takes seconds) waits, pending, until job.cli unblocks it
        # with the handler in place; torchrun's agent keeps it blocked (this launcher, not
        # torchrun, decides what a SIGTERM means).
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        try:
            # a session of its own, as torchrun's workers: a signal to the launcher's group
            # (Ctrl-C, kill -- -PGID) reaches the worker through the launcher, once
            proc = subprocess.Popen(
                worker_command(args, env, device), env=env, start_new_session=single
            )
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        forward.proc = proc
        outcome = single_outcome if single else _outcome
        code, lines = outcome(proc.wait(), exit_dir)
    for line in lines:  # the last lines of the log: why the pod stopped
        print(line, file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
