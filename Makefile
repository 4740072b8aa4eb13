# Everyday targets. `make help` lists them.
SHELL := /bin/bash
CARGO ?= cargo
SEEDS ?= 10000
START ?= 0
# Container image: tag, local base (see scripts/base-image.sh) and the cargo profile of the
# binaries it is built from (CI uses debug to save a release build).
IMAGE ?= pbft:0.1.0
BASE_IMAGE ?= pbft-base:bookworm
PROFILE ?= release
IMAGE_BINS := pbft-replica pbft pbft-controller

.PHONY: help deps build image image-from-source e2e-docker crd crd-check k8s-validate dashboards-check e2e sim-demo bench test test-unit teeth lint verify fix sim sim-replay check-core-deps run

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

image: ## Build the container image from binaries built here (PROFILE=release|debug), on a local base image
	bash scripts/base-image.sh $(BASE_IMAGE)
	$(CARGO) build $(if $(filter release,$(PROFILE)),--release,) -p pbft-replica -p pbft-client -p pbft-controller
	rm -rf build/docker-bin && mkdir -p build/docker-bin
	cp $(addprefix target/$(PROFILE)/,$(IMAGE_BINS)) build/docker-bin/
	docker build --target runtime-prebuilt --build-arg BASE_IMAGE=$(BASE_IMAGE) -t $(IMAGE) .

image-from-source: ## The normal multi-stage build, compiling inside Docker (needs the Rust and Debian images)
	docker build -t $(IMAGE) .

e2e-docker: image ## Four replica containers under faults: kill, disconnect, partition, rolling restart
	PBFT_E2E_IMAGE=$(IMAGE) $(CARGO) nextest run -p pbft-client --test t30_containers --run-ignored only --no-capture

crd: ## Regenerate the CRD YAML (deploy/helm/pbft/crds, deploy/k8s) from the controller's types
	$(CARGO) run --quiet -p pbft-controller --bin crdgen -- --write

crd-check: ## Fail if the committed CRD YAML differs from the controller's types
	$(CARGO) run --quiet -p pbft-controller --bin crdgen -- --check

.venv-k8s/.installed: scripts/requirements-k8s.txt
	python3 -m venv .venv-k8s
	.venv-k8s/bin/pip install --quiet -r scripts/requirements-k8s.txt
	touch $@

k8s-validate: .venv-k8s/.installed ## Offline: helm lint + render (Helm 4), kubernetes-validate --strict, kubectl kustomize
	.venv-k8s/bin/python scripts/k8s_validate.py

dashboards-check: deps ## A real Prometheus scrapes a loaded local cluster; every alert and dashboard query must parse and return data
	$(CARGO) build -p pbft-replica -p pbft-client
	python3 scripts/dashboards_check.py

e2e: ## End to end on a real Kubernetes (kind): image, helm install, Ready, put/get (needs kind, kubectl, helm)
	bash scripts/e2e_kind.sh

sim-demo: ## The same cluster in one process over the simulator's network (virtual time)
	$(CARGO) run --quiet -p pbft-sim -- demo

test: deps ## Run all tests (unit, handler, 1,088 simulated scenarios, multi-process, teeth, doc tests)
	$(CARGO) test --workspace --doc --quiet
	$(CARGO) nextest run -p pbft-sim --features mutations --test teeth
	@# Last, so the closing summary line counts every test of the workspace.
	$(CARGO) nextest run --workspace --no-fail-fast

teeth: ## Break a quorum rule on purpose and show the simulator catching it
	-$(CARGO) run --quiet -p pbft-sim --features mutations -- --mutation weak-quorum --seeds 50 2>&1 | head -4
	-$(CARGO) run --quiet -p pbft-sim --features mutations -- --mutation skip-digest-check --seeds 50 2>&1 | head -4
	-$(CARGO) run --quiet -p pbft-sim --features mutations -- --mutation skip-vouch-check --seeds 170 2>&1 | head -4

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
