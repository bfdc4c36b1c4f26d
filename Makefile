# Ferry's developer commands. `make help` lists them.

SHELL := bash
CARGO ?= cargo
export FERRY_TOOLS ?= $(HOME)/.cache/ferry/tools
TOOLS_BIN := $(FERRY_TOOLS)/bin
HELM := $(TOOLS_BIN)/helm

.PHONY: help tools crds lint fmt test test-unit test-k8s test-agent build clean

help: ## This list.
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

tools: ## Build kube-apiserver, kubectl, etcd and helm from the Go module proxy (once; cached in $FERRY_TOOLS).
	tests/tools/build.sh

crds: ## Regenerate the chart's CRDs from crds/src.
	$(CARGO) run -q -p ferry-crds --bin crdgen

build: ## Build every crate.
	$(CARGO) build --workspace --all-targets

lint: tools ## cargo fmt --check, clippy -D warnings, helm lint.
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(HELM) lint --strict charts/ferry

fmt: ## Format the Rust code.
	$(CARGO) fmt --all

test-unit: ## Pure-logic unit tests (no QEMU, no apiserver).
	$(CARGO) test --workspace --lib --bins

test-k8s: tools ## The chart, CRDs and RBAC against a real etcd + kube-apiserver.
	$(CARGO) test -p ferry-tests -- --test-threads=2

test-agent: ## The agent data plane against real QEMU.
	$(CARGO) test -p ferry-agent

test: lint ## Everything: lint, unit tests, the agent against QEMU, the chart against kube-apiserver.
	$(CARGO) test --workspace --no-fail-fast -- --test-threads=2

clean: ## Remove build output (not the tools cache).
	$(CARGO) clean
