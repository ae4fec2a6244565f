# reliability-lab: common tasks. `make help` lists them.
.PHONY: help build run test lint fmt profile heap bench fuzz experiments

URL ?= http://localhost:8080
SECONDS ?= 30

help:
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

build: ## Build the service (release)
	cargo build --release

run: ## Run the service on :8080 (in-memory store unless DATABASE_URL is set)
	cargo run --release

test: ## Run the whole test suite (starts a throwaway PostgreSQL if DATABASE_URL is unset)
	scripts/test.sh

lint: ## Formatting and clippy, warnings as errors
	cargo fmt --all -- --check
	cargo clippy --all-targets -- -D warnings

fmt: ## Format the code
	cargo fmt --all

profile: ## Flame graph of the running service: flamegraph.svg (URL=..., SECONDS=30)
	curl -sSf "$(URL)/debug/pprof/flamegraph?seconds=$(SECONDS)" -o flamegraph.svg
	@echo "wrote flamegraph.svg; open it in a browser"

heap: ## Heap profile of the running service: heap.pb.gz (read with go tool pprof -top heap.pb.gz)
	curl -sSf "$(URL)/debug/pprof/heap" -o heap.pb.gz
	@echo "wrote heap.pb.gz"

fuzz: ## The API contract: schemathesis against the release binary's /openapi.json
	scripts/fuzz.sh

bench: ## Load benchmark against a reference server and Postgres's own ceiling, then micro-benchmarks
	scripts/bench.sh

experiments: ## Every experiment in experiments/ at full length; reports in reports/<name>/ (QUICK=1: the quick profile; a throwaway PostgreSQL for those with replicas)
	scripts/experiments.sh
