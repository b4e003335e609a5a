"""The image, checked offline (no Docker engine, no network): docker/Dockerfile is linted by
hadolint and read as text for what it installs and what the manifests rely on."""

import fnmatch
import importlib.metadata
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from support.data import ROOT

DOCKERFILE = ROOT / "docker" / "Dockerfile"
BIN = Path(sys.executable).parent

# The CUDA builds PyTorch publishes for a release, as download.pytorch.org/whl/<build>.
# Tests cannot reach that index, so this is what was established, from PyTorch's own record:
# - RELEASE.md's compatibility matrix, row 2.13 (pytorch/pytorch#187075): stable CUDA 12.6
#   and 13.0, experimental 13.2. CUDA 12.8 left the matrix with 2.12 (#182849; the release
#   manager: "we have removed cu 12.8 builds", googlecolab/colabtools#5982) and 2.13's matrix
#   is 2.12's (#197555).
# - PyPI: torch 2.13.0's Linux wheel (the one `pip install torch` gets) requires
#   cuda-toolkit==13.0.3, nvidia-cudnn-cu13==9.20.0.48 and nvidia-nccl-cu13==2.29.7, the
#   matrix's CUDA 13.0 row: cu130 is the default build.
# A torch bump fails here until its builds are established the same way and added.
TORCH_CUDA_BUILDS = {"2.13.0": {"cu126", "cu130", "cu132"}}


def tool(name: str) -> str:
    path = shutil.which(name, path=str(BIN)) or shutil.which(name)
    assert path, f"{name} is missing: make setup installs it"
    return path


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    out, buf = [], ""
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("#") or not s:
            continue
        if s.endswith("\\"):
            buf += s[:-1] + " "
            continue
        word, _, rest = (buf + s).partition(" ")
        out.append((word.upper(), " ".join(rest.split())))
        buf = ""
    return out


def stages(text: str) -> dict[str, list[tuple[str, str]]]:
    """Each stage's instructions by its name (`FROM x AS name`)."""
    found, current = {}, None
    for word, rest in instructions(text):
        if word == "FROM":
            current = found.setdefault(rest.split()[-1], [])
        if current is not None:
            current.append((word, rest))
    return found


def build_args(text: str) -> dict[str, str]:
    found = {}
    for word, rest in instructions(text):
        if word == "ARG":
            name, _, default = rest.partition("=")
            assert name not in found, f"ARG {name} declared twice: which default is meant?"
            found[name] = default
    return found


def env(stage: list[tuple[str, str]]) -> dict[str, str]:
    found = {}
    for word, rest in stage:
        if word == "ENV":
            found.update(item.split("=", 1) for item in shlex.split(rest))
    return found


def installs(text: str) -> list[str]:
    """Every `uv pip install ...` command of every RUN."""
    runs = [rest for word, rest in instructions(text) if word == "RUN"]
    return [c.strip() for run in runs for c in run.split("&&") if "uv pip install" in c]


def constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def test_dockerfile_is_hadolint_clean():
    proc = subprocess.run(
        [tool("hadolint"), "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_torch_is_a_cuda_build_that_exists_for_ci_release():
    """TORCH_VERSION is CI's torch release and TORCH_INDEX one of its published CUDA builds;
    torch is installed from that index with the build as its local version."""
    text = DOCKERFILE.read_text()
    args = build_args(text)
    torch_ci = re.search(r"TORCH_CPU := torch==([\d.]+)", (ROOT / "Makefile").read_text()).group(1)
    assert importlib.metadata.version("torch").split("+")[0] == torch_ci
    assert args["TORCH_VERSION"] == torch_ci
    assert torch_ci in TORCH_CUDA_BUILDS, (
        f"torch {torch_ci}: establish which CUDA indexes PyTorch publishes for it (RELEASE.md's "
        "matrix, the PyPI wheel's requirements) and add them to TORCH_CUDA_BUILDS"
    )
    index = re.fullmatch(r"https://download\.pytorch\.org/whl/(cu\d+)", args["TORCH_INDEX"])
    assert index, f"TORCH_INDEX={args['TORCH_INDEX']} is not a CUDA index of download.pytorch.org"
    assert index.group(1) in TORCH_CUDA_BUILDS[torch_ci], (
        f"torch {torch_ci} has no {index.group(1)} build; it has "
        f"{sorted(TORCH_CUDA_BUILDS[torch_ci])}"
    )
    torch = [c for c in installs(text) if '--index-url "${TORCH_INDEX}"' in c]
    assert len(torch) == 1, installs(text)
    assert '"torch==${TORCH_VERSION}+${build}"' in torch[0] and "--no-deps" in torch[0]
    assert 'build="${TORCH_INDEX%/}" && build="${build##*/}"' in " ".join(
        rest for word, rest in instructions(text) if word == "RUN"
    )  # the local version is the index's last path segment: cu130 -> torch==2.13.0+cu130


def test_python_and_every_pin_equal_what_ci_tests():
    """CI's Python minor; every package resolved with constraints.txt; nothing pinned in the
    Dockerfile that disagrees with it."""
    text = DOCKERFILE.read_text()
    py = re.fullmatch(r"(\d+)\.(\d+)(\.\d+)?", build_args(text)["PYTHON_VERSION"])
    assert py and (int(py.group(1)), int(py.group(2))) == sys.version_info[:2]
    pins = constraints()
    for name in (
        "transformers",
        "datasets",
        "accelerate",
        "deepspeed",
        "boto3",
        "tokenizers",
        "numpy",
        "pyyaml",
    ):
        assert name in pins, name
    torch_ci = build_args(text)["TORCH_VERSION"]
    assert pins.get("torch", torch_ci) == torch_ci
    for command in installs(text):
        if "--index-url" in command:  # torch alone, --no-deps (the test above)
            continue
        assert "--constraint constraints.txt" in command, command
    deps = [c for c in installs(text) if "-r pyproject.toml" in c]
    assert len(deps) == 1 and "--constraint torch.txt" in deps[0], deps
    for name, version in re.findall(r"\b([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\"'$]+)", text):
        key = re.sub(r"[-_.]+", "-", name).lower()
        assert key in pins and pins[key] == version, f"{name}=={version} vs constraints.txt"


def test_dependencies_are_installed_before_the_code_is_copied():
    """A code change rebuilds neither the dependency layers nor the venv layer of the image."""
    deps = stages(DOCKERFILE.read_text())["deps"]
    copied = [rest.split()[:-1] for word, rest in deps if word == "COPY" and "--from" not in rest]
    assert copied == [["pyproject.toml", "constraints.txt"]], copied
    app = stages(DOCKERFILE.read_text())["app"]
    assert ("FROM", "deps AS app") in app
    assert ("COPY", "job ./job") in app
    runtime = stages(DOCKERFILE.read_text())["runtime"]
    assert ("COPY", "--from=deps /opt/venv /opt/venv") in runtime
    assert ("COPY", "--from=app /opt/mlmjob /opt/mlmjob") in runtime


def test_runtime_is_what_the_manifests_rely_on():
    text = DOCKERFILE.read_text()
    assert "nvidia/cuda" not in text  # torch's wheels bring their CUDA libraries
    runtime = stages(text)["runtime"]
    last = {word: rest for word, rest in runtime}  # the last of each instruction wins
    entry, cmd = json.loads(last["ENTRYPOINT"]), json.loads(last["CMD"])
    # args replace CMD only: every command is tini's child, and only the launcher forwards
    # SIGTERM to its workers (tini -g would signal torchrun, which kills them after 30 s)
    assert Path(entry[0]).name == "tini" and entry[1:] == ["--"], entry
    assert cmd == ["mlmjob", "--help"]
    assert last["USER"] == "1000:1000"
    assert last["WORKDIR"] == "/app"
    assert ("COPY", "configs ./configs") in runtime
    e = env(runtime)
    path = e["PATH"].split(":")
    assert path[:2] == ["/opt/mlmjob/bin", "/opt/venv/bin"], path  # mlmjob, python -m job.launch
    assert e["NVIDIA_VISIBLE_DEVICES"] == "all"
    assert e["NVIDIA_DRIVER_CAPABILITIES"] == "compute,utility"
    assert e["MLMJOB_CACHE"] == "/cache" and e["HF_HOME"] == "/cache/huggingface"
    # the root filesystem is read-only: /cache and /tmp are the writable paths
    for name in (
        "XDG_CACHE_HOME",
        "TORCH_HOME",
        "TORCHINDUCTOR_CACHE_DIR",
        "TORCH_EXTENSIONS_DIR",
        "TRITON_HOME",
        "TRITON_CACHE_DIR",
        "CUDA_CACHE_PATH",
        "MPLCONFIGDIR",
    ):
        assert re.match(r"/(cache|tmp)(/|$)", e[name]), f"{name}={e[name]}"


def test_rdma_build_arg_selects_a_transport_stage():
    text = DOCKERFILE.read_text()
    assert build_args(text)["RDMA"] == "none"
    names = stages(text)
    assert {"rdma-none", "rdma-ib", "rdma-efa"} <= names.keys()
    assert names["runtime"][0] == ("FROM", "rdma-${RDMA} AS runtime")
    efa = " ".join(rest for _, rest in names["rdma-efa"])
    assert "efa_installer.sh -y --skip-kmod --skip-limit-conf --no-verify" in efa
    assert "libnccl-net-ofi.so" in efa and env(names["rdma-efa"])["NCCL_NET_PLUGIN"] == "ofi"


def test_deepspeed_configs_need_no_compiled_op():
    """The image pre-builds no DeepSpeed op and has no compiler to JIT-build one."""
    assert "DS_BUILD_OPS=0" in DOCKERFILE.read_text()
    for path in sorted((ROOT / "configs" / "deepspeed").glob("*.json")):
        ds = json.loads(path.read_text())
        assert "optimizer" not in ds, f"{path.name}: DeepSpeed's optimizers need compiled ops"
        zero = ds.get("zero_optimization", {})
        assert not {"offload_optimizer", "offload_param"} & zero.keys(), path.name


def test_dockerignore_sends_what_the_dockerfile_copies_and_nothing_else():
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]

    def ignored(path: str) -> bool:  # Docker's rule: the last pattern that matches wins
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        result = False
        for pattern in patterns:
            negated = pattern.startswith("!")
            if any(fnmatch.fnmatchcase(p, pattern.lstrip("!")) for p in prefixes):
                result = not negated
        return result

    sources = [
        src
        for word, rest in instructions(DOCKERFILE.read_text())
        if word == "COPY" and "--from" not in rest
        for src in rest.split()[:-1]
    ]
    assert sources, "no COPY from the build context?"
    for src in sources:
        assert (ROOT / src).exists(), src
        assert not ignored(src), f"{src} is copied but .dockerignore leaves it out"
    for path in (
        ".git",
        ".venv",
        "out",
        "tests",
        "k8s",
        "bench",
        "mlmjob.egg-info",
        "job/__pycache__",
        "job/train/__pycache__/loop.cpython-311.pyc",
    ):
        assert ignored(path), f"{path} would be sent to the daemon"
