#!/usr/bin/env bash
# The bgjobs demo (`make demo`): a real control plane, 3 operator replicas, a few hundred jobs, live progress, and a
# summary that checks the queue's promises (every job ran exactly once, none lost, priorities respected).
#
#   e2e/demo.sh                      300 `sleep` jobs of 1 s each
#   DEMO_JOBS=60 DEMO_SECONDS=2 e2e/demo.sh
#
# Environment:
#   DEMO_JOBS       jobs to enqueue (default 300)
#   DEMO_SECONDS    seconds each `sleep` job sleeps (default 1; fractions allowed)
#   DEMO_REPLICAS   operator replicas (default 3)
#   DEMO_SLOTS      --max-concurrent-jobs-per-instance of each replica (default 4)
#   DEMO_STALL      give up when no job finished for this many seconds (default 120)
#   BGJOBS_BIN      use this bgjobs binary instead of building target/release/bgjobs
#
# Everything the demo writes lives in .demo/ (git-ignored): replica-N.log (operator logs), replica-N.inv (invocation
# logs), replica-N.pid, jobs.yaml, final-jobs.json. The replicas are stopped when the script ends (also on Ctrl-C);
# the namespace and its jobs are left for you to look at. The control plane keeps running: `e2e/cluster.sh down`.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=e2e/lib.sh
. "$ROOT/e2e/lib.sh"
cd "$ROOT"

NS=bgjobs-demo
JOBS=${DEMO_JOBS:-300}
JOB_SECONDS=${DEMO_SECONDS:-1} # not $SECONDS: that is bash's own clock, used below for elapsed time
REPLICAS=${DEMO_REPLICAS:-3}
SLOTS=${DEMO_SLOTS:-4}
STALL=${DEMO_STALL:-120}
DEMO_DIR=$ROOT/.demo
BIN=${BGJOBS_BIN:-$ROOT/target/release/bgjobs}

REPLICA_PIDS=()  # exactly the operator processes this run started; the only processes the exit trap signals
AGENT_PID=       # the node agent of the Pod-mode section, likewise
POD_NS=bgjobs-demo-pods
POD_JOBS=${DEMO_POD_JOBS:-20}
CURSOR_HIDDEN=0

step() { printf '\n==> %s\n' "$*"; }
die() {
  printf 'demo.sh: %s\n' "$*" >&2
  exit 1
}

check_inputs() {
  [[ $JOBS =~ ^[1-9][0-9]*$ ]] || die "DEMO_JOBS must be a positive integer, got '$JOBS'"
  [[ $JOB_SECONDS =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "DEMO_SECONDS must be a non-negative number, got '$JOB_SECONDS'"
  [[ $REPLICAS =~ ^[1-9][0-9]*$ ]] || die "DEMO_REPLICAS must be a positive integer, got '$REPLICAS'"
  [[ $SLOTS =~ ^[1-9][0-9]*$ ]] || die "DEMO_SLOTS must be a positive integer, got '$SLOTS'"
  [[ $STALL =~ ^[1-9][0-9]*$ ]] || die "DEMO_STALL must be a positive integer, got '$STALL'"
  local cmd
  for cmd in kubectl python3; do
    command -v "$cmd" >/dev/null || die "$cmd is required (kubectl talks to the control plane, python3 does the arithmetic)"
  done
}

# --- 1. control plane and binary ---------------------------------------------------------------------------------

prepare() {
  step "control plane (first run on a machine builds Kubernetes once, ~7 min; later runs reuse it)"
  e2e/cluster.sh up
  eval "$(e2e/cluster.sh env)"
  export KUBECONFIG

  if [ -n "${BGJOBS_BIN:-}" ]; then
    step "using BGJOBS_BIN=$BIN"
  else
    # Release build: the demo measures throughput, so measure what would be deployed.
    step "cargo build --release (a few minutes the first time)"
    cargo build --release
  fi
  [ -x "$BIN" ] || die "no bgjobs binary at $BIN"
}

# --- 2. a fresh namespace ----------------------------------------------------------------------------------------

fresh_namespace() { # [namespace]
  local NS=${1:-$NS}
  step "fresh namespace $NS"
  if kubectl get namespace "$NS" >/dev/null 2>&1; then
    # Deleting a namespace is asynchronous (the namespace controller empties it first); wait until it is gone, or
    # the create below fails with "being terminated".
    echo "deleting the previous $NS and waiting until it is gone"
    kubectl delete namespace "$NS" --wait=true --timeout=180s >/dev/null ||
      die "namespace $NS is still terminating after 180 s (kubectl get namespace $NS -o yaml says why)"
  fi
  kubectl create namespace "$NS" >/dev/null
}

# --- 3. operator replicas ----------------------------------------------------------------------------------------

start_replicas() {
  step "starting $REPLICAS operator replicas ($SLOTS slots each)"
  mkdir -p "$DEMO_DIR"
  # Only our own files: .demo may hold other people's experiments. Invocation logs are appended to, so start empty.
  rm -f "$DEMO_DIR"/replica-*.log "$DEMO_DIR"/replica-*.inv "$DEMO_DIR"/jobs.yaml "$DEMO_DIR"/final-jobs.json
  launch_replicas "$DEMO_DIR" "$DEMO_DIR" "$NS" "$REPLICAS" "$SLOTS" replica
  echo "all replicas are dispatching"
}

on_exit() {
  local rc=$?
  [ "$CURSOR_HIDDEN" = 1 ] && { tput cnorm 2>/dev/null || true; }
  stop_replicas "$DEMO_DIR" replica
  stop_replicas "$DEMO_DIR/pods" pod-replica
  stop_node_agent
  exit "$rc"
}

stop_node_agent() {
  if [ -n "$AGENT_PID" ] && kill -0 "$AGENT_PID" 2>/dev/null; then
    kill -TERM "$AGENT_PID" 2>/dev/null || true
    wait_gone "$AGENT_PID" 30 || kill -KILL "$AGENT_PID" 2>/dev/null || true
    wait "$AGENT_PID" 2>/dev/null || true
  fi
  AGENT_PID=
}

# --- Pod mode ----------------------------------------------------------------------------------------------------

# The same queue, with jobs that run as Pods: the real kube-scheduler binds them to a local node agent (a dev
# stand-in for a kubelet that runs each Pod's command as a local process: `bgjobs node-agent --help`).
pod_mode() {
  step "Pod mode: $POD_JOBS jobs run as Pods (sh -c 'sleep 1; echo done') on a local node agent"
  fresh_namespace "$POD_NS"
  mkdir -p "$DEMO_DIR/pods"
  "$BIN" node-agent --node-name bgjobs-demo-node --node-label bgjobs.dev/demo-node=true \
    --work-dir "$DEMO_DIR/pods/node" --delete-node-on-exit >"$DEMO_DIR/pods/node-agent.log" 2>&1 &
  AGENT_PID=$!
  local deadline=$((SECONDS + 60))
  until kubectl get node bgjobs-demo-node -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null |
    grep -q True; do
    ((SECONDS < deadline)) || die "the demo node did not become Ready (.demo/pods/node-agent.log)"
    sleep 0.5
  done
  echo "node bgjobs-demo-node is Ready"
  launch_replicas "$DEMO_DIR/pods" "$DEMO_DIR/pods" "$POD_NS" "$REPLICAS" "$SLOTS" pod-replica
  local i
  for ((i = 1; i <= POD_JOBS; i++)); do
    printf -- '---\napiVersion: bgjobs.dev/v1alpha1\nkind: BackgroundJob\nmetadata: {name: pod-job-%02d}\n' "$i"
    printf 'spec:\n  jobName: render\n  args: {page: %d}\n  template:\n    spec:\n' "$i"
    printf '      nodeSelector: {bgjobs.dev/demo-node: "true"}\n      containers:\n      - name: main\n'
    printf '        image: busybox\n        command: ["sh", "-c", "sleep 1; echo done: $BGJOBS_ARGS"]\n'
  done >"$DEMO_DIR/pods/jobs.yaml"
  kubectl create -n "$POD_NS" -f "$DEMO_DIR/pods/jobs.yaml" >/dev/null
  local finished=0 start=$SECONDS
  while ((finished < POD_JOBS)); do
    sleep 1
    finished=$(kubectl get bgj -n "$POD_NS" -o json | jq '[.items[] | select(.status.phase == "Succeeded")] | length')
    printf '  %3ds: %d/%d pod jobs succeeded\n' "$((SECONDS - start))" "$finished" "$POD_JOBS"
    ((SECONDS - start < 180)) || die "pod jobs did not finish in 180 s (.demo/pods/)"
  done
  stop_replicas "$DEMO_DIR/pods" pod-replica
  stop_node_agent
  local pods
  pods=$(kubectl get pods -n "$POD_NS" --no-headers 2>/dev/null | wc -l)
  echo "all $POD_JOBS pod jobs Succeeded; $pods Pods (one per attempt, kept for inspection)"
  echo "  kubectl get bgj,pods -n $POD_NS; their output: .demo/pods/node/*/logs/"
}

# --- 4. enqueue --------------------------------------------------------------------------------------------------

# One multi-document YAML and one `kubectl create`: it creates the documents one after another in file order, so
# creation order = document order = name order (demo-0001 first), which the summary relies on. One CLI call per job
# would spend most of the demo starting processes.
enqueue_jobs() {
  step "enqueueing $JOBS sleep jobs ({\"seconds\": $JOB_SECONDS}) in one kubectl create"
  python3 - "$JOBS" "$JOB_SECONDS" >"$DEMO_DIR/jobs.yaml" <<'PY'
import random, sys
jobs, seconds = int(sys.argv[1]), sys.argv[2]
# 10% High, 20% AboveNormal, 50% Normal, 20% Low, shuffled with a fixed seed: every run enqueues the same queue.
mix = ["High"] * 10 + ["AboveNormal"] * 20 + ["Normal"] * 50 + ["Low"] * 20
rng = random.Random(2024)
width = max(4, len(str(jobs)))
for i in range(1, jobs + 1):
    print(f"""---
apiVersion: bgjobs.dev/v1alpha1
kind: BackgroundJob
metadata:
  name: demo-{i:0{width}d}
  labels:
    app.kubernetes.io/part-of: bgjobs-demo
spec:
  jobName: sleep
  args:
    seconds: {seconds}
  priority: {rng.choice(mix)}""")
PY
  local t0=$EPOCHREALTIME
  kubectl create -n "$NS" -f "$DEMO_DIR/jobs.yaml" >/dev/null
  python3 -c 'import sys; print(f"created {sys.argv[1]} jobs in {float(sys.argv[3]) - float(sys.argv[2]):.1f} s")' \
    "$JOBS" "$t0" "$EPOCHREALTIME"
  grep -h '^  priority:' "$DEMO_DIR/jobs.yaml" | sort | uniq -c | awk '{printf "  %-12s %d\n", $3, $1}'
}

# --- 5. live progress --------------------------------------------------------------------------------------------

# One cheap list call: only phase and worker per job. Prints "<finished> <listed>" on the first line, then the
# progress block ("block" mode, for terminals) or one line ("line" mode, for logs and CI).
snapshot() { # mode
  local replicas="" i
  for ((i = 1; i <= REPLICAS; i++)); do replicas+="replica-$i "; done
  kubectl get bgj -n "$NS" --no-headers -o custom-columns='PHASE:.status.phase,WORKER:.status.worker' 2>/dev/null |
    awk -v mode="$1" -v total="$JOBS" -v replicas="$replicas" -v elapsed="$SECONDS" -v slots="$SLOTS" '
      { listed++ }
      $1 == "<none>" || $1 == "Waiting" { waiting++; next }      # never touched, or back in the queue for a retry
      $1 == "Running"                   { running++; run[$2]++; next }
      $1 == "Succeeded"                 { succeeded++; done[$2]++; next }
                                        { failed++; done[$2]++ }  # Failed, Abandoned, Cancelled: final, not a success
      END {
        finished = succeeded + failed
        print finished + 0, listed + 0
        width = 40
        filled = int(width * finished / total)
        bar = ""
        for (i = 0; i < width; i++) bar = bar (i < filled ? "#" : "-")
        n = split(replicas, r, " ")
        if (mode == "block") {
          printf "  [%s] %3d%%  %d/%d finished   %ds\n", bar, 100 * finished / total, finished, total, elapsed
          printf "  waiting %-6d running %-6d succeeded %-6d", waiting, running, succeeded
          if (failed) printf " not succeeded %d", failed
          printf "\n"
          for (i = 1; i <= n; i++)
            printf "  %-10s running %2d/%d   done %5d\n", r[i], run[r[i]], slots, done[r[i]]
        } else {
          printf "[%4ds] %d/%d finished: waiting %d, running %d, succeeded %d", elapsed, finished, total, waiting, running, succeeded
          if (failed) printf ", not succeeded %d", failed
          printf " |"
          for (i = 1; i <= n; i++) printf " %s %d running %d done", r[i], run[r[i]], done[r[i]]
          printf "\n"
        }
      }'
}

# Which of our replicas have exited (they should not until we stop them).
dead_replicas() {
  local i out=""
  for ((i = 1; i <= REPLICAS; i++)); do
    kill -0 "${REPLICA_PIDS[i - 1]}" 2>/dev/null || out+="replica-$i "
  done
  printf '%s' "$out"
}

watch_progress() {
  step "running (Ctrl-C stops the replicas and leaves the jobs as they are)"
  local tty=0 mode=line
  if [ -t 1 ]; then tty=1 mode=block; fi
  SECONDS=0
  local drawn=0 last_line=-5 finished=0 listed=0 last_finished=-1 last_change=0 out block="" dead
  [ "$tty" = 1 ] && { tput civis 2>/dev/null && CURSOR_HIDDEN=1 || true; }
  while :; do
    # A failed list (an apiserver hiccup) keeps the previous numbers rather than showing 0 finished.
    if out=$(snapshot "$mode"); then
      read -r finished listed <<<"${out%%$'\n'*}"
      block=${out#*$'\n'}
    fi
    dead=$(dead_replicas)
    [ -n "$dead" ] && block+=$'\n'"  EXITED: ${dead}(see .demo/replica-N.log)"
    if ((finished != last_finished)); then last_finished=$finished last_change=$SECONDS; fi
    local done_now=0
    ((finished >= JOBS)) && done_now=1
    if [ "$tty" = 1 ]; then
      # Redraw in place: move up over the previous block and clear to the end of the screen.
      if ((drawn > 0)); then
        tput cuu "$drawn" 2>/dev/null || printf '\033[%dA' "$drawn"
        tput ed 2>/dev/null || printf '\033[J'
      fi
      printf '%s\n' "$block"
      drawn=$(($(printf '%s\n' "$block" | wc -l)))
    elif ((SECONDS - last_line >= 5 || done_now)); then
      printf '%s\n' "$block"
      last_line=$SECONDS
    fi
    ((done_now)) && break
    if ((SECONDS - last_change >= STALL)); then
      echo "no job finished for $STALL s: giving up waiting (the summary shows what is missing)" >&2
      break
    fi
    if [ "$(printf '%s' "$dead" | wc -w)" -ge "$REPLICAS" ]; then
      echo "every replica has exited: giving up waiting" >&2
      break
    fi
    sleep 1
  done
  [ "$CURSOR_HIDDEN" = 1 ] && { tput cnorm 2>/dev/null || true; CURSOR_HIDDEN=0; }
  return 0
}

# --- 6. summary --------------------------------------------------------------------------------------------------

# From the replicas' own audit trail (invocation logs) and the final job list. Exit status 1 on FAIL.
summarize() {
  kubectl get bgj -n "$NS" -o json >"$DEMO_DIR/final-jobs.json"
  step "summary"
  python3 - "$DEMO_DIR" "$JOBS" "$REPLICAS" "$SLOTS" "$JOB_SECONDS" <<'PY'
import bisect, glob, json, math, os, re, statistics, sys
from collections import defaultdict
from datetime import datetime

demo_dir, expected, replicas, slots, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
RANK = {"Low": 0, "BelowNormal": 1, "Normal": 2, "AboveNormal": 3, "High": 4}

items = json.load(open(os.path.join(demo_dir, "final-jobs.json")))["items"]
jobs = {j["metadata"]["name"]: j for j in items}

# Executions: one per start line, paired with its end line by (uid, attempt, worker).
starts, ends = [], {}
for path in sorted(glob.glob(os.path.join(demo_dir, "replica-*.inv"))):
    for line in open(path):
        line = line.strip()
        if not line:
            continue
        e = json.loads(line)
        key = (e["uid"], e["attempt"], e["worker"])
        if e["event"] == "start":
            starts.append((e["t_ms"], key, e["job"].split("/", 1)[1]))
        else:
            ends[key] = e["t_ms"]
execs = defaultdict(list)  # uid -> [(start, end or None, worker, attempt)]
name_of = {}
for t, key, name in starts:
    execs[key[0]].append((t, ends.get(key), key[2], key[1]))
    name_of[key[0]] = name
unended = sum(1 for runs in execs.values() for r in runs if r[1] is None)

# Exactly once: a job started more than once is a duplicate; two executions of one job at the same time overlap.
duplicates = sorted(name_of[u] for u, runs in execs.items() if len(runs) > 1)
overlaps = 0
for runs in execs.values():
    runs.sort()
    for a, b in zip(runs, runs[1:]):
        if a[1] is None or b[0] < a[1]:
            overlaps += 1

# Lost: every enqueued job must be there and Succeeded.
width = max(4, len(str(expected)))
names = [f"demo-{i:0{width}d}" for i in range(1, expected + 1)]
phase = lambda n: (jobs[n].get("status") or {}).get("phase") or "Waiting" if n in jobs else "missing"
lost = [n for n in names if phase(n) != "Succeeded"]

# Timing.
all_starts = [r[0] for runs in execs.values() for r in runs]
all_ends = [r[1] for runs in execs.values() for r in runs if r[1] is not None]
makespan = (max(all_ends) - min(all_starts)) / 1000 if all_starts and all_ends else float("nan")
ideal = math.ceil(expected / (replicas * slots)) * seconds
efficiency = 100 * ideal / makespan if makespan > 0 else float("nan")

# Priority inversions: pairs (a, b) where b has LOWER priority and was created AFTER a (creation order = name
# order), yet a started more than 1 s after b. Also, for information, the same within one priority (FIFO).
first_start = {name_of[u]: min(r[0] for r in runs) for u, runs in execs.items()}
order = [n for n in names if n in first_start and n in jobs]
prio = {n: RANK[jobs[n]["spec"].get("priority", "Normal")] for n in order}
later = defaultdict(list)  # priority -> sorted first-start times of the jobs created after the current one
earliest = {}              # priority -> (first start, name) of the earliest-started job created after the current one
inv_pairs, inv_worst, inv_example = 0, 0, None
fifo_pairs, fifo_worst = 0, 0
for n in reversed(order):
    t, p = first_start[n], prio[n]
    for q in range(p + 1):
        k = bisect.bisect_left(later[q], t - 1000)  # later-created jobs of priority q that started > 1 s before n
        if not k:
            continue
        delay = t - earliest[q][0]
        if q < p:
            inv_pairs += k
            if delay > inv_worst:
                inv_worst, inv_example = delay, (n, earliest[q][1])
        else:
            fifo_pairs += k
            fifo_worst = max(fifo_worst, delay)
    bisect.insort(later[p], t)
    if p not in earliest or t < earliest[p][0]:
        earliest[p] = (t, n)

# Queue wait by priority: creation (whole seconds) to first start.
waits = defaultdict(list)
for n in order:
    created = datetime.fromisoformat(jobs[n]["metadata"]["creationTimestamp"].replace("Z", "+00:00")).timestamp()
    waits[jobs[n]["spec"].get("priority", "Normal")].append(max(0.0, first_start[n] / 1000 - created))

# Per replica: executions from the audit trail, plus each replica's own counters from its "operator stopped" line.
per_worker = defaultdict(int)
for runs in execs.values():
    for r in runs:
        per_worker[r[2]] += 1
counters = {}
for path in sorted(glob.glob(os.path.join(demo_dir, "replica-*.log"))):
    rid = os.path.basename(path)[: -len(".log")]
    text = re.sub(r"\x1b\[[0-9;]*m", "", open(path, errors="replace").read())
    m = re.findall(r"stats=(\{[^}]*\})", text)
    if m:
        counters[rid] = json.loads(m[-1])

def row(label, value, note=""):
    print(f"  {label:<22}{value:<14}{note}")

row("jobs", f"{expected}", f"{sum(1 for n in names if phase(n) == 'Succeeded')} succeeded, {len(execs)} started at least once")
row("makespan", f"{makespan:.1f} s", "first start -> last end (invocation logs)")
row("ideal makespan", f"{ideal:.1f} s", f"ceil({expected} / ({replicas} x {slots})) x {seconds:g} s")
if lost:
    row("efficiency", "n/a", "not every job finished")
else:
    row("efficiency", f"{efficiency:.1f} %", "ideal / makespan")
row("jobs per replica", ", ".join(f"{w}: {per_worker[w]}" for w in sorted(per_worker)) or "none")
if counters:
    total = lambda k: sum(c.get(k, 0) for c in counters.values())
    row("claim conflicts", f"{total('claim_conflicts')}", "claims lost to another replica (harmless, counted by the replicas)")
    row("takeovers", f"{total('takeovers')}", "attempts taken over from a replica that stopped renewing")
    row("stale results", f"{total('stale_results_discarded')}", "outcomes discarded because the claim was gone")
row("duplicates", f"{len(duplicates)}", "jobs started more than once (must be 0)" + (f": {', '.join(duplicates[:10])}" if duplicates else ""))
row("overlaps", f"{overlaps}", "executions of one job overlapping in time (must be 0)")
row("lost", f"{len(lost)}", "jobs not Succeeded (must be 0)" + (": " + ", ".join(f"{n} ({phase(n)})" for n in lost[:10]) if lost else ""))
if unended:
    row("unfinished executions", f"{unended}", "start lines without an end line")
note = f"worst {inv_worst / 1000:.1f} s" + (f": {inv_example[0]} waited for later, lower-priority {inv_example[1]}" if inv_example else "")
row("priority inversions", f"{inv_pairs}", note)
row("FIFO inversions", f"{fifo_pairs}", f"same priority, later job started > 1 s earlier; worst {fifo_worst / 1000:.1f} s")
print("  queue wait by priority (creation -> first start, s):")
for p in sorted(waits, key=lambda p: -RANK[p]):
    w = waits[p]
    print(f"    {p:<12} {len(w):>5} jobs   median {statistics.median(w):5.1f}   max {max(w):5.1f}")

ok = not duplicates and not overlaps and not lost
print()
if ok:
    print(f"PASS: every one of the {expected} jobs ran exactly once (0 duplicates, 0 overlaps, 0 lost)")
else:
    print(f"FAIL: {len(duplicates)} duplicates, {overlaps} overlaps, {len(lost)} lost (details: .demo/)")
sys.exit(0 if ok else 1)
PY
}

# --- 7. where to look --------------------------------------------------------------------------------------------

how_to_look() {
  local first
  first=$(printf 'demo-%0*d' "$((${#JOBS} > 4 ? ${#JOBS} : 4))" 1)
  cat <<EOF

Look around (the jobs stay; the replicas are stopped):
  export KUBECONFIG=$KUBECONFIG
  kubectl get bgj -n $NS
  kubectl describe bgj $first -n $NS
  $BIN stats -n $NS
Logs: .demo/replica-N.log (operators), .demo/replica-N.inv (invocation logs)
Stop the control plane: e2e/cluster.sh down
EOF
}

main() {
  check_inputs
  trap on_exit EXIT
  trap 'echo; exit 130' INT # echo: start a fresh line after the ^C
  trap 'exit 143' TERM
  prepare
  stop_leftover_replicas "$DEMO_DIR"/replica-*.pid -- "operator --namespace $NS --identity replica-"
  fresh_namespace
  start_replicas
  enqueue_jobs
  watch_progress
  # Stop the replicas before summing up: their last log line carries their counters.
  step "stopping the replicas"
  stop_replicas "$DEMO_DIR" replica
  local rc=0
  summarize || rc=$?
  [ "${DEMO_PODS:-1}" = 0 ] || pod_mode
  how_to_look
  return "$rc"
}

main "$@"
