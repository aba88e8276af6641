#!/usr/bin/env bash
# `make bench-recurring`: thousands of RecurringBackgroundJobs on the same one-minute schedule. N definitions
# (`* * * * *`) on 3 replicas (release build, separate processes) on the local control plane; the script waits for
# three whole ticks and prints, per tick:
#   jobs created (of N), misses (definitions without a job for the tick), duplicates (a job name created twice: the
#   tick ran again), lateness p50/p99/max (tick -> job created, as the creating replica logged it; the apiserver's
#   creationTimestamp, at 1 s resolution, gives an independent max), jobs per replica (the rendezvous spread);
# and for the run: replica CPU seconds, peak RSS (VmHWM), API writes per tick and definition (the apiserver's own
# counters, by resource), the machine's load average.
# With BENCH_KILL=1 (the default) a fourth tick follows, for which one replica is killed with SIGKILL
# BENCH_KILL_BEFORE seconds before the tick: its share must move to the others within one lease duration
# (--lease-duration, 15 s), and its definitions' tick be created late but once (no missed or duplicated tick).
#
#   e2e/bench_recurring.sh                     5,000 definitions
#   BENCH_DEFS=1000 e2e/bench_recurring.sh     1,000
#
# Environment (defaults in brackets):
#   BENCH_DEFS [5000]            definitions
#   BENCH_REPLICAS [3]           replicas
#   BENCH_CONCURRENCY [32]       --recurring-concurrency of each replica
#   BENCH_CLAIM_AHEAD [10s]      --recurring-claim-ahead of each replica (0: each tick claimed when due)
#   BENCH_EXECUTE [false]        --job-execution-enabled: false measures the schedule alone (the jobs stay Waiting);
#                                running them costs their own writes, which `make bench-scale` measures
#   BENCH_KILL [1]               1: the fourth tick, with one replica killed before it
#   BENCH_KILL_BEFORE [10]       seconds before the fourth tick the replica is killed
#   BENCH_RAW [3000]             then the apiserver's raw write rate now (e2e/bench: lease-write-rate: this many
#                                Lease creates from 32 streams; 0: not measured), for the floor of a tick:
#                                writes per tick x definitions / that rate; and the floor measured with the tick's
#                                own writes (e2e/bench: tick-floor: a claim and a create per definition, from
#                                replicas x concurrency streams, no operator running), printed as the lateness
#                                p50/p99/max it allows
#   BGJOBS_BIN                   use this bgjobs binary instead of building the release one
# Results: target/bench/recurring-<date>/ (definitions, replica logs, figures.txt).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=e2e/lib.sh
. "$ROOT/e2e/lib.sh"
cd "$ROOT"

DEFS=${BENCH_DEFS:-5000}
REPLICAS=${BENCH_REPLICAS:-3}
CONCURRENCY=${BENCH_CONCURRENCY:-32}
CLAIM_AHEAD=${BENCH_CLAIM_AHEAD:-10s}
EXECUTE=${BENCH_EXECUTE:-false}
KILL=${BENCH_KILL:-1}
KILL_BEFORE=${BENCH_KILL_BEFORE:-10}
RAW=${BENCH_RAW:-3000}
NS=bgjobs-rec-bench
RUN_DIR=$ROOT/target/bench/recurring-$(date +%Y%m%d-%H%M%S)
PID_DIR=$ROOT/target/bench/pids
REPLICA_PIDS=()

die() {
  printf 'bench_recurring.sh: %s\n' "$*" >&2
  exit 1
}

[[ $RAW =~ ^[0-9]+$ ]] || die "BENCH_RAW must be a number, got '$RAW'"
for v in $DEFS $REPLICAS $CONCURRENCY $KILL_BEFORE; do
  [[ $v =~ ^[1-9][0-9]*$ ]] || die "counts and seconds must be positive integers, got '$v'"
done
[[ $CLAIM_AHEAD =~ ^[0-9]+(ms|s)?$ ]] || die "BENCH_CLAIM_AHEAD must be e.g. 10s, 500ms or 0, got '$CLAIM_AHEAD'"
[[ $EXECUTE == true || $EXECUTE == false ]] || die "BENCH_EXECUTE must be true or false"
[[ $KILL == 0 || $KILL == 1 ]] || die "BENCH_KILL must be 0 or 1"
((KILL_BEFORE < 50)) || die "BENCH_KILL_BEFORE must be under 50 s (the tick before must be done)"
# The local control plane (started if it is not up; it installs kubectl and jq when missing).
e2e/cluster.sh up
eval "$(e2e/cluster.sh env)"
export KUBECONFIG
for v in kubectl jq awk; do command -v "$v" >/dev/null || die "$v is required"; done

# The next whole minute (Unix seconds) at least $1 seconds from now.
next_minute_after() { local t=$(($(date +%s) + $1)); echo $(((t + 59) / 60 * 60)); }
sleep_until() { local d=$(($1 - $(date +%s))); ((d <= 0)) || sleep "$d"; }

cleanup() {
  stop_replicas "$PID_DIR" recbench
  kubectl delete namespace "$NS-raw" --wait=false >/dev/null 2>&1 || true
}
trap cleanup EXIT

mkdir -p "$RUN_DIR"
FIG=$RUN_DIR/figures.txt
say() { echo "$*" | tee -a "$FIG"; }

if [ -n "${BGJOBS_BIN:-}" ]; then
  BIN=$BGJOBS_BIN
else
  echo "==> cargo build --release --bin bgjobs"
  cargo build --release --bin bgjobs
  BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/bgjobs
fi
RATE_BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/lease-write-rate
FLOOR_BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/tick-floor
if ((RAW > 0)); then
  echo "==> cargo build --release -p bgjobs-bench --bin lease-write-rate --bin tick-floor"
  cargo build --release -p bgjobs-bench --bin lease-write-rate --bin tick-floor
  cp "$RATE_BIN" "$FLOOR_BIN" "$RUN_DIR/"
  RATE_BIN=$RUN_DIR/lease-write-rate
  FLOOR_BIN=$RUN_DIR/tick-floor
fi
# Frozen for the run: someone else's `cargo build --release` may replace the binary meanwhile.
cp "$BIN" "$RUN_DIR/bgjobs"
BIN=$RUN_DIR/bgjobs
stop_leftover_replicas "$PID_DIR"/recbench-*.pid -- "--identity recbench-"

echo "==> namespace $NS with $DEFS definitions"
kubectl delete namespace "$NS" --wait=true --timeout=600s >/dev/null 2>&1 || true
kubectl create namespace "$NS" >/dev/null
mkdir -p "$RUN_DIR/defs"
awk -v n="$DEFS" -v dir="$RUN_DIR/defs" 'BEGIN {
  for (i = 1; i <= n; i++) {
    f = sprintf("%s/part-%03d.yaml", dir, int((i - 1) / 500))
    printf "---\napiVersion: bgjobs.dev/v1alpha1\nkind: RecurringBackgroundJob\nmetadata:\n  name: tenant-%05d\nspec:\n  schedule: \"* * * * *\"\n  jobTemplate:\n    spec:\n      jobName: noop\n", i >> f
  }
}'
t0=$SECONDS
find "$RUN_DIR/defs" -name 'part-*.yaml' | sort | xargs -P 4 -I{} kubectl create -n "$NS" -f {} -o name >/dev/null
echo "created $DEFS definitions in $((SECONDS - t0)) s"

BIN=$BIN launch_replicas "$RUN_DIR" "$PID_DIR" "$NS" "$REPLICAS" 4 recbench \
  --lease-namespace "$NS" --job-execution-enabled="$EXECUTE" --recurring-concurrency "$CONCURRENCY" \
  --recurring-claim-ahead "$CLAIM_AHEAD" --log-format json
# Any tick that passed while the definitions were created is caught up first; the measured ticks come after, and
# the counters start 30 s before the first (its claims come up to the claim-ahead before it; the first looks at the
# definitions are over by then).
FIRST=$(next_minute_after 60)
TICKS=("$FIRST" $((FIRST + 60)) $((FIRST + 120)))
((KILL == 0)) || TICKS+=($((FIRST + 180)))
LAST=${TICKS[${#TICKS[@]} - 1]}
echo "measuring ticks at $(date -u -d "@$FIRST" +%H:%M:%S) and the $((${#TICKS[@]} - 1)) after (UTC)"

sleep_until $((FIRST - 30))
metrics_snapshot "$RUN_DIR/metrics-before.txt"
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
declare -A cpu0
for pid in "${REPLICA_PIDS[@]}"; do cpu0[$pid]=$(cpu_seconds "$pid"); done
api_pid=$(plane_pid kube-apiserver)
api_cpu0=$(cpu_seconds "$api_pid")
KILLED=""
if ((KILL == 1)); then
  sleep_until $((LAST - KILL_BEFORE))
  KILLED=${REPLICA_PIDS[${#REPLICA_PIDS[@]} - 1]}
  # Its figures are read now: a killed process has none.
  killed_cpu=$(cpu_seconds "$KILLED")
  killed_rss=$(peak_rss_mib "$KILLED")
  kill -KILL "$KILLED"
  echo "killed replica recbench-$REPLICAS (pid $KILLED) with SIGKILL at $(date -u +%H:%M:%S), $KILL_BEFORE s before the last tick"
fi
# Wait for the last tick's jobs (or 120 s).
sleep_until $((LAST + 5))
deadline=$((LAST + 120))
while (($(date +%s) < deadline)); do
  n=$(kubectl get backgroundjobs -n "$NS" --no-headers -o custom-columns=N:.metadata.name 2>/dev/null | grep -c -- "-$LAST\$" || true)
  ((n >= DEFS)) && break
  sleep 2
done
sleep 5 # a duplicate would come after the last job
metrics_snapshot "$RUN_DIR/metrics-after.txt"
load_after=$(cut -d' ' -f1-3 /proc/loadavg)
api_cpu=$(awk -v a="$api_cpu0" -v b="$(cpu_seconds "$api_pid")" 'BEGIN {printf "%.1f", b - a}')

kubectl get backgroundjobs -n "$NS" -o json |
  jq -r '.items[] | [.metadata.name, (.metadata.creationTimestamp | fromdateiso8601)] | @tsv' >"$RUN_DIR/jobs.tsv"
# Every "tick: job created" line of every replica: replica, job, lateness (ms).
for ((i = 1; i <= REPLICAS; i++)); do
  jq -r --arg r "$i" 'select(.fields.message == "tick: job created") | [$r, .fields.job, .fields.late_ms] | @tsv' \
    "$RUN_DIR/replica-$i.log" 2>/dev/null || true
done >"$RUN_DIR/created.tsv"

{
  echo
  echo "# bench-recurring: $DEFS definitions (* * * * *), $REPLICAS replicas, --recurring-concurrency $CONCURRENCY, --recurring-claim-ahead $CLAIM_AHEAD, job execution $EXECUTE"
  echo "# $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, load average $load_before (before) / $load_after (after)"
  printf '%-9s %6s %6s %5s %9s %9s %9s %12s  %s\n' tick jobs misses dups p50_s p99_s max_s max_api_s per-replica
} | tee -a "$FIG"
for tick in "${TICKS[@]}"; do
  label=$(date -u -d "@$tick" +%H:%M:%S)
  [ "$tick" = "$LAST" ] && [ -n "$KILLED" ] && label="$label*"
  jobs=$(awk -v s="-$tick" 'substr($1, length($1) - length(s) + 1) == s' "$RUN_DIR/jobs.tsv" | wc -l)
  max_api=$(awk -v s="-$tick" -v t="$tick" 'substr($1, length($1) - length(s) + 1) == s && $2 - t > m { m = $2 - t }
    END { printf "%d", m }' "$RUN_DIR/jobs.tsv")
  awk -v s="-$tick" 'substr($2, length($2) - length(s) + 1) == s' "$RUN_DIR/created.tsv" >"$RUN_DIR/created-$tick.tsv"
  dups=$(cut -f2 "$RUN_DIR/created-$tick.tsv" | sort | uniq -d | wc -l)
  lat=$(cut -f3 "$RUN_DIR/created-$tick.tsv" | sort -n | awk '{v[NR] = $1} END {
      if (NR == 0) { print "- - -"; exit }
      p50 = v[int((NR - 1) * 0.50) + 1]; p99 = v[int((NR - 1) * 0.99) + 1]
      printf "%.2f %.2f %.2f", p50 / 1000, p99 / 1000, v[NR] / 1000 }')
  spread=$(cut -f1 "$RUN_DIR/created-$tick.tsv" | sort | uniq -c | awk '{printf "%sr%s=%s", (NR > 1 ? " " : ""), $2, $1}')
  read -r p50 p99 max <<<"$lat"
  printf '%-9s %6d %6d %5d %9s %9s %9s %12s  %s\n' "$label" "$jobs" $((DEFS - jobs)) "$dups" "$p50" "$p99" "$max" \
    "$max_api" "$spread" | tee -a "$FIG"
done
[ -z "$KILLED" ] || say "* replica $REPLICAS killed (SIGKILL) $KILL_BEFORE s before this tick; lease duration 15 s"

# Writes that landed; refused ones (409: the definition changed since read) are counted apart.
writes_def=$(writes_between "$RUN_DIR/metrics-before.txt" "$RUN_DIR/metrics-after.txt" recurringbackgroundjobs '2..')
refused_def=$(writes_between "$RUN_DIR/metrics-before.txt" "$RUN_DIR/metrics-after.txt" recurringbackgroundjobs 409)
writes_job=$(writes_between "$RUN_DIR/metrics-before.txt" "$RUN_DIR/metrics-after.txt" backgroundjobs)
writes_ev=$(writes_between "$RUN_DIR/metrics-before.txt" "$RUN_DIR/metrics-after.txt" events)
writes_lease=$(writes_between "$RUN_DIR/metrics-before.txt" "$RUN_DIR/metrics-after.txt" leases)
n_ticks=${#TICKS[@]}
created=$(cat "$RUN_DIR"/created-*.tsv | wc -l)
say "API writes per tick and definition: $(awk -v d="$writes_def" -v r="$refused_def" -v c="$created" -v e="$writes_ev" -v n="$((n_ticks * DEFS))" \
  'BEGIN {printf "definition status %.2f (and %.2f refused with a 409), job creates %.2f, Events %.2f", d / n, r / n, c / n, e / n}')"
say "(apiserver-wide over the run, other users of the shared control plane included: $writes_job BackgroundJob and $writes_lease Lease writes)"
say "apiserver CPU over the measured ticks: $api_cpu s"
for ((i = 1; i <= REPLICAS; i++)); do
  pid=${REPLICA_PIDS[$((i - 1))]}
  if [ "$pid" = "$KILLED" ]; then
    say "replica $i: CPU $(awk -v a="${cpu0[$pid]}" -v b="$killed_cpu" 'BEGIN {printf "%.1f", b - a}') s until killed, peak RSS $killed_rss MiB"
  else
    say "replica $i: CPU $(awk -v a="${cpu0[$pid]}" -v b="$(cpu_seconds "$pid")" 'BEGIN {printf "%.1f", b - a}') s over the measured ticks, peak RSS $(peak_rss_mib "$pid") MiB"
  fi
done

if ((RAW > 0)); then
  # After the replicas stopped: the rate the apiserver accepts now, on this machine as loaded now.
  stop_replicas "$PID_DIR" recbench
  kubectl delete namespace "$NS-raw" --wait=true --timeout=300s >/dev/null 2>&1 || true
  kubectl create namespace "$NS-raw" >/dev/null
  "$RATE_BIN" --namespace "$NS-raw" --concurrency 32 --count "$RAW" >"$RUN_DIR/raw.txt" 2>&1 || true
  rate=$(sed -n 's/^RESULT //p' "$RUN_DIR/raw.txt" | jq -r '.creates_per_s // empty')
  kubectl delete namespace "$NS-raw" --wait=false >/dev/null 2>&1 || true
  if [ -n "$rate" ]; then
    per_tick=$(awk -v d="$writes_def" -v e="$writes_ev" -v n="$((n_ticks * DEFS))" 'BEGIN {printf "%.2f", (d + e) / n + 1}')
    say "raw write rate now: $(printf '%.0f' "$rate") Lease creates/s (load average $(cut -d' ' -f1-3 /proc/loadavg));" \
      "floor of one tick: $per_tick writes x $DEFS / that rate = $(awk -v w="$per_tick" -v n="$DEFS" -v r="$rate" 'BEGIN {printf "%.1f", w * n / r}') s"
  else
    say "raw write rate: not measured ($RUN_DIR/raw.txt)"
  fi
  # The tick's own writes (claim + create per definition) on the bench's definitions, for a tick a day ahead, from
  # as many streams as the replicas had, with none of them running.
  "$FLOOR_BIN" --namespace "$NS" --concurrency $((REPLICAS * CONCURRENCY)) >"$RUN_DIR/floor.txt" 2>&1 || true
  floor=$(sed -n 's/^RESULT //p' "$RUN_DIR/floor.txt")
  if [ -n "$floor" ]; then
    say "floor of one tick, its own writes with no operator running ($((REPLICAS * CONCURRENCY)) streams):" \
      "$(jq -r '"\(.definitions) jobs created after p50 \(.p50_s * 100 | round / 100) s, p99 \(.p99_s * 100 | round / 100) s, max \(.max_s * 100 | round / 100) s (\(.errors) errors)"' <<<"$floor")"
  else
    say "floor of one tick: not measured ($RUN_DIR/floor.txt)"
  fi
  # The creates alone (a tick two days ahead): the floor if every claim were written before its tick.
  "$FLOOR_BIN" --namespace "$NS" --concurrency $((REPLICAS * CONCURRENCY)) --create-only --days-ahead 2 \
    >"$RUN_DIR/floor-creates.txt" 2>&1 || true
  floor=$(sed -n 's/^RESULT //p' "$RUN_DIR/floor-creates.txt")
  [ -z "$floor" ] || say "floor of the creates alone (as if every claim came before the tick):" \
    "$(jq -r '"p50 \(.p50_s * 100 | round / 100) s, p99 \(.p99_s * 100 | round / 100) s, max \(.max_s * 100 | round / 100) s (\(.errors) errors)"' <<<"$floor")"
fi
echo "figures: ${FIG#"$ROOT"/}"
