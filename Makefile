# One target per step; CI (.ci/run) calls these same targets.
CARGO ?= cargo
export CARGO_TERM_COLOR ?= never

.PHONY: all setup test test-core demo bench lint clean

all: test

# Installs what the build needs on a fresh Debian machine of this kind (Rust is preinstalled).
setup:
	@command -v cc >/dev/null || (apt-get update && apt-get install -y build-essential)

test: setup test-core

test-core:
	$(CARGO) test -p queue_dispatcher_core --release

demo: setup
	$(CARGO) run -q --release -p queue_dispatcher_core --example demo

# BENCH_SHORT=1 runs a quick pass (CI), figures printed as JSON lines, never asserted.
bench: setup
	$(CARGO) bench -p queue_dispatcher_core --bench engine

lint:
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) fmt --all -- --check

clean:
	$(CARGO) clean
