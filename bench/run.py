"""`make bench`: every CPU benchmark, one JSON object on stdout (figures in the README).

python bench/run.py [--only preprocess,train,batches,infer,memory,infer_memory,checkpoint]
                    [--out bench.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("MLMJOB_NO_PROGRESS", "1")

SECTIONS = ("preprocess", "train", "batches", "infer", "memory", "infer_memory", "checkpoint")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--only", default=",".join(SECTIONS))
    p.add_argument("--out", default=None)
    args = p.parse_args()
    result = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()}}
    for name in args.only.split(","):
        module = __import__(f"bench_{name}")
        print(f"bench: {name} ...", file=sys.stderr)
        result[name] = module.run()
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
