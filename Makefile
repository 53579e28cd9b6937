# One target per step; CI (.ci/run) calls these same targets.
CARGO ?= cargo
RUBY ?= ruby
GEM ?= gem
PYTHON ?= python3
PIP = PIP_ROOT_USER_ACTION=ignore $(PYTHON) -m pip --disable-pip-version-check
export CARGO_TERM_COLOR ?= never

.PHONY: all setup installed test test-core demo bench lint clean setup-python install-python test-python bench-python setup-ruby install-ruby test-ruby test-cross demo-rust

all: test

# Installs what the build needs on a fresh Debian machine of this kind (Rust is preinstalled).
setup:
	@command -v cc >/dev/null || (apt-get update && apt-get install -y build-essential)

test: setup test-core test-python test-ruby test-cross

test-core:
	$(CARGO) test -p queue_dispatcher_core --release

# Python package: build tools and test tools from PyPI (works on a fresh machine).
setup-python:
	$(PIP) install --quiet "maturin>=1.16,<2" "pytest>=8" "pytest-timeout>=2.3" "mypy>=1.10"

# `pip install .` (maturin builds bindings-python against the committed Cargo.lock).
install-python: setup setup-python
	$(PIP) install --quiet --no-build-isolation .
	mkdir -p $(STAMPS) && touch $(STAMPS)/python

test-python: install-python
	$(PYTHON) -m mypy.stubtest queue_dispatcher._native
	$(PYTHON) -m mypy --strict -p queue_dispatcher
	$(PYTHON) -m pytest tests/python

# Ruby gem: Debian's Ruby 3.1 and test libraries (the public gem registry is not reachable).
setup-ruby:
	@if command -v ruby >/dev/null && command -v sqlite3 >/dev/null \
	  && [ -f "$$(ruby -e 'print RbConfig::CONFIG["rubyhdrdir"]')/ruby.h" ] \
	  && ruby -e 'require "minitest"' 2>/dev/null && ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1; then :; \
	else apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y ruby ruby-dev libclang-dev ruby-minitest sqlite3; fi

# `gem build` + `gem install --local` exactly as a user does (cargo builds the extension, ~2 min),
# into target/ruby-gems so the system's gems stay untouched.
RUBY_GEM_HOME = $(CURDIR)/target/ruby-gems
RUBY_ENV = GEM_HOME=$(RUBY_GEM_HOME) GEM_PATH=$(RUBY_GEM_HOME):$$($(RUBY) -e 'print Gem.default_path.join(":")') PATH=$(RUBY_GEM_HOME)/bin:$$PATH
install-ruby: setup setup-ruby
	mkdir -p target
	$(GEM) build queue_dispatcher.gemspec -o target/queue_dispatcher.gem
	$(GEM) install target/queue_dispatcher.gem --local --no-document --install-dir $(RUBY_GEM_HOME) --bindir $(RUBY_GEM_HOME)/bin
	mkdir -p $(STAMPS) && touch $(STAMPS)/ruby

# The crate's own test (embedded Ruby), every Ruby suite, then the binding's unit tests once more
# under GC.stress.
test-ruby: install-ruby
	$(CARGO) test -p queue_dispatcher_ruby --release
	$(RUBY_ENV) $(RUBY) -w -e 'ARGV.each { |f| require File.expand_path(f) }' bindings-ruby/test/*_test.rb tests/ruby/*_test.rb
	$(RUBY_ENV) QD_GC_STRESS=1 $(RUBY) -w -e 'ARGV.each { |f| require File.expand_path(f) }' bindings-ruby/test/native_test.rb bindings-ruby/test/enqueue_test.rb

# Both languages on one database (tests/cross): cross-language enqueue, serial queues and
# dependencies across runtimes, rows written straight into the database, then the crash soak
# (about 2 minutes: dispatchers SIGKILLed every second).
test-cross: install-python install-ruby
	$(RUBY_ENV) $(PYTHON) -m pytest tests/cross
	$(RUBY_ENV) QD_PYTHON=$(PYTHON) $(RUBY) -w tests/cross/cross_language_test.rb
	$(RUBY_ENV) $(PYTHON) tests/cross/soak.py

# The two-language showcase (examples/demo.py): builds and installs both packages when their
# sources changed since the last install (else starts in a few seconds), then runs it.
STAMPS = target/stamps
PY_SOURCES = $(shell find core/src bindings-python/src bindings-python/python -type f -not -name '*.pyc') \
	Cargo.toml Cargo.lock pyproject.toml core/Cargo.toml bindings-python/Cargo.toml
RB_SOURCES = $(shell find core/src bindings-ruby/src bindings-ruby/lib bindings-ruby/exe bindings-ruby/ext -type f) \
	Cargo.toml Cargo.lock queue_dispatcher.gemspec core/Cargo.toml bindings-ruby/Cargo.toml
# (install-python / install-ruby touch the stamps, so a `make test` before counts too.)
$(STAMPS)/python: $(PY_SOURCES)
	$(MAKE) --no-print-directory install-python
$(STAMPS)/ruby: $(RB_SOURCES)
	$(MAKE) --no-print-directory install-ruby

# Both packages installed from the current sources (rebuilt only if a source changed or the
# installed package does not load).
installed: setup
	@$(PYTHON) -c 'import queue_dispatcher' 2>/dev/null || rm -f $(STAMPS)/python
	@$(RUBY_ENV) $(RUBY) -e 'require "queue_dispatcher"' 2>/dev/null || rm -f $(STAMPS)/ruby
	@$(MAKE) --no-print-directory $(STAMPS)/python $(STAMPS)/ruby

demo: installed
	$(RUBY_ENV) $(PYTHON) examples/demo.py

# The engine alone, driven from Rust (core/examples/demo.rs).
demo-rust: setup
	$(CARGO) run -q --release -p queue_dispatcher_core --example demo

# BENCH_SHORT=1 runs a quick pass (CI), figures printed as JSON lines, never asserted.
bench: installed
	$(CARGO) bench -p queue_dispatcher_core --bench engine
	$(RUBY_ENV) $(RUBY) bindings-ruby/bench/bench.rb
	$(PYTHON) bindings-python/bench/bench.py

bench-python: install-python
	$(PYTHON) bindings-python/bench/bench.py

lint:
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) fmt --all -- --check

clean:
	$(CARGO) clean
