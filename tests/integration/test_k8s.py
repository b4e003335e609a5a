"""Kubernetes submission, checked offline and then run: no API server here.

1. Every overlay renders with kustomize (kubectl's) and validates: core objects and each
   replicated job's Job template with `kubernetes-validate --strict` (Kubernetes 1.33), the
   JobSet and Kueue objects against their released CRD schemas (../shared/k8s-schemas).
2. The rendered JobSet is executed (tests/support/kubelet.py): every container of every replicated
   job runs its own command, args and environment in dependsOn order against the SeaweedFS
   server, with a tiny model; the pipeline's outputs must be in the bucket.
3. Training pods started in the wrong order, and pod 0 lost mid-run, still finish.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from support.data import DATA, ROOT, need_shared
from support.kubelet import BIN, Cluster, render, stages, start
from support.s3 import free_port

from job.config import load_config

OVERLAYS = {"askscience-5k": "eli5-askscience", "full-eli5": "eli5-full"}
SCHEMAS = DATA.parent / "k8s-schemas"  # beside the data layer: ../shared/k8s-schemas
SCHEMA_FILES = {
    "JobSet": "jobset-v0.12.0-jobsets.yaml",
    "LocalQueue": "kueue-v0.19.2-localqueues.yaml",
    "ClusterQueue": "kueue-v0.19.2-clusterqueues.yaml",
    "ResourceFlavor": "kueue-v0.19.2-resourceflavors.yaml",
}
STAGES = ["preflight", "preprocess", "train", "infer"]


def overlay(name: str) -> Path:
    return ROOT / "k8s" / "overlays" / name


def jobset_of(docs: list[dict]) -> dict:
    (js,) = [d for d in docs if d["kind"] == "JobSet"]
    return js


def rjobs(js: dict) -> dict[str, dict]:
    return {r["name"]: r for r in js["spec"]["replicatedJobs"]}


def container(rjob: dict) -> dict:
    (c,) = rjob["template"]["spec"]["template"]["spec"]["containers"]
    return c


def env_of(c: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


# ---- 1. render and validate ------------------------------------------------------------


def strict_validate(docs: list[dict], tmp_path: Path) -> None:
    path = tmp_path / "objects.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    proc = subprocess.run(
        [str(BIN / "kubernetes-validate"), "-k", "1.33.0", "--strict", str(path)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("passed") == len(docs), proc.stdout


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


@pytest.mark.parametrize("name", OVERLAYS)
def test_overlay_and_setup_validate_in_strict_mode(name, tmp_path):
    docs = render(overlay(name)) + render(overlay(name) / "setup")
    core = [d for d in docs if d["apiVersion"] == "v1"]
    assert {d["kind"] for d in core} == {"ConfigMap", "Namespace", "ServiceAccount"}
    strict_validate(core + as_jobs(jobset_of(docs)), tmp_path)


def crd_schema(kind: str, api_version: str) -> dict:
    need_shared(SCHEMAS)
    crd = yaml.safe_load((SCHEMAS / SCHEMA_FILES[kind]).read_text())
    version = api_version.split("/")[1]
    (v,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    assert v["served"], f"{api_version} {kind} is not served by this release"
    return v["schema"]["openAPIV3Schema"]


def validate_crd(doc: dict) -> None:
    import jsonschema

    jsonschema.validate(doc, crd_schema(doc["kind"], doc["apiVersion"]))


@pytest.mark.data
@pytest.mark.parametrize("name", OVERLAYS)
def test_jobset_and_queue_match_the_released_crd_schemas(name):
    import jsonschema

    docs = render(overlay(name)) + render(overlay(name) / "setup")
    custom = [d for d in docs if d["kind"] in SCHEMA_FILES]
    assert sorted(d["kind"] for d in custom) == ["JobSet", "LocalQueue"]
    for doc in custom:
        validate_crd(doc)
    broken = jobset_of(docs)
    broken["spec"]["replicatedJobs"][0]["replicas"] = "1"  # the schema does catch mistakes
    with pytest.raises(jsonschema.ValidationError):
        validate_crd(broken)


@pytest.mark.data
def test_cluster_admin_queue_example_matches_the_crd_schemas():
    docs = [d for d in yaml.safe_load_all((ROOT / "k8s" / "admin" / "kueue.yaml").read_text())]
    assert sorted(d["kind"] for d in docs) == ["ClusterQueue", "ResourceFlavor"]
    for doc in docs:
        validate_crd(doc)
    (cq,) = [d for d in docs if d["kind"] == "ClusterQueue"]
    local = yaml.safe_load((ROOT / "k8s" / "setup" / "localqueue.yaml").read_text())
    assert local["spec"]["clusterQueue"] == cq["metadata"]["name"]


# ---- wiring: what the schemas cannot say -----------------------------------------------


@pytest.mark.parametrize("name, config", OVERLAYS.items())
def test_pipeline_order_and_failure_policy(name, config):
    js = jobset_of(render(overlay(name)))
    jobs = rjobs(js)
    assert [r["name"] for r in stages(js)] == STAGES
    assert {n: [d["name"] for d in r.get("dependsOn", [])] for n, r in jobs.items()} == {
        "preflight": [],
        "preprocess": ["preflight"],
        "train": ["preprocess"],
        "infer": ["train"],
    }
    assert js["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "mlmjob"
    policy = js["spec"]["failurePolicy"]
    rules = {r["name"]: r for r in policy["rules"]}
    assert rules["BadInput"]["action"] == "FailJobSet"
    assert rules["Preempted"]["action"] == "RestartJobSetAndIgnoreMaxRestarts"
    assert policy["maxRestarts"] >= 1 and js["spec"]["ttlSecondsAfterFinished"] > 0
    for rjob in jobs.values():
        spec = rjob["template"]["spec"]
        fail_on = [r for r in spec["podFailurePolicy"]["rules"] if r["action"] == "FailJob"]
        assert {"containerName": "mlmjob", "operator": "In", "values": [2]} in [
            r.get("onExitCodes") for r in fail_on
        ]
        assert spec["completions"] == spec["parallelism"]
    train = jobs["train"]["template"]["spec"]
    assert train["backoffLimit"] == 0  # a lost pod restarts the whole group (failurePolicy)
    assert all(
        "backoffLimitPerIndex" in jobs[n]["template"]["spec"] for n in ("preprocess", "infer")
    )
    load_config(ROOT / "configs" / f"{config}.yaml")  # what the pods will read loads


# The Job controller's messages for a podFailurePolicy FailJob (pkg/controller/job,
# pod_failure_policy.go): the JobSet's onJobFailureMessagePatterns must match them.
EXIT_MESSAGE = "Container mlmjob for pod {ns}/{pod} failed with exit code {code} matching FailJob rule at index 0"
CONDITION_MESSAGE = "Pod {ns}/{pod} has condition DisruptionTarget matching FailJob rule at index 1"


def matching_rule(js: dict, reason: str, message: str) -> str | None:
    for rule in js["spec"]["failurePolicy"]["rules"]:
        if reason not in rule.get("onJobFailureReasons", [reason]):
            continue
        patterns = rule.get("onJobFailureMessagePatterns")
        if patterns is None or any(re.search(p, message) for p in patterns):
            return rule["action"]
    return None


def test_each_failure_kind_gets_its_action():
    js = jobset_of(render(overlay("full-eli5")))
    pod = dict(ns="mlmjob-full-eli5", pod="mlmjob-full-eli5-train-0-1-x7k2p")
    assert matching_rule(js, "PodFailurePolicy", EXIT_MESSAGE.format(code=2, **pod)) == "FailJobSet"
    assert matching_rule(js, "PodFailurePolicy", EXIT_MESSAGE.format(code=3, **pod)) == (
        "RestartJobSetAndIgnoreMaxRestarts"
    )
    assert matching_rule(js, "PodFailurePolicy", CONDITION_MESSAGE.format(**pod)) == (
        "RestartJobSetAndIgnoreMaxRestarts"
    )
    assert (
        matching_rule(js, "BackoffLimitExceeded", "Job has reached the specified backoff limit")
        == "RestartJobSet"
    )
    assert matching_rule(js, "FailedIndexes", "Job has failed indexes") == "RestartJobSet"


@pytest.mark.parametrize("name", OVERLAYS)
def test_pod_hygiene(name):
    docs = render(overlay(name))
    assert not [d for d in docs if d["kind"] in ("Secret", "Namespace")]  # kept apart
    text = yaml.safe_dump_all(docs)
    assert not re.search(r"AWS_SECRET_ACCESS_KEY|aws_secret|AKIA[0-9A-Z]{16}", text)
    js = jobset_of(docs)
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap"]
    assert re.fullmatch(rf"mlmjob-run-{name}-[a-z0-9]{{10}}", cm["metadata"]["name"])
    for rname, rjob in rjobs(js).items():
        pod = rjob["template"]["spec"]["template"]
        spec, c = pod["spec"], container(rjob)
        labels = pod["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "mlmjob"
        assert labels["app.kubernetes.io/instance"] == name
        assert labels["app.kubernetes.io/component"] == rname
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert c["securityContext"] == {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        }
        assert {m["mountPath"] for m in c["volumeMounts"]} >= {"/tmp", "/cache"}
        assert all(v["emptyDir"].get("sizeLimit") for v in spec["volumes"])
        assert {"configMapRef": {"name": cm["metadata"]["name"]}} in c["envFrom"]
        assert {"secretRef": {"name": "mlmjob-s3", "optional": True}} in c["envFrom"]
        assert spec["serviceAccountName"] == "mlmjob"
        res = c["resources"]
        assert res["requests"] == res["limits"], rname  # Guaranteed QoS
        gpus = res["limits"].get("nvidia.com/gpu")
        if rname in ("preflight", "preprocess"):
            assert gpus is None and env_of(c)["NVIDIA_VISIBLE_DEVICES"] == "void"
        else:
            assert int(gpus) >= 1 and env_of(c)["MLMJOB_NPROC_PER_NODE"] == gpus
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec[
                "tolerations"
            ]
        n = rjob["template"]["spec"]["completions"]
        key = {"train": "MLMJOB_NNODES"}.get(rname, "MLMJOB_NUM_WORKERS")
        if rname != "preflight":
            assert int(env_of(c)[key]) == n, rname


def test_full_eli5_scale():
    js = jobset_of(render(overlay("full-eli5")))
    jobs = rjobs(js)
    assert jobs["preprocess"]["template"]["spec"]["completions"] == 8
    assert jobs["train"]["template"]["spec"]["completions"] == 4
    assert env_of(container(jobs["train"]))["MLMJOB_NPROC_PER_NODE"] == "8"
    cfg = load_config(ROOT / "configs" / "eli5-full.yaml")
    assert cfg.train.deepspeed == "configs/deepspeed/zero2.json"
    assert (ROOT / cfg.train.deepspeed).exists()  # the image ships configs/ at /app


# ---- 2. the rendered pipeline, executed --------------------------------------------------

TINY = """\
# A tiny model on the bundled sample: the image's configs/ as this test builds it.
run: {{seed: 42, lease_ttl_seconds: 10}}  # a killed pod's lease: seconds
data:
  sources: ['{root}/job/sample/eli5-sample.jsonl']
  test_size: 0.2
  block_size: 64
model:
  name_or_path: '{root}/job/sample/tokenizer'
  from_scratch: true
  config_overrides: {{hidden_size: 64, num_hidden_layers: 1, num_attention_heads: 2,
                     intermediate_size: 128, max_position_embeddings: 130, type_vocab_size: 1}}
train:
  max_steps: {steps}
  per_device_batch_size: 4
  learning_rate: 2.0e-3
  warmup_steps: 0
  eval_every_steps: 1000
  checkpoint_every_steps: {checkpoint_every}
  log_every_steps: 1
infer: {{top_k: 2}}
"""


def user_overlay(tmp_path: Path, base: str, storage: str, patches: str = "") -> Path:
    """What the README tells a user to write: an overlay of their own over the repo's, with
    their bucket and run name (and, here, the image's test config)."""
    folder = tmp_path / "my-run"
    folder.mkdir()
    (folder / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources: ['{os.path.relpath(overlay(base), folder)}']\n"
        "configMapGenerator:\n  - name: mlmjob-run\n    behavior: merge\n    literals:\n"
        "      - MLMJOB_RUN=kubelet\n      - MLMJOB_CONFIG=kubelet-test\n"
        f"      - MLMJOB_STORAGE={storage}\n      - MLMJOB_INFER_INPUTS={storage}/in/*.txt\n"
        # the stand-in cluster runs the GPU stages on this CPU
        "      - MLMJOB_DEVICE=auto\n" + patches
    )
    return folder


def image_app(tmp_path: Path, steps: int = 6, checkpoint_every: int = 1000) -> Path:
    """The image's /app: its configs/ (copied as the Dockerfile does) plus the tiny config."""
    import shutil

    app = tmp_path / "app"
    shutil.copytree(ROOT / "configs", app / "configs")
    (app / "configs" / "kubelet-test.yaml").write_text(
        TINY.format(root=ROOT, steps=steps, checkpoint_every=checkpoint_every)
    )
    return app


def cluster(docs: list[dict], s3, tmp_path: Path) -> Cluster:
    # The Secret a user creates (README): the credentials, and the endpoint of a non-AWS S3.
    secret = {
        "AWS_ACCESS_KEY_ID": s3.env()["AWS_ACCESS_KEY_ID"],
        "AWS_SECRET_ACCESS_KEY": s3.env()["AWS_SECRET_ACCESS_KEY"],
        "AWS_ENDPOINT_URL": s3.endpoint,
        "AWS_REGION": "us-east-1",
    }
    image_env = {
        "HOME": str(tmp_path / "home"),
        "PYTHONUNBUFFERED": "1",
        "MLMJOB_NO_PROGRESS": "1",
        "HF_HUB_OFFLINE": "1",
    }
    return Cluster.of(docs, {"mlmjob-s3": secret}, image_env)


def dns_for(js: dict, port: int) -> dict[str, str]:
    name = js["metadata"]["name"]
    return {f"{name}-train-0-0.{name}": "127.0.0.1", "29500": str(port)}


def run_stage(cl: Cluster, js: dict, rjob: dict, app: Path, tmp_path: Path, dns) -> None:
    """All pods of a replicated job at once (parallelism = completions), as the Job would."""
    pods = [start(p, app, tmp_path / "pods", dns) for p in cl.pods(js, rjob)]
    for p in pods:
        p.wait(900)
    assert all(p.proc.returncode == 0 for p in pods), "\n".join(p.tail() for p in pods)


def upload_inputs(storage_uri: str) -> list[str]:
    from job import storage

    storage.configure()
    lines = (ROOT / "job" / "sample" / "fill-mask.txt").read_text().splitlines()
    storage.write_text(f"{storage_uri}/in/a.txt", "\n".join(lines[:2]) + "\n")
    storage.write_text(f"{storage_uri}/in/b.txt", "\n".join(lines[2:]) + "\n")
    return lines


def assert_pipeline_outputs(storage_uri: str, lines: list[str]) -> None:
    from job import storage

    listed = storage.list_files(storage_uri)
    (manifest,) = [u for u in listed if u.endswith("/manifest.json")]
    assert manifest.startswith(f"{storage_uri}/datasets/")
    run = f"{storage_uri}/runs/kubelet"
    summary = json.loads(storage.read_text(f"{run}/summary.json"))
    assert summary["global_step"] == 6 and summary["perplexity"] > 1
    assert storage.exists(f"{run}/model/model.safetensors")
    parts = [
        u for u in listed if u.startswith(f"{storage_uri}/infer/kubelet/") and u.endswith(".jsonl")
    ]
    got = [json.loads(x) for u in parts for x in storage.read_text(u).splitlines()]
    seen = sorted((r["file"].rsplit("/", 1)[1], r["line"]) for r in got)
    assert seen == [("a.txt", 1), ("a.txt", 2)] + [("b.txt", i) for i in range(1, len(lines) - 1)]
    assert all(r["masks"] for r in got)  # every sample line has a <mask>


@pytest.mark.slow
def test_rendered_pipeline_runs_as_the_cluster_would(tmp_path, s3, s3_prefix):
    """askscience-5k, one pod per stage: preflight, preprocess, train, infer, in order."""
    docs = render(user_overlay(tmp_path, "askscience-5k", s3_prefix))
    js, app = jobset_of(docs), image_app(tmp_path)
    cl = cluster(docs, s3, tmp_path)
    lines = upload_inputs(s3_prefix)
    for rjob in stages(js):
        run_stage(cl, js, rjob, app, tmp_path, dns_for(js, free_port()))
    assert_pipeline_outputs(s3_prefix, lines)


CPU_SCALE = """\
patches:
  - target: {kind: JobSet}
    patch: |
      - {op: test, path: /spec/replicatedJobs/2/name, value: train}
      - {op: replace, path: /spec/replicatedJobs/2/template/spec/template/spec/containers/0/env/1/value, value: "1"}
      - {op: replace, path: /spec/replicatedJobs/2/template/spec/completions, value: %(nodes)d}
      - {op: replace, path: /spec/replicatedJobs/2/template/spec/parallelism, value: %(nodes)d}
      - {op: replace, path: /spec/replicatedJobs/2/template/spec/template/spec/containers/0/env/0/value, value: "%(nodes)d"}
      - {op: test, path: /spec/replicatedJobs/3/name, value: infer}
      - {op: replace, path: /spec/replicatedJobs/3/template/spec/template/spec/containers/0/env/1/value, value: "1"}
"""


@pytest.mark.slow
def test_full_eli5_pipeline_with_8_preprocess_pods_and_2_train_nodes(tmp_path, s3, s3_prefix):
    """full-eli5's shape on 2 CPUs: its 8 preprocessing pods, 2 training pods of 1 process
    (the overlay's 8 GPUs per pod become 1 process), the static rendezvous through pod 0's
    DNS name, then inference."""
    docs = render(user_overlay(tmp_path, "full-eli5", s3_prefix, CPU_SCALE % {"nodes": 2}))
    js, app = jobset_of(docs), image_app(tmp_path)
    assert rjobs(js)["preprocess"]["template"]["spec"]["completions"] == 8
    cl = cluster(docs, s3, tmp_path)
    lines = upload_inputs(s3_prefix)
    for rjob in stages(js):
        run_stage(cl, js, rjob, app, tmp_path, dns_for(js, free_port()))
    assert_pipeline_outputs(s3_prefix, lines)
    from job import storage

    summary = json.loads(storage.read_text(f"{s3_prefix}/runs/kubelet/summary.json"))
    assert summary["world_size"] == 2


# ---- 3. rendezvous and restarts ----------------------------------------------------------


def train_pods(tmp_path: Path, s3, s3_prefix: str, steps: int, checkpoint_every: int):
    docs = render(user_overlay(tmp_path, "full-eli5", s3_prefix, CPU_SCALE % {"nodes": 2}))
    js, app = jobset_of(docs), image_app(tmp_path, steps, checkpoint_every)
    cl = cluster(docs, s3, tmp_path)
    upload_inputs(s3_prefix)
    for rjob in stages(js)[:2]:  # preflight, preprocess
        run_stage(cl, js, rjob, app, tmp_path, {})
    return cl, js, app, cl.pods(js, rjobs(js)["train"])


@pytest.mark.slow
def test_training_starts_whatever_order_its_pods_start_in(tmp_path, s3, s3_prefix):
    """Pod 1 first, pod 0 (the rendezvous host) 10 s later: pod 1 waits for it, both finish."""
    cl, js, app, (pod0, pod1) = train_pods(tmp_path, s3, s3_prefix, 6, 1000)
    dns = dns_for(js, free_port())
    first = start(pod1, app, tmp_path / "pods", dns)
    time.sleep(10)
    assert first.proc.poll() is None, first.tail()  # still waiting, not failed
    second = start(pod0, app, tmp_path / "pods", dns)
    for p in (first, second):
        p.wait(600)
    assert [first.proc.returncode, second.proc.returncode] == [0, 0], first.tail() + second.tail()
    assert "training kubelet: 2 processes" in second.log.read_text()


@pytest.mark.slow
def test_pod_0_lost_mid_run_then_the_group_restarts_from_the_checkpoint(tmp_path, s3, s3_prefix):
    """Pod 0's node dies after a checkpoint: the JobSet's restart (every pod anew, as its
    Recreate strategy does) resumes from that checkpoint and ends after exactly max_steps."""
    from job import storage

    steps = 100  # 75 left after the step-25 checkpoint: the kill comes well before the end
    cl, js, app, pods = train_pods(tmp_path, s3, s3_prefix, steps, 25)
    run = f"{s3_prefix}/runs/kubelet"
    dns = dns_for(js, free_port())
    running = [start(p, app, tmp_path / "pods", dns) for p in pods]
    storage.configure()
    deadline = time.monotonic() + 600
    while not storage.exists(f"{run}/checkpoints/step-25/COMMITTED.json"):
        assert time.monotonic() < deadline and running[0].proc.poll() is None, running[0].tail()
        time.sleep(0.5)
    running[0].kill()
    # Its Job fails (backoffLimit 0), so the JobSet recreates the group: the survivor gets
    # SIGTERM and, stuck in a collective with a peer that is gone, SIGKILL after the grace
    # period (900 s in the manifest, 10 s here).
    running[1].terminate(grace=10)
    dns = dns_for(js, free_port())  # the new pod 0 (a new IP, the same DNS name)
    again = [start(p, app, tmp_path / "restart", dns) for p in pods]
    for p in again:
        p.wait(900)
    assert [p.proc.returncode for p in again] == [0, 0], "\n".join(p.tail() for p in again)
    assert "resuming from" in again[0].log.read_text()
    summary = json.loads(storage.read_text(f"{run}/summary.json"))
    assert summary["global_step"] == steps and summary["world_size"] == 2
