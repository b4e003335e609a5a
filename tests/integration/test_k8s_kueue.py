"""The stages as Kueue workloads, offline: what Kueue v0.19 reserves for each (emulated from
its source, tests/support/kueue.py), where admission places its pods, what they may do there
(the restricted Pod Security Standard, tests/support/pss.py) and how a failed stage ends.

A run is four workloads (preflight, preprocess on the LocalQueue mlmjob-cpu; train, infer
on mlmjob-gpu) that the Argo DAG creates one after another, so a queue holds one stage at a
time: a run needs the quota of its largest stage, not the sum (k8s/admin/kueue.yaml).
"""

from __future__ import annotations

import copy
from fractions import Fraction

import pytest
import yaml
from support.controllers import (
    CONDITION_MESSAGE,
    EXIT_MESSAGE,
    jobset_action,
    pod_failure_action,
)
from support.kueue import (
    admit,
    assign,
    fmt,
    placed,
    pod_requests,
    quantity,
    simulate,
    sized_to,
    workload,
)
from support.pss import violations

from integration.test_k8s import (
    GPU,
    GPU_STAGES,
    K8S,
    OVERLAYS,
    STAGES,
    container,
    env_of,
    overlay,
    pod_of,
    rendered,
    rjob,
    stage_docs,
)

ADMIN = list(yaml.safe_load_all((K8S / "admin" / "kueue.yaml").read_text()))
GPU_TOLERATION = {"key": GPU, "operator": "Exists", "effect": "NoSchedule"}
CPU_QUEUE, GPU_QUEUE = "mlmjob-cpu", "mlmjob-gpu"


def admin(kind: str) -> list[dict]:
    return [copy.deepcopy(d) for d in ADMIN if d["kind"] == kind]


def workloads(name: str) -> dict:
    return {stage: workload(js) for stage, js in stage_docs(name).items()}


def localqueues(name: str) -> list[dict]:
    return rendered(overlay(OVERLAYS[name]) / "queues")  # gke, eks: full-eli5's namespace


def queues(name: str, clusterqueues=None) -> tuple:
    """What assign/admit/simulate take besides the workload: the namespace's LocalQueues,
    the ClusterQueues (the admin's unless given) and the admin's ResourceFlavors."""
    return localqueues(name), clusterqueues or admin("ClusterQueue"), admin("ResourceFlavor")


def gpu_queue_with(gpus: int) -> list[dict]:
    """The admin's ClusterQueues, the GPU one's GPU quota set to `gpus`."""
    cqs = admin("ClusterQueue")
    for cq in cqs:
        for r in cq["spec"]["resourceGroups"][0]["flavors"][0]["resources"]:
            r["nominalQuota"] = gpus if r["name"] == GPU else r["nominalQuota"]
    return cqs


def sized_queues(wls: dict) -> list[dict]:
    """The admin's ClusterQueues with the quota of the largest stage each takes, no more."""
    return [
        sized_to(cq, [w for w in wls.values() if w.queue == cq["metadata"]["name"]])
        for cq in admin("ClusterQueue")
    ]


# stage -> (queue, pods, GPUs, CPUs, memory): what Kueue reserves while the stage runs
CPU_STAGES = {"preflight": (CPU_QUEUE, 1, 0, 1, "4Gi")}
FULL = {
    **CPU_STAGES,
    "preprocess": (CPU_QUEUE, 8, 0, 32, "128Gi"),
    "train": (GPU_QUEUE, 1, 8, 64, "512Gi"),
    "infer": (GPU_QUEUE, 1, 8, 32, "256Gi"),
}
RESERVED = {
    "askscience-5k": {
        **CPU_STAGES,
        "preprocess": (CPU_QUEUE, 1, 0, 4, "16Gi"),
        "train": (GPU_QUEUE, 1, 1, 6, "24Gi"),
        "infer": (GPU_QUEUE, 1, 1, 4, "16Gi"),
    },
    "full-eli5": FULL,
    "full-eli5-gke": FULL,
    "full-eli5-eks-efa": {**FULL, "train": (GPU_QUEUE, 4, 32, 640, "6Ti")},
}


@pytest.mark.parametrize("name", OVERLAYS)
def test_each_stage_is_one_workload_on_its_queue(name):
    got = {}
    for stage, wl in workloads(name).items():
        (ps,) = wl.podsets  # one replicated job: one PodSet, every pod started together
        assert ps.name == stage and "dependsOn" not in rjob(stage_docs(name)[stage])
        t = wl.total
        got[stage] = (wl.queue, ps.count, t.get(GPU, 0), t["cpu"], fmt("memory", t["memory"]))
        assert (GPU in t) == (stage in GPU_STAGES), stage
    assert got == RESERVED[name]


@pytest.mark.parametrize("name", OVERLAYS)
def test_every_workload_is_admitted_under_the_admin_queues(name):
    for stage, wl in workloads(name).items():
        adm = assign(wl, *queues(name))
        flavor = GPU_QUEUE if stage in GPU_STAGES else CPU_QUEUE  # flavors named as queues
        assert (adm.clusterqueue, adm.flavors, adm.reasons) == (flavor, {stage: flavor}, [])


@pytest.mark.parametrize("name", OVERLAYS)
def test_admission_keeps_the_cpu_stages_off_gpus_and_lets_gpu_stages_on(name):
    flavors = {f["metadata"]["name"]: f for f in admin("ResourceFlavor")}
    for stage, wl in workloads(name).items():
        (flavor,) = admit(wl, *queues(name)).values()
        pod = placed(pod_of(stage_docs(name)[stage]), flavors[flavor])
        spec, (c,) = pod["spec"], pod["spec"]["containers"]
        gpu_tolerations = [t for t in spec.get("tolerations", []) if t.get("key") == GPU]
        if stage in GPU_STAGES:
            assert gpu_tolerations == [GPU_TOLERATION], stage  # the flavor's and the pod's: one
        else:
            assert gpu_tolerations == [] and "nodeSelector" not in spec, stage
            assert env_of(c)["NVIDIA_VISIBLE_DEVICES"] == "void", stage


# overlay -> (the largest GPU stage, the GPUs of all stages together)
GPUS = {
    "askscience-5k": (1, 2),
    "full-eli5": (8, 16),
    "full-eli5-gke": (8, 16),
    "full-eli5-eks-efa": (32, 40),
}


@pytest.mark.parametrize("name", OVERLAYS)
def test_a_queue_of_the_largest_stage_runs_every_stage_in_order(name):
    wls = workloads(name)
    largest, together = GPUS[name]
    assert sum(w.total.get(GPU, 0) for w in wls.values()) == together
    run = simulate(list(wls.values()), *queues(name, sized_queues(wls)))
    assert run.admitted == [w.name for w in wls.values()] and run.pending == []
    assert run.most_running == 1  # each stage alone
    assert run.peak[(GPU_QUEUE, GPU_QUEUE, GPU)] == largest
    for (cq, _, resource), held in run.peak.items():  # every resource: the largest stage's
        assert held == max(w.total.get(resource, 0) for w in wls.values() if w.queue == cq)
    # One GPU less and training never starts: the pipeline stops there, nothing else holds GPUs.
    short = gpu_queue_with(largest - 1)
    run = simulate(list(wls.values()), *queues(name, short))
    assert run.admitted == [wls["preflight"].name, wls["preprocess"].name]
    assert run.pending == [wls["train"].name, wls["infer"].name]


def test_submitted_at_once_the_queues_keep_gpu_stages_apart_but_not_in_order():
    """Without the DAG (every stage applied at once) quota alone keeps train and infer
    apart on an 8-GPU queue, and preflight and preprocess apart on a 32-CPU one, but infer
    would start before preprocess ends: the order is the workflow's."""
    wls = workloads("full-eli5")
    run = simulate(list(wls.values()), *queues("full-eli5", sized_queues(wls)), chained=False)
    stage = {w.name: s for s, w in wls.items()}
    assert [(e, stage[w]) for e, w, _ in run.events] == [
        ("admitted", "preflight"),
        ("admitted", "train"),  # preprocess does not fit beside preflight: it waits
        ("finished", "preflight"),
        ("admitted", "preprocess"),
        ("finished", "train"),
        ("admitted", "infer"),
        ("finished", "preprocess"),
        ("finished", "infer"),
    ]
    assert run.peak[(GPU_QUEUE, GPU_QUEUE, GPU)] == 8


def test_the_old_single_jobset_is_not_admissible_on_8_gpus():
    """The shape this replaced: one JobSet whose replicated jobs are the four stages, one
    workload holding every stage's quota at once (16 GPUs for full-eli5)."""
    docs = stage_docs("full-eli5")
    old = copy.deepcopy(docs["train"])
    old["metadata"]["name"] = "mlmjob-full-eli5"
    old["spec"]["replicatedJobs"] = [rjob(docs[s]) for s in STAGES]
    wl = workload(old)
    assert [(ps.name, ps.count) for ps in wl.podsets] == list(
        zip(STAGES, [1, 8, 1, 1], strict=True)
    )
    on_8 = queues("full-eli5", gpu_queue_with(8))
    adm = assign(wl, *on_8)
    assert adm.flavors is None
    assert adm.reasons == [
        "infer: insufficient quota for nvidia.com/gpu in flavor mlmjob-gpu, previously considered podsets requests (8) + current podset request (8) > maximum capacity (8)"
    ]
    assert all(admit(w, *on_8) for w in workloads("full-eli5").values())  # the stages fit


def test_a_resource_no_resource_group_covers_keeps_the_workload_pending():
    efa = "vpc.amazonaws.com/efa"
    cqs = admin("ClusterQueue")
    for cq in cqs:  # a GPU queue that forgot EFA's device plugin resource
        for group in cq["spec"]["resourceGroups"]:
            group["coveredResources"] = [r for r in group["coveredResources"] if r != efa]
            for f in group["flavors"]:
                f["resources"] = [r for r in f["resources"] if r["name"] != efa]
    wls = workloads("full-eli5-eks-efa")
    adm = assign(wls["train"], *queues("full-eli5-eks-efa", cqs))
    assert (adm.flavors, adm.reasons) == (None, [f"resource {efa} unavailable in ClusterQueue"])
    assert admit(wls["infer"], *queues("full-eli5-eks-efa", cqs))  # no EFA asked: admitted


def test_the_emulation_counts_requests_as_kueue_and_kubernetes_do():
    quantities = [quantity(q) for q in ("500m", "16Gi", "1e3", "1.5", 64)]
    assert quantities == [Fraction(1, 2), 16 * 2**30, 1000, Fraction(3, 2), 64]
    fetch = {"name": "fetch", "resources": {"limits": {"cpu": "8"}}}  # a limit stands in
    proxy = {"name": "proxy", "restartPolicy": "Always", "resources": {"requests": {"cpu": "1"}}}
    main = {"name": "a", "resources": {"requests": {"cpu": "2"}, "limits": {"memory": "1Gi"}}}
    spec = {"initContainers": [fetch, proxy], "containers": [main]}
    assert pod_requests(spec) == {"cpu": 8, "memory": 2**30}  # max(fetch, a + the sidecar)
    wl = job_workload({"spec": spec}, parallelism=3, completions=2)
    assert [(p.name, p.count, p.total) for p in wl.podsets] == [
        ("main", 2, {"cpu": 16, "memory": 2**31})
    ]


SPOT = {
    "metadata": {"name": "spot"},
    "spec": {
        "nodeLabels": {"pool": "spot"},
        "nodeTaints": [{"key": "spot", "effect": "NoSchedule"}],
    },
}


def job_workload(template: dict, parallelism: int = 1, completions: int = 1):
    meta = {"name": "j", "namespace": "ns", "labels": {"kueue.x-k8s.io/queue-name": "q"}}
    spec = {"parallelism": parallelism, "completions": completions, "template": template}
    return workload({"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": spec})


def spot_queue(cpus: int) -> tuple:
    lq = {"metadata": {"name": "q", "namespace": "ns"}, "spec": {"clusterQueue": "cq"}}
    quota = [{"name": "cpu", "nominalQuota": cpus}]
    group = {"coveredResources": ["cpu"], "flavors": [{"name": "spot", "resources": quota}]}
    cq = {"metadata": {"name": "cq"}, "spec": {"namespaceSelector": {}, "resourceGroups": [group]}}
    return [lq], [cq], [SPOT]


def test_the_emulation_matches_flavors_and_quota_as_kueue_does():
    pod = {"spec": {"containers": [{"name": "a", "resources": {"requests": {"cpu": "4"}}}]}}
    assert assign(job_workload(pod), *spot_queue(8)).reasons == [
        "main: untolerated taint spot in flavor spot"
    ]
    pod["spec"]["tolerations"] = [{"key": "spot", "operator": "Exists"}]
    assert admit(job_workload(pod), *spot_queue(8)) == {"main": "spot"}
    used = {("cq", "spot", "cpu"): Fraction(6)}
    assert assign(job_workload(pod), *spot_queue(8), used).reasons == [
        "main: insufficient unused quota for cpu in flavor spot, 2 more needed"
    ]
    pod["spec"]["nodeSelector"] = {"pool": "ondemand"}
    assert assign(job_workload(pod), *spot_queue(8)).reasons == [
        "main: flavor spot doesn't match node affinity"
    ]
    with pytest.raises(ValueError, match=r"conflict for nodeSelector: \['pool'\]"):
        placed(pod, SPOT)
    pod["spec"]["nodeSelector"] = {}
    got = placed(
        pod, {"metadata": {"name": "x"}, "spec": {**SPOT["spec"], "tolerations": [GPU_TOLERATION]}}
    )
    assert got["spec"]["nodeSelector"] == {"pool": "spot"}
    assert got["spec"]["tolerations"] == [{"key": "spot", "operator": "Exists"}, GPU_TOLERATION]
    lq, _, flavors = spot_queue(8)
    assert assign(job_workload(pod), lq, [], flavors).reasons == ["ClusterQueue cq doesn't exist"]


# ---- placement ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["askscience-5k", "full-eli5"])
def test_no_gpu_product_label_is_asked_for(name):
    """nvidia.com/gpu.product exists only with NVIDIA's GPU feature discovery, which neither
    GKE nor EKS installs: a pod selecting it would stay Pending."""
    texts = [yaml.safe_dump_all(rendered(overlay(name))), yaml.safe_dump_all(ADMIN)]
    assert not any("nvidia.com/gpu.product" in t for t in texts)


def test_gke_gpu_stages_select_the_accelerator():
    for stage, js in stage_docs("full-eli5-gke").items():
        want = (
            {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
            if stage in GPU_STAGES
            else None
        )
        assert pod_of(js)["spec"].get("nodeSelector") == want, stage


def test_eks_efa_training_spans_4_nodes_of_one_node_group_with_every_efa_device():
    docs = stage_docs("full-eli5-eks-efa")
    for stage, js in docs.items():
        want = {"node.kubernetes.io/instance-type": "p5.48xlarge"} if stage in GPU_STAGES else None
        assert pod_of(js)["spec"].get("nodeSelector") == want, stage
        efa = container(js)["resources"]["limits"].get("vpc.amazonaws.com/efa")
        assert efa == ("32" if stage == "train" else None), stage
    train = rjob(docs["train"])
    assert train["template"]["metadata"]["annotations"] == {
        "alpha.jobset.sigs.k8s.io/exclusive-topology": "eks.amazonaws.com/nodegroup"
    }
    spec, env = train["template"]["spec"], env_of(container(docs["train"]))
    assert (env["MLMJOB_NNODES"], spec["completions"], spec["parallelism"]) == ("4", 4, 4)
    assert (
        env["MLMJOB_NPROC_PER_NODE"]
        == container(docs["train"])["resources"]["requests"][GPU]
        == "8"
    )


def test_the_tutorial_training_pod_fits_a_common_1_gpu_node():
    """8 vCPU and 32 GiB (g5.2xlarge, g2-standard-8), of which about 7 and 28 GiB are
    allocatable; /dev/shm is memory counted against the limit, so it must fit inside it."""
    pod = pod_of(stage_docs("askscience-5k")["train"])
    asks = pod_requests(pod["spec"])
    assert asks["cpu"] <= 7 and asks["memory"] <= quantity("28Gi") and asks[GPU] == 1
    (shm,) = [v["emptyDir"] for v in pod["spec"]["volumes"] if v["name"] == "dshm"]
    assert shm["medium"] == "Memory"
    (c,) = pod["spec"]["containers"]
    assert quantity(shm["sizeLimit"]) < quantity(c["resources"]["limits"]["memory"])


# ---- what the pods may do -----------------------------------------------------------------


@pytest.mark.parametrize("name", OVERLAYS)
def test_every_pod_passes_the_restricted_pod_security_standard(name):
    for stage, js in stage_docs(name).items():
        assert violations(pod_of(js)) == [], stage


# what breaks the standard -> (a change to the pod's spec and its first container's
# securityContext, what the checker must say)
PSS_MUTATIONS = {
    "privileged": (lambda s, c: c.update(privileged=True), ["containers[0] (mlmjob): privileged"]),
    "hostPath": (
        lambda s, c: s.update(volumes=[{"name": "cache", "hostPath": {"path": "/data"}}]),
        ["volumes[cache]: hostPath"],
    ),
    "hostNetwork": (lambda s, c: s.update(hostNetwork=True), ["host namespaces: hostNetwork"]),
    "hostPort": (
        lambda s, c: s["containers"][0]["ports"][0].update(hostPort=29500),
        ["mlmjob: hostPort 29500"],
    ),
    "root": (
        lambda s, c: s["securityContext"].pop("runAsNonRoot"),
        ["containers[0] (mlmjob): runAsNonRoot != true"],
    ),
    "escalation": (
        lambda s, c: c.pop("allowPrivilegeEscalation"),
        ["containers[0] (mlmjob): allowPrivilegeEscalation != false"],
    ),
    "capability": (
        lambda s, c: c["capabilities"].update(add=["SYS_ADMIN"]),
        ["containers[0] (mlmjob): capabilities.add ['SYS_ADMIN']"],
    ),
    "unconfined": (
        lambda s, c: s["securityContext"].update(seccompProfile={"type": "Unconfined"}),
        [
            "pod: seccompProfile Unconfined",
            "containers[0] (mlmjob): seccompProfile not RuntimeDefault or Localhost",
        ],
    ),
}


@pytest.mark.parametrize("mutation", PSS_MUTATIONS)
def test_the_pod_security_checker_rejects_a_mutated_pod(mutation):
    pod = pod_of(stage_docs("askscience-5k")["train"])
    mutate, expected = PSS_MUTATIONS[mutation]
    mutate(pod["spec"], pod["spec"]["containers"][0]["securityContext"])
    assert violations(pod) == expected


# ---- failure policies ---------------------------------------------------------------------

NS, POD = "mlmjob-full-eli5", "mlmjob-train-full-eli5-train-0-1-x7k2p"


def job_failure(job_spec: dict, failure: int | str) -> tuple[str, str] | None:
    """The Job's end for one failed pod (an exit code, or the DisruptionTarget condition):
    the first podFailurePolicy rule that matches decides (FailJob: the Job fails with reason
    PodFailurePolicy; Ignore: the pod is replaced, None); with none, the pod counts against
    the backoff limit, which the manifests set so that it is used up."""
    action, i = pod_failure_action(job_spec, failure)
    if action == "Ignore":
        return None
    if action == "FailJob":
        if isinstance(failure, int):
            message = EXIT_MESSAGE.format(c="mlmjob", ns=NS, pod=POD, code=failure, i=i)
        else:
            message = CONDITION_MESSAGE.format(ns=NS, pod=POD, i=i)
        return "PodFailurePolicy", message
    if "backoffLimitPerIndex" in job_spec:
        return "FailedIndexes", "Job has failed indexes"
    assert job_spec["backoffLimit"] == 0
    return "BackoffLimitExceeded", "Job has reached the specified backoff limit"


RESTART, PREEMPTED, FAIL = "RestartJobSet", "RestartJobSetAndIgnoreMaxRestarts", "FailJobSet"
# stage -> failure -> what the JobSet does (None: the pod is replaced, nothing fails)
ACTIONS = {
    "preflight": {2: FAIL, 1: RESTART, 3: RESTART, "DisruptionTarget": PREEMPTED},
    "preprocess": {2: FAIL, 1: RESTART, 3: RESTART, "DisruptionTarget": None},
    "train": {2: FAIL, 1: RESTART, 137: RESTART, 3: PREEMPTED, "DisruptionTarget": PREEMPTED},
    "infer": {2: FAIL, 1: RESTART, 3: None, "DisruptionTarget": None},
}


@pytest.mark.parametrize("name", OVERLAYS)
def test_each_failure_kind_gets_its_action(name):
    for stage, js in stage_docs(name).items():
        spec = rjob(js)["template"]["spec"]
        got = {}
        for failure in ACTIONS[stage]:
            ended = job_failure(spec, failure)
            got[failure] = ended and jobset_action(js, *ended)
        assert got == ACTIONS[stage], stage
        assert js["spec"]["failurePolicy"]["maxRestarts"] >= 1, stage
