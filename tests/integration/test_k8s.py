"""Kubernetes submission, checked offline: no API server here, nothing runs but kubectl's
kustomize, kubernetes-validate and k8s/workflow.py.

A run is four JobSets, one per stage (preflight, preprocess: CPU; train, infer: GPU), each
one Kueue workload, created one after another by an Argo WorkflowTemplate
(k8s/overlays/*/workflow/, made by k8s/workflow.py). Here: every kustomization renders;
core objects and each JobSet's child Job pass `kubernetes-validate --strict` (1.33); the
custom objects match their released CRD schemas (../shared/k8s-schemas: the data layer);
the committed workflow files are what the overlays render; the pods are wired as their
stages need. What Kueue reserves, where it places each stage, what its pods may do (the
restricted Pod Security Standard) and how a failed stage ends: test_k8s_kueue.py. The
manifests run by a stand-in cluster: test_k8s_run.py.
"""

from __future__ import annotations

import copy
import functools
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from support.data import DATA, ROOT, need_shared
from support.kubelet import BIN, Cluster, render

from job.config import load_config

K8S = ROOT / "k8s"
# overlay -> the overlay whose setup/ and queues/ it uses (the namespace it runs in)
OVERLAYS = {
    "askscience-5k": "askscience-5k",
    "full-eli5": "full-eli5",
    "full-eli5-gke": "full-eli5",
    "full-eli5-eks-efa": "full-eli5",
}
STAGES = ["preflight", "preprocess", "train", "infer"]
GPU_STAGES = {"train", "infer"}
COMPONENT = "app.kubernetes.io/component"
GPU = "nvidia.com/gpu"
SCHEMAS = DATA.parent / "k8s-schemas"  # beside the data layer: ../shared/k8s-schemas
SCHEMA_FILES = {
    "JobSet": "jobset-v0.12.0-jobsets.yaml",
    "LocalQueue": "kueue-v0.19.2-localqueues.yaml",
    "ClusterQueue": "kueue-v0.19.2-clusterqueues.yaml",
    "ResourceFlavor": "kueue-v0.19.2-resourceflavors.yaml",
    "WorkflowTemplate": "argo-workflows-v4.1.2-workflowtemplates.yaml",
    "Workflow": "argo-workflows-v4.1.2-workflows.yaml",
}


def overlay(name: str) -> Path:
    return K8S / "overlays" / name


def kustomizations() -> list[Path]:
    return sorted(p.parent for p in K8S.rglob("kustomization.yaml"))


@functools.cache
def _rendered(folder: Path) -> tuple[dict, ...]:
    return tuple(render(folder))


def rendered(folder: Path) -> list[dict]:
    """kubectl kustomize's objects (rendered once per session; a copy to change freely)."""
    return copy.deepcopy(list(_rendered(folder)))


def stage_docs(name: str) -> dict[str, dict]:
    """The overlay's JobSets by stage, in pipeline order."""
    found = {
        d["metadata"]["labels"][COMPONENT]: d
        for d in rendered(overlay(name))
        if d["kind"] == "JobSet"
    }
    assert sorted(found) == sorted(STAGES), found.keys()
    return {s: found[s] for s in STAGES}


def configmap(name: str) -> dict:
    (cm,) = [d for d in rendered(overlay(name)) if d["kind"] == "ConfigMap"]
    return cm


def rjob(js: dict) -> dict:
    (r,) = js["spec"]["replicatedJobs"]
    return r


def pod_of(js: dict) -> dict:
    return rjob(js)["template"]["spec"]["template"]


def container(js: dict) -> dict:
    (c,) = pod_of(js)["spec"]["containers"]
    return c


def env_of(c: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


def workflow_file(name: str, which: str) -> dict:
    return yaml.safe_load((overlay(name) / "workflow" / f"{which}.yaml").read_text())


def test_the_tables_here_name_every_overlay():
    assert sorted(OVERLAYS) == sorted(p.name for p in (K8S / "overlays").iterdir())
    for name in OVERLAYS:
        kinds = sorted(d["kind"] for d in rendered(overlay(name)))
        assert kinds == ["ConfigMap", "JobSet", "JobSet", "JobSet", "JobSet"], name


# ---- render and validate ------------------------------------------------------------------


@pytest.mark.parametrize("folder", kustomizations(), ids=lambda p: str(p.relative_to(K8S)))
def test_every_kustomization_renders(folder):
    docs = rendered(folder)
    assert docs and all(d["kind"] and d["metadata"]["name"] for d in docs)


def as_jobs(js: dict) -> list[dict]:
    """Each replicated job's template as the batch/v1 Job the JobSet controller creates."""
    return [
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {
                "name": f"{js['metadata']['name']}-{r['name']}-0",
                "namespace": js["metadata"].get("namespace", "default"),
            },
            "spec": r["template"]["spec"],
        }
        for r in js["spec"]["replicatedJobs"]
    ]


def test_core_objects_and_child_jobs_pass_strict_validation(tmp_path):
    """Every folder (overlays, their setup/ and queues/, base, setup, argo) in one run of
    kubernetes-validate, a file per folder."""
    files, kinds = {}, set()
    for folder in kustomizations():
        docs = rendered(folder)
        core = [d for d in docs if d["apiVersion"] in ("v1", "rbac.authorization.k8s.io/v1")]
        core += [j for d in docs if d["kind"] == "JobSet" for j in as_jobs(d)]
        if core:
            path = tmp_path / (str(folder.relative_to(K8S)).replace("/", "_") + ".yaml")
            path.write_text(yaml.safe_dump_all(core))
            files[path] = len(core)
            kinds |= {d["kind"] for d in core}
    assert kinds == {"ConfigMap", "Job", "Namespace", "Role", "RoleBinding", "ServiceAccount"}
    proc = subprocess.run(
        [str(BIN / "kubernetes-validate"), "-k", "1.33.0", "--strict", *map(str, files)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for path, n in files.items():
        assert proc.stdout.count(f"{path} passed") == n, proc.stdout


@functools.cache
def crd_schema(kind: str, api_version: str) -> dict:
    need_shared(SCHEMAS)
    text = (SCHEMAS / SCHEMA_FILES[kind]).read_text()
    crd = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # 2.8 MB
    version = api_version.split("/")[1]
    (v,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    assert v["served"], f"{api_version} {kind} is not served by this release"
    return v["schema"]["openAPIV3Schema"]


def schema_errors(doc: dict) -> list[tuple[str, str]]:
    import jsonschema

    schema = crd_schema(doc["kind"], doc["apiVersion"])
    return [(e.validator, e.json_path) for e in jsonschema.Draft7Validator(schema).iter_errors(doc)]


def custom_objects(kind: str) -> list[dict]:
    docs = [d for f in kustomizations() for d in rendered(f)]
    docs += yaml.safe_load_all((K8S / "admin" / "kueue.yaml").read_text())
    docs += [workflow_file(n, w) for n in OVERLAYS for w in ("template", "run")]
    return [d for d in docs if d["kind"] == kind]


def _set_rule_action(d):  # the Job's action name where the JobSet's is meant
    d["spec"]["failurePolicy"]["rules"][0]["action"] = "FailJob"


def _set_step_action(d):  # Argo's verbs are lower case
    d["spec"]["templates"][2]["resource"]["action"] = "Create"


MUTATIONS = {
    "JobSet": (_set_rule_action, ("enum", "$.spec.failurePolicy.rules[0].action")),
    "LocalQueue": (
        lambda d: d["spec"].update(clusterQueue="mlmjob_gpu"),
        ("pattern", "$.spec.clusterQueue"),
    ),
    "ClusterQueue": (
        lambda d: d["spec"].update(queueingStrategy="FIFO"),
        ("enum", "$.spec.queueingStrategy"),
    ),
    "ResourceFlavor": (
        lambda d: d["spec"].update(nodeLabels={f"pool-{i}": "x" for i in range(9)}),
        ("maxProperties", "$.spec.nodeLabels"),
    ),
    "WorkflowTemplate": (_set_step_action, ("enum", "$.spec.templates[2].resource.action")),
    "Workflow": (
        lambda d: d["spec"]["workflowTemplateRef"].update(clusterScope="false"),
        ("type", "$.spec.workflowTemplateRef.clusterScope"),
    ),
}


@pytest.mark.data
@pytest.mark.parametrize("kind", SCHEMA_FILES)
def test_custom_objects_match_their_released_crd_schemas(kind):
    docs = custom_objects(kind)
    assert docs, kind
    for doc in docs:
        assert schema_errors(doc) == [], f"{kind} {doc['metadata']}"
    mutate, error = MUTATIONS[kind]  # and the schema does catch a mistake
    broken = copy.deepcopy(docs[0])
    mutate(broken)
    assert schema_errors(broken) == [error]


# ---- the Argo pipeline --------------------------------------------------------------------


def workflow_check(*folders: str, cwd: Path = ROOT, write: bool = False):
    args = [] if write else ["--check"]
    return subprocess.run(
        [sys.executable, str(K8S / "workflow.py"), *args, *folders],
        cwd=cwd,
        capture_output=True,
        text=True,
    )


@pytest.mark.parametrize("name", OVERLAYS)
def test_committed_workflow_files_are_what_the_overlay_renders(name):
    assert (overlay(name) / "workflow").is_dir()
    proc = workflow_check(f"k8s/overlays/{name}")
    assert (proc.returncode, proc.stderr) == (0, "")


def test_workflow_check_names_the_stale_file_after_an_edit(tmp_path):
    shutil.copytree(K8S, tmp_path / "k8s")
    folder = "k8s/overlays/askscience-5k"
    assert workflow_check(folder, cwd=tmp_path).returncode == 0  # the copy is faithful
    kustomization = tmp_path / folder / "kustomization.yaml"
    text = kustomization.read_text()
    assert "- MLMJOB_RUN=askscience-5k " in text
    kustomization.write_text(text.replace("- MLMJOB_RUN=askscience-5k ", "- MLMJOB_RUN=my-run "))
    proc = workflow_check(folder, cwd=tmp_path)
    assert (proc.returncode, proc.stderr) == (
        1,
        f"{folder}/workflow/template.yaml: not what the overlay renders; run python k8s/workflow.py\n",
    )
    assert workflow_check(folder, cwd=tmp_path, write=True).returncode == 0
    assert workflow_check(folder, cwd=tmp_path).returncode == 0
    assert "MLMJOB_RUN: my-run" in (tmp_path / folder / "workflow" / "template.yaml").read_text()


RESOURCE = {
    "action": "create",
    "setOwnerReference": True,  # deleting the Workflow deletes its JobSets
    "successCondition": "status.terminalState == Completed",
    "failureCondition": "status.terminalState == Failed",
}


@pytest.mark.parametrize("name", OVERLAYS)
def test_workflow_creates_the_rendered_stages_one_after_another(name):
    tmpl, run = workflow_file(name, "template"), workflow_file(name, "run")
    by = {t["name"]: t for t in tmpl["spec"]["templates"]}
    assert sorted(by) == sorted(["pipeline", "run-config", *STAGES])
    assert tmpl["spec"]["entrypoint"] == "pipeline"
    tasks = [(t["name"], t["template"], t.get("depends")) for t in by["pipeline"]["dag"]["tasks"]]
    assert tasks == [
        ("run-config", "run-config", None),
        ("preflight", "preflight", "run-config"),
        ("preprocess", "preprocess", "preflight"),
        ("train", "train", "preprocess"),
        ("infer", "infer", "train"),
    ]
    cm = configmap(name)
    assert by["run-config"]["resource"]["action"] == "apply"
    assert yaml.safe_load(by["run-config"]["resource"]["manifest"]) == cm
    for stage, js in stage_docs(name).items():
        resource = dict(by[stage]["resource"])
        manifest = yaml.safe_load(resource.pop("manifest"))
        assert resource == RESOURCE, stage
        js["metadata"]["generateName"] = js["metadata"].pop("name") + "-"
        assert manifest == js, stage
    namespace = cm["metadata"]["namespace"]
    assert tmpl["metadata"]["namespace"] == run["metadata"]["namespace"] == namespace
    assert run["metadata"]["generateName"] == tmpl["metadata"]["name"] + "-"
    assert run["spec"] == {"workflowTemplateRef": {"name": tmpl["metadata"]["name"]}}


def test_the_step_account_may_do_what_the_steps_do():
    """Argo's steps (spec.serviceAccountName) apply a ConfigMap, create and watch JobSets and
    report their outcome; the Role allows that and no more (no Secrets, no pods)."""
    docs = rendered(K8S / "argo")
    (role,) = [d for d in docs if d["kind"] == "Role"]
    (binding,) = [d for d in docs if d["kind"] == "RoleBinding"]
    allowed = {
        (g, r): set(rule["verbs"])
        for rule in role["rules"]
        for g in rule["apiGroups"]
        for r in rule["resources"]
    }
    assert allowed == {
        ("jobset.x-k8s.io", "jobsets"): {"create", "get", "list", "watch", "patch"},
        ("", "configmaps"): {"create", "get", "patch"},
        ("argoproj.io", "workflowtaskresults"): {"create", "patch"},
    }
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "mlmjob-workflow"}]
    for name in OVERLAYS:
        assert workflow_file(name, "template")["spec"]["serviceAccountName"] == "mlmjob-workflow"


# ---- the pods' wiring ----------------------------------------------------------------------


@pytest.mark.parametrize("home", sorted(set(OVERLAYS.values())))
def test_the_namespace_enforces_the_restricted_standard(home):
    (ns,) = [d for d in rendered(overlay(home) / "setup") if d["kind"] == "Namespace"]
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    users = [n for n, h in OVERLAYS.items() if h == home]
    for name in users:  # every object of the overlays that run there is in it
        assert {d["metadata"]["namespace"] for d in rendered(overlay(name))} == {
            ns["metadata"]["name"]
        }
    accounts = {
        d["metadata"]["name"]
        for d in rendered(overlay(home) / "setup")
        if d["kind"] == "ServiceAccount"
    }
    assert accounts == {"mlmjob", "mlmjob-workflow"}


@pytest.mark.parametrize("name", OVERLAYS)
def test_labels_account_and_guaranteed_qos(name):
    instance = OVERLAYS[name]  # the gke and eks overlays are full-eli5's run
    for stage, js in stage_docs(name).items():
        pod = pod_of(js)
        for labels in (js["metadata"]["labels"], pod["metadata"]["labels"]):
            assert labels["app.kubernetes.io/name"] == "mlmjob"
            assert labels["app.kubernetes.io/instance"] == instance
            assert labels[COMPONENT] == stage
        assert pod["spec"]["serviceAccountName"] == "mlmjob"
        assert pod["spec"]["automountServiceAccountToken"] is False
        for c in pod["spec"]["containers"]:
            assert c["resources"]["requests"] == c["resources"]["limits"], stage  # Guaranteed
        assert all(v["emptyDir"].get("sizeLimit") for v in pod["spec"]["volumes"]), stage


@pytest.mark.parametrize("name", OVERLAYS)
def test_each_stage_loads_only_the_secrets_it_needs(name):
    cm = configmap(name)["metadata"]["name"]
    assert re.fullmatch(rf"mlmjob-run-{OVERLAYS[name]}-[a-z0-9]{{10}}", cm)
    sources = {s: container(js)["envFrom"] for s, js in stage_docs(name).items()}
    s3 = {"secretRef": {"name": "mlmjob-s3", "optional": True}}
    assert {s: f[:2] for s, f in sources.items()} == {
        s: [{"configMapRef": {"name": cm}}, s3] for s in STAGES
    }
    secrets = {
        s: [x["secretRef"]["name"] for x in f if "secretRef" in x] for s, f in sources.items()
    }
    assert secrets == {
        "preflight": ["mlmjob-s3"],
        "preprocess": ["mlmjob-s3"],
        "train": ["mlmjob-s3", "mlmjob-tracking", "mlmjob-hub"],
        "infer": ["mlmjob-s3"],
    }
    assert all(x["secretRef"]["optional"] for f in sources.values() for x in f if "secretRef" in x)


@pytest.mark.parametrize("name", OVERLAYS)
def test_device_and_scale_wiring(name):
    docs = rendered(overlay(name))
    assert configmap(name)["data"]["MLMJOB_DEVICE"] == "cuda"
    cluster = Cluster.of(docs, {}, {})  # builds each pod's environment and args, runs nothing
    for stage, js in stage_docs(name).items():
        c, spec = container(js), rjob(js)["template"]["spec"]
        env, gpus = env_of(c), c["resources"]["limits"].get(GPU)
        assert spec["completions"] == spec["parallelism"], stage
        workers = env.get("MLMJOB_NNODES" if stage == "train" else "MLMJOB_NUM_WORKERS", "1")
        assert int(workers) == spec["completions"], stage
        pods = cluster.pods(js, rjob(js))  # every $(VAR) in args is defined, or this fails
        assert len(pods) == spec["completions"]
        if stage in GPU_STAGES:
            assert "run.device=$(MLMJOB_DEVICE)" in c["args"], stage
            assert "run.device=cuda" in pods[0].argv, stage
            assert int(gpus) >= 1 and env["MLMJOB_NPROC_PER_NODE"] == gpus, stage
        else:
            assert gpus is None and env["NVIDIA_VISIBLE_DEVICES"] == "void", stage
            assert not any(a.startswith("run.device=") for a in c["args"]), stage


@pytest.mark.parametrize("name", OVERLAYS)
def test_train_ends_a_stuck_collective_and_stops_in_time(name):
    js = stage_docs(name)["train"]
    env = env_of(container(js))
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "3"
    assert int(env["TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC"]) > 0
    assert int(env["MLMJOB_COLLECTIVE_TIMEOUT"]) > 0
    (pod, *_) = Cluster.of(rendered(overlay(name)), {}, {}).pods(js, rjob(js))
    assert f"train.collective_timeout_seconds={env['MLMJOB_COLLECTIVE_TIMEOUT']}" in pod.argv
    assert pod_of(js)["spec"]["terminationGracePeriodSeconds"] <= 300


def test_no_credentials_in_any_rendered_text():
    texts = [yaml.safe_dump_all(rendered(f)) for f in kustomizations()]
    texts += [p.read_text() for p in K8S.rglob("*.yaml")]
    assert not [d for f in kustomizations() for d in rendered(f) if d["kind"] == "Secret"]
    for text in texts:
        assert not re.search(
            r"AWS_SECRET_ACCESS_KEY|aws_secret|AKIA[0-9A-Z]{16}|hf_[A-Za-z0-9]{30}", text
        )


@pytest.mark.parametrize("name", OVERLAYS)
def test_the_config_each_overlay_names_loads(name):
    cfg = load_config(ROOT / "configs" / f"{configmap(name)['data']['MLMJOB_CONFIG']}.yaml")
    if cfg.train.deepspeed:
        assert (ROOT / cfg.train.deepspeed).exists()  # the image ships configs/ at /app
