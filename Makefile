# Ferry's developer commands. `make help` lists them.

SHELL := bash
CARGO ?= cargo
export FERRY_TOOLS ?= $(HOME)/.cache/ferry/tools
TOOLS_BIN := $(FERRY_TOOLS)/bin
HELM := $(TOOLS_BIN)/helm
# Where cargo puts the binaries (it honours CARGO_TARGET_DIR).
BIN := $(or $(CARGO_TARGET_DIR),target)/debug

.PHONY: help tools tools-real crds lint fmt test test-unit test-k8s test-agent test-e2e test-hostile test-real test-faults test-faults-tunnelled soak build bins images up down demo bench clean

help: ## This list.
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

tools: ## Build kube-apiserver, kubectl, etcd and helm from the Go module proxy (once; cached in $FERRY_TOOLS).
	tests/tools/build.sh

tools-real: ## Build a real node's kubelet, kube-scheduler, kube-controller-manager, kube-proxy, containerd, ctr, runc shim and CNI plugins from the Go module proxy; runc, iptables, conntrack from Debian (once; cached in $FERRY_TOOLS).
	tests/tools/build-real.sh

crds: ## Regenerate the chart's CRDs from crds/src.
	$(CARGO) run -q -p ferry-crds --bin crdgen

bins:
	$(CARGO) build --workspace --bins

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

test-k8s: tools ## The chart, CRDs, RBAC, the admission policies and the API fault proxy against a real etcd + kube-apiserver.
	$(CARGO) test -p ferry-tests --test foundation --test rbac --test identity --test identity_vm --test identity_peer --test api_proxy -- --test-threads=2

test-e2e: tools bins ## Migrations (managed and peer-to-peer), evacuation and the kubectl plugin end to end: control plane, operator, agents, real QEMU.
	$(CARGO) test -p ferry-tests --test e2e --test peer --test evacuate --test cli --test tunnelled

# The end-to-end migrations of tests/tests/e2e.rs and the post-copy tests of tests/tests/faults.rs again,
# every migration they create peer-to-peer (FERRY_TEST_MODE, tests/src/e2e_support.rs).
test-e2e-p2p: tools bins ## The end-to-end migrations and the post-copy tests again, peer-to-peer.
	FERRY_TEST_MODE=PeerToPeer $(CARGO) test -p ferry-tests --test e2e
	FERRY_TEST_MODE=PeerToPeer $(CARGO) test -p ferry-tests --test faults post_copy -- --nocapture

# `make test` runs the fault matrix's fixed subset (tests/src/fault_matrix/mod.rs, SUBSET:
# managed, one row per fault and one per injection point; peer-to-peer, every fault on
# the paths the source agent drives) and the API fault matrix's (fault_matrix/api.rs,
# API_SUBSET, 7 rows); this runs all 60 rows of the first and all 65 of the second in
# each mode.
test-faults: tools bins ## The full fault matrices: every fault at every phase point (60 rows per control mode) and every API fault (65 rows per mode).
	$(CARGO) test -p ferry-tests --test faults --test api_faults -- --include-ignored --nocapture

# `make test` runs fault_matrix/mod.rs's TUNNELLED_SUBSET (5 rows); this runs all 60 rows
# of each mode with the stream tunnelled through the agents.
test-faults-tunnelled: tools bins ## The full fault matrix (60 rows per control mode) with the stream tunnelled through the agents.
	FERRY_FAULT_TRANSPORT=Tunnelled $(CARGO) test -p ferry-tests --test faults fault_matrix_full -- --include-ignored --nocapture

soak: tools bins ## 100 back-to-back migrations of one guest, RSS of operator and agents every 10 migrations.
	$(CARGO) test -p ferry-tests --test soak -- --ignored --nocapture

# FERRY_CHAOS_SEED=<seed> replays a run's plan (the seed is printed first);
# FERRY_CHAOS_MIGRATIONS=<n> runs fewer.
soak-chaos: tools bins ## 200 back-to-back migrations of two guests, each with one random fault of the matrices (seeded): 0 lost, faults by kind, RSS of operator and agents.
	$(CARGO) test -p ferry-tests --test soak_chaos -- --ignored --nocapture

test-agent: ## The agent data plane against real QEMU.
	$(CARGO) test -p ferry-agent

# One line per hostile spec: the case, the refusal the status reports, and that nothing
# outside the storage roots was opened or created (tests/tests/hostile.rs).
# The hostile-input suite: specs (tests/tests/hostile.rs), forged Lease and nodeName writes
# with real node-bound tokens (identity.rs, identity_vm.rs), hostile state files
# (save_restore.rs), consoles only for the users the apiserver authorises (console.rs).
# `make test` runs these here only, not in its workspace run.
HOSTILE_API = an_agent_writes_only_its_own_leases a_disk_lock_is_taken_only_in_the_stamped_hand_over
HOSTILE_VM = nodename_moves_only_to_the_recorded_target_in_finish
HOSTILE_FILES = save_on_one_node_and_restore_on_the_other
HOSTILE_CONSOLE = only_a_user_the_cluster_authorises_reaches_a_console_and_it_follows_the_guest
HOSTILE_SKIP = --skip hostile_specs_are_refused $(foreach t,$(HOSTILE_API) $(HOSTILE_VM) $(HOSTILE_FILES) $(HOSTILE_CONSOLE),--skip $(t))
test-hostile: tools bins ## Tenants' hostile input: host paths outside the roots, symlinks, FIFOs, devices, qcow2 backing files, target XML, another tenant's guest or image, forged Lease and nodeName writes, forged and bomb state files, consoles for users without the right: each refused, one line per case.
	$(CARGO) test -p ferry-tests --test hostile -- --nocapture
	$(CARGO) test -p ferry-tests --test identity -- --nocapture --exact $(HOSTILE_API)
	$(CARGO) test -p ferry-tests --test identity_vm -- --nocapture --exact $(HOSTILE_VM)
	$(CARGO) test -p ferry-tests --test save_restore -- --nocapture --exact $(HOSTILE_FILES)
	$(CARGO) test -p ferry-tests --test console -- --nocapture --exact $(HOSTILE_CONSOLE)

test: lint bins ## Everything: lint, unit tests, the agent against QEMU, the chart and end-to-end migrations against kube-apiserver, the hostile-input suite, the end-to-end migrations peer-to-peer, then Ferry's Pods on real kubelet nodes.
	$(CARGO) test --workspace --no-fail-fast -- --test-threads=2 $(HOSTILE_SKIP) $(REAL_SKIP)
	$(MAKE) test-hostile
	$(MAKE) test-e2e-p2p
	$(MAKE) test-real

# Ferry on real kubelet nodes (tests/tests/real.rs): needs tools-real and images.
REAL_TESTS = ferry_runs_as_the_charts_pods_on_real_nodes_and_guests_outlive_the_agents
REAL_SKIP = $(foreach t,$(REAL_TESTS),--skip $(t))
test-real: tools tools-real bins images ## Ferry as deployed, on real nodes (kubelet, containerd, kube-proxy each; the images imported; the chart with helm): Pods Ready, a TLS migration, agents restarted, deleted and upgraded while the guest runs.
	$(CARGO) test -p ferry-tests --test real -- --nocapture --test-threads=1

NODES ?= 2
# REAL=1: real nodes, Ferry as the chart's Pods from `make images` (needs tools-real).
REAL ?=
UP_DEPS = tools bins $(if $(REAL),tools-real images)
up: $(UP_DEPS) ## A local Ferry left running (control plane, chart, operator, $(NODES) agents; REAL=1: real kubelet nodes and the chart's Pods); `make down` stops it.
	@mkdir -p .ferry
	@if [ -f .ferry/up.pid ] && kill -0 $$(cat .ferry/up.pid) 2>/dev/null; then echo "already up (make down first)"; exit 1; fi
	@nohup $(BIN)/ferry-up --nodes $(NODES) --dir $(CURDIR)/.ferry/cluster $(if $(REAL),--real --images $(CURDIR)/target/images) > .ferry/up.log 2>&1 & echo $$! > .ferry/up.pid
	@for i in $$(seq 1 3000); do \
	  grep -q '^ready' .ferry/up.log 2>/dev/null && break; \
	  kill -0 $$(cat .ferry/up.pid) 2>/dev/null || { cat .ferry/up.log; rm -f .ferry/up.pid; exit 1; }; \
	  sleep 0.2; done
	@grep -v '^ready' .ferry/up.log

down: ## Stop what `make up` started.
	@if [ -f .ferry/up.pid ]; then pid=$$(cat .ferry/up.pid); kill $$pid 2>/dev/null || true; \
	  while kill -0 $$pid 2>/dev/null; do sleep 0.2; done; rm -f .ferry/up.pid; echo "down"; \
	else echo "not up"; fi

images: ## OCI images of the operator and the agent (target/images/*.oci.tar), from Debian's packages, without a container engine; prints names and sizes.
	images/build.sh

RUNS ?= 5
bench: tools ## Ferry vs raw QEMU over QMP (median of $(RUNS) runs per case), a table and target/bench.json.
	$(CARGO) build --release --workspace --bins
	FERRY_BIN_DIR=$(CURDIR)/target/release target/release/ferry-bench --runs $(RUNS) --json target/bench.json

demo: tools bins ## From nothing: a local Ferry, a VM, a live migration with progress, a summary, then down.
	$(BIN)/ferry-demo

clean: ## Remove build output (not the tools cache).
	$(CARGO) clean
