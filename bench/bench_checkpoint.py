"""How long a checkpoint blocks training when its upload is slow.

The training row's model (RoBERTa 4 x 256, the full 50,265-token vocabulary: a checkpoint
of weights, Adam moments and RNG states, about 200 MB) trains on the shared ELI5 file for
60 steps with a checkpoint every 20, its run output on a local SeaweedFS server behind the
tests' S3 proxy, which takes uploads in at `BENCH_CHECKPOINT_MBPS` (50 MB/s: about 4 s a
checkpoint). Each checkpoint's figures come from the run's log line at its commit
(`checkpoint ... committed T s after its save began; training waited B s of it`):
`total_s` from the save's start to the commit, `blocking_s` what the training thread spent
on it (writing the staging folder, waiting for the upload at a wait point, the commit).
`upload_s` is the background thread's (hashing and uploading): before the upload moved off
the training thread, a checkpoint blocked for about `blocking_s + upload_s`. `total_s` also
counts the wait for the commit, which comes at the first preemption check (at most 10
steps) after the upload ends. The last checkpoint, saved at the last step, has only the
final evaluation to hide its upload behind: `mid_run` sums the others.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_train import MODEL
from common import ELI5, ROOT, TOKENIZER

sys.path.insert(0, str(ROOT / "tests"))
from support.s3 import S3Proxy, Weed  # noqa: E402 (the tests' server and proxy)

STEPS = int(os.environ.get("BENCH_CHECKPOINT_STEPS", "60"))
EVERY = int(os.environ.get("BENCH_CHECKPOINT_EVERY", "20"))
MBPS = float(os.environ.get("BENCH_CHECKPOINT_MBPS", "50"))

CONFIG = """
run: {{output: 's3://test/bench-{stamp}/run', seed: 42}}
data: {{sources: ['{eli5}'], output: '{data}'}}
model:
  name_or_path: '{tok}'
  from_scratch: true
  config_overrides: {model}
train:
  max_steps: {steps}
  per_device_batch_size: 8
  learning_rate: 5.0e-4
  checkpoint_every_steps: {every}
  eval_every_steps: 100000
  log_every_steps: 10
"""

COMMITTED = re.compile(
    r"checkpoints/step-(\d+) committed ([\d.]+) s after its save began "
    r"\(hash and upload ([\d.]+) s\); training waited ([\d.]+) s of it"
)


def _train(cfg: Path, env: dict) -> str:
    job = [sys.executable, "-m", "job"]
    subprocess.run(
        [*job, "preprocess", "-c", cfg], env=env, cwd=ROOT, check=True, capture_output=True
    )
    proc = subprocess.run(
        [*job, "train", "-c", cfg], env=env, cwd=ROOT, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise RuntimeError(f"train failed ({proc.returncode}): {proc.stderr[-3000:]}")
    return proc.stderr


def _checkpoint_mb(weed: Weed, stamp: str) -> float:
    import boto3

    s3 = boto3.client("s3", **_client_args(weed))
    prefix = f"bench-{stamp}/run/checkpoints/step-{STEPS}/"
    listed = s3.list_objects_v2(Bucket="test", Prefix=prefix).get("Contents", [])
    return round(sum(o["Size"] for o in listed) / 1e6, 1)


def _client_args(weed: Weed) -> dict:
    env = weed.server.env()
    return {
        "endpoint_url": env["AWS_ENDPOINT_URL"],
        "region_name": env["AWS_REGION"],
        "aws_access_key_id": env["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": env["AWS_SECRET_ACCESS_KEY"],
    }


def _figures(log: str) -> list[dict]:
    return [
        {
            "step": int(m[1]),
            "total_s": float(m[2]),
            "upload_s": float(m[3]),
            "blocking_s": float(m[4]),
        }
        for m in COMMITTED.finditer(log)
    ]


def _summed(rows: list[dict]) -> dict:
    total, upload, blocking = (
        sum(r[k] for r in rows) for k in ("total_s", "upload_s", "blocking_s")
    )
    return {
        "total_s": round(total, 2),
        "upload_s": round(upload, 2),
        "blocking_s": round(blocking, 2),
        "blocking_fraction": round(blocking / total, 3) if total else None,
        "blocking_before_s": round(blocking + upload, 2),  # save, upload, commit in line
    }


def run() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        weed = Weed(Path(tmp) / "weed")
        weed.data.mkdir()
        weed.start()
        proxy = S3Proxy(weed.server.endpoint)
        proxy.limit(MBPS * 1e6)
        try:
            stamp = str(time.time_ns())
            cfg = Path(tmp) / "bench.yaml"
            cfg.write_text(
                CONFIG.format(
                    stamp=stamp,
                    eli5=ELI5,
                    data=f"{tmp}/data",
                    tok=TOKENIZER,
                    model=json.dumps(MODEL),
                    steps=STEPS,
                    every=EVERY,
                )
            )
            env = {
                **os.environ,
                **weed.server.env(),
                **proxy.env(),
                "MLMJOB_NO_PROGRESS": "1",
                "MLMJOB_CACHE": f"{tmp}/cache",
            }
            rows = _figures(_train(cfg, env))
            size = _checkpoint_mb(weed, stamp)
        finally:
            proxy.close()
            weed.stop()
    mid = [r for r in rows if r["step"] != STEPS]
    return {
        "model": {**MODEL, "vocab_size": 50265, "steps": STEPS, "checkpoint_every": EVERY},
        "checkpoint_mb": size,
        "upload_limit_mb_s": MBPS,
        "checkpoints": rows,
        "mid_run": _summed(mid),
        "last": _summed([r for r in rows if r["step"] == STEPS]),
    }


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
