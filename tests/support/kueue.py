"""What Kueue v0.19 reserves for a job and where it places it, emulated offline from its
source (kubernetes-sigs/kueue v0.19.2; no API server, no controller here).

- `workload(doc)`: the Workload Kueue makes for a JobSet or a batch/v1 Job. PodSets as
  `(*JobSet).PodSets` (pkg/controller/jobs/jobset/jobset_controller.go: one PodSet per
  replicated job, named after it, count `podsCount` = replicas * `PodsCountPerReplica` =
  min(parallelism, completions)) and `(*Job).PodSets` (pkg/controller/jobs/job: one PodSet
  `main`, count `podsCount`); the queue is the label `kueue.x-k8s.io/queue-name`
  (pkg/controller/constants `QueueLabel`). Per-pod requests as `AdjustResources`'s
  `UseLimitsAsMissingRequestsInPod` (pkg/workload/resources.go: a limit stands in for a
  missing request, as Kubernetes' own defaulting does), then `totalRequestsFromPodSets`
  (pkg/workload/workload.go), which takes Kubernetes' `resource.PodRequests`
  (component-helpers: the containers' sum, the init containers' peak, sidecars, overhead)
  times the count.
- `assign`/`admit(workload, localqueues, clusterqueues, flavors, used)`: the LocalQueue
  of the workload's namespace names the ClusterQueue (pkg/controller/core
  workload_controller.go: "LocalQueue ... doesn't exist", "ClusterQueue ... doesn't
  exist"; a ClusterQueue naming a missing flavor is inactive); then
  `FlavorAssigner.assignFlavors` (pkg/scheduler/flavorassigner/flavorassigner.go): PodSets
  in order, each resource's resource group (`RGByResource`; a requested resource that no
  group covers: "resource ... unavailable in ClusterQueue", the workload stays pending),
  in that group the first flavor whose taints the pod tolerates and whose nodeLabels its
  nodeSelector does not contradict (`checkFlavorForPodSets`) and whose nominal quota holds
  what is used plus what the workload's earlier PodSets took plus this PodSet
  (`findFlavorForPodSets`, `fitsResourceQuota`).
- `placed(pod_template, flavor)`: what admission writes into the pod template
  (pkg/podset/podset.go `FromAssignment` + `Merge`): the flavor's nodeLabels into
  nodeSelector (a contradiction is an error), its tolerations appended unless equal.
- `simulate(...)`: a ClusterQueue admitting in submission order while quota allows
  (BestEffortFIFO: a workload that does not fit does not block one that does), releasing a
  workload's quota when it ends.

Not emulated (none is used by k8s/admin/kueue.yaml): cohorts and borrowing (quota is each
ClusterQueue's nominal quota), preemption (a workload that does not fit what is left
waits), LimitRanges and RuntimeClass overhead filled in by `AdjustResources`,
topology-aware scheduling, partial admission, fair sharing, admission checks,
excludeResourcePrefixes and quotaCheckStrategy (their defaults: every resource counted),
required node affinity and non-empty namespaceSelectors (NotImplementedError, not a guess).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from fractions import Fraction

QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
_SUFFIX = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_SUFFIX |= {"n": Fraction(1, 10**9), "u": Fraction(1, 10**6), "m": Fraction(1, 1000), "": 1}
_SUFFIX |= {"k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18}
_QUANTITY = re.compile(
    r"([+-]?(?:\d+\.?\d*|\.\d+))(?:[eE]([+-]?\d+)|(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE])?)"
)

Amounts = dict[str, Fraction]  # resource name -> amount (cores, bytes, devices)


def quantity(q) -> Fraction:
    """A Kubernetes quantity ("500m", "16Gi", 64) as an exact number."""
    if isinstance(q, (int, Fraction)):
        return Fraction(q)
    m = _QUANTITY.fullmatch(str(q).strip())
    if not m:
        raise ValueError(f"not a Kubernetes quantity: {q!r}")
    if m.group(2):
        return Fraction(m.group(1)) * Fraction(10) ** int(m.group(2))
    return Fraction(m.group(1)) * _SUFFIX[m.group(3) or ""]


def _add(a: Amounts, b: Amounts, times: int = 1) -> Amounts:
    return {r: a.get(r, 0) + times * b.get(r, 0) for r in a.keys() | b.keys()}


def _max(a: Amounts, b: Amounts) -> Amounts:
    return {r: max(a.get(r, 0), b.get(r, 0)) for r in a.keys() | b.keys()}


def container_requests(container: dict) -> Amounts:
    res = container.get("resources", {})
    merged = {**res.get("limits", {}), **res.get("requests", {})}  # a request wins
    return {r: quantity(q) for r, q in merged.items()}


def pod_requests(spec: dict) -> Amounts:
    """Kubernetes' PodRequests: every container at once, then the larger of that and the
    peak of the init phase (init containers run one by one, beside the sidecars started
    before them), plus the pod's overhead."""
    total: Amounts = {}
    for c in spec["containers"]:
        total = _add(total, container_requests(c))
    sidecars: Amounts = {}
    init_peak: Amounts = {}
    for c in spec.get("initContainers", []):
        if c.get("restartPolicy") == "Always":  # a sidecar: runs until the pod ends
            sidecars = _add(sidecars, container_requests(c))
            init_peak = _max(init_peak, sidecars)
        else:
            init_peak = _max(init_peak, _add(sidecars, container_requests(c)))
    out = _max(_add(total, sidecars), init_peak)
    return _add(out, {r: quantity(q) for r, q in spec.get("overhead", {}).items()})


@dataclass
class PodSet:
    name: str
    count: int
    template: dict  # the pod template, as the workload copies it
    per_pod: Amounts

    @property
    def total(self) -> Amounts:
        return {r: q * self.count for r, q in self.per_pod.items()}


@dataclass
class Workload:
    name: str
    namespace: str
    queue: str | None
    podsets: list[PodSet]

    @property
    def total(self) -> Amounts:
        out: Amounts = {}
        for ps in self.podsets:
            out = _add(out, ps.total)
        return out


def _podset(name: str, replicas: int, job_spec: dict) -> PodSet:
    parallelism = job_spec.get("parallelism", 1)  # Kubernetes defaults it to 1
    count = replicas * min(parallelism, job_spec.get("completions", parallelism))
    template = job_spec["template"]
    return PodSet(name, count, copy.deepcopy(template), pod_requests(template["spec"]))


def workload(doc: dict) -> Workload:
    meta = doc["metadata"]
    if doc["kind"] == "JobSet":
        rjobs = doc["spec"]["replicatedJobs"]
        podsets = [_podset(r["name"], r.get("replicas", 1), r["template"]["spec"]) for r in rjobs]
    elif (doc["apiVersion"], doc["kind"]) == ("batch/v1", "Job"):
        podsets = [_podset("main", 1, doc["spec"])]
    else:
        raise ValueError(f"not a JobSet or a batch/v1 Job: {doc['apiVersion']} {doc['kind']}")
    name = meta.get("name") or meta["generateName"]
    queue = meta.get("labels", {}).get(QUEUE_LABEL)
    return Workload(name, meta.get("namespace", "default"), queue, podsets)


# ---- admission ----------------------------------------------------------------------------


@dataclass
class Admission:
    """`flavors` (PodSet -> flavor) when admitted, else None and `reasons` say why it
    stays pending; `usage` is what it holds: (ClusterQueue, flavor, resource) -> amount."""

    clusterqueue: str | None
    flavors: dict[str, str | None] | None
    usage: dict[tuple[str, str, str], Fraction] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)


def _tolerates(toleration: dict, taint: dict) -> bool:
    if toleration.get("effect") and toleration["effect"] != taint["effect"]:
        return False
    if toleration.get("key") and toleration["key"] != taint["key"]:
        return False
    if toleration.get("operator", "Equal") == "Exists":
        return True
    return toleration.get("value", "") == taint.get("value", "")


def flavor_fits_pod(spec: dict, flavor: dict) -> str | None:
    """Why the flavor cannot take the pod (checkFlavorForPodSets), or None."""
    name, fspec = flavor["metadata"]["name"], flavor.get("spec", {})
    tolerations = spec.get("tolerations", []) + fspec.get("tolerations", [])
    for taint in fspec.get("nodeTaints", []):
        if taint["effect"] in ("NoSchedule", "NoExecute") and not any(
            _tolerates(t, taint) for t in tolerations
        ):
            return f"untolerated taint {taint['key']} in flavor {name}"
    if spec.get("affinity", {}).get("nodeAffinity"):
        raise NotImplementedError("required node affinity is not emulated")
    labels, selector = fspec.get("nodeLabels", {}), spec.get("nodeSelector", {})
    if any(k in labels and labels[k] != v for k, v in selector.items()):
        return f"flavor {name} doesn't match node affinity"
    return None


def _clusterqueue(wl: Workload, localqueues, clusterqueues, flavors) -> tuple[dict | None, str]:
    lqs = {
        (q["metadata"].get("namespace", "default"), q["metadata"]["name"]): q for q in localqueues
    }
    lq = lqs.get((wl.namespace, wl.queue))
    if lq is None:
        return None, f"LocalQueue {wl.queue} doesn't exist (namespace {wl.namespace})"
    name = lq["spec"]["clusterQueue"]
    cq = {c["metadata"]["name"]: c for c in clusterqueues}.get(name)
    if cq is None:
        return None, f"ClusterQueue {name} doesn't exist"
    selector = cq["spec"].get("namespaceSelector")
    if selector is None:  # v1beta2: null selects no namespace
        return None, "workload namespace doesn't match ClusterQueue selector"
    if selector:
        raise NotImplementedError("a non-empty namespaceSelector is not emulated")
    known = {f["metadata"]["name"] for f in flavors}
    groups = cq["spec"].get("resourceGroups", [])
    missing = sorted({f["name"] for g in groups for f in g["flavors"]} - known)
    if missing:
        return None, f"ClusterQueue {name} is inactive: flavors {missing} not found"
    return cq, ""


def fmt(resource: str, q: Fraction) -> str:
    """An amount as Kubernetes writes it: memory in the largest binary unit that is exact."""
    if resource in ("memory", "ephemeral-storage"):
        for suffix in ("Ei", "Pi", "Ti", "Gi", "Mi", "Ki"):
            if q and (q / _SUFFIX[suffix]).denominator == 1:
                return f"{q / _SUFFIX[suffix]}{suffix}"
    return str(q) if q.denominator == 1 else f"{q * 1000}m"


@dataclass
class _Quota:
    """One ClusterQueue's nominal quota, what others hold in it, what this workload took."""

    name: str
    nominal: dict[tuple[str, str], Fraction]
    used: dict[tuple[str, str, str], Fraction]
    taken: dict[tuple[str, str, str], Fraction] = field(default_factory=dict)

    def short(self, flavor: str, ask: Amounts) -> str | None:
        """fitsResourceQuota's two refusals: over the nominal quota (never fits) or over what
        is left of it (waits until quota is freed)."""
        for r, q in sorted(ask.items()):
            nominal = self.nominal.get((flavor, r), Fraction(0))
            mine = self.taken.get((self.name, flavor, r), Fraction(0))
            others = self.used.get((self.name, flavor, r), Fraction(0))
            if mine + q > nominal:
                return (
                    f"insufficient quota for {r} in flavor {flavor}, previously considered "
                    f"podsets requests ({fmt(r, mine)}) + current podset request ({fmt(r, q)}) "
                    f"> maximum capacity ({fmt(r, nominal)})"
                )
            if others + mine + q > nominal:
                more = fmt(r, others + mine + q - nominal)
                return f"insufficient unused quota for {r} in flavor {flavor}, {more} more needed"
        return None

    def take(self, flavor: str, ask: Amounts) -> None:
        for r, q in ask.items():
            key = (self.name, flavor, r)
            self.taken[key] = self.taken.get(key, 0) + q


def _flavor_for(ps: PodSet, group: dict, ask: Amounts, quota: _Quota, flavors) -> tuple:
    """findFlavorForPodSets: the group's first flavor that takes the pod and has the quota."""
    reasons = []
    for f in group["flavors"]:
        why = flavor_fits_pod(ps.template["spec"], flavors[f["name"]])
        why = why or quota.short(f["name"], ask)
        if why is None:
            return f["name"], []
        reasons.append(f"{ps.name}: {why}")
    return None, reasons


def assign(wl: Workload, localqueues, clusterqueues, flavors, used=None) -> Admission:
    """Admit `wl` next to what `used` ((ClusterQueue, flavor, resource) -> amount) holds."""
    if wl.queue is None:
        return Admission(None, None, reasons=[f"no {QUEUE_LABEL} label: not Kueue's"])
    cq, why = _clusterqueue(wl, localqueues, clusterqueues, flavors)
    if cq is None:
        return Admission(None, None, reasons=[why])
    groups = cq["spec"].get("resourceGroups", [])
    nominal = {
        (f["name"], r["name"]): quantity(r["nominalQuota"])
        for g in groups
        for f in g["flavors"]
        for r in f["resources"]
    }
    quota = _Quota(cq["metadata"]["name"], nominal, used or {})
    by_name = {f["metadata"]["name"]: f for f in flavors}
    covered = {r for g in groups for r in g["coveredResources"]}
    out: dict[str, str | None] = {}
    for ps in wl.podsets:
        requests = ps.total
        if "pods" in covered:
            requests["pods"] = Fraction(ps.count)
        uncovered = sorted(r for r, q in requests.items() if q and r not in covered)
        if uncovered:
            reasons = [f"resource {r} unavailable in ClusterQueue" for r in uncovered]
            return Admission(quota.name, None, reasons=reasons)
        chosen = set()
        for g in groups:
            ask = {r: q for r, q in requests.items() if r in g["coveredResources"]}
            if not ask:
                continue
            fname, reasons = _flavor_for(ps, g, ask, quota, by_name)
            if fname is None:
                return Admission(quota.name, None, reasons=reasons)
            quota.take(fname, ask)
            chosen.add(fname)
        if len(chosen) > 1:
            raise NotImplementedError(f"{ps.name} spans resource groups: {sorted(chosen)}")
        out[ps.name] = chosen.pop() if chosen else None
    return Admission(quota.name, out, usage=quota.taken)


def admit(wl: Workload, localqueues, clusterqueues, flavors, used=None) -> dict | None:
    """The flavor per PodSet, or None: Kueue keeps the workload pending."""
    return assign(wl, localqueues, clusterqueues, flavors, used).flavors


def placed(pod_template: dict, flavor: dict | None) -> dict:
    """The pod template as admission leaves it (FromAssignment + Merge)."""
    out = copy.deepcopy(pod_template)
    if flavor is None:
        return out
    spec, fspec = out["spec"], flavor.get("spec", {})
    labels, selector = fspec.get("nodeLabels", {}), spec.get("nodeSelector", {})
    clash = sorted(k for k in labels if k in selector and selector[k] != labels[k])
    if clash:
        raise ValueError(f"conflict for nodeSelector: {clash}")  # BadPodSetsUpdateError
    if labels:
        spec["nodeSelector"] = {**selector, **labels}

    def norm(t: dict) -> dict:  # utiltolerations.Equal: an empty operator is Equal
        return {"operator": "Equal", **t}

    tolerations = list(spec.get("tolerations", []))
    for t in fspec.get("tolerations", []):
        if norm(t) not in [norm(x) for x in tolerations]:
            tolerations.append(t)
    if tolerations:
        spec["tolerations"] = tolerations
    return out


# ---- a queue over time --------------------------------------------------------------------


@dataclass
class Run:
    events: list[tuple[str, str, dict]]  # (admitted | finished, workload, held after it)
    pending: list[str]  # never admitted: nothing left running would free their quota

    @property
    def admitted(self) -> list[str]:
        return [w for e, w, _ in self.events if e == "admitted"]

    @property
    def peak(self) -> dict[tuple[str, str, str], Fraction]:
        out: dict = {}
        for _, _, held in self.events:
            out = _max(out, held)
        return {k: v for k, v in out.items() if v}

    @property
    def most_running(self) -> int:
        running = best = 0
        for event, _, _ in self.events:
            running += 1 if event == "admitted" else -1
            best = max(best, running)
        return best


def simulate(workloads: list[Workload], localqueues, clusterqueues, flavors, chained=True) -> Run:
    """Admit in submission order while quota allows; then the oldest running workload ends
    and frees its quota. `chained`: each is submitted only once the one before it ended
    (the Argo DAG: a stage starts after the one before succeeded); else all at once."""
    pending = [workloads[0]] if chained else list(workloads)
    later = list(workloads[1:]) if chained else []
    running: list[tuple[Workload, Admission]] = []
    used: dict[tuple[str, str, str], Fraction] = {}
    events: list[tuple[str, str, dict]] = []
    while pending or running:
        for wl in list(pending):
            adm = assign(wl, localqueues, clusterqueues, flavors, used)
            if adm.flavors is not None:
                pending.remove(wl)
                running.append((wl, adm))
                used = {k: v for k, v in _add(used, adm.usage).items() if v}
                events.append(("admitted", wl.name, dict(used)))
        if not running:
            break
        wl, adm = running.pop(0)
        used = {k: v for k, v in _add(used, adm.usage, times=-1).items() if v}
        events.append(("finished", wl.name, dict(used)))
        if chained and later:
            pending.append(later.pop(0))
    return Run(events, [w.name for w in pending + later])


def sized_to(clusterqueue: dict, workloads: list[Workload]) -> dict:
    """A copy of the ClusterQueue whose every nominal quota is the most that one of these
    workloads asks for: what the queue needs to run them one at a time, and no more."""
    out = copy.deepcopy(clusterqueue)
    for group in out["spec"]["resourceGroups"]:
        for flavor in group["flavors"]:
            for r in flavor["resources"]:
                most = max((wl.total.get(r["name"], Fraction(0)) for wl in workloads), default=0)
                r["nominalQuota"] = fmt(r["name"], Fraction(most))
    return out
