# bgjobs: the README's commands. Every target that needs a cluster stands up the local control plane first.
SHELL := /bin/bash
export KUBECONFIG := $(CURDIR)/.cluster/kubeconfig
# Integration tests start operator processes; two test threads keep a 2-core machine responsive.
TEST_THREADS ?= 2

.PHONY: all build binaries demo test unit integration lint lint-deps fmt crds check-crds cluster node cluster-down bench bench-pods bench-scale bench-recurring clean helm-deps chaos chaos-deps

all: build

build:
	cargo build

## demo: the main job end to end on the local control plane (3 replicas drain a few hundred jobs).
demo:
	e2e/demo.sh

## test: lint, unit tests, then integration tests on the local control plane (started if needed).
test: lint unit integration

## unit: everything that needs no control plane, in seconds: the pure decisions and the CRD drift check (the
## crates' unit tests), the oracle's hand-made histories (e2e/history), and the chart offline (tests/chart_render.rs:
## render, schema, every flag reachable through values and documented; it needs the Helm SDK, see helm-deps).
unit: helm-deps
	cargo test --workspace --lib --bins
	cargo test --doc
	cargo test --test chart_render

## integration: every test binary against the local control plane with a real node (the chart's Deployment runs
## the operator image there: tests/chart_on_node.rs), the bounded chaos run (tests/chaos) included. The binaries the
## tests start as processes are built first, each package on its own as the tests build them (tests/common
## dev_bin), so that the tests' own builds find them fresh.
integration: node helm-deps chaos-deps binaries
	cargo test --tests --no-fail-fast -- --test-threads $(TEST_THREADS)

## binaries: the binaries the tests and the chaos run start, one package at a time.
binaries:
	for p in bgjobs bgjobs-test-worker bgjobs-node-agent bgjobs-history; do cargo build -p $$p || exit 1; done

## chaos: the adversarial tier on its own, longer: CHAOS_SECONDS (default 600) of randomized faults over a mixed
## workload; CHAOS_SEED=<n> replays a schedule. The run's history and report stay in target/test-runs/t-chaos-*.
CHAOS_SECONDS ?= 600
chaos: cluster chaos-deps binaries
	CHAOS_SECONDS=$(CHAOS_SECONDS) cargo test --test chaos -- --nocapture

## chaos-deps: libfaketime (Debian's faketime) for the clock-offset fault.
chaos-deps:
	@[ -e /usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1 ] || [ -e /usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1 ] || \
	  { if [ "$$(id -u)" = 0 ]; then apt-get install -y -q faketime >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q faketime >/dev/null; }; \
	    else sudo apt-get install -y -q faketime; fi; }

## helm-deps: the Helm v4 engine for tests/chart_render.rs, tests/chart_install.rs and e2e/helm.py (Debian has no helm binary). Idempotent.
## Debian's own python3 refuses pip installs into the system (PEP 668) unless told --break-system-packages.
HELM_SDK := helm-python-sdk==0.2.2
helm-deps:
	@python3 -c 'import importlib.metadata as m, sys; sys.exit(m.version("helm-python-sdk") != "0.2.2")' 2>/dev/null || \
	  python3 -m pip install -q --disable-pip-version-check $(HELM_SDK) || \
	  python3 -m pip install -q --disable-pip-version-check --break-system-packages $(HELM_SDK)

## lint: Rust (rustfmt, clippy) and the e2e Python files (ruff: e2e/helm.py, e2e/report.py; ruff.toml).
lint: lint-deps
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings
	python3 -m ruff check e2e
	python3 -m ruff format --check e2e

## lint-deps: ruff for the e2e Python files, pinned like the Helm SDK. Idempotent.
RUFF := ruff==0.8.6
lint-deps:
	@python3 -c 'import importlib.metadata as m, sys; sys.exit(m.version("ruff") != "0.8.6")' 2>/dev/null || \
	  python3 -m pip install -q --disable-pip-version-check $(RUFF) || \
	  python3 -m pip install -q --disable-pip-version-check --break-system-packages $(RUFF)

fmt:
	cargo fmt --all

## crds: regenerate crds/ from the Rust types (a test fails when they drift).
crds:
	rm -f crds/*.yaml
	cargo run -q -- crd --output-dir crds

cluster:
	e2e/cluster.sh up

## node: the control plane plus a real node (kubelet, containerd, CNI bridge, kube-proxy; e2e/node.sh), with the
## operator image (built from the Dockerfile) and the job image imported into it (e2e/image.sh). Cached per machine.
node:
	e2e/cluster.sh up --node
	e2e/image.sh import

cluster-down:
	e2e/cluster.sh down

## bench: the throughput benchmarks; prints figures.
bench:
	e2e/bench.sh

## bench-pods: 500 short Pods as batch/v1 Jobs vs Pod-mode BackgroundJobs, on the real node (e2e/cluster.sh up --node).
bench-pods:
	e2e/bench_pods.sh

## bench-scale: drain backlogs of 1k, 10k and 100k jobs (SCALE_SIZES; the first SCALE_BASELINE_ROUNDS times) on 4 replicas x 16 slots; figures per size, ratios to the baseline's median; then the first size again beside the jobs the last one left (SCALE_BESIDE_ROUNDS).
bench-scale:
	e2e/bench_scale.sh

## bench-recurring: BENCH_DEFS (default 5,000) one-minute RecurringBackgroundJobs on 3 replicas: jobs, misses,
## duplicates and lateness per tick, then a tick with one replica killed (BENCH_KILL=0: not).
bench-recurring:
	e2e/bench_recurring.sh

clean: cluster-down
	cargo clean
