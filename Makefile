# Everyday targets. `make help` lists them.
SHELL := /bin/bash
CARGO ?= cargo
SEEDS ?= 10000
START ?= 0

.PHONY: help deps build sim-demo bench test test-unit teeth lint verify fix sim sim-replay check-core-deps run

help: ## List targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

deps: ## Install the system packages the tests use (promtool, dnsmasq)
	@if ! command -v promtool >/dev/null || ! command -v dnsmasq >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus dnsmasq-base; \
	fi

build: ## Build every crate
	$(CARGO) build --workspace --all-targets

run: ## Build, then start a local 4-replica cluster with demo load and a live status view (Ctrl-C stops)
	$(CARGO) build -p pbft-replica -p pbft-client
	./target/debug/pbft --data .pbft up --load 100

sim-demo: ## The same cluster in one process over the simulator's network (virtual time)
	$(CARGO) run --quiet -p pbft-sim -- demo

test: deps ## Run all tests (unit, handler, 1,024 simulated scenarios, multi-process, teeth, doc tests)
	$(CARGO) test --workspace --doc --quiet
	$(CARGO) nextest run -p pbft-sim --features mutations --test teeth
	@# Last, so the closing summary line counts every test of the workspace.
	$(CARGO) nextest run --workspace --no-fail-fast

teeth: ## Break a quorum rule on purpose and show the simulator catching it
	-$(CARGO) run --quiet -p pbft-sim --features mutations -- --mutation weak-quorum --seeds 50 2>&1 | head -4
	-$(CARGO) run --quiet -p pbft-sim --features mutations -- --mutation skip-digest-check --seeds 50 2>&1 | head -4

lint: check-core-deps ## fmt --check, clippy -D warnings, core dependency rule
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) clippy -p pbft-sim --features mutations --all-targets -- -D warnings

verify: lint test ## Everything CI checks

fix: ## Format and apply clippy's suggestions
	$(CARGO) fmt --all
	$(CARGO) clippy --workspace --all-targets --fix --allow-dirty --allow-staged

check-core-deps: ## The consensus core must not depend on I/O crates
	@deps=$$($(CARGO) tree -p pbft-core -e normal --prefix none | grep -E '^(tokio|tonic|prost|axum|kube|hyper|mio) v' || true); \
	if [ -n "$$deps" ]; then echo "pbft-core depends on I/O crates:"; echo "$$deps"; exit 1; fi; \
	echo "pbft-core: no I/O dependencies"

bench: ## Measure the local cluster (n=4,7; gRPC, TCP; 64/512/1024 B) and write docs/BENCHMARKS.md
	bash scripts/bench.sh

sim: ## Soak: SEEDS scenarios from START, prints scenarios/s (make sim SEEDS=100000)
	$(CARGO) run --release -p pbft-sim -- --seeds $(SEEDS) --start $(START)

sim-replay: ## Replay one seed with a full trace (make sim-replay PBFT_SEED=123)
	PBFT_SEED=$(PBFT_SEED) $(CARGO) run --release -p pbft-sim
