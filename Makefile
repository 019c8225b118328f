# make test   : create .venv if missing, install everything, build the extension, run the CPU + interpreter tests
# make bench  : same set-up, then the kernel microbenchmarks (small sizes on CPU, the full suite on a GPU)
# make gpu-suite : benchmarks/gpu_suite.sh (on a GPU machine: build for sm_90a, pytest -m gpu, benchmarks)
PYTHON ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.14.1
STAMP := $(VENV)/.peft_kernels-installed
CSRC := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' 2>/dev/null)
BENCH_ARGS ?=

.PHONY: install build test test-cpu test-triton bench gpu-suite lint info clean

$(VPY):
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip setuptools wheel

$(STAMP): $(VPY) pyproject.toml setup.py
	$(VPY) -m pip install -q "$(TORCH_SPEC)"
	$(VPY) -m pip install -q ninja "setuptools>=64" wheel
	PEFT_KERNELS_SKIP_EXT=1 $(VPY) -m pip install -q -e ".[dev]" --no-build-isolation
	touch $(STAMP)

# Rebuild the native extension when a C++/CUDA source changes (ninja makes it incremental).
peft_kernels/_C.stamp: $(STAMP) $(CSRC)
	MAX_JOBS=$${MAX_JOBS:-2} $(VPY) setup.py -q build_ext --inplace
	touch $@

install: peft_kernels/_C.stamp

build: install

info: install
	$(VPY) -m peft_kernels.info

test-cpu: install
	$(VPY) -m pytest -q -m "not triton and not gpu" tests

# TRITON_INTERPRET must be set before triton is imported: a separate pytest process.
test-triton: install
	TRITON_INTERPRET=1 $(VPY) -m pytest -q -m "triton and not gpu" tests

test: test-cpu test-triton

bench: install
	$(VPY) -m peft_kernels.bench $(BENCH_ARGS)

gpu-suite:
	bash benchmarks/gpu_suite.sh

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf build *.egg-info peft_kernels/_C*.so peft_kernels/_C.stamp
