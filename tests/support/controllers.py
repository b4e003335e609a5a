"""The JobSet and Job controllers, as far as the stage manifests use them, over real processes.

A stage's JobSet (k8s/base/*.yaml) is run as the controllers would run it (JobSet v0.12,
Kubernetes 1.33 Job controller; no Python port of either exists, hence this):
- every replicated job's pods start together (no `dependsOn`: asserted), one process per
  pod (tests/support/kubelet.py builds each pod's command and environment);
- a failed pod goes through its Job's `podFailurePolicy` (first rule that matches:
  `FailJob`, `Ignore`, or counted), then `backoffLimitPerIndex` (that index alone is
  retried) or `backoffLimit` (the Job fails past it). A failed Job reports the reason and
  message the Job controller writes (pkg/controller/job/pod_failure_policy.go);
- a failed Job goes through the JobSet's `failurePolicy` rules (first match by reason and
  message pattern): `FailJobSet`, `RestartJobSet` (counted against `maxRestarts`), or
  `RestartJobSetAndIgnoreMaxRestarts`; a restart recreates every pod (Recreate);
- the JobSet ends with `status.terminalState` Completed or Failed, the one field the Argo
  step's success and failure conditions read.
Faults are injected per pod attempt: `faults[(job, index, attempt)](running)` is called
on a thread once that pod started (kill it when its log shows a line, ...).
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from support.kubelet import Cluster, Pod, Running, start
from support.s3 import free_port

# The Job controller's messages for a podFailurePolicy FailJob (pkg/controller/job,
# pod_failure_policy.go): the JobSets' onJobFailureMessagePatterns must match them.
EXIT_MESSAGE = "Container {c} for pod {ns}/{pod} failed with exit code {code} matching FailJob rule at index {i}"
CONDITION_MESSAGE = (
    "Pod {ns}/{pod} has condition DisruptionTarget matching FailJob rule at index {i}"
)
Fault = Callable[[Running], None]


@dataclass
class Stage:
    """What one JobSet run needs besides its manifest: where the image's /app is, where pod
    folders go, the faults to inject, and a record of every pod started."""

    cluster: Cluster
    app: Path
    root: Path
    faults: dict[tuple[str, int, int], Fault] = field(default_factory=dict)
    delays: dict[tuple[str, int], float] = field(default_factory=dict)  # pod start order
    started: list[tuple[str, str, int]] = field(default_factory=list)
    timeout: float = 900

    def run(self, js: dict) -> dict:
        """Run the JobSet to its end; its status as the JobSet controller would write it."""
        limit, counted = js["spec"].get("failurePolicy", {}).get("maxRestarts", 0), 0
        for attempt in range(20):  # a bound on restarts that ignore maxRestarts
            failure = self._attempt(js, attempt)
            status = {"restarts": attempt, "restartsCountTowardsMax": counted}
            if failure is None:
                return {"terminalState": "Completed", **status}
            action = jobset_action(js, *failure) or "RestartJobSet"  # JobSet's default
            if action == "FailJobSet" or (action == "RestartJobSet" and counted >= limit):
                return {"terminalState": "Failed", **status, "failure": failure}
            counted += action == "RestartJobSet"
        raise AssertionError(f"{js['metadata']['name']}: restarted 20 times")

    def _attempt(self, js: dict, restart: int) -> tuple[str, str] | None:
        rjobs = js["spec"]["replicatedJobs"]
        assert not any("dependsOn" in r for r in rjobs), "a queued workload has dependsOn"
        (rjob,) = rjobs  # every stage: one replicated job
        dns = dns_for(js)
        return JobRun(self, js, rjob, dns, restart).run()


def dns_for(js: dict) -> dict[str, str]:
    """Pod 0's hostname (JobSet's headless Service) to loopback, port 29500 to a free one:
    a fresh port per (re)created group, as a new pod 0 is a new IP."""
    name = js["metadata"]["name"]
    return {f"{name}-train-0-0.{name}": "127.0.0.1", "29500": str(free_port())}


@dataclass
class JobRun:
    """One Indexed Job of a JobSet, from its pods' start to its success or failure."""

    stage: Stage
    js: dict
    rjob: dict
    dns: dict[str, str]
    restart: int
    attempts: dict[int, int] = field(default_factory=dict)
    counted: dict[int, int] = field(default_factory=dict)

    def run(self) -> tuple[str, str] | None:
        pods = self.stage.cluster.pods(self.js, self.rjob)
        running = {p.index: self._start(p) for p in self._in_start_order(pods)}
        spec = self.rjob["template"]["spec"]
        try:
            while running:
                index, code = self._next_exit(running)
                pod = running.pop(index).pod
                if code == 0:
                    continue
                verdict = self._failed(spec, pod, code)
                if verdict is not None:
                    return verdict
                running[index] = self._start(pod)
            return None
        finally:
            for r in running.values():  # the Job failed: the controller deletes its pods
                r.terminate(grace=10)

    def _in_start_order(self, pods: list[Pod]) -> list[Pod]:
        return sorted(pods, key=lambda p: self.stage.delays.get((p.job, p.index), 0.0))

    def _start(self, pod: Pod) -> Running:
        delay = self.stage.delays.pop((pod.job, pod.index), 0.0)
        time.sleep(delay)
        attempt = self.attempts.get(pod.index, 0)
        self.attempts[pod.index] = attempt + 1
        folder = self.stage.root / f"r{self.restart}" / f"a{attempt}"
        running = start(pod, self.stage.app, folder, self.dns)
        self.stage.started.append((self.js["metadata"]["name"], pod.job, pod.index))
        fault = self.stage.faults.pop((pod.job, pod.index, attempt), None)
        if fault:  # beside the pods, as a node is lost whatever its peers do
            threading.Thread(target=fault, args=(running,), daemon=True).start()
        return running

    def _next_exit(self, running: dict[int, Running]) -> tuple[int, int]:
        deadline = time.monotonic() + self.stage.timeout
        while time.monotonic() < deadline:
            for index, r in running.items():
                if r.proc.poll() is not None:
                    return index, r.proc.returncode
            time.sleep(0.2)
        tails = "\n".join(r.tail() for r in running.values())
        raise AssertionError(f"pods still running after {self.stage.timeout} s\n{tails}")

    def _failed(self, spec: dict, pod: Pod, code: int) -> tuple[str, str] | None:
        """A failed pod: the Job's verdict (reason, message) if the Job fails, else None
        and the index is started again."""
        action, i = pod_failure_action(spec, code)
        ns = self.js["metadata"].get("namespace", "default")
        if action == "FailJob":
            message = EXIT_MESSAGE.format(c="mlmjob", ns=ns, pod=pod.name, code=code, i=i)
            return "PodFailurePolicy", message
        if action == "Ignore":
            return None
        self.counted[pod.index] = self.counted.get(pod.index, 0) + 1
        if "backoffLimitPerIndex" in spec:
            if self.counted[pod.index] > spec["backoffLimitPerIndex"]:
                return "FailedIndexes", "Job has failed indexes"
            return None
        if sum(self.counted.values()) > spec.get("backoffLimit", 6):
            return "BackoffLimitExceeded", "Job has reached the specified backoff limit"
        return None


def pod_failure_action(spec: dict, failure: int | str) -> tuple[str | None, int]:
    """The first podFailurePolicy rule that matches a failed pod: its container's exit code
    (an int) or a condition it carries (`"DisruptionTarget"`; the pods run here never do:
    a node drain is not emulated). (None, -1): no rule, the failure is counted."""
    for i, rule in enumerate(spec.get("podFailurePolicy", {}).get("rules", [])):
        on = rule.get("onExitCodes")
        if (
            on
            and isinstance(failure, int)
            and (failure in on["values"]) == (on["operator"] == "In")
        ):
            return rule["action"], i
        if failure in [c["type"] for c in rule.get("onPodConditions", [])]:
            return rule["action"], i
    return None, -1


def jobset_action(js: dict, reason: str, message: str) -> str | None:
    """The first failurePolicy rule whose reasons and message patterns match a failed Job."""
    for rule in js["spec"].get("failurePolicy", {}).get("rules", []):
        if reason not in rule.get("onJobFailureReasons", [reason]):
            continue
        patterns = rule.get("onJobFailureMessagePatterns")
        if patterns is None or any(re.search(p, message) for p in patterns):
            return rule["action"]
    return None


def kill_when(text: str, timeout: float = 300) -> Fault:
    """A fault: the pod's node is lost once its log shows `text`."""

    def fault(running: Running) -> None:
        deadline = time.monotonic() + timeout
        while text not in running.log.read_text(errors="replace"):
            assert running.proc.poll() is None, running.tail()
            assert time.monotonic() < deadline, running.tail()
            time.sleep(0.2)
        with contextlib.suppress(ProcessLookupError):
            running.kill()

    return fault
