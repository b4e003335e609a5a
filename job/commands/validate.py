"""`mlmjob validate`: print the resolved config; with --preflight, check what the run will
read and write first (job.preflight) and print the plan."""

from __future__ import annotations

from job.config import Config, dump_yaml
from job.errors import BadInput


def main(cfg: Config, preflight: bool) -> int:
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
