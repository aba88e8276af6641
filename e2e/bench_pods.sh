#!/usr/bin/env bash
# Pod-mode benchmark (`make bench-pods`): what a user would pick instead of bgjobs for Pod work is one batch/v1 Job
# per task. Both run the same short Pods on the same control plane and the same real node (e2e/cluster.sh up --node:
# kubelet, containerd, runc), in the job image built here (e2e/image.sh job, Debian's busybox-static):
#   A. BENCH_PODS (500) batch/v1 Jobs, driven by the real kube-controller-manager;
#   B. BENCH_PODS Pod-mode BackgroundJobs, driven by BENCH_POD_REPLICAS (4) bgjobs replicas.
# Each is timed from the start of its `kubectl create` (one multi-document file) to the moment every Job / job has
# succeeded; the figures and the ratio are printed from the same run.
#
#   e2e/bench_pods.sh                      default run (a few minutes on 2 cores)
#   BENCH_PODS=100 e2e/bench_pods.sh       a quick one
#   BGJOBS_BIN=...                         use this bgjobs binary instead of building target/release/bgjobs
#
# Both contenders are bound by the same node: its kubelet's capacity (110 Pods, the default) and its 2 cores, which
# also run the control plane and the replicas.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=e2e/lib.sh
. "$ROOT/e2e/lib.sh"
cd "$ROOT"

PODS=${BENCH_PODS:-500}
REPLICAS=${BENCH_POD_REPLICAS:-4}
SLOTS=${BENCH_POD_SLOTS:-32}
SCRIPT=${BENCH_POD_SCRIPT:-sleep 1}
BIN=${BGJOBS_BIN:-$ROOT/target/release/bgjobs}
DIR=$ROOT/target/bench/pods-$(date +%Y%m%d-%H%M%S)
NODE=bgjobs-node # e2e/node.sh
IMAGE=localhost/bgjobs/busybox:1 # e2e/image.sh job
NS_JOBS=bgjobs-bench-batch
NS_BGJ=bgjobs-bench-pods
REPLICA_PIDS=()

die() { echo "bench_pods.sh: $*" >&2; exit 1; }
step() { printf '\n==> %s\n' "$*"; }

on_exit() {
  local rc=$?
  stop_replicas "$DIR" bench
  exit "$rc"
}
trap on_exit EXIT
trap 'exit 130' INT TERM

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.1f", b - a}'; }

fresh_namespace() {
  kubectl delete namespace "$1" --ignore-not-found --wait=true >/dev/null 2>&1 || true
  kubectl create namespace "$1" >/dev/null
}

# The Pod spec both contenders run: on the real node, never restarted by the kubelet, the image never pulled.
pod_spec() {
  cat <<EOF
      nodeSelector: {kubernetes.io/hostname: $NODE}
      restartPolicy: Never
      terminationGracePeriodSeconds: 1
      containers:
      - name: main
        image: $IMAGE
        imagePullPolicy: Never
        command: ["sh", "-c", "$SCRIPT"]
EOF
}

write_batch_jobs() {
  local i
  for ((i = 1; i <= PODS; i++)); do
    printf -- '---\napiVersion: batch/v1\nkind: Job\nmetadata: {name: task-%04d}\nspec:\n  backoffLimit: 0\n  template:\n    spec:\n' "$i"
    pod_spec
  done >"$DIR/batch-jobs.yaml"
}

write_bgjobs() {
  local i
  for ((i = 1; i <= PODS; i++)); do
    printf -- '---\napiVersion: bgjobs.dev/v1alpha1\nkind: BackgroundJob\nmetadata: {name: task-%04d}\nspec:\n  jobName: task\n  template:\n    spec:\n' "$i"
    pod_spec
  done >"$DIR/bgjobs.yaml"
}

# wait_done KIND NS JQ_FILTER: poll until JQ_FILTER counts PODS finished objects; print progress every 5 s.
wait_done() {
  local kind=$1 ns=$2 filter=$3 done=0 last=0 stall=0
  while ((done < PODS)); do
    sleep 0.5
    done=$(kubectl get "$kind" -n "$ns" -o json | jq "$filter")
    if ((done != last)); then last=$done stall=0; else stall=$((stall + 1)); fi
    ((stall < 600)) || die "no $kind finished for 300 s ($done/$PODS)"
    if ((SECONDS % 5 == 0)); then printf '  %s: %d/%d succeeded\n' "$kind" "$done" "$PODS"; fi
  done
}

main() {
  command -v jq >/dev/null || die "jq is missing: run e2e/cluster.sh up (it installs it)"
  e2e/cluster.sh up --node
  e2e/image.sh import job
  eval "$(e2e/cluster.sh env)"
  if [ -z "${BGJOBS_BIN:-}" ]; then
    step "building the release binary"
    cargo build --release -q
  fi
  mkdir -p "$DIR"
  cp "$BIN" "$DIR/bgjobs" && BIN=$DIR/bgjobs

  local deadline=$((SECONDS + 60))
  until kubectl get node "$NODE" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null | grep -q True; do
    ((SECONDS < deadline)) || die "node $NODE not Ready (.cluster/logs/kubelet.log)"
    sleep 0.5
  done

  step "A: $PODS batch/v1 Jobs (kube-controller-manager)"
  fresh_namespace "$NS_JOBS"
  write_batch_jobs
  local t0 t1
  t0=$(now)
  kubectl create -n "$NS_JOBS" -f "$DIR/batch-jobs.yaml" >/dev/null
  wait_done jobs "$NS_JOBS" '[.items[] | select((.status.succeeded // 0) >= 1)] | length'
  t1=$(now)
  local batch
  batch=$(elapsed "$t0" "$t1")
  kubectl delete namespace "$NS_JOBS" --wait=true >/dev/null 2>&1 || true

  step "B: $PODS Pod-mode BackgroundJobs ($REPLICAS bgjobs replicas x $SLOTS slots)"
  fresh_namespace "$NS_BGJ"
  write_bgjobs
  # Every Event, the happy path included: the Job controller writes Events for every Job too.
  launch_replicas "$DIR" "$DIR" "$NS_BGJ" "$REPLICAS" "$SLOTS" bench --events all
  t0=$(now)
  kubectl create -n "$NS_BGJ" -f "$DIR/bgjobs.yaml" >/dev/null
  wait_done bgj "$NS_BGJ" '[.items[] | select(.status.phase == "Succeeded")] | length'
  t1=$(now)
  local bgj
  bgj=$(elapsed "$t0" "$t1")
  stop_replicas "$DIR" bench
  local dups
  dups=$(kubectl get pods -n "$NS_BGJ" -o json | jq '[.items[].metadata.labels["bgjobs.dev/job"]] | group_by(.) | map(select(length > 1)) | length')
  kubectl delete namespace "$NS_BGJ" --wait=true >/dev/null 2>&1 || true

  local ratio
  ratio=$(awk -v a="$batch" -v b="$bgj" 'BEGIN {printf "%.2f", a / b}')
  {
    echo "## Pod mode vs batch/v1 Jobs ($(date -Is), $(nproc) CPUs)"
    echo
    echo "| contender | pods | time to all succeeded |"
    echo "|---|---|---|"
    echo "| $PODS batch/v1 Jobs (kube-controller-manager) | $PODS x \`$SCRIPT\` | ${batch} s |"
    echo "| $PODS Pod-mode BackgroundJobs ($REPLICAS replicas x $SLOTS slots) | $PODS x \`$SCRIPT\` | ${bgj} s |"
    echo
    echo "batch/v1 time / bgjobs time = **$ratio** (above 1: bgjobs is faster). Jobs with more than one pod: $dups."
    echo "Same real node ($NODE: kubelet, containerd), same control plane, same Pod spec; details in ${DIR#"$ROOT"/}."
  } | tee "$DIR/result.md"
  [ "$dups" = 0 ] || die "a BackgroundJob got more than one pod"
}

main "$@"; exit $?
