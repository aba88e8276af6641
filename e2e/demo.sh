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
#   DEMO_POD_JOBS   jobs of the Pod-mode section, run as Pods in containers on a real node (default 20)
#   DEMO_PODS       0: skip the Pod-mode section and the real node it needs (kubelet, containerd, a job image)
#   BGJOBS_BIN      use this bgjobs binary instead of building target/release/bgjobs
#
# Everything the demo writes lives in .demo/ (git-ignored): replica-N.log (operator logs), replica-N.inv (invocation
# logs), replica-N.pid, jobs.yaml, final-jobs.json, audit.json (the oracle's verdict). The replicas are stopped when
# the script ends (also on Ctrl-C); the namespace and its jobs are left for you to look at. The control plane keeps running: `e2e/cluster.sh down`.
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
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
BIN=${BGJOBS_BIN:-$TARGET/release/bgjobs}
HISTORY=$TARGET/release/bgjobs-history # the exactly-once oracle (e2e/history)

REPLICA_PIDS=()  # exactly the operator processes this run started; the only processes the exit trap signals
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
    command -v "$cmd" >/dev/null || die "$cmd is required (kubectl talks to the control plane, python3 writes the report)"
  done
}

# --- 1. control plane and binary ---------------------------------------------------------------------------------

prepare() {
  step "control plane (first run on a machine builds Kubernetes once, ~7 min; later runs reuse it)"
  if [ "${DEMO_PODS:-1}" = 0 ]; then e2e/cluster.sh up; else e2e/cluster.sh up --node && e2e/image.sh import job; fi
  eval "$(e2e/cluster.sh env)"
  export KUBECONFIG

  if [ -n "${BGJOBS_BIN:-}" ]; then
    step "using BGJOBS_BIN=$BIN"
    cargo build --release -p bgjobs-history
  else
    # Release build: the demo measures throughput, so measure what would be deployed.
    step "cargo build --release (a few minutes the first time)"
    cargo build --release -p bgjobs -p bgjobs-history
  fi
  [ -x "$BIN" ] || die "no bgjobs binary at $BIN"
  [ -x "$HISTORY" ] || die "no bgjobs-history binary at $HISTORY"
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
  exit "$rc"
}

# --- Pod mode ----------------------------------------------------------------------------------------------------

# The same queue, with jobs that run as Pods: the kube-scheduler binds them to the real node (a kubelet with
# containerd, e2e/cluster.sh up --node), which runs them in containers of the job image built here (e2e/image.sh).
pod_mode() {
  step "Pod mode: $POD_JOBS jobs run as Pods (sh -c 'sleep 1; echo done') in containers on a real node"
  fresh_namespace "$POD_NS"
  mkdir -p "$DEMO_DIR/pods"
  local deadline=$((SECONDS + 60))
  until kubectl get serviceaccount default -n "$POD_NS" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || die "no default ServiceAccount in $POD_NS (Pods need one)"
    sleep 0.2
  done
  launch_replicas "$DEMO_DIR/pods" "$DEMO_DIR/pods" "$POD_NS" "$REPLICAS" "$SLOTS" pod-replica
  local i
  for ((i = 1; i <= POD_JOBS; i++)); do
    printf -- '---\napiVersion: bgjobs.dev/v1alpha1\nkind: BackgroundJob\nmetadata: {name: pod-job-%02d}\n' "$i"
    printf 'spec:\n  jobName: render\n  args: {page: %d}\n  template:\n    spec:\n' "$i"
    printf '      containers:\n      - name: main\n        image: localhost/bgjobs/busybox:1\n'
    printf '        imagePullPolicy: Never\n        command: ["sh", "-c", "sleep 1; echo done: $BGJOBS_ARGS"]\n'
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
  local pods
  pods=$(kubectl get pods -n "$POD_NS" --no-headers 2>/dev/null | wc -l)
  echo "all $POD_JOBS pod jobs Succeeded; $pods Pods (one per attempt, kept for inspection)"
  echo "  kubectl get bgj,pods -n $POD_NS; their output: kubectl logs -n $POD_NS pod-job-01-1"
}

# --- 4. enqueue --------------------------------------------------------------------------------------------------

# One multi-document YAML and one `kubectl create`: it creates the documents one after another in file order, so
# creation order = document order = name order (demo-0001 first), which the summary relies on. One CLI call per job
# would spend most of the demo starting processes.
enqueue_jobs() {
  step "enqueueing $JOBS sleep jobs ({\"seconds\": $JOB_SECONDS}) in one kubectl create"
  e2e/report.py demo-jobs "$JOBS" "$JOB_SECONDS" >"$DEMO_DIR/jobs.yaml"
  local t0=$EPOCHREALTIME
  kubectl create -n "$NS" -f "$DEMO_DIR/jobs.yaml" >/dev/null
  awk -v n="$JOBS" -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN {printf "created %d jobs in %.1f s\n", n, b - a}'
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

# From the replicas' own audit trail (invocation logs, judged by `bgjobs-history audit`, the oracle the tests share)
# and the final job list. Exit status 1 on FAIL.
summarize() {
  kubectl get bgj -n "$NS" -o json >"$DEMO_DIR/final-jobs.json"
  step "summary"
  "$HISTORY" audit "$DEMO_DIR" --jobs >"$DEMO_DIR/audit.json" || true # a duplicate is reported below
  e2e/report.py demo "$DEMO_DIR" --jobs "$JOBS" --replicas "$REPLICAS" --slots "$SLOTS" --seconds "$JOB_SECONDS"
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
