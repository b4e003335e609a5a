"""The submission, run as the cluster would run it: the README's runbook, command by command.

No API server here (a stand-in stores the objects: tests/support/runbook.py); everything
under it is real: kustomize (kubectl's), the WorkflowTemplate that k8s/workflow.py makes,
walked as Argo would (tests/support/argo.py), each stage's JobSet through the Job and
JobSet controllers' failure policies (tests/support/controllers.py), every pod a process
with the command, arguments and environment its manifest gives (tests/support/kubelet.py),
against the SeaweedFS server, with a tiny model.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from support import runbook
from support.controllers import Stage, kill_when
from support.data import ROOT
from support.kubelet import Cluster

README = ROOT / "README.md"

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
  learning_rate: {lr}
  warmup_steps: 0
  eval_every_steps: 1000
  checkpoint_every_steps: {checkpoint_every}
  log_every_steps: 1
infer: {{top_k: 2}}
"""

# full-eli5's shape on 2 CPUs: its 8 preprocessing pods; training as 2 pods of 1 process
# (the overlay's one node of 8 GPUs: the static rendezvous across pods is what a
# multi-node overlay such as full-eli5-eks-efa adds); inference as 1 process.
CPU_SCALE = """\
patches:
  - target: {kind: JobSet, name: mlmjob-train}
    patch: |
      - {op: test, path: /spec/replicatedJobs/0/template/spec/template/spec/containers/0/env/0/name, value: MLMJOB_NNODES}
      - {op: replace, path: /spec/replicatedJobs/0/template/spec/template/spec/containers/0/env/0/value, value: "2"}
      - {op: replace, path: /spec/replicatedJobs/0/template/spec/template/spec/containers/0/env/1/value, value: "1"}
      - {op: replace, path: /spec/replicatedJobs/0/template/spec/completions, value: 2}
      - {op: replace, path: /spec/replicatedJobs/0/template/spec/parallelism, value: 2}
  - target: {kind: JobSet, name: mlmjob-infer}
    patch: |
      - {op: test, path: /spec/replicatedJobs/0/template/spec/template/spec/containers/0/env/1/name, value: MLMJOB_NPROC_PER_NODE}
      - {op: replace, path: /spec/replicatedJobs/0/template/spec/template/spec/containers/0/env/1/value, value: "1"}
"""


def blocks(base: str) -> dict[str, str]:
    """The README's runbook blocks, for the overlay `base` (they are written for
    askscience-5k: its name is the only word that changes)."""
    found = runbook.blocks(README)
    assert set(found) == {"setup", "argo", "argo-retry", "kubectl", "resubmit"}, set(found)
    return {k: v.replace("askscience-5k", base) for k, v in found.items()}


def user_overlay(ws: Path, base: str, storage: str, config: str, patches: str = "") -> Path:
    """README step 4: `my-run/` over the repository's overlay, beside the clone `mlmjob/`."""
    folder = ws / "my-run"
    folder.mkdir(exist_ok=True)
    (folder / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources: [../mlmjob/k8s/overlays/{base}]\n"
        "configMapGenerator:\n  - name: mlmjob-run\n    behavior: merge\n    literals:\n"
        f"      - MLMJOB_RUN=kubelet\n      - MLMJOB_CONFIG={config}\n"
        f"      - MLMJOB_STORAGE={storage}\n      - MLMJOB_INFER_INPUTS={storage}/in/*.txt\n"
        # the stand-in cluster runs the GPU stages on this CPU
        "      - MLMJOB_DEVICE=auto\n" + patches
    )
    return folder


def image_app(tmp_path: Path, steps: int = 6, checkpoint_every: int = 1000) -> Path:
    """The image's /app: its configs/ (copied as the Dockerfile does) plus the tiny configs
    (`kubelet-test-lr`: the same run with another learning rate)."""
    import shutil

    app = tmp_path / "app"
    shutil.copytree(ROOT / "configs", app / "configs")
    for name, lr in (("kubelet-test", "2.0e-3"), ("kubelet-test-lr", "1.0e-3")):
        text = TINY.format(root=ROOT, steps=steps, checkpoint_every=checkpoint_every, lr=lr)
        (app / "configs" / f"{name}.yaml").write_text(text)
    return app


def workspace(tmp_path: Path, s3, storage: str, base: str, patches: str = "", **app):
    """The folder the runbook runs in (the clone as `mlmjob/`, `my-run/`, `s3.env`) and the
    stand-in cluster."""
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "mlmjob").symlink_to(ROOT)
    user_overlay(ws, base, storage, "kubelet-test", patches)
    # The Secret a user creates from a file (README): test credentials and the endpoint.
    env = s3.env()
    (ws / "s3.env").write_text(
        f"AWS_ACCESS_KEY_ID={env['AWS_ACCESS_KEY_ID']}\n"
        f"AWS_SECRET_ACCESS_KEY={env['AWS_SECRET_ACCESS_KEY']}\n"
        f"AWS_ENDPOINT_URL={s3.endpoint}\nAWS_REGION=us-east-1\n"
    )
    image_env = {
        "HOME": str(tmp_path / "home"),
        "PYTHONUNBUFFERED": "1",
        "MLMJOB_NO_PROGRESS": "1",
        "HF_HUB_OFFLINE": "1",
        # this "node" is the test machine's two cores, shared with the suite's other
        # workers: a compute thread per process, as the suite's own (support/__init__.py)
        "OMP_NUM_THREADS": "1",
    }
    stage = Stage(Cluster({}, {}, image_env), image_app(tmp_path, **app), tmp_path / "pods")
    return ws, runbook.Cluster(stage, ws)


def upload_inputs(storage_uri: str) -> list[str]:
    from job import storage

    storage.configure()
    lines = (ROOT / "job" / "sample" / "fill-mask.txt").read_text().splitlines()
    storage.write_text(f"{storage_uri}/in/a.txt", "\n".join(lines[:2]) + "\n")
    storage.write_text(f"{storage_uri}/in/b.txt", "\n".join(lines[2:]) + "\n")
    return lines


def assert_pipeline_outputs(
    storage_uri: str, lines: list[str], world: int = 1, steps: int = 6
) -> None:
    from job import storage

    listed = storage.list_files(storage_uri)
    (manifest,) = [u for u in listed if u.endswith("/manifest.json")]
    assert manifest.startswith(f"{storage_uri}/datasets/")
    run = f"{storage_uri}/runs/kubelet"
    summary = json.loads(storage.read_text(f"{run}/summary.json"))
    assert summary["global_step"] == steps and summary["perplexity"] > 1
    assert summary["world_size"] == world
    assert storage.exists(f"{run}/model/model.safetensors")
    parts = [
        u for u in listed if u.startswith(f"{storage_uri}/infer/kubelet/") and u.endswith(".jsonl")
    ]
    got = [json.loads(x) for u in parts for x in storage.read_text(u).splitlines()]
    seen = sorted((r["file"].rsplit("/", 1)[1], r["line"]) for r in got)
    assert seen == [("a.txt", 1), ("a.txt", 2)] + [("b.txt", i) for i in range(1, len(lines) - 1)]
    assert all(r["masks"] for r in got)  # every sample line has a <mask>


def pods_started(stage: Stage) -> dict[str, int]:
    counts: dict[str, int] = {}
    for _, job, _index in stage.started:
        counts[job] = counts.get(job, 0) + 1
    return counts


def pod_log(stage: Stage, job: str, index: int = 0, attempt: int = -1) -> str:
    logs = sorted(stage.root.glob(f"r*/a*/*-{job}-0-{index}/log.txt"), key=os.path.getmtime)
    return logs[attempt].read_text()


@pytest.mark.slow
def test_argo_pipeline_then_a_failed_stage_reruns_alone(tmp_path, s3, s3_prefix):
    """askscience-5k through Argo: the inputs vanish after training, so inference fails
    with exit 2 (its JobSet fails at once, nothing is retried) and the Workflow stops there.
    The inputs back, `argo retry` runs inference alone, whose first pod is lost mid-run and
    retried by its Job; preflight, preprocessing and training never run again."""
    from job import storage

    ws, cluster = workspace(tmp_path, s3, s3_prefix, "askscience-5k")
    book, lines = blocks("askscience-5k"), upload_inputs(s3_prefix)
    cluster.sh(book["setup"])
    cluster.before = {"infer": lambda: storage.delete_prefix(f"{s3_prefix}/in")}
    cluster.sh(book["argo"])
    (wf,) = cluster.workflows
    assert wf.phase == "Failed"
    assert wf.nodes == {
        "run-config": "Succeeded",
        "preflight": "Succeeded",
        "preprocess": "Succeeded",
        "train": "Succeeded",
        "infer": "Failed",
    }
    infer = wf.objects[-1]
    assert infer["status"]["terminalState"] == "Failed" and infer["status"]["restarts"] == 0
    assert "exit code 2 matching FailJob rule" in infer["status"]["failure"][1]
    assert f"infer.inputs[0]: '{s3_prefix}/in/*.txt' matches no file" in pod_log(
        cluster.stage, "infer"
    )
    assert pods_started(cluster.stage) == {"preflight": 1, "preprocess": 1, "train": 1, "infer": 1}

    upload_inputs(s3_prefix)
    cluster.before = {}
    cluster.stage.faults[("infer", 0, 0)] = kill_when("infer: model")
    cluster.sh(book["argo-retry"])
    assert wf.phase == "Succeeded" and wf.nodes["infer"] == "Succeeded"
    assert pods_started(cluster.stage) == {"preflight": 1, "preprocess": 1, "train": 1, "infer": 3}
    assert wf.objects[-1]["status"] == {
        "terminalState": "Completed",
        "restarts": 0,
        "restartsCountTowardsMax": 0,
    }
    assert_pipeline_outputs(s3_prefix, lines)


@pytest.mark.slow
def test_argo_pipeline_full_eli5_8_preprocess_pods_2_train_pods_and_pod_0_lost(
    tmp_path, s3, s3_prefix
):
    """full-eli5 through Argo, 8 preprocessing pods; training pod 1 starts 10 s before pod 0
    (the rendezvous host): it waits for it and both train as one job of 2 processes. Then
    pod 0's node dies after a checkpoint: its Job fails (backoffLimit 0), the JobSet's
    failurePolicy restarts the group (Recreate: the survivor, stuck in a collective with a
    peer that is gone, gets SIGTERM, then SIGKILL after the grace period, 10 s here), the
    new pods resume from that checkpoint and end after exactly max_steps, and the Workflow
    goes on to inference. (One walk, where two once ran the same pipeline up to training.)"""
    from job import storage

    # 75 steps left after the step-25 checkpoint (seconds on 2 pods; the checkpoint is
    # polled every 50 ms): the kill comes well before the end
    steps = 100
    ws, cluster = workspace(
        tmp_path, s3, s3_prefix, "full-eli5", CPU_SCALE, steps=steps, checkpoint_every=25
    )
    book, lines = blocks("full-eli5"), upload_inputs(s3_prefix)
    run = f"{s3_prefix}/runs/kubelet"

    def lose_node(running) -> None:
        deadline = time.monotonic() + 600
        while not storage.exists(f"{run}/checkpoints/step-25/COMMITTED.json"):
            assert time.monotonic() < deadline and running.proc.poll() is None, running.tail()
            time.sleep(0.05)
        running.kill()

    cluster.stage.delays[("train", 0)] = 10.0
    cluster.stage.faults[("train", 0, 0)] = lose_node
    cluster.sh(book["setup"])
    cluster.sh(book["argo"])
    (wf,) = cluster.workflows
    assert wf.phase == "Succeeded", wf.nodes
    assert pods_started(cluster.stage) == {"preflight": 1, "preprocess": 8, "train": 4, "infer": 1}
    train_starts = [s[2] for s in cluster.stage.started if s[1] == "train"]
    assert train_starts[:2] == [1, 0]  # pod 1 first
    assert "training kubelet: 2 processes" in pod_log(cluster.stage, "train", 0, attempt=0)
    (train,) = [o for o in wf.objects if o["metadata"]["name"].startswith("mlmjob-train")]
    assert train["status"] == {
        "terminalState": "Completed",
        "restarts": 1,
        "restartsCountTowardsMax": 1,
    }
    assert "resuming from" in pod_log(cluster.stage, "train", 0)
    assert_pipeline_outputs(s3_prefix, lines, world=2, steps=steps)


@pytest.mark.slow
def test_kubectl_runbook_then_a_resubmission_with_another_config(tmp_path, s3, s3_prefix):
    """The plain kubectl path, stage by stage. Then the README's resubmission with another
    config (another learning rate for the finished run): training refuses it with exit 2
    before any work, the JobSet fails without a retry, and nothing already written changes."""
    from job import storage

    ws, cluster = workspace(tmp_path, s3, s3_prefix, "askscience-5k")
    book, lines = blocks("askscience-5k"), upload_inputs(s3_prefix)
    cluster.sh(book["setup"])
    cluster.sh(book["kubectl"])
    assert pods_started(cluster.stage) == {"preflight": 1, "preprocess": 1, "train": 1, "infer": 1}
    assert_pipeline_outputs(s3_prefix, lines)
    summary = storage.read_text(f"{s3_prefix}/runs/kubelet/summary.json")

    cluster.sh(book["resubmit"])
    assert not [k for k in cluster.objects if k[0] == "JobSet"]  # deleted, then re-applied
    user_overlay(ws, "askscience-5k", s3_prefix, "kubelet-test-lr")
    with pytest.raises(AssertionError, match="wait jobset/mlmjob-train-askscience-5k: Failed"):
        cluster.sh(book["kubectl"])
    train = cluster.objects[("JobSet", "mlmjob-train-askscience-5k")]["status"]
    assert train["restarts"] == 0 and "exit code 2" in train["failure"][1]
    refused = f"train.learning_rate: 0.002 in {s3_prefix}/runs/kubelet/config.yaml, now 0.001"
    assert refused in pod_log(cluster.stage, "train")
    assert pods_started(cluster.stage) == {"preflight": 2, "preprocess": 2, "train": 2, "infer": 1}
    assert storage.read_text(f"{s3_prefix}/runs/kubelet/summary.json") == summary
