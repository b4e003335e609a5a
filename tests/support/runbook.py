"""The README's Kubernetes runbook, executed: its commands, as written, against a stand-in
cluster (no API server here: a mock of the API, said so, over real pods).

`Runbook.blocks()` reads the README's ```bash blocks that follow a
`<!-- runbook: NAME -->` line; `Cluster.sh(block)` runs one block's commands in order:
- `kubectl apply -k DIR [-l SELECTOR]`, `kubectl apply -f FILE`, `kubectl create -f FILE`:
  kustomize renders (kubectl's own); a ConfigMap is stored, a JobSet runs to its end at
  once (tests/support/controllers.py), a WorkflowTemplate is stored, a Workflow walks its
  template (tests/support/argo.py);
- `kubectl [-n NS] create secret generic NAME --from-env-file=FILE`: the pods' Secret;
- `kubectl [-n NS] wait jobset/NAME --for=jsonpath='{.status.terminalState}'=X`: the
  JobSet's state must be X (a real wait would time out otherwise: that is a failure here);
- `kubectl delete -k DIR --cascade=foreground --wait`, `kubectl wait pod -l SEL --for=delete`:
  the objects go; no pod of theirs may still run (every stand-in pod has ended);
- `argo -n NS watch|retry @latest`, `python .../k8s/workflow.py OVERLAY`.
Anything else fails the test: a runbook command the tests do not run is not in it.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from support.argo import Workflow, matches
from support.controllers import Stage
from support.kubelet import render

_BLOCK = re.compile(r"<!-- runbook: ([\w-]+) -->\s*```bash\n(.*?)```", re.S)


def blocks(readme: Path) -> dict[str, str]:
    return {m.group(1): m.group(2) for m in _BLOCK.finditer(readme.read_text())}


def commands(block: str) -> list[list[str]]:
    text = re.sub(r"\\\n\s*", " ", block)
    out = []
    for line in text.splitlines():
        words = shlex.split(line, comments=True)
        if words:
            out.append(words)
    return out


@dataclass
class Cluster:
    """The API server's objects, by (kind, name); pods run through `stage`."""

    stage: Stage
    cwd: Path
    objects: dict[tuple[str, str], dict] = field(default_factory=dict)
    workflows: list[Workflow] = field(default_factory=list)
    before: dict = field(default_factory=dict)  # Argo task -> hook (a test's fault)

    def sh(self, block: str) -> None:
        for words in commands(block):
            self.run(words)

    def run(self, words: list[str]) -> None:
        tool, *args = words
        opts, rest = _options(args)
        if tool == "python":
            return self._python(rest)
        if tool == "argo":
            return self._argo(rest)
        assert tool == "kubectl", words
        verb = rest[0]
        handler = getattr(self, f"_cmd_{verb}", None)
        assert handler, f"a runbook command the stand-in does not know: {words}"
        handler(rest[1:], opts)

    def _python(self, rest: list[str]) -> None:
        assert rest[0].endswith("k8s/workflow.py"), rest
        proc = subprocess.run(
            [sys.executable, str(self.cwd / rest[0]), *rest[1:]],
            cwd=self.cwd,
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, proc.stderr

    def _argo(self, rest: list[str]) -> None:
        verb, which = rest
        assert which == "@latest" and self.workflows, rest
        if verb == "retry":
            self.workflows[-1].walk(self._create, self.before)
        else:
            assert verb == "watch", rest

    def _docs(self, opts: dict) -> list[dict]:
        if "-k" in opts:
            docs = render(self.cwd / opts["-k"])
        else:
            docs = list(yaml.safe_load_all((self.cwd / opts["-f"]).read_text()))
        sel = opts.get("-l")
        return [d for d in docs if d and (sel is None or matches(sel, _labels(d).get))]

    def _cmd_apply(self, rest: list[str], opts: dict) -> None:
        for doc in self._docs(opts):
            self._create(doc)

    def _cmd_create(self, rest: list[str], opts: dict) -> None:
        if rest[:2] == ["secret", "generic"]:
            return self._secret(opts, rest[2])
        assert not rest, rest
        for doc in self._docs(opts):
            self._create(doc)

    def _create(self, doc: dict) -> dict:
        kind, meta = doc["kind"], doc["metadata"]
        if kind == "Workflow":
            return self._submit(doc)
        key = (kind, meta["name"])
        assert key not in self.objects or kind != "JobSet", f"{key} exists: a JobSet is immutable"
        self.objects[key] = doc
        if kind == "ConfigMap":
            self.stage.cluster.configmaps[meta["name"]] = doc.get("data", {})
        if kind == "JobSet":
            doc["status"] = self.stage.run(doc)
            return doc["status"]
        return {}

    def _submit(self, doc: dict) -> dict:
        ref = doc["spec"]["workflowTemplateRef"]["name"]
        tmpl = self.objects[("WorkflowTemplate", ref)]
        wf = Workflow(tmpl, doc["metadata"]["generateName"] + str(len(self.workflows)))
        self.workflows.append(wf)
        wf.walk(self._create, self.before)
        return {}

    def _cmd_wait(self, rest: list[str], opts: dict) -> None:
        if opts.get("--for") == "delete":
            assert rest == ["pod"], rest
            return  # every stand-in pod has ended by the time its JobSet's status is set
        (target,) = rest
        kind, name = target.split("/")
        assert kind == "jobset", target
        m = re.fullmatch(r"jsonpath=\{\.status\.terminalState\}=(\w+)", opts["--for"])
        assert m, opts["--for"]
        got = self.objects[("JobSet", name)]["status"]["terminalState"]
        assert got == m.group(1), f"kubectl wait {target}: {got}, not {m.group(1)}"

    def _cmd_delete(self, rest: list[str], opts: dict) -> None:
        assert opts.get("--cascade") == "foreground" and "--wait" in opts, opts
        for doc in self._docs(opts):
            self.objects.pop((doc["kind"], doc["metadata"]["name"]), None)

    def _secret(self, opts: dict, name: str) -> None:
        env = (self.cwd / opts["--from-env-file"]).read_text().splitlines()
        pairs = dict(line.split("=", 1) for line in env if line and not line.startswith("#"))
        self.stage.cluster.secrets[name] = pairs


def _labels(doc: dict) -> dict:
    return doc["metadata"].get("labels", {})


def _options(args: list[str]) -> tuple[dict, list[str]]:
    """kubectl/argo flags (`-n NS`, `-k DIR`, `--for=X`, `--wait`) apart from the words."""
    opts, rest, it = {}, [], iter(args)
    for a in it:
        if a.startswith("--"):
            k, _, v = a.partition("=")
            opts[k] = v
        elif a in ("-n", "-k", "-f", "-l"):
            opts[a] = next(it)
        else:
            rest.append(a)
    return opts, rest
