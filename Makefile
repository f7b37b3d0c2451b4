# `make demo` and `make test` do all set-up: a virtual environment in .venv that keeps an importable
# torch >= 2.11 (from the system site-packages) or else installs the pinned CPU build, then the package, every
# version as constraints.txt pins it (a kept torch keeps its own triton: those two pins are left out then).
# `make test-latest` runs the suite on the newest releases instead (a report of drift, not part of CI).
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.moespec-installed
CONSTRAINTS := constraints.txt
LATEST := .venv-latest

.PHONY: setup demo test test-latest constraints bench bench-ops gpu-check lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(VPY) || $(PY) -m venv --system-site-packages $(VENV)
	@if $(VPY) -c "import sys, torch; v = tuple(int(x) for x in torch.__version__.split('+')[0].split('.')[:2]); sys.exit(0 if v >= (2, 11) else 1)" 2>/dev/null; then \
		echo "keeping the importable torch: $$($(VPY) -c 'import torch; print(torch.__version__)')"; \
		grep -v -E '^(torch|triton)==' $(CONSTRAINTS) > $(VENV)/constraints.txt; \
	else \
		cp $(CONSTRAINTS) $(VENV)/constraints.txt; \
		echo "installing the pinned CPU build $$(grep '^torch==' $(VENV)/constraints.txt)"; \
		$(VPY) -m pip install -q -c $(VENV)/constraints.txt torch; \
	fi
	$(VPY) -m pip install -q -c $(VENV)/constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VPY) -P -m moe_spec_compile.commands demo

# TEST_WORKERS pytest-xdist processes, one file each at a time (a file's fixtures are built once), one thread each
# (OMP_NUM_THREADS=1: two workers on 2 cores, not four threads): 10.7 min against 18-21 min serial on 2 cores.
# TEST_WORKERS=0 runs the suite in this one process.
TEST_WORKERS ?= 2
test: $(STAMP)
	# -P: keep the repo root off sys.path, or transformers would import our kernels/ as the `kernels` hub package
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} TRITON_INTERPRET=1 $(VPY) -P -m pytest -n $(TEST_WORKERS) --dist loadfile tests

# The suite against the newest releases (torch stays at its pin: an unpinned torch pulls CUDA wheels), with
# the versions that differ from constraints.txt listed first: drift shows up here, not as a red CI.
test-latest:
	test -x $(LATEST)/bin/python || $(PY) -m venv --system-site-packages $(LATEST)
	grep '^torch==' $(CONSTRAINTS) > $(LATEST)/torch-pin.txt
	$(LATEST)/bin/python -m pip install -q --upgrade --upgrade-strategy eager -c $(LATEST)/torch-pin.txt -e ".[dev]"
	$(LATEST)/bin/python .ci/constraints.py --diff $(CONSTRAINTS)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} TRITON_INTERPRET=1 $(LATEST)/bin/python -P -m pytest -n $(TEST_WORKERS) --dist loadfile tests

# Re-pin constraints.txt to what .venv has now (after `make test` passed there on the versions you mean to pin).
constraints: $(STAMP)
	$(VPY) .ci/constraints.py --write $(CONSTRAINTS)

lint: $(STAMP)
	$(VPY) -m ruff check .

bench: $(STAMP)
	$(VPY) benchmarks/bench_budget_cpu.py

# Op microbenchmarks (pytest-benchmark, benchmarks/README.md), never part of `make test`: each run saved under
# OPS_STORE and compared with the last saved run there. Compare is left out while nothing is saved (it would only
# warn, but --benchmark-compare-fail would fail). BENCH_OPS_ARGS: more pytest arguments, e.g. -k N16 or
# --benchmark-compare-fail=median:10%.
OPS_STORE := benchmarks/results/ops
bench-ops: $(STAMP)
	$(VPY) -P -m pytest benchmarks/bench_ops.py --benchmark-only --benchmark-autosave \
		--benchmark-storage=$(OPS_STORE) $(if $(wildcard $(OPS_STORE)/*/*.json),--benchmark-compare) $(BENCH_OPS_ARGS)

# The GPU check (benchmarks/README.md): results to $$OUT when set, and to benchmarks/results/gpu/. No set-up
# step: a lent device has no network; install the checkout there with `pip install --no-deps
# --no-build-isolation -e .` first. GPU_PY: .venv's python where it exists, else the python on PATH.
GPU_PY ?= $(if $(wildcard $(VPY)),$(VPY),python)
gpu-check:
	$(GPU_PY) -P benchmarks/gpu_suite.py --out $${OUT:-benchmarks/results/gpu} $(GPU_ARGS)

clean:
	rm -rf $(VENV) $(LATEST) build *.egg-info
