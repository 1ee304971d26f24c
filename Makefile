# Set-up and entry points. `make demo` and `make test` work on a fresh machine: they create
# .venv, install torch (CPU build) first, then build mtmerge._C without build isolation.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
TORCH_SPEC ?= torch==2.13.0
CSRC := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu')

.PHONY: demo test install lint bench cuda-check gpu-check gpu-check-dry clean

$(VENV)/.stamp-deps: Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch first, by exact version: a bare `torch` requirement pulls a multi-GB CUDA build
	$(PIP) install --quiet "$(TORCH_SPEC)"
	$(PIP) install --quiet numpy pytest ruff ninja pybind11 setuptools wheel "triton>=3.2" pyyaml safetensors \
		scikit-learn psutil
	# Peers for the parity tests and benchmarks. --no-deps: their full requirements pull
	# transformers and an unpinned (CUDA) torch; these few packages are all their merge code needs.
	$(PIP) install --quiet --no-deps peft==0.21.2 mergekit==0.1.5 pydantic==2.14.3 pydantic-core==2.50.4 \
		annotated-types==0.8.0 typing-inspection==0.4.5 accelerate==1.15.0
	# transformers for the MoE drop-in (ExpertsInterface, 5.23+) and its parity tests; it needs no torch pin
	$(PIP) install --quiet transformers==5.24.0
	touch $@

$(VENV)/.stamp-build: $(VENV)/.stamp-deps setup.py pyproject.toml $(CSRC)
	$(PIP) install --quiet --no-build-isolation --no-deps -e .
	touch $@

install: $(VENV)/.stamp-build

# The main job: a real multi-task merge experiment on scikit-learn's bundled digits (base,
# six fine-tunes as safetensors checkpoints, merged through `mtmerge merge`'s pipeline).
demo: install
	$(PY) -m mtmerge demo

# The whole suite, Triton interpreter tests included. pytest's exit 5 ("no tests ran") fails too.
test: install
	@$(PY) -m pytest tests; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests: that is a failure"; fi; exit $$rc

lint: install
	$(VENV)/bin/ruff check .

bench: install
	$(PY) benchmarks/bench_select.py --threads 1 2

# Compile-check the CUDA C++ sources with nvcc (no GPU needed).
cuda-check:
	@for f in csrc/cuda/*.cu; do \
	  echo "nvcc -c $$f"; nvcc -std=c++17 -O3 -Icsrc -c $$f -o /dev/null || exit 1; \
	done

# The GPU check (DESIGN.md, "The GPU check"): on a GPU machine with torch, triton and pytest
# preinstalled and no network, build against the torch found there, run the op tests on CUDA and
# every benchmark's GPU mode, write OUT/report.md + OUT/report.json, in under 8 minutes. It uses
# the machine's Python (not .venv) and installs nothing from the network. gpu-check-dry lists the
# steps without running them (CI runs it).
GPU_PYTHON ?= python3
OUT ?= gpu-check

gpu-check:
	$(GPU_PYTHON) scripts/gpu_check.py --out $(OUT)

gpu-check-dry:
	$(GPU_PYTHON) scripts/gpu_check.py --dry-run --out $(OUT)

clean:
	rm -rf build *.egg-info mtmerge/_C*.so $(VENV)/.stamp-build
