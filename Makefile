# Two commands on a fresh machine: `make demo`, `make test`. Everything else is set up on demand.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
UV := $(VENV)/bin/uv
# CPU build by default (this machine's pip finds its wheel locally; elsewhere add
# TORCH_INDEX=https://download.pytorch.org/whl/cpu). GPU hosts: TORCH_INDEX=https://download.pytorch.org/whl/cu128
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
# The project's extras: dev (tests, lint) here; the image installs gpu (GPU builds) or none (CPU builds).
EXTRAS ?= dev
STAMP := $(VENV)/.installed
DEMO_ARGS ?=
# The image the KubeRay manifests run (deploy/kubernetes/): `make image`, or IMAGE_BASE=...-cpu for CPU nodes.
IMAGE ?= terminus-platform:2.60.0-gpu
IMAGE_BASE ?= rayproject/ray:2.60.0-py311-gpu
IMAGE_TORCH_INDEX ?= https://download.pytorch.org/whl/cu128
IMAGE_EXTRAS ?= gpu

.PHONY: setup demo test test-fast test-cluster lint bench smoke-sdxl image clean

setup: $(STAMP)

# torch through pip (its CPU or CUDA build, as above), the rest through uv: the same pins, resolved and
# installed in parallel, about 3x faster than pip. Compiled to bytecode at install, as pip does: where
# PYTHONDONTWRITEBYTECODE is set, every process would otherwise compile its imports from source, every time.
# A private package index: UV_INDEX_URL / UV_EXTRA_INDEX_URL.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip uv==0.9.9
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q $(TORCH_SPEC) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(UV) pip install -q --compile-bytecode --python $(PY) -c constraints.txt -e ".$(if $(EXTRAS),[$(EXTRAS)])"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) flows/demo.py --config flows/configs/tiny.yaml $(DEMO_ARGS)

# Two workers: the integration tests in order on one (tests/conftest.py, SERIAL), the unit tests on the other.
test: $(STAMP)
	$(PY) -m pytest -q tests -n 2 -m "not cluster" --durations=15

# The tests that start, kill or spread whole Ray clusters: several nodes on this machine
# (ray.cluster_utils.Cluster) with a node lost under curation, DDP training and Serve; a training worker
# SIGKILLed; a flow and its local cluster killed mid-checkpoint; a submitted job's whole cluster killed and the
# run resumed on a new one. Each holds both cores for minutes, so they are a target (and a CI step) of their own.
test-cluster: $(STAMP)
	$(PY) -m pytest -q tests -m cluster --durations=10

# The edit-test loop: everything but the end-to-end and fault-injection runs marked slow (`make test` runs all).
test-fast: $(STAMP)
	$(PY) -m pytest -q tests -m "not slow" -n 2 --durations=10

lint: $(STAMP)
	$(VENV)/bin/ruff check components deploy bench flows tests

bench: $(STAMP)
	$(PY) flows/bench.py --config flows/configs/tiny.yaml

# SDXL at its real size (3.5 B parameters, random weights, built offline) through the demo's chain, measured per
# stage under .state/sdxl/. It needs three copies of the fp16 base free on disk (about 23 GB; checked before it
# starts) and 24 GiB of memory; runs are recorded in bench/results/.
smoke-sdxl: $(STAMP)
	$(PY) flows/smoke.py --config flows/configs/sdxl_cpu.yaml --set state_dir=$(CURDIR)/.state/sdxl

# The Dockerfile runs `make setup` inside the image (the same steps as here), with the build arguments below.
image:
	docker build -t $(IMAGE) --build-arg BASE=$(IMAGE_BASE) --build-arg TORCH_INDEX=$(IMAGE_TORCH_INDEX) \
		--build-arg EXTRAS=$(IMAGE_EXTRAS) .

clean:
	rm -rf .state
