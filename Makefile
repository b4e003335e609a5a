# The two commands a fresh clone needs: `make demo` and `make test`. Each creates .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
TORCH_CPU := torch==2.13.0
UV := 0.13.9
IMAGE ?= mlmjob:latest
# The GPU nodes are amd64: an image built natively on an arm64 laptop fails there with
# "exec format error". buildx emulates the other architecture where it has to (slower).
PLATFORM ?= linux/amd64
# --load: the image lands in the local image store (for `docker push`) whichever buildx
# builder is in use. Build args go here too: IMAGE_FLAGS='--load --build-arg RDMA=efa'.
IMAGE_FLAGS ?= --load

# Bytecode is written for what gets imported, by the first process that imports it. These
# machines set PYTHONDONTWRITEBYTECODE=1: every process then compiled transformers, torch and
# the rest from source again (11 s of a test worker's imports instead of 6). Compiling the
# whole venv at install instead (19,000 files, most never imported) took 70 s of set-up.
unexport PYTHONDONTWRITEBYTECODE

.PHONY: setup demo test lint format bench bench-gpu image k8s-check workflows clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	# CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install -q --no-compile $(TORCH_CPU) uv==$(UV)
	# uv resolves and installs the pinned rest in parallel: 15 s here against pip's 160 s
	# (most of a fresh clone's set-up); pip again should uv be unable to.
	$(BIN)/uv pip install -q --python $(PY) -c constraints.txt -e '.[dev]' \
		|| $(PY) -m pip install -q --no-compile -c constraints.txt -e '.[dev]'
	touch $@

demo: setup
	$(BIN)/mlmjob preprocess -c configs/demo.yaml
	$(BIN)/mlmjob train -c configs/demo.yaml
	$(BIN)/mlmjob evaluate -c configs/demo.yaml
	$(BIN)/mlmjob infer -c configs/demo.yaml

test: setup
	# three workers on two cores: a third of the suite waits (servers, leases, outages)
	$(PY) -m pytest -q -n 3 --dist worksteal

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: setup
	$(PY) bench/run.py

bench-gpu: setup
	$(PY) bench/gpu.py

image:
	docker buildx build --platform $(PLATFORM) $(IMAGE_FLAGS) -f docker/Dockerfile -t $(IMAGE) .

k8s-check: setup
	$(PY) -m pytest -q tests/integration/test_k8s.py tests/integration/test_k8s_run.py

# The overlays' Argo WorkflowTemplates, made again from the overlays (tests check they are).
workflows: setup
	$(PY) k8s/workflow.py k8s/overlays/askscience-5k k8s/overlays/full-eli5 \
	  k8s/overlays/full-eli5-gke k8s/overlays/full-eli5-eks-efa

clean:
	rm -rf out .pytest_cache
