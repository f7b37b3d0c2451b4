# `make demo` and `make test` do all set-up: a virtual environment in .venv that keeps an importable
# torch >= 2.11 (from the system site-packages) or else installs the pinned CPU build, then the package.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.moespec-installed
TORCH_PIN := torch==2.13.0
JOBS ?= 2

.PHONY: setup demo test test-quick bench gpu-check lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VPY) || $(PY) -m venv --system-site-packages $(VENV)
	@if $(VPY) -c "import sys, torch; v = tuple(int(x) for x in torch.__version__.split('+')[0].split('.')[:2]); sys.exit(0 if v >= (2, 11) else 1)" 2>/dev/null; then \
		echo "keeping the importable torch: $$($(VPY) -c 'import torch; print(torch.__version__)')"; \
	else \
		echo "installing the pinned CPU build $(TORCH_PIN)"; \
		$(VPY) -m pip install -q "$(TORCH_PIN)"; \
	fi
	$(VPY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VPY) -P -m moe_spec_compile.commands demo

test: $(STAMP)
	# -P: keep the repo root off sys.path, or transformers would import our kernels/ as the `kernels` hub package
	TRITON_INTERPRET=1 $(VPY) -P -m pytest tests

lint: $(STAMP)
	$(VPY) -m ruff check .

bench: $(STAMP)
	$(VPY) benchmarks/bench_budget_cpu.py

# The GPU check (benchmarks/README.md): results to $$OUT when set, and to benchmarks/results/gpu/. No set-up
# step: a lent device has no network; install the checkout there with `pip install --no-deps
# --no-build-isolation -e .` first. GPU_PY: .venv's python where it exists, else the python on PATH.
GPU_PY ?= $(if $(wildcard $(VPY)),$(VPY),python)
gpu-check:
	$(GPU_PY) -P benchmarks/gpu_suite.py --out $${OUT:-benchmarks/results/gpu} $(GPU_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
