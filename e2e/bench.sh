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
#             apiserver's raw write ceiling (examples/lease_write_rate.rs: BENCH_RAW_LEASES Lease creates from
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
BIN=${BGJOBS_BIN:-$ROOT/target/release/bgjobs}
RATE_BIN=$ROOT/target/release/examples/lease_write_rate
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
    command -v "$v" >/dev/null || die "$v is required (kubectl and jq poll the queue, python3 does the arithmetic)"
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
  [ -x "$BIN" ] || die "no bgjobs binary at $BIN"
  if wants noop; then
    cargo build --release --example lease_write_rate
    [ -x "$RATE_BIN" ] || die "no lease_write_rate example at $RATE_BIN"
  fi
  mkdir -p "$RUN_DIR" "$PID_DIR"
  # Freeze the binaries for the whole run: other people's `cargo build --release` may replace target/release/bgjobs
  # halfway through, and every scenario must measure the same operator.
  cp "$BIN" "$RUN_DIR/bgjobs"
  BIN_SOURCE=$BIN
  BIN=$RUN_DIR/bgjobs
  if wants noop; then
    cp "$RATE_BIN" "$RUN_DIR/lease_write_rate"
    RATE_BIN=$RUN_DIR/lease_write_rate
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
write_jobs() { # file count handler args-json
  python3 - "$@" <<'PY'
import sys
path, count, handler, args = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
with open(path, "w") as f:
    for i in range(1, count + 1):
        f.write(f"""---
apiVersion: bgjobs.dev/v1alpha1
kind: BackgroundJob
metadata:
  name: b-{i:05d}
spec:
  jobName: {handler}
  args: {args}
""")
PY
}

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

replicas_cpu_seconds() {
  local pid total=0
  for pid in ${REPLICA_PIDS[@]+"${REPLICA_PIDS[@]}"}; do
    total=$(python3 -c 'import sys; print(round(float(sys.argv[1]) + float(sys.argv[2]), 2))' "$total" "$(cpu_seconds "$pid")")
  done
  echo "$total"
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
  create_s=$(python3 -c 'import sys; print(f"{float(sys.argv[2]) - float(sys.argv[1]):.1f}")' "$t0" "$EPOCHREALTIME")
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
  api_cpu=$(python3 -c 'import sys; print(round(float(sys.argv[2]) - float(sys.argv[1]), 2))' "$api_cpu0" "$(cpu_seconds "$apiserver_pid")")
  etcd_cpu=$(python3 -c 'import sys; print(round(float(sys.argv[2]) - float(sys.argv[1]), 2))' "$etcd_cpu0" "$(cpu_seconds "$etcd_pid")")

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

# Figures of one scenario from the replicas' audit trail, their final counters, the final job list and the
# apiserver's counters. Prints them, writes result.json; exit status 1 if a job was lost or duplicated.
analyze() {
  python3 - "$1" <<'PY'
import glob, json, os, re, sys
from collections import defaultdict

d = sys.argv[1]
meta = json.load(open(os.path.join(d, "meta.json")))
jobs, n, slots, seconds = meta["jobs"], meta["replicas"], meta["slots"], meta["seconds"]

# Executions: one per start line, paired with its end line by (uid, attempt, worker).
starts, ends = [], {}
for path in sorted(glob.glob(os.path.join(d, "replica-*.inv"))):
    for line in open(path):
        line = line.strip()
        if not line:
            continue
        e = json.loads(line)
        key = (e["uid"], e["attempt"], e["worker"])
        if e["event"] == "start":
            starts.append((e["t_ms"], key))
        else:
            ends[key] = e["t_ms"]
execs = defaultdict(list)
for t, key in starts:
    execs[key[0]].append((t, ends.get(key), key[2]))
duplicates = sum(1 for runs in execs.values() if len(runs) > 1)
overlaps = 0
for runs in execs.values():
    runs.sort(key=lambda r: r[0])
    for a, b in zip(runs, runs[1:]):
        if a[1] is None or b[0] < a[1]:
            overlaps += 1
unended = sum(1 for runs in execs.values() for r in runs if r[1] is None)
all_runs = [r for runs in execs.values() for r in runs]
first = min((r[0] for r in all_runs), default=None)
last = max((r[1] for r in all_runs if r[1] is not None), default=None)
makespan = (last - first) / 1000 if first is not None and last is not None else None
per_worker = defaultdict(int)
first_by_worker = {}
for t, e, w in all_runs:
    per_worker[w] += 1
    first_by_worker[w] = min(first_by_worker.get(w, t), t)
skew = (max(first_by_worker.values()) - first) / 1000 if first_by_worker else None
busy = sum((e - t) for t, e, _ in all_runs if e is not None) / 1000
utilization = busy / (makespan * n * slots) if makespan else None

ideal = jobs / (n * slots) * seconds if meta["handler"] == "sleep" else None
efficiency = ideal / makespan if ideal and makespan else None
jobs_per_s = jobs / makespan if makespan else None

# Final phases, from the last poll.
phases = defaultdict(int)
try:
    for j in json.load(open(os.path.join(d, "final-jobs.json")))["items"]:
        phases[(j.get("status") or {}).get("phase") or "Waiting"] += 1
except (OSError, ValueError):
    pass
not_succeeded = jobs - phases.get("Succeeded", 0)

# Each replica's own counters, from its "bgjobs operator stopped stats={...}" line.
counters, missing_stats = defaultdict(int), []
for path in sorted(glob.glob(os.path.join(d, "replica-*.log"))):
    text = re.sub(r"\x1b\[[0-9;]*m", "", open(path, errors="replace").read())
    m = re.findall(r"stats=(\{[^}]*\})", text)
    if not m:
        missing_stats.append(os.path.basename(path))
        continue
    for k, v in json.loads(m[-1]).items():
        counters[k] += v

# API writes from the apiserver's apiserver_request_total (all response codes: a 409 costs the apiserver too).
WRITE_VERBS = {"POST", "PUT", "PATCH", "DELETE", "DELETECOLLECTION", "CREATE", "UPDATE", "APPLY"}
QUEUE_RESOURCES = ("backgroundjobs", "leases", "events")
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
def load(name):
    out = {}
    try:
        for line in open(os.path.join(d, name)):
            labels, _, value = line.rpartition(" ")
            out[labels] = float(value)
    except OSError:
        pass
    return out
def writes(a, b):
    by = defaultdict(float)
    for series, v in b.items():
        if not series.startswith("apiserver_request_total{"):
            continue
        lab = dict(LABEL.findall(series))
        if lab.get("verb") not in WRITE_VERBS:
            continue
        delta = v - a.get(series, 0.0)
        if delta:
            by[(lab.get("resource", ""), lab.get("verb"), lab.get("code", ""))] += delta
    return by
m0, m1, m2 = load("metrics-0-before-create.txt"), load("metrics-1-before-replicas.txt"), load("metrics-2-after.txt")
have_metrics = bool(m1 and m2)
run_w = writes(m1, m2) if have_metrics else {}
by_resource = {r: int(sum(v for (res, _, _), v in run_w.items() if res == r)) for r in QUEUE_RESOURCES}
by_verb = defaultdict(int)
for (res, verb, code), v in run_w.items():
    if res in QUEUE_RESOURCES:
        by_verb[f"{res} {verb}" + ("" if code.startswith("2") else f" ({code})")] += int(v)
terminated = {}
for series, v in m2.items():
    if series.startswith("apiserver_terminated_watchers_total{") and v - m1.get(series, 0.0) > 0:
        terminated[dict(LABEL.findall(series)).get("resource", "?")] = int(v - m1.get(series, 0.0))
conflict_409 = int(sum(v for (res, _, code), v in run_w.items() if res in QUEUE_RESOURCES and code == "409"))
other = int(sum(v for (res, _, _), v in run_w.items() if res not in QUEUE_RESOURCES))
queue_writes = sum(by_resource.values())

# Successful writes in this scenario's namespace, from the watches (see start_watches).
watched = {}
for r in QUEUE_RESOURCES:
    try:
        types = [json.loads(l).get("type") for l in open(os.path.join(d, f"watch-{r}.jsonl")) if l.strip()]
    except (OSError, ValueError):
        watched = None
        break
    if "ERROR" in types or os.path.exists(os.path.join(d, f"watch-{r}.ended-early")):
        watched = None  # incomplete: it cannot tell this benchmark's writes from other clients'
        break
    watched[r] = sum(1 for t in types if t in ("ADDED", "MODIFIED", "DELETED"))
# What the apiserver counted beyond this namespace's successful writes and its 409s came from other clients.
foreign = queue_writes - conflict_409 - sum(watched.values()) if have_metrics and watched is not None else None
contaminated = foreign is not None and foreign > max(5, 0.01 * queue_writes)
# Then count only this namespace's successful writes plus the 409s the replicas caused: each lost claim is exactly
# one 409 answer (a Lease create or a status write), which the replicas count as claim_conflicts.
own_409 = min(conflict_409, counters.get("claim_conflicts", 0))
own_writes = sum(watched.values()) + own_409 if contaminated else queue_writes
enqueue_writes = int(sum(v for (res, _, _), v in writes(m0, m1).items() if res == "backgroundjobs")) if m0 and m1 else None

result = dict(meta)
result.update(
    makespan_s=makespan, ideal_s=ideal, efficiency=efficiency, jobs_per_s=jobs_per_s, duplicates=duplicates,
    overlaps=overlaps, unended=unended, started=len(execs), not_succeeded=not_succeeded, phases=dict(phases),
    per_worker=dict(sorted(per_worker.items())), start_skew_s=skew, utilization=utilization,
    counters=dict(counters), missing_stats=missing_stats,
    api_writes_all_clients=queue_writes if have_metrics else None,
    api_writes=own_writes if have_metrics else None, api_writes_per_job=own_writes / jobs if have_metrics else None,
    watched_writes=watched, foreign_writes=foreign, contaminated=contaminated, terminated_watchers=terminated,
    api_writes_by_resource=by_resource, api_writes_by_verb=dict(sorted(by_verb.items())), api_409=conflict_409,
    other_writes=other, enqueue_writes=enqueue_writes,
    conflicts_per_job=counters.get("claim_conflicts", 0) / jobs,
)
json.dump(result, open(os.path.join(d, "result.json"), "w"), indent=1)

f = lambda x, fmt: "n/a" if x is None else format(x, fmt)
def row(label, value, note=""):
    print(f"  {label:<20}{value:<16}{note}")
print()
row("makespan", f"{f(makespan, '.1f')} s", "first attempt start -> last attempt end (invocation logs)")
if ideal is not None:
    row("ideal", f"{ideal:.1f} s", f"{jobs} / ({n} x {slots}) x {seconds:g} s")
    goal = "  (goal >= 95 %)" if meta["id"] == "seed" else ""
    row("efficiency", f"{f(efficiency and 100 * efficiency, '.1f')} %", "ideal / makespan" + goal)
else:
    row("throughput", f"{f(jobs_per_s, '.1f')} jobs/s", "jobs / makespan")
row("slot utilization", f"{f(utilization and 100 * utilization, '.1f')} %", "time inside handlers / (makespan x slots)")
row("start skew", f"{f(skew, '.2f')} s", "last replica's first start - first start")
row("jobs per replica", ", ".join(f"{w}: {c}" for w, c in sorted(per_worker.items())) or "none")
row("duplicates", f"{duplicates}", "jobs started more than once (must be 0)")
row("overlaps", f"{overlaps}", "executions of one job overlapping in time (must be 0)")
row("not succeeded", f"{not_succeeded}", ", ".join(f"{p}: {c}" for p, c in sorted(phases.items()) if p != "Succeeded") or "(must be 0)")
row("claim conflicts", f"{counters.get('claim_conflicts', 0)}", f"{result['conflicts_per_job']:.3f} per job (replicas' own counters)")
for k in ("takeovers", "stale_results_discarded", "renew_failures"):
    if counters.get(k):
        row(k.replace("_", " "), f"{counters[k]}")
if missing_stats:
    row("no final stats line", ", ".join(missing_stats))
if have_metrics:
    row("API writes", f"{queue_writes}", f"{queue_writes / jobs:.2f} per job (apiserver_request_total): " + ", ".join(f"{r} {c}" for r, c in by_resource.items()))
    row("", "", "; ".join(f"{k} {v}" for k, v in sorted(by_verb.items())) + f"; {conflict_409} answered 409")
    if watched is not None:
        row("seen in namespace", f"{sum(watched.values())}", "successful writes (watch events): " + ", ".join(f"{r} {c}" for r, c in watched.items())
            + f"; + {conflict_409} answered 409 = {sum(watched.values()) + conflict_409}")
    if terminated:
        row("watchers cut", f"{sum(terminated.values())}", "watches the apiserver closed for not keeping up (any client): "
            + ", ".join(f"{k} {v}" for k, v in terminated.items()))
    if watched is None:
        row("seen in namespace", "n/a", "a namespace watch ended early (watch-*.ended-early): other clients' writes cannot be told apart")
    if contaminated:
        row("OTHER CLIENTS", f"{queue_writes - own_writes}", f"writes to these resources by other clients of the shared apiserver: not counted; "
            f"this benchmark's: {sum(watched.values())} + {own_409} lost claims = {own_writes / jobs:.2f} writes/job")
    if other:
        row("other writes", f"{other}", "to other resources in the same interval (other clients, controllers)")
row("CPU", f"{meta['replica_cpu_s']:.1f} s", f"replicas; apiserver {meta['apiserver_cpu_s']:.1f} s, etcd {meta['etcd_cpu_s']:.1f} s (load {meta['load_before']} -> {meta['load_after']})")
ok = duplicates == 0 and overlaps == 0 and not_succeeded == 0 and meta["complete"]
if not ok:
    print(f"  CHECK FAILED: {duplicates} duplicates, {overlaps} overlaps, {not_succeeded} not succeeded")
sys.exit(0 if ok else 1)
PY
}

# --- the apiserver's raw write ceiling ----------------------------------------------------------------------------

raw_write_rate() {
  local dir=$RUN_DIR/raw ns=$NS_PREFIX-raw
  step "raw write ceiling: $RAW_LEASES Lease creates from $RAW_CONCURRENCY concurrent streams (examples/lease_write_rate.rs)"
  mkdir -p "$dir"
  fresh_namespace "$ns"
  local api_cpu0 etcd_cpu0
  api_cpu0=$(cpu_seconds "$(plane_pid kube-apiserver)")
  etcd_cpu0=$(cpu_seconds "$(plane_pid etcd)")
  "$RATE_BIN" --namespace "$ns" --concurrency "$RAW_CONCURRENCY" --count "$RAW_LEASES" >"$dir/output.txt" ||
    echo "warning: lease_write_rate failed ($dir/output.txt)" >&2
  echo "  apiserver CPU $(python3 -c 'import sys; print(round(float(sys.argv[2]) - float(sys.argv[1]), 1))' "$api_cpu0" "$(cpu_seconds "$(plane_pid kube-apiserver)")") s, etcd CPU $(python3 -c 'import sys; print(round(float(sys.argv[2]) - float(sys.argv[1]), 1))' "$etcd_cpu0" "$(cpu_seconds "$(plane_pid etcd)")") s" | tee "$dir/cpu.txt"
  grep -v '^RESULT ' "$dir/output.txt" | sed 's/^/  /' || true
  sed -n 's/^RESULT //p' "$dir/output.txt" >"$dir/result.json"
  echo "deleting namespace $ns ($RAW_LEASES Leases)"
  delete_namespace "$ns"
  if [ -s "$dir/result.json" ] && [ -f "$RUN_DIR/noop/result.json" ]; then
    python3 - "$RUN_DIR/noop/result.json" "$dir/result.json" <<'PY'
import json, sys
noop, raw = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
if noop.get("jobs_per_s") and noop.get("api_writes_per_job") and raw.get("creates_per_s"):
    used = noop["jobs_per_s"] * noop["api_writes_per_job"]
    print(f"\n  the queue wrote {used:.0f} writes/s ({noop['jobs_per_s']:.1f} jobs/s x {noop['api_writes_per_job']:.2f} writes/job): "
          f"it uses {100 * used / raw['creates_per_s']:.0f}% of the apiserver's raw write capacity ({raw['creates_per_s']:.0f} creates/s)")
PY
  fi
}

# --- report -------------------------------------------------------------------------------------------------------

report() {
  step "results"
  python3 - "$RUN_DIR" <<'PY' | tee "$RUN_DIR/report.md"
import json, os, sys
run = sys.argv[1]
order = [l.strip() for l in open(os.path.join(run, "order.txt")) if l.strip()]
res = {}
for i in order:
    try:
        res[i] = json.load(open(os.path.join(run, i, "result.json")))
    except (OSError, ValueError):
        pass
raw = None
try:
    raw = json.load(open(os.path.join(run, "raw", "result.json")))
except (OSError, ValueError):
    pass
f = lambda x, fmt, suffix="": "n/a" if x is None else format(x, fmt) + suffix

print("## bgjobs benchmark\n")
for line in open(os.path.join(run, "machine.txt")):
    print(f"- {line.strip()}")
print()
print("Jobs are created before the replicas start (one `kubectl create -f`); makespan = first attempt start -> "
      "last attempt end (invocation logs); ideal = jobs / (replicas x slots) x job seconds; efficiency = ideal / makespan; "
      "API writes = the apiserver's apiserver_request_total for backgroundjobs, leases and events (POST/PUT/PATCH/DELETE/APPLY, "
      "any response code) from replica start to replica stop, so the enqueue POST is not included; load = the machine's "
      "1-minute load average before and after the scenario (the control plane, the replicas and anything else share "
      f"{os.cpu_count()} CPUs).\n")
print("| scenario | strategy | replicas x slots | jobs | makespan | ideal | efficiency | jobs/s | duplicates | not succeeded | claim conflicts/job | API writes/job | load 1 min |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for i in order:
    r = res.get(i)
    if not r:
        print(f"| {i} | (no result) ||||||||||||")
        continue
    print(f"| {r['title']} | {r['strategy']} | {r['replicas']} x {r['slots']} | {r['jobs']} x {r['handler']}"
          + (f" {r['seconds']:g} s" if r['handler'] == 'sleep' else "")
          + f" | {f(r['makespan_s'], '.1f', ' s')} | {f(r['ideal_s'], '.1f', ' s')} | {f(r['efficiency'] and 100 * r['efficiency'], '.1f', ' %')}"
          + f" | {f(r['jobs_per_s'], '.1f')} | {r['duplicates']} | {r['not_succeeded']} | {r['conflicts_per_job']:.3f}"
          + f" | {f(r['api_writes_per_job'], '.2f')}{' *' if r.get('contaminated') else ''}"
          + f" | {r['load_before']:g} -> {r['load_after']:g} |")

seed = res.get("seed")
if seed and seed.get("efficiency"):
    verdict = "met" if seed["efficiency"] >= 0.95 else "missed"
    import math
    floor = math.ceil(seed["jobs"] / (seed["replicas"] * seed["slots"])) * seed["seconds"]
    print(f"\nseed efficiency {100 * seed['efficiency']:.1f} % (goal >= 95 %): {verdict}; duplicates {seed['duplicates']} (must be 0). "
          f"Equal jobs run in whole rounds, so no schedule beats {floor:g} s here: at most {100 * seed['ideal_s'] / floor:.1f} % by this definition.")
if any(r.get("contaminated") for r in res.values()):
    print("\n\\* other clients of the shared apiserver wrote to these resources during the run (seen as apiserver-counted writes "
          "that the scenario namespace's watch did not see); the figure is this benchmark's own: successful writes in its "
          "namespace (watch events) + one 409 answer per claim conflict the replicas counted.")
noop = res.get("noop")
if noop or raw:
    print("\n| no-op throughput | value |")
    print("|---|---|")
    if noop:
        print(f"| jobs/s ({noop['jobs']} noop jobs, {noop['replicas']} x {noop['slots']}) | {f(noop['jobs_per_s'], '.1f')} |")
        br = noop.get("api_writes_by_resource") or {}
        per_res = ", ".join(f"{k} {v / noop['jobs']:.2f}" for k, v in br.items())
        print(f"| API writes per job (operator, excl. the enqueue POST) | {f(noop['api_writes_per_job'], '.2f')} ({per_res}) |")
        print(f"| API writes during the run, by resource and verb | {'; '.join(f'{k} {v}' for k, v in noop['api_writes_by_verb'].items())} ({noop['api_409']} answered 409) |")
        print(f"| claim conflicts per job | {noop['conflicts_per_job']:.3f} ({noop['counters'].get('claim_conflicts', 0)} total) |")
        print(f"| CPU during the run | replicas {noop['replica_cpu_s']:.1f} s, apiserver {noop['apiserver_cpu_s']:.1f} s, etcd {noop['etcd_cpu_s']:.1f} s |")
    if raw:
        print(f"| apiserver raw write rate ({raw['creates']} Lease creates, {raw['concurrency']} streams) | {raw['creates_per_s']:.0f} creates/s "
              f"(p50 {raw['p50_ms']:.1f} ms, p99 {raw['p99_ms']:.1f} ms, {raw['errors']} errors) |")
    if noop and raw and noop.get("jobs_per_s") and noop.get("api_writes_per_job"):
        used = noop["jobs_per_s"] * noop["api_writes_per_job"]
        print(f"| queue write rate | {used:.0f} writes/s: the queue uses {100 * used / raw['creates_per_s']:.0f}% of the apiserver's raw write capacity |")

ex, par = res.get("baseline-exclusive"), res.get("baseline-parallel")
if ex and par and ex.get("makespan_s") and par.get("makespan_s"):
    busy = lambda r: sum(1 for c in r["per_worker"].values() if c > 0)
    print("\n| single-lock baseline | makespan | replicas that ran jobs | jobs per replica |")
    print("|---|---|---|---|")
    for r in (ex, par):
        print(f"| {r['strategy']} ({r['replicas']} x {r['slots']}, {r['jobs']} x sleep {r['seconds']:g} s) | {r['makespan_s']:.1f} s "
              f"| {busy(r)} of {r['replicas']} | {', '.join(f'{w}: {c}' for w, c in r['per_worker'].items())} |")
    print(f"\nparallel is {ex['makespan_s'] / par['makespan_s']:.1f}x faster on the same replicas and slots.")
PY
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
