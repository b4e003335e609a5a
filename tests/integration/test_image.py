"""The image, checked offline (no Docker engine, no network): docker/Dockerfile is linted by
hadolint and read as text for what it installs and what the manifests rely on."""

import fnmatch
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
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


def make_image(*assignments: str) -> list[str]:
    """The command `make image` runs, as argv, printed by `make -n` (no Docker needed)."""
    environ = {k: v for k, v in os.environ.items() if k not in ("PLATFORM", "IMAGE", "IMAGE_FLAGS")}
    environ.pop("MAKEFLAGS", None)  # under `make test`: the outer make's flags stay out
    proc = subprocess.run(
        [tool("make"), "--no-print-directory", "-s", "-n", "image", *assignments],
        cwd=ROOT,
        env=environ,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, lines
    return shlex.split(lines[0])


def flag(argv: list[str], name: str) -> str:
    assert argv.count(name) == 1, argv
    return argv[argv.index(name) + 1]


def test_make_image_builds_for_amd64_unless_told_otherwise():
    """The GPU nodes are amd64: built natively on an arm64 laptop, the image fails there with
    "exec format error". buildx (BuildKit) with --platform, overridable; --load puts the
    result in the local store for `docker push` whatever the builder."""
    argv = make_image()
    assert argv[:3] == ["docker", "buildx", "build"], argv
    assert flag(argv, "--platform") == "linux/amd64"
    assert flag(argv, "-f") == "docker/Dockerfile" and flag(argv, "-t") == "mlmjob:latest"
    assert "--load" in argv and argv[-1] == ".", argv
    argv = make_image("PLATFORM=linux/arm64", "IMAGE=registry.example.com/mlmjob:0.1.0")
    assert flag(argv, "--platform") == "linux/arm64"
    assert flag(argv, "-t") == "registry.example.com/mlmjob:0.1.0"


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The project installed as the app stage installs it (`uv pip install --no-deps --target
    /opt/mlmjob .`) from what the build context holds of it: /opt/mlmjob's tree. Offline:
    the venv's setuptools builds it instead of an isolated one (same backend, same rules)."""
    tmp = tmp_path_factory.mktemp("image")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "constraints.txt", "README.md"):
        shutil.copy(ROOT / name, src / name)
    # .dockerignore keeps __pycache__ and *.pyc out of the context
    shutil.copytree(
        ROOT / "job", src / "job", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
    )
    target = tmp / "opt" / "mlmjob"
    proc = subprocess.run(
        [
            tool("uv"),
            "pip",
            "install",
            "--python",
            sys.executable,
            "--no-build-isolation",
            "--no-deps",
            "--offline",
            "--no-cache",
            "--quiet",
            "--target",
            str(target),
            ".",
        ],
        cwd=src,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return target


def test_package_installs_every_sample_file(installed):
    """The demo's data, inputs and tokenizer are package data: the image has no other copy
    (a package-data glob does not recurse, which left out job/sample/tokenizer/)."""
    sample = ROOT / "job" / "sample"
    source = {
        p.relative_to(sample).as_posix()
        for p in sample.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    }
    got = {
        p.relative_to(installed / "job" / "sample").as_posix()
        for p in (installed / "job" / "sample").rglob("*")
        if p.is_file()
    }
    assert {"tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json"} <= source
    assert got == source


def test_demo_config_runs_from_a_folder_linked_to_the_installed_package(installed):
    """The README's smoke test runs configs/demo.yaml in the image from /tmp/demo with
    `job` linked to /opt/mlmjob/job: every path it reads is under job/ and installed, and
    every output is relative, so it lands in /tmp (the root filesystem is read-only)."""
    demo = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    reads = [s["uri"] for s in demo["data"]["sources"]]
    reads += [demo["model"]["name_or_path"], *demo["infer"]["inputs"]]
    assert reads == [
        "job/sample/eli5-sample.jsonl",
        "job/sample/tokenizer",
        "job/sample/fill-mask.txt",
    ]
    for path in reads:
        assert (installed / path).exists(), f"{path} is not in /opt/mlmjob"
    assert (installed / "job/sample/tokenizer/tokenizer.json").is_file()
    for section in ("run", "data", "infer"):
        out = Path(demo[section]["output"])
        assert not out.is_absolute() and ".." not in out.parts, f"{section}.output={out}"


def test_every_package_download_is_in_a_cache_mount():
    """uv's and apt's downloads stay in BuildKit cache mounts: rebuilds fetch only what
    changed, and no layer (the venv included) holds a cache."""
    text = DOCKERFILE.read_text()
    deps = env(stages(text)["deps"])
    assert "UV_NO_CACHE" not in deps  # it would leave the mount unused
    mount = f"--mount=type=cache,target={deps['UV_CACHE_DIR']}"
    runs = [rest for word, rest in instructions(text) if word == "RUN"]
    uv = [run for run in runs if re.search(r"\buv (pip|python) install\b", run)]
    assert len(uv) == 4, uv  # Python, torch, the dependencies, the project
    for run in uv:
        assert run.startswith(mount + " "), run
    apt = [run for run in runs if "apt-get update" in run]
    assert len(apt) == 3, apt  # os, rdma-ib, rdma-efa
    for run in apt:
        assert run.startswith("--mount=type=cache,target=/var/lib/apt/lists,sharing=locked "), run
        assert "rm -rf /var/lib/apt/lists" not in run, run  # it would empty the cache


def test_uv_is_ci_uv_and_python_its_newest_patch_of_ci_minor():
    """UV_IMAGE is the Makefile's uv (the venv's, so CI resolves with it), and PYTHON_VERSION
    the newest patch of CI's minor in that uv's embedded list of Python downloads, for both
    Linux architectures (no network: the list ships in the binary)."""
    args = build_args(DOCKERFILE.read_text())
    uv_ci = re.search(r"^UV := (\S+)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert args["UV_IMAGE"] == f"ghcr.io/astral-sh/uv:{uv_ci}"
    version = subprocess.run([tool("uv"), "--version"], capture_output=True, text=True)
    assert version.stdout.split()[:2] == ["uv", uv_ci], version.stdout
    proc = subprocess.run(
        [
            tool("uv"),
            "python",
            "list",
            "--all-versions",
            "--only-downloads",
            "--all-platforms",
            "--all-arches",
            "--offline",
            "--output-format",
            "json",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    patches: dict[str, set[int]] = {"x86_64": set(), "aarch64": set()}
    for d in json.loads(proc.stdout):
        v = d["version_parts"]
        if (
            (d["implementation"], d["os"], d["libc"], d["variant"])
            == ("cpython", "linux", "gnu", "default")
            and d["arch"] in patches
            and (v["major"], v["minor"]) == sys.version_info[:2]
            and d["version"] == f"{v['major']}.{v['minor']}.{v['patch']}"  # no pre-release
        ):
            patches[d["arch"]].add(v["patch"])
    newest = max(patches["x86_64"] & patches["aarch64"])
    assert args["PYTHON_VERSION"] == f"{sys.version_info[0]}.{sys.version_info[1]}.{newest}", (
        f"uv {uv_ci} installs Python {sys.version_info[0]}.{sys.version_info[1]}.{newest} "
        "on both architectures: bump PYTHON_VERSION"
    )
