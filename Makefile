# One target per step; CI (.ci/run) calls these same targets.
CARGO ?= cargo
PYTHON ?= python3
PIP = $(PYTHON) -m pip --disable-pip-version-check --root-user-action=ignore
export CARGO_TERM_COLOR ?= never

.PHONY: all setup test test-core demo bench lint clean setup-python install-python test-python bench-python

all: test

# Installs what the build needs on a fresh Debian machine of this kind (Rust is preinstalled).
setup:
	@command -v cc >/dev/null || (apt-get update && apt-get install -y build-essential)

test: setup test-core test-python

test-core:
	$(CARGO) test -p queue_dispatcher_core --release

# Python package: build tools and test tools from PyPI (works on a fresh machine).
setup-python:
	$(PIP) install --quiet "maturin>=1.16,<2" "pytest>=8" "pytest-timeout>=2.3" "mypy>=1.10"

# `pip install .` (maturin builds bindings-python against the committed Cargo.lock).
install-python: setup setup-python
	$(PIP) install --quiet --no-build-isolation .

test-python: install-python
	$(PYTHON) -m mypy.stubtest queue_dispatcher._native
	$(PYTHON) -m pytest tests/python

demo: setup
	$(CARGO) run -q --release -p queue_dispatcher_core --example demo

# BENCH_SHORT=1 runs a quick pass (CI), figures printed as JSON lines, never asserted.
bench: setup install-python
	$(CARGO) bench -p queue_dispatcher_core --bench engine
	$(PYTHON) bindings-python/bench/bench.py

bench-python: install-python
	$(PYTHON) bindings-python/bench/bench.py

lint:
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) fmt --all -- --check

clean:
	$(CARGO) clean
