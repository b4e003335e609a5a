"""The pod entrypoint: `python -m job.launch {train|infer|evaluate} -c CONFIG [--set ...]`.

Reads what Kubernetes (or a test, or a laptop) puts in the environment and starts
`torchrun` with one worker per GPU:

    MLMJOB_NNODES            nodes in the job (default 1)
    MLMJOB_NPROC_PER_NODE    workers per node (default: the GPU count, else 1)
    JOB_COMPLETION_INDEX     this pod's index in the Indexed Job = node rank (default 0)
    MASTER_ADDR, MASTER_PORT rendezvous endpoint: pod 0's stable DNS name (default loopback)
    MLMJOB_RDZV_ID           rendezvous id shared by the pods of one job (default mlmjob)
    MLMJOB_RDZV_BACKEND      c10d (default) or static: node rank = JOB_COMPLETION_INDEX, rank 0
                             hosts the store whatever its DNS record says, the others retry
                             MASTER_ADDR for MLMJOB_RDZV_TIMEOUT seconds (default 1800)

Exit codes are the job's (0 done, 2 bad input, 3 preempted with a checkpoint, 1 retry):
torchrun itself reports every worker failure as 1, so workers leave their code in a
file that this launcher reads. On SIGTERM (what the kubelet sends PID 1 on preemption)
it signals the workers directly, so they checkpoint, and waits for them however long it
takes; torchrun would give them 30 s.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from job import redact
from job.errors import EXIT_BAD_INPUT, EXIT_OK, EXIT_PREEMPTED, EXIT_RETRY

COMMANDS = ("train", "infer", "evaluate")  # the ones that run on every process


def torchrun_command(args: list[str], env: dict) -> list[str]:
    nnodes = int(env.get("MLMJOB_NNODES", "1"))
    nproc = env.get("MLMJOB_NPROC_PER_NODE") or str(_gpu_count() or 1)
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
                "-m", "job", *args,
            ]  # fmt: skip
        cmd += [
            f"--nnodes={nnodes}",
            f"--node-rank={env.get('JOB_COMPLETION_INDEX', '0')}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={host}:{port}",
            f"--rdzv-id={env.get('MLMJOB_RDZV_ID', 'mlmjob')}",
            "--max-restarts=0",
        ]
    return cmd + ["-m", "job", *args]


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


def _signal_workers(pid: int, sig: int) -> None:
    import psutil

    try:
        for child in psutil.Process(pid).children(recursive=True):
            child.send_signal(sig)
    except psutil.NoSuchProcess:
        pass


def main(argv: list[str] | None = None) -> int:
    redact.install()  # this process's lines; each worker (job.cli:main) redacts its own
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in COMMANDS:
        print(f"usage: python -m job.launch {{{'|'.join(COMMANDS)}}} -c CONFIG [--set ...]",
              file=sys.stderr)  # fmt: skip
        return EXIT_BAD_INPUT
    with tempfile.TemporaryDirectory(prefix="mlmjob-exit-") as exit_dir:
        env = {**os.environ, "MLMJOB_EXIT_DIR": exit_dir}
        proc = subprocess.Popen(torchrun_command(args, env), env=env)

        def on_sigterm(signum, frame):
            _signal_workers(proc.pid, signal.SIGTERM)

        signal.signal(signal.SIGTERM, on_sigterm)
        rc = proc.wait()
        codes = [int(p.read_text()) for p in Path(exit_dir).glob("rank-*")]
    return exit_code(rc, codes)


if __name__ == "__main__":
    raise SystemExit(main())
