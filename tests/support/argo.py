"""An Argo Workflows (v4.1) WorkflowTemplate, walked as Argo's controller and executor would.

- DAG: tasks in dependency order; a task runs when every task it `depends` on Succeeded
  (the `depends` forms the WorkflowTemplates here use: task names joined by `&&`), and is
  Omitted when one did not.
- resource templates: the manifest string parsed, `generateName` given a suffix,
  `setOwnerReference` adding the Workflow as controller owner; `apply` stores the object,
  `create` runs it (a JobSet through tests/support/controllers.py) and reads the object's
  status as Argo does: failure condition first, then success (workflow/executor/
  resource.go `matchConditions`).
- conditions and `kubectl -l` selectors: Kubernetes label-selector syntax (`k8s.io/
  apimachinery/pkg/labels` Parse), with Argo's keys being gjson paths into the object.
  Written here because no Python library parses that syntax; only what the manifests and
  runbook use is supported: `=`, `==`, `!=`, `in`, `notin`, `>`, `<`, exists, `!`exists,
  and dotted paths without gjson modifiers.
- `argo retry`: nodes that Succeeded are kept; the others run again.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import yaml

_REQ = re.compile(
    r"\s*(?P<neg>!)?(?P<key>[A-Za-z0-9_./-]+)\s*"
    r"(?:(?P<op>==|!=|=|>|<|in(?=[\s(])|notin(?=[\s(]))\s*(?P<val>\([^)]*\)|[^,\s]+))?\s*$"
)
_suffix = (f"{n:05x}" for n in itertools.count(0xA0000, 7919))


def requirements(selector: str) -> list[tuple[str, str, list[str]]]:
    """(key, op, values) of each comma-separated requirement (commas in sets kept)."""
    parts, depth, cur = [], 0, ""
    for ch in selector:
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    out = []
    for part in parts:
        m = _REQ.match(part)
        assert m, f"not a label selector requirement: {part!r}"
        op = (m["op"] or ("!" if m["neg"] else "exists")).strip()
        val = (m["val"] or "").strip("()")
        out.append((m["key"], op, [v.strip() for v in val.split(",") if v.strip()]))
    return out


def matches(selector: str, lookup: Callable[[str], str | None]) -> bool:
    """Every requirement holds; `lookup(key)` is None when the key is absent."""
    for key, op, values in requirements(selector):
        got = lookup(key)
        if op == "exists":
            ok = got is not None
        elif op == "!":
            ok = got is None
        elif op in ("=", "==", "in"):
            ok = got is not None and got in values
        elif op in ("!=", "notin"):
            ok = got is None or got not in values
        else:  # > and <: integers only, as Kubernetes parses them
            ok = _int(got) is not None and (
                _int(got) > int(values[0]) if op == ">" else _int(got) < int(values[0])
            )
        if not ok:
            return False
    return True


def _int(value: str | None) -> int | None:
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def path_lookup(obj: dict) -> Callable[[str], str | None]:
    """gjson's dotted path, as Argo reads an object's status (values as strings)."""

    def lookup(path: str) -> str | None:
        cur = obj
        for part in path.split("."):
            if not isinstance(cur, dict) or part not in cur:
                return None
            cur = cur[part]
        return str(cur).lower() if isinstance(cur, bool) else str(cur)

    return lookup


@dataclass
class Workflow:
    """One submission of a WorkflowTemplate: its nodes' phases and what its steps made."""

    template: dict
    name: str
    nodes: dict[str, str] = field(default_factory=dict)  # task -> Succeeded/Failed/Omitted
    objects: list[dict] = field(default_factory=list)  # every object a step applied/created

    @property
    def phase(self) -> str:
        tasks = self.tasks()
        ok = all(self.nodes.get(t["name"]) == "Succeeded" for t in tasks)
        return "Succeeded" if ok else "Failed"

    def tasks(self) -> list[dict]:
        (entry,) = [t for t in self.template["spec"]["templates"] if "dag" in t]
        assert entry["name"] == self.template["spec"]["entrypoint"]
        return entry["dag"]["tasks"]

    def walk(self, create: Callable[[dict], dict], before: dict | None = None) -> str:
        """Every task not yet Succeeded, in order; `create(obj)` runs a created object and
        returns its status; `before[task]()` runs just before that task (a test's hook)."""
        templates = {t["name"]: t for t in self.template["spec"]["templates"]}
        for task in ordered(self.tasks()):
            name = task["name"]
            if self.nodes.get(name) == "Succeeded":
                continue
            deps = [d.strip() for d in task.get("depends", "").split("&&") if d.strip()]
            if any(self.nodes.get(d) != "Succeeded" for d in deps):
                self.nodes[name] = "Omitted"
                continue
            if before and name in before:
                before[name]()
            self.nodes[name] = self._step(templates[task["template"]]["resource"], create)
        return self.phase

    def _step(self, res: dict, create: Callable[[dict], dict]) -> str:
        obj = yaml.safe_load(res["manifest"])
        meta = obj["metadata"]
        if "generateName" in meta:
            meta["name"] = meta.pop("generateName") + next(_suffix)
        if res.get("setOwnerReference"):
            owner = {"apiVersion": "argoproj.io/v1alpha1", "kind": "Workflow"}
            meta.setdefault("ownerReferences", []).append(
                {**owner, "name": self.name, "controller": True}
            )
        self.objects.append(obj)
        assert res["action"] in ("apply", "create"), res["action"]
        status = create(obj)  # the API server stores it; a JobSet runs to its end
        if res["action"] == "apply":
            return "Succeeded"
        obj["status"] = status
        lookup = path_lookup(obj)
        if res.get("failureCondition") and matches(res["failureCondition"], lookup):
            return "Failed"
        assert matches(res["successCondition"], lookup), f"neither condition: {obj['status']}"
        return "Succeeded"


def ordered(tasks: list[dict]) -> list[dict]:
    """Tasks so that each comes after those it depends on."""
    done, out, todo = set(), [], list(tasks)
    while todo:
        ready = [
            t
            for t in todo
            if all(d.strip() in done for d in t.get("depends", "").split("&&") if d.strip())
        ]
        assert ready, f"a dependency cycle or an unknown task among {[t['name'] for t in todo]}"
        for t in ready:
            out.append(t)
            done.add(t["name"])
            todo.remove(t)
    return out
