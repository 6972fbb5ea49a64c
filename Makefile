# The two set-up commands: `make demo` and `make test`. Both create .venv if missing.
# CPU (default): torch is pinned to the CPU build. GPU: `make demo TORCH=torch` (PyPI's CUDA build)
# or install torch yourself into .venv first, then `make demo TORCH=`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# `make test` runs test files on this many pytest-xdist workers: most process tests wait on
# pings, timeouts and other processes, so two workers on two cores take ~0.6x the serial time.
# Files are dealt in collection order (tests/conftest.py puts the longest first), not xdist's
# default of most tests first, which left the Ray file running alone at the end.
TEST_WORKERS ?= 2

.PHONY: demo test check install clean-venv

$(BIN)/python:
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) (set PYTHON=...)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	@if [ -n "$(TORCH)" ]; then $(BIN)/pip install --quiet "$(TORCH)"; fi
	$(BIN)/pip install --quiet -e '.[test]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/respec launch configs/tiny.toml

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# The quick tier for the inner loop: every test that starts no process and is not slow (~1 min).
check: $(STAMP)
	$(BIN)/python -m pytest -q -m "not process and not slow"

clean-venv:
	rm -rf $(VENV)
