"""The restricted Pod Security Standard, checked on a pod template offline.

Hand-written because no Python library implements the Pod Security Standards: their
reference is Go (k8s.io/pod-security-admission, what the API server runs for a namespace
labelled pod-security.kubernetes.io/enforce). This follows the documented controls
(kubernetes.io/docs/concepts/security/pod-security-standards, version "latest", Kubernetes
1.33): every baseline control, then the restricted ones. Linux pods only (the Windows
exemptions are not needed here). `violations` returns one line per breach, empty when the
pod would be admitted.
"""

from __future__ import annotations

SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}
SELINUX_TYPES = {"container_t", "container_init_t", "container_kvm_t", "container_engine_t"}
VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}
CONFINED = {"RuntimeDefault", "Localhost"}  # seccomp and AppArmor profile types allowed


def _containers(spec: dict):
    for kind in ("initContainers", "containers", "ephemeralContainers"):
        for i, c in enumerate(spec.get(kind, [])):
            yield f"{kind}[{i}] ({c.get('name')})", c.get("securityContext") or {}


def _baseline(spec: dict, meta: dict) -> list[str]:
    out = []
    psc = spec.get("securityContext") or {}
    out += [f"host namespaces: {k}" for k in ("hostNetwork", "hostPID", "hostIPC") if spec.get(k)]
    out += [f"volumes[{v['name']}]: hostPath" for v in spec.get("volumes", []) if "hostPath" in v]
    out += [f"sysctl {s['name']}" for s in psc.get("sysctls", []) if s["name"] not in SAFE_SYSCTLS]
    for where, sc in [("pod", psc), *_containers(spec)]:
        if (sc.get("windowsOptions") or {}).get("hostProcess"):
            out.append(f"{where}: hostProcess")
        if sc.get("privileged"):
            out.append(f"{where}: privileged")
        if sc.get("procMount", "Default") != "Default":
            out.append(f"{where}: procMount {sc['procMount']}")
        selinux = sc.get("seLinuxOptions") or {}
        if selinux.get("type", "container_t") not in SELINUX_TYPES:
            out.append(f"{where}: seLinuxOptions.type {selinux['type']}")
        out += [f"{where}: seLinuxOptions.{k}" for k in ("user", "role") if selinux.get(k)]
        for key in ("seccompProfile", "appArmorProfile"):
            if (sc.get(key) or {}).get("type") == "Unconfined":
                out.append(f"{where}: {key} Unconfined")
    for c in spec.get("containers", []) + spec.get("initContainers", []):
        ports = [p for p in c.get("ports", []) if p.get("hostPort")]
        out += [f"{c['name']}: hostPort {p['hostPort']}" for p in ports]
    apparmor = "container.apparmor.security.beta.kubernetes.io/"
    for key, value in (meta.get("annotations") or {}).items():
        allowed = value == "runtime/default" or value.startswith("localhost/")
        if key.startswith(apparmor) and not allowed:
            out.append(f"annotation {key}: {value}")
    return out


def _restricted(spec: dict) -> list[str]:
    out = []
    psc = spec.get("securityContext") or {}
    for v in spec.get("volumes", []):
        other = set(v) - VOLUMES - {"name", "hostPath"}  # hostPath: baseline's already
        if other:
            out.append(f"volumes[{v['name']}]: {', '.join(sorted(other))}")
    if psc.get("runAsUser") == 0:
        out.append("pod: runAsUser 0")
    pod_nonroot = psc.get("runAsNonRoot") is True
    pod_seccomp = (psc.get("seccompProfile") or {}).get("type") in CONFINED
    for where, sc in _containers(spec):
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{where}: allowPrivilegeEscalation != false")
        nonroot = sc.get("runAsNonRoot")
        if nonroot is False or (nonroot is None and not pod_nonroot):
            out.append(f"{where}: runAsNonRoot != true")
        if sc.get("runAsUser") == 0:
            out.append(f"{where}: runAsUser 0")
        seccomp = (sc.get("seccompProfile") or {}).get("type")
        if seccomp not in CONFINED and not (seccomp is None and pod_seccomp):
            out.append(f"{where}: seccompProfile not RuntimeDefault or Localhost")
        caps = sc.get("capabilities") or {}
        if "ALL" not in caps.get("drop", []):
            out.append(f"{where}: capabilities.drop lacks ALL")
        added = [c for c in caps.get("add", []) if c != "NET_BIND_SERVICE"]
        if added:
            out.append(f"{where}: capabilities.add {added}")
    return out


def violations(pod_template: dict) -> list[str]:
    """Why the restricted profile would reject a pod of this template (empty: admitted)."""
    spec, meta = pod_template["spec"], pod_template.get("metadata") or {}
    return _baseline(spec, meta) + _restricted(spec)
