#!/usr/bin/env bash
# The bgjobs benchmarks (`make bench`): real operator replicas (release build, separate processes) drain real
# BackgroundJobs on the local control plane, and the script reports how close they get to the ideal.
#
#   e2e/bench.sh                                   the full run (about 10-12 minutes on 2 cores)
#   BENCH_JOBS=64 BENCH_SECONDS=1 BENCH_SCALING="1 2" BENCH_NOOP_JOBS=300 e2e/bench.sh      a quick run (~2 min)
#
# Scenarios (BENCH_SCENARIOS selects and orders them; default "seed scaling noop baseline"):
#   seed      BENCH_JOBS `sleep` jobs of BENCH_SECONDS s on BENCH_REPLICAS x BENCH_SLOTS: makespan, ideal
#             (jobs / slots x seconds), efficiency = ideal / makespan (goal >= 95 %), duplicates (must be 0).
#   scaling   the same workload on each replica count of BENCH_SCALING (BENCH_SLOTS slots each).
#   noop      BENCH_NOOP_JOBS `noop` jobs on BENCH_NOOP_REPLICAS x BENCH_NOOP_SLOTS: jobs/s, API writes per job
#             (the apiserver's own apiserver_request_total), claim conflicts per job; then, in the same run, the
#             apiserver's raw write ceiling (e2e/bench: lease-write-rate: BENCH_RAW_LEASES Lease creates from
#             BENCH_RAW_CONCURRENCY streams) and the share of it the queue uses.
#   baseline  BENCH_BASELINE_JOBS `sleep` jobs on 4 replicas x 1 slot, once with `--strategy exclusive` (one
#             cluster-wide Lease, like single-lock job managers) and once with the default parallel strategy.
#
# Environment (defaults in brackets):
#   BENCH_JOBS [500]  BENCH_SECONDS [2]  BENCH_REPLICAS [4]  BENCH_SLOTS [4]  BENCH_SCALING ["1 2 4 8"]
#   BENCH_NOOP_JOBS [2000]  BENCH_NOOP_REPLICAS [4]  BENCH_NOOP_SLOTS [16]
#   BENCH_RAW_LEASES [3000]  BENCH_RAW_CONCURRENCY [16]
#   BENCH_BASELINE_JOBS [30]  BENCH_BASELINE_REPLICAS [4]
#   BENCH_STALL [120]  give up on a scenario when no job finished for this many seconds
#   BGJOBS_BIN         use this bgjobs binary instead of building target/release/bgjobs
#
# How a scenario runs: fresh namespace -> all jobs created BEFORE the replicas start (one multi-document YAML, one
# `kubectl create -f`), so the replicas drain a full queue and the creation rate of kubectl never limits them ->
# N replicas started -> poll every 1 s until every job is Succeeded -> SIGTERM the replicas and wait -> delete the
# namespace (and wait, so its deletion does not load the next scenario). Makespan = first attempt start -> last
# attempt end, from the replicas' invocation logs: neither job creation nor replica start-up before the first
# start counts; replicas that sync later than the first one do count (a real cost of starting a fleet).
#
# Output: figures as each scenario ends, a final markdown table (also in target/bench/latest.md), and per-run
# details in target/bench/run-<date>/<scenario>/ (replica-N.log, replica-N.inv, jobs.yaml, metrics, result.json).
# The control plane keeps running. Exit status 1 if any scenario lost or duplicated a job.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=e2e/lib.sh
. "$ROOT/e2e/lib.sh"
cd "$ROOT"

SCENARIOS=${BENCH_SCENARIOS:-seed scaling noop baseline}
JOBS=${BENCH_JOBS:-500}
JOB_SECONDS=${BENCH_SECONDS:-2} # not $SECONDS: that is bash's own clock
REPLICAS=${BENCH_REPLICAS:-4}
SLOTS=${BENCH_SLOTS:-4}
SCALING=${BENCH_SCALING:-1 2 4 8}
NOOP_JOBS=${BENCH_NOOP_JOBS:-2000}
NOOP_REPLICAS=${BENCH_NOOP_REPLICAS:-4}
NOOP_SLOTS=${BENCH_NOOP_SLOTS:-16}
RAW_LEASES=${BENCH_RAW_LEASES:-3000}
RAW_CONCURRENCY=${BENCH_RAW_CONCURRENCY:-16}
BASELINE_JOBS=${BENCH_BASELINE_JOBS:-30}
BASELINE_REPLICAS=${BENCH_BASELINE_REPLICAS:-4}
STALL=${BENCH_STALL:-120}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
BIN=${BGJOBS_BIN:-$TARGET/release/bgjobs}
RATE_BIN=$TARGET/release/lease-write-rate
HISTORY=$TARGET/release/bgjobs-history # the exactly-once oracle (e2e/history)
BIN_SOURCE=$BIN

BENCH_DIR=$ROOT/target/bench
RUN_DIR=$BENCH_DIR/run-$(date +%Y%m%d-%H%M%S)
PID_DIR=$BENCH_DIR/pids # shared by every run, so a later run can find replicas an aborted run left behind
NS_PREFIX=bgjobs-bench

REPLICA_PIDS=()  # exactly the operator processes this run started; with WATCH_PIDS, the only ones the script signals
WATCH_PIDS=()    # the `kubectl get --raw ...?watch=1` processes counting writes in the scenario's namespace
WATCH_FILES=()   # their output files, in the same order
CURRENT_NS=""    # the namespace of the scenario in progress, deleted by the exit trap if the run is aborted
FAILED_CHECKS=0  # scenarios that lost or duplicated a job, or did not finish

step() { printf '\n==> %s\n' "$*"; }
die() {
  printf 'bench.sh: %s\n' "$*" >&2
  exit 1
}

check_inputs() {
  local v
  for v in JOBS REPLICAS SLOTS NOOP_JOBS NOOP_REPLICAS NOOP_SLOTS RAW_LEASES RAW_CONCURRENCY BASELINE_REPLICAS STALL; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "BENCH_$v must be a positive integer, got '${!v}'"
  done
  [[ $BASELINE_JOBS =~ ^[0-9]+$ ]] || die "BENCH_BASELINE_JOBS must be a non-negative integer, got '$BASELINE_JOBS'"
  [[ $JOB_SECONDS =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "BENCH_SECONDS must be a non-negative number, got '$JOB_SECONDS'"
  for v in $SCALING; do [[ $v =~ ^[1-9][0-9]*$ ]] || die "BENCH_SCALING must list positive integers, got '$SCALING'"; done
  for v in $SCENARIOS; do
    [[ $v =~ ^(seed|scaling|noop|baseline)$ ]] || die "unknown scenario '$v' in BENCH_SCENARIOS (seed scaling noop baseline)"
  done
  for v in kubectl python3 jq; do
    command -v "$v" >/dev/null || die "$v is required (kubectl and jq poll the queue, python3 writes the report)"
  done
}

wants() { [[ " $SCENARIOS " == *" $1 "* ]]; }

# --- control plane, binaries, machine -----------------------------------------------------------------------------

prepare() {
  step "control plane"
  e2e/cluster.sh up
  eval "$(e2e/cluster.sh env)"
  export KUBECONFIG
  # Release builds only: a debug operator spends its time on JSON, and the benchmark would measure that.
  if [ -n "${BGJOBS_BIN:-}" ]; then
    step "using BGJOBS_BIN=$BIN"
  else
    step "cargo build --release"
    cargo build --release --bin bgjobs
  fi
  cargo build --release -p bgjobs-history
  [ -x "$BIN" ] || die "no bgjobs binary at $BIN"
  if wants noop; then
    cargo build --release -p bgjobs-bench --bin lease-write-rate
    [ -x "$RATE_BIN" ] || die "no lease-write-rate binary at $RATE_BIN"
  fi
  mkdir -p "$RUN_DIR" "$PID_DIR"
  # Freeze the binaries for the whole run: other people's `cargo build --release` may replace target/release/bgjobs
  # halfway through, and every scenario must measure the same operator.
  cp "$BIN" "$RUN_DIR/bgjobs"
  BIN_SOURCE=$BIN
  BIN=$RUN_DIR/bgjobs
  cp "$HISTORY" "$RUN_DIR/bgjobs-history"
  HISTORY=$RUN_DIR/bgjobs-history
  if wants noop; then
    cp "$RATE_BIN" "$RUN_DIR/lease-write-rate"
    RATE_BIN=$RUN_DIR/lease-write-rate
  fi
  : >"$RUN_DIR/order.txt"
  machine_info >"$RUN_DIR/machine.txt"
  cat "$RUN_DIR/machine.txt"
}

machine_info() {
  local mem cpu
  mem=$(awk '/^MemTotal:/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo)
  cpu=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n1)
  echo "date: $(date -Is)"
  echo "machine: $(nproc) CPUs (${cpu:-unknown model}), $mem memory, $(uname -sr)"
  echo "control plane: kube-apiserver $(kubectl version -o json 2>/dev/null | jq -r '.serverVersion.gitVersion // "?"') on loopback, etcd --unsafe-no-fsync, same machine"
  echo "bgjobs: ${BIN_SOURCE#"$ROOT"/} (working tree at $(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo unknown)), copied for the run"
  echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
}


# --- namespaces ---------------------------------------------------------------------------------------------------

fresh_namespace() {
  local ns=$1
  if kubectl get namespace "$ns" >/dev/null 2>&1; then
    # Left over from an aborted run. Deletion is asynchronous; creating it again fails while it is terminating.
    echo "deleting the leftover namespace $ns first"
    delete_namespace "$ns"
  fi
  kubectl create namespace "$ns" >/dev/null
  CURRENT_NS=$ns
}

# Wait for the deletion, so the namespace controller's work (deleting hundreds of jobs and events) is over before
# the next scenario measures anything.
delete_namespace() {
  local ns=$1
  kubectl delete namespace "$ns" --wait=true --timeout=300s >/dev/null ||
    echo "warning: namespace $ns is still terminating after 300 s" >&2
  [ "$CURRENT_NS" = "$ns" ] && CURRENT_NS=""
  return 0
}

# --- jobs and metrics ---------------------------------------------------------------------------------------------

# One multi-document YAML: `kubectl create -f` sends the documents one after another over one client, far faster
# than one CLI call per job. Names b-00001... sort in creation order.
write_jobs() { e2e/report.py bench-jobs "$@"; } # file count handler args-json

# The apiserver's own request counters; compared before and after to count writes without trusting the client.
metrics_snapshot() {
  # Also the watchers the apiserver force-closed for not keeping up (its watch cache gives each a small buffer): the
  # replicas' own watches included, which then have to re-watch or re-list.
  kubectl get --raw /metrics 2>/dev/null | grep -E '^apiserver_(request_total|terminated_watchers_total)\{' >"$1" || {
    echo "warning: could not read the apiserver's /metrics; write counts will be missing" >&2
    : >"$1"
  }
}

# The apiserver's counters have no namespace label: on a shared control plane (other test runs, the demo) they
# also count other clients' writes. Watching the scenario's namespace counts exactly the successful writes made
# there (one watch event per create, update or delete), so the analysis can tell the two apart. The watches start
# at the resourceVersion of a fresh list, i.e. after the jobs were created.
start_watches() { # dir ns
  local dir=$1 ns=$2 spec name path rv
  for spec in "backgroundjobs:/apis/bgjobs.dev/v1alpha1/namespaces/$ns/backgroundjobs" \
    "leases:/apis/coordination.k8s.io/v1/namespaces/$ns/leases" "events:/api/v1/namespaces/$ns/events"; do
    name=${spec%%:*} path=${spec#*:}
    rv=$(kubectl get --raw "$path?limit=1" | jq -r '.metadata.resourceVersion')
    kubectl get --raw "$path?watch=1&resourceVersion=$rv" >"$dir/watch-$name.jsonl" 2>"$dir/watch-$name.err" &
    WATCH_PIDS+=($!)
    WATCH_FILES+=("$dir/watch-$name.jsonl")
  done
}

# A watch that ended before we stop it (the apiserver closed it, kubectl gave up) missed events: mark it, so the
# analysis does not mistake the missing events for other clients' writes.
stop_watches() {
  local i rc
  for i in ${WATCH_PIDS[@]+"${!WATCH_PIDS[@]}"}; do
    if kill -0 "${WATCH_PIDS[i]}" 2>/dev/null; then
      kill -TERM "${WATCH_PIDS[i]}" 2>/dev/null || true
      wait "${WATCH_PIDS[i]}" 2>/dev/null || true
    else
      rc=0
      wait "${WATCH_PIDS[i]}" 2>/dev/null || rc=$?
      echo "exit status $rc" >"${WATCH_FILES[i]%.jsonl}.ended-early"
    fi
  done
  WATCH_PIDS=()
  WATCH_FILES=()
}

# --- operator replicas --------------------------------------------------------------------------------------------

start_replicas() { # dir ns count slots extra-args...
  local dir=$1 ns=$2 n=$3 slots=$4
  shift 4
  launch_replicas "$dir" "$PID_DIR" "$ns" "$n" "$slots" bench "$@"
}

on_exit() {
  local rc=$?
  stop_replicas "$PID_DIR" bench
  stop_watches
  if [ -n "$CURRENT_NS" ]; then
    echo "deleting namespace $CURRENT_NS (run aborted; logs stay in ${RUN_DIR#"$ROOT"/})" >&2
    kubectl delete namespace "$CURRENT_NS" --wait=false >/dev/null 2>&1 || true
  fi
  exit "$rc"
}

# --- waiting ------------------------------------------------------------------------------------------------------

# Poll every second until every job is in a final phase. One raw list through jq: no kubectl table printing, so
# the poll costs the 2-core machine as little as possible. The last list is kept for the analysis.
wait_all_finished() { # dir ns jobs
  local dir=$1 ns=$2 jobs=$3 out total=0 succeeded=0 running=0 bad=0 last_done=-1 last_change=$SECONDS last_print=-10
  local t0=$SECONDS
  while :; do
    if kubectl get --raw "/apis/bgjobs.dev/v1alpha1/namespaces/$ns/backgroundjobs" >"$dir/final-jobs.json.tmp" 2>/dev/null &&
      out=$(jq -r '[.items[] | (.status.phase // "Waiting")] |
          "\(length) \(map(select(. == "Succeeded")) | length) \(map(select(. == "Running")) | length) \(map(select(. == "Failed" or . == "Abandoned" or . == "Cancelled")) | length)"' \
        "$dir/final-jobs.json.tmp"); then
      read -r total succeeded running bad <<<"$out"
      mv "$dir/final-jobs.json.tmp" "$dir/final-jobs.json"
    fi
    local finished=$((succeeded + bad))
    if ((SECONDS - last_print >= 10 || finished >= jobs)); then
      printf '  [%4ds] %d/%d succeeded, %d running%s\n' $((SECONDS - t0)) "$succeeded" "$jobs" "$running" \
        "$( ((bad)) && echo ", $bad not succeeded")"
      last_print=$SECONDS
    fi
    ((finished >= jobs)) && return 0
    ((finished != last_done)) && last_done=$finished last_change=$SECONDS
    if ((SECONDS - last_change >= STALL)); then
      echo "  no job finished for $STALL s: giving up on this scenario" >&2
      return 1
    fi
    local pid dead=0
    for pid in "${REPLICA_PIDS[@]}"; do kill -0 "$pid" 2>/dev/null || dead=$((dead + 1)); done
    if ((dead == ${#REPLICA_PIDS[@]})); then
      echo "  every replica has exited: giving up on this scenario" >&2
      return 1
    fi
    sleep 1
  done
}

# --- one scenario -------------------------------------------------------------------------------------------------

# scenario ID TITLE STRATEGY REPLICAS SLOTS JOBS HANDLER ARGS-JSON JOB-SECONDS
scenario() {
  local id=$1 title=$2 strategy=$3 n=$4 slots=$5 jobs=$6 handler=$7 args=$8 job_seconds=$9
  local dir=$RUN_DIR/$id ns=$NS_PREFIX-$id
  step "$title: $jobs x $handler on $n replica$( ((n > 1)) && echo s) x $slots slot$( ((slots > 1)) && echo s) ($strategy strategy)"
  mkdir -p "$dir"
  echo "$id" >>"$RUN_DIR/order.txt"
  fresh_namespace "$ns"
  write_jobs "$dir/jobs.yaml" "$jobs" "$handler" "$args"

  local load_before apiserver_pid etcd_pid
  load_before=$(cut -d' ' -f1 /proc/loadavg)
  apiserver_pid=$(plane_pid kube-apiserver)
  etcd_pid=$(plane_pid etcd)
  metrics_snapshot "$dir/metrics-0-before-create.txt"
  local t0=$EPOCHREALTIME
  kubectl create -n "$ns" -f "$dir/jobs.yaml" >/dev/null
  local create_s
  create_s=$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN {printf "%.1f", b - a}')
  echo "created $jobs jobs in $create_s s (one kubectl create), before starting the replicas"
  metrics_snapshot "$dir/metrics-1-before-replicas.txt"
  local api_cpu0 etcd_cpu0
  api_cpu0=$(cpu_seconds "$apiserver_pid")
  etcd_cpu0=$(cpu_seconds "$etcd_pid")
  start_watches "$dir" "$ns"

  local extra=()
  [ "$strategy" = exclusive ] && extra=(--strategy exclusive --lease-namespace "$ns")
  start_replicas "$dir" "$ns" "$n" "$slots" ${extra[@]+"${extra[@]}"}
  local complete=1
  wait_all_finished "$dir" "$ns" "$jobs" || complete=0
  local replica_cpu api_cpu etcd_cpu
  replica_cpu=$(replicas_cpu_seconds)
  stop_replicas "$PID_DIR" bench
  metrics_snapshot "$dir/metrics-2-after.txt"
  sleep 1 # the watch events of the last writes are on their way
  stop_watches
  api_cpu=$(awk -v a="$api_cpu0" -v b="$(cpu_seconds "$apiserver_pid")" 'BEGIN {printf "%.2f", b - a}')
  etcd_cpu=$(awk -v a="$etcd_cpu0" -v b="$(cpu_seconds "$etcd_pid")" 'BEGIN {printf "%.2f", b - a}')

  cat >"$dir/meta.json" <<EOF
{"id": "$id", "title": "$title", "strategy": "$strategy", "replicas": $n, "slots": $slots, "jobs": $jobs,
 "handler": "$handler", "seconds": $job_seconds, "create_s": $create_s, "complete": $complete,
 "replica_cpu_s": $replica_cpu, "apiserver_cpu_s": $api_cpu, "etcd_cpu_s": $etcd_cpu,
 "load_before": $load_before, "load_after": $(cut -d' ' -f1 /proc/loadavg)}
EOF
  analyze "$dir" || FAILED_CHECKS=$((FAILED_CHECKS + 1))
  echo "deleting namespace $ns"
  delete_namespace "$ns"
}

# Figures of one scenario from the replicas' audit trail (judged by `bgjobs-history audit`, the oracle the tests
# share), their final counters, the final job list and the apiserver's counters. Prints them, writes result.json; exit
# status 1 if a job was lost, duplicated or re-executed.
analyze() {
  "$HISTORY" audit "$1" >"$1/audit.json" || true # a duplicate is reported by the scenario's figures
  e2e/report.py scenario "$1"
}

# --- the apiserver's raw write ceiling ----------------------------------------------------------------------------

raw_write_rate() {
  local dir=$RUN_DIR/raw ns=$NS_PREFIX-raw
  step "raw write ceiling: $RAW_LEASES Lease creates from $RAW_CONCURRENCY concurrent streams (e2e/bench: lease-write-rate)"
  mkdir -p "$dir"
  fresh_namespace "$ns"
  local api_cpu0 etcd_cpu0
  api_cpu0=$(cpu_seconds "$(plane_pid kube-apiserver)")
  etcd_cpu0=$(cpu_seconds "$(plane_pid etcd)")
  "$RATE_BIN" --namespace "$ns" --concurrency "$RAW_CONCURRENCY" --count "$RAW_LEASES" >"$dir/output.txt" ||
    echo "warning: lease-write-rate failed ($dir/output.txt)" >&2
  awk -v a="$api_cpu0" -v b="$(cpu_seconds "$(plane_pid kube-apiserver)")" -v c="$etcd_cpu0" \
    -v d="$(cpu_seconds "$(plane_pid etcd)")" 'BEGIN {printf "  apiserver CPU %.1f s, etcd CPU %.1f s\n", b - a, d - c}' |
    tee "$dir/cpu.txt"
  grep -v '^RESULT ' "$dir/output.txt" | sed 's/^/  /' || true
  sed -n 's/^RESULT //p' "$dir/output.txt" >"$dir/result.json"
  echo "deleting namespace $ns ($RAW_LEASES Leases)"
  delete_namespace "$ns"
  if [ -s "$dir/result.json" ] && [ -f "$RUN_DIR/noop/result.json" ]; then
    e2e/report.py raw-share "$RUN_DIR/noop/result.json" "$dir/result.json"
  fi
}

# --- report -------------------------------------------------------------------------------------------------------

report() {
  step "results"
  e2e/report.py bench "$RUN_DIR" | tee "$RUN_DIR/report.md"
  mkdir -p "$BENCH_DIR"
  cp "$RUN_DIR/report.md" "$BENCH_DIR/latest.md"
  echo
  echo "written to ${BENCH_DIR#"$ROOT"/}/latest.md (details: ${RUN_DIR#"$ROOT"/}/)"
}

main() {
  check_inputs
  trap on_exit EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  prepare
  stop_leftover_replicas "$PID_DIR"/*.pid -- "operator --namespace $NS_PREFIX-"
  local r
  if wants seed; then
    scenario seed "seed" parallel "$REPLICAS" "$SLOTS" "$JOBS" sleep "{\"seconds\": $JOB_SECONDS}" "$JOB_SECONDS"
  fi
  if wants scaling; then
    for r in $SCALING; do
      scenario "scale-$r" "scaling: $r replica$( ((r > 1)) && echo s)" parallel "$r" "$SLOTS" "$JOBS" sleep "{\"seconds\": $JOB_SECONDS}" "$JOB_SECONDS"
    done
  fi
  if wants noop; then
    scenario noop "no-op throughput" parallel "$NOOP_REPLICAS" "$NOOP_SLOTS" "$NOOP_JOBS" noop "{}" 0
    raw_write_rate
  fi
  if wants baseline && ((BASELINE_JOBS > 0)); then
    scenario baseline-exclusive "baseline: single lock" exclusive "$BASELINE_REPLICAS" 1 "$BASELINE_JOBS" sleep \
      "{\"seconds\": $JOB_SECONDS}" "$JOB_SECONDS"
    scenario baseline-parallel "baseline: parallel" parallel "$BASELINE_REPLICAS" 1 "$BASELINE_JOBS" sleep \
      "{\"seconds\": $JOB_SECONDS}" "$JOB_SECONDS"
  fi
  report
  if ((FAILED_CHECKS > 0)); then
    echo "FAIL: $FAILED_CHECKS scenario(s) lost, duplicated or did not finish jobs (details above)" >&2
    return 1
  fi
}

# One line, so bash has parsed it all before main runs: editing this file during a long run cannot make bash
# execute whatever bytes end up after the old end of the file.
main "$@"; exit $?
