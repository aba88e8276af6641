# bgjobs: the README's commands. Every target that needs a cluster stands up the local control plane first.
SHELL := /bin/bash
export KUBECONFIG := $(CURDIR)/.cluster/kubeconfig
# Integration tests start operator processes; two test threads keep a 2-core machine responsive.
TEST_THREADS ?= 2

.PHONY: all build demo test unit integration lint fmt crds check-crds cluster cluster-down bench clean

all: build

build:
	cargo build

## demo: the main job end to end on the local control plane (3 replicas drain a few hundred jobs).
demo:
	e2e/demo.sh

## test: lint, unit tests, then integration tests on the local control plane (started if needed).
test: lint unit integration

unit:
	cargo test --lib --bins
	cargo test --doc

integration: cluster
	cargo test --tests -- --test-threads $(TEST_THREADS)

lint:
	cargo fmt --all -- --check
	cargo clippy --all-targets -- -D warnings

fmt:
	cargo fmt --all

## crds: regenerate crds/ from the Rust types (a test fails when they drift).
crds:
	cargo run -q -- crd > crds/backgroundjobs.bgjobs.dev.yaml

cluster:
	e2e/cluster.sh up

cluster-down:
	e2e/cluster.sh down

## bench: the throughput benchmarks; prints figures.
bench:
	e2e/bench.sh

clean: cluster-down
	cargo clean
