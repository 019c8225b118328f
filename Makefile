# make test   : create .venv if missing, install everything, build the extension, run the CPU + interpreter tests
# make bench  : same set-up, then the kernel microbenchmarks (small sizes on CPU, the full suite on a GPU)
# make gpu-suite : benchmarks/gpu_suite.sh (on a GPU machine: build for sm_90a, pytest -m gpu, benchmarks)
# make compile-check : compile every Triton kernel variant for sm_90a (no GPU needed) with the installed Triton
#                      and Triton $(COMPILE_CHECK_TRITON) from a side folder; reports in benchmarks/results/compile/
PYTHON ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.14.1
STAMP := $(VENV)/.peft_kernels-installed
CSRC := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' 2>/dev/null)
BENCH_ARGS ?=

.PHONY: install build test test-cpu test-triton bench gpu-suite lint info clean compile-check

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

# Triton of the GPU machine, pip-installed without dependencies into a cached side folder (never into the venv).
COMPILE_CHECK_TRITON ?= 3.6.0
COMPILE_CHECK_SIDE := build/compile-check/triton-$(COMPILE_CHECK_TRITON)
$(COMPILE_CHECK_SIDE)/triton/__init__.py:
	$(VPY) -m pip install -q --no-deps --target $(COMPILE_CHECK_SIDE) triton==$(COMPILE_CHECK_TRITON)

compile-check: install $(COMPILE_CHECK_SIDE)/triton/__init__.py
	@status=0; \
	env -u TRITON_INTERPRET $(VPY) -m peft_kernels.triton._compile_check \
		--json benchmarks/results/compile/triton-$$($(VPY) -c 'import triton; print(triton.__version__)').json || status=1; \
	env -u TRITON_INTERPRET PYTHONPATH=$(COMPILE_CHECK_SIDE):. $(VPY) -m peft_kernels.triton._compile_check \
		--json benchmarks/results/compile/triton-$(COMPILE_CHECK_TRITON).json || status=1; \
	exit $$status

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf build *.egg-info peft_kernels/_C*.so peft_kernels/_C.stamp
