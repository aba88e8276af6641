#!/usr/bin/env bash
# `make bench-scale`: does dispatch cost stay flat as the backlog grows? For each backlog size, real operator
# replicas (release build, separate processes) drain that many pre-created jobs on the local control plane, and the
# script prints, per size, in one run:
#   throughput (jobs/s, first start to last finish), replica CPU per job (and the part of it spent before the first
#   job finished: listing and indexing the backlog), peak RSS per replica (VmHWM), apiserver
#   CPU per job (and etcd's, the recorder's and the whole machine's: on a 2-core machine throughput follows the
#   machine's CPU per job, so they say where a larger backlog's extra time went), the apiserver's allocations and
#   an estimate of its garbage collector's time per job (from its Go runtime metrics; readings in
#   <size>/apiserver-runtime.txt), successful API writes per job
#   (BackgroundJob and Lease writes that landed, from the apiserver's counters; the replicas record no Event for a
#   job that succeeds), refused claims per job, the apiserver's memory per 10k created jobs, a job's size as stored,
#   throughput per tenth of the drain (first tenth: the whole backlog waiting; last: almost none), and the
#   adversarial tier's checker line (bgjobs-history: lost, overlaps, duplicates).
#
#   e2e/bench_scale.sh                                    1k, 10k and 100k (the 100k run takes about 30 minutes)
#   SCALE_SIZES="1000 10000" e2e/bench_scale.sh          a quicker run
#
# The first size is the baseline the others are compared with. A 1k drain lasts about 11 s, so one drain measures the
# shared machine's moment as much as the code (two runs of the same code: 89 and 114 jobs/s): the baseline is drained
# SCALE_BASELINE_ROUNDS times in a row, and the summary compares every larger size with the rounds' median
# throughput and replica CPU per job (printing the rounds' range beside it).
#
# Environment (defaults in brackets):
#   SCALE_SIZES ["1000 10000 100000"]  SCALE_REPLICAS [4]  SCALE_SLOTS [16]
#   SCALE_BASELINE_ROUNDS [3]   drains of the first size, each with its own replicas and backlog
#   SCALE_CREATE_PARALLEL [4]   concurrent `kubectl create` streams filling the backlog
#   SCALE_STALL [180]           give up on a size when no job finished for this many seconds
#   SCALE_NAMESPACE [bgjobs-scale]  the namespace the run fills (deleted and re-created per size)
#   SCALE_PROFILE_SECONDS [0]   when > 0, the apiserver's own CPU profile (/debug/pprof/profile) is taken for
#                               that many seconds once a tenth of the jobs finished: <size>/apiserver.pprof, and its
#                               top functions (own time, then cumulative) in <size>/apiserver-profile.txt
#                               (`go tool pprof`; the Go that e2e/cluster.sh installs)
#   SCALE_PERF_SECONDS [0]      when > 0, replica 1's CPU profile is sampled with `perf record` (99 Hz) for that
#                               many seconds, from the same moment: <size>/replica-1-profile.txt lists its functions
#                               by share of samples. Both profiles take CPU: leave them at 0 for the ratios.
#   SCALE_ALLOC_PROFILE [0]     1: the apiserver's allocations during each drain, by function (/debug/pprof/allocs
#                               before and after: <size>/apiserver-allocs-{before,after}.pprof; their difference
#                               by `go tool pprof`, the Go that e2e/cluster.sh installs: <size>/apiserver-allocs.txt;
#                               errors in <size>/pprof.log)
#   SCALE_FRESH_PLANE [1]       each size, and each round of the baseline, starts on a control plane started afresh
#                               (e2e/cluster.sh down && up: the run owns the local control plane), so that every
#                               size starts from the same apiserver: one that held and deleted an earlier backlog
#                               starts bigger (apiserver_rss_mib_at_start), and garbage collection grows with its
#                               heap. 0: reuse the running one.
#   SCALE_BESIDE_ROUNDS [1]     after the last size, drains of the first size in a namespace of their own on the
#                               same control plane, the last size's jobs still held (finished, unless it gave up,
#                               and kept by the default retention): what the apiserver holding them costs a small
#                               drain. Their figures are printed beside the last size's, not counted among the
#                               baseline's rounds.
#                               0: none.
#   SCALE_RETENTION [finished=never]  the replicas' --retention: by default every finished job stays, so the run
#                               holds the whole backlog to the end; e.g. SCALE_RETENTION=succeeded=5m measures the
#                               envelope as deployed (the chart's default). The checker reads the recorded history,
#                               so jobs deleted by retention are judged by their last recorded status.
#
# The replicas are `bgjobs-test-worker operator` (the operator with recording handlers): each job is
# `jobName: record` with `ms: 0`, so the handler does nothing but write its start and finish lines to the execution
# log the checker reads. Jobs are created before the replicas start, so the replicas drain a full queue. Results:
# target/bench/scale-<date>/ (per size: replica logs, execution logs, status history, metrics, figures.txt).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=e2e/lib.sh
. "$ROOT/e2e/lib.sh"
cd "$ROOT"

# Word-split and re-joined: the first and last size are taken from its ends.
SIZES=$(echo ${SCALE_SIZES:-1000 10000 100000})
REPLICAS=${SCALE_REPLICAS:-4}
SLOTS=${SCALE_SLOTS:-16}
BASELINE_ROUNDS=${SCALE_BASELINE_ROUNDS:-3}
CREATE_PARALLEL=${SCALE_CREATE_PARALLEL:-4}
STALL=${SCALE_STALL:-180}
PROFILE_SECONDS=${SCALE_PROFILE_SECONDS:-0}
PERF_SECONDS=${SCALE_PERF_SECONDS:-0}
ALLOC_PROFILE=${SCALE_ALLOC_PROFILE:-0}
RETENTION=${SCALE_RETENTION:-finished=never}
FRESH_PLANE=${SCALE_FRESH_PLANE:-1}
BESIDE_ROUNDS=${SCALE_BESIDE_ROUNDS:-1}
GO=/usr/lib/go-1.19/bin/go # installed by e2e/cluster.sh to build the control plane
RUN_DIR=$ROOT/target/bench/scale-$(date +%Y%m%d-%H%M%S)
PID_DIR=$ROOT/target/bench/pids
NS=${SCALE_NAMESPACE:-bgjobs-scale}
REPLICA_PIDS=()
RECORDER_PID=""
export SYNC_SECONDS=600 # listing 100,000 jobs takes a while

die() {
  printf 'bench_scale.sh: %s\n' "$*" >&2
  exit 1
}

[[ $BESIDE_ROUNDS =~ ^(0|[1-9][0-9]*)$ ]] || die "SCALE_BESIDE_ROUNDS must be a number of rounds, got '$BESIDE_ROUNDS'"
[[ $FRESH_PLANE =~ ^[01]$ ]] || die "SCALE_FRESH_PLANE must be 0 or 1, got '$FRESH_PLANE'"
[[ $PROFILE_SECONDS =~ ^[0-9]+$ ]] || die "SCALE_PROFILE_SECONDS must be a number of seconds, got '$PROFILE_SECONDS'"
[[ $ALLOC_PROFILE =~ ^[01]$ ]] || die "SCALE_ALLOC_PROFILE must be 0 or 1, got '$ALLOC_PROFILE'"
[[ $PERF_SECONDS =~ ^[0-9]+$ ]] || die "SCALE_PERF_SECONDS must be a number of seconds, got '$PERF_SECONDS'"
if ((PERF_SECONDS > 0)) && ! command -v perf >/dev/null; then
  if [ "$(id -u)" = 0 ]; then apt-get install -y -q linux-perf >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q linux-perf >/dev/null; }; fi
  command -v perf >/dev/null || die "SCALE_PERF_SECONDS needs perf (Debian: linux-perf)"
fi
for v in $SIZES $REPLICAS $SLOTS $BASELINE_ROUNDS $CREATE_PARALLEL $STALL; do
  [[ $v =~ ^[1-9][0-9]*$ ]] || die "sizes, replicas, slots, rounds, parallelism and stall must be positive integers, got '$v'"
done
for v in kubectl jq awk; do command -v "$v" >/dev/null || die "$v is required"; done


# The apiserver's Go runtime, read from its /metrics: bytes allocated since it started; the time its garbage
# collector had spent when its last cycle ended, estimated as Go's GC CPU fraction times the CPU time available
# since the start (uptime then times the CPUs the apiserver may run on). Go 1.19 updates the fraction at each
# cycle's end and counts the mark assists, the dedicated and fractional mark workers and the pauses, as time on its
# threads, not as CPU the kernel counts: idle marking, sweeping and returning memory are left out, and on a busy
# machine a mark worker's time includes waiting for a core. An estimate, then, and only counting the cycles
# completed between two readings, so a drain with few cycles gets no figure (gc_figures). Prints "ALLOC_BYTES
# GC_SECONDS CYCLES START", or fails when a figure is missing.
apiserver_runtime() { # apiserver_pid
  local cpus
  cpus=$(awk '/^Cpus_allowed_list:/ {
      n = split($2, r, ","); for (i = 1; i <= n; i++) { m = split(r[i], b, "-"); c += (m == 2 ? b[2] - b[1] + 1 : 1) }
      print c }' "/proc/$1/status" 2>/dev/null)
  kubectl get --raw /metrics | awk -v cpus="${cpus:-0}" '
    /^go_memstats_alloc_bytes_total / { alloc = $2 }
    /^go_memstats_gc_cpu_fraction / { frac = $2 }
    /^go_memstats_last_gc_time_seconds / { last = $2 }
    /^go_gc_duration_seconds_count / { cycles = $2 }
    /^process_start_time_seconds / { start = $2 }
    END {
      if (alloc == "" || frac == "" || last == "" || cycles == "" || start == "" || cpus <= 0) exit 1
      printf "%.0f %.3f %d %s\n", alloc, (last > start ? frac * (last - start) * cpus : 0), cycles, start
    }'
}
# gc_figures N BEFORE AFTER: "ALLOC_KIB_PER_JOB GC_MS_PER_JOB CYCLES" between two apiserver_runtime readings; n/a where
# a reading is missing or the apiserver restarted in between, and for GC when fewer than 3 cycles ended.
gc_figures() {
  awk -v n="$1" -v a="$2" -v b="$3" 'BEGIN {
    if (split(a, x, " ") < 4 || split(b, y, " ") < 4 || x[4] != y[4]) { print "n/a n/a n/a"; exit }
    k = y[3] - x[3]
    printf "%.1f %s %d\n", (y[1] - x[1]) / 1024 / n, (k >= 3 ? sprintf("%.2f", (y[2] - x[2]) * 1000 / n) : "n/a"), k
  }'
}

# API writes come from the apiserver's request counters (e2e/lib.sh: metrics_snapshot, writes_between), counting the
# writes that landed (2xx) to BackgroundJobs and Leases; nothing else writes those while a size runs. Refused claims
# (another replica got there first, a 409 each) come from the replicas' own counters.
claim_conflicts() { # dir
  cat "$1"/replica-*.log | sed -n 's/.*"claim_conflicts":\([0-9]*\).*/\1/p' | awk '{s += $1} END {print s + 0}'
}


cleanup() {
  stop_replicas "$PID_DIR" scale
  local pid
  for pid in $RECORDER_PID; do
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  RECORDER_PID=""
}
trap cleanup EXIT

# N jobs in files of 5,000, created by CREATE_PARALLEL concurrent `kubectl create` streams. Names sort in index
# order; within one stream, creation order follows it.
create_jobs() { # dir count
  local dir=$1 n=$2 i chunk=5000
  mkdir -p "$dir/jobs"
  awk -v n="$n" -v chunk=$chunk -v dir="$dir/jobs" 'BEGIN {
    for (i = 1; i <= n; i++) {
      f = sprintf("%s/part-%04d.yaml", dir, int((i - 1) / chunk))
      printf "---\napiVersion: bgjobs.dev/v1alpha1\nkind: BackgroundJob\nmetadata:\n  name: s-%06d\nspec:\n  jobName: record\n  args: {ms: 0}\n", i >> f
    }
  }'
  find "$dir/jobs" -name 'part-*.yaml' | sort | xargs -P "$CREATE_PARALLEL" -I{} kubectl create -n "$NS" -f {} -o name >/dev/null
}

# One figure (e.g. jobs_per_s) of every drain in a summary: "label figure" per drain, from its first line.
figures_of() { # summary name
  awk -v name="$2" '/^backlog=/ {
    for (f = 2; f <= NF; f++) if (index($f, name "=") == 1) { print substr($1, 9), substr($f, length(name) + 2); next }
  }' "$1"
}

# The same per size ("backlog figure"), the baseline's rounds under their size. The rounds beside the last size
# (labels "<size>-beside-<last>") are left out: they are neither baseline nor backlog.
figure_of() { # summary name
  figures_of "$1" "$2" | awk '$1 !~ /-beside-/ { sub(/[^0-9].*/, "", $1); print $1, $2 }'
}

# awk: sorts v[1..k] (numbers) in place and returns their median. Shared by both comparisons below.
MEDIAN_AWK='function median(v, k,   i, j, t) {
  for (i = 1; i <= k; i++) for (j = i + 1; j <= k; j++) if (v[j] + 0 < v[i] + 0) { t = v[i]; v[i] = v[j]; v[j] = t }
  return k % 2 ? v[(k + 1) / 2] : (v[k / 2] + v[k / 2 + 1]) / 2
}'

# Each size's throughput and replica CPU per job as a ratio of the baseline's median over its rounds.
compare_with_baseline() { # summary baseline
  local name
  for name in jobs_per_s replica_cpu_ms_per_job; do
    figure_of "$1" "$name" | awk -v base="$2" -v name="$name" "$MEDIAN_AWK"'
      $1 == base { v[++k] = $2; next }
      { size[++m] = $1; val[m] = $2 }
      END {
        if (k == 0) exit
        med = median(v, k)
        printf "%s at %d: median %.2f of %d round(s), range %.2f-%.2f\n", name, base, med, k, v[1], v[k]
        for (i = 1; i <= m; i++)
          printf "  at %d: %.2f = %.2fx the median (%.2fx-%.2fx of the rounds)\n", size[i], val[i], val[i] / med, val[i] / v[k], val[i] / v[1]
      }'
  done
}

# The rounds beside the last size against it and against the baseline's median: throughput and the CPU per job of
# the replicas, the apiserver and the whole machine. Same-time comparison: the beside rounds ran minutes after the
# last size, on the apiserver that still held its jobs.
compare_beside() { # summary baseline last
  local name
  for name in jobs_per_s replica_cpu_ms_per_job apiserver_cpu_ms_per_job machine_cpu_ms_per_job; do
    figures_of "$1" "$name" | awk -v base="$2" -v last="$3" -v name="$name" "$MEDIAN_AWK"'
      $1 ~ ("^" base "-beside-") { b[++m] = $2; next }
      $1 == base || $1 ~ ("^" base "-round") { v[++k] = $2; next }
      $1 == last { l = $2 }
      END {
        if (k == 0 || m == 0 || l + 0 == 0) exit
        med = median(v, k)
        for (i = 1; i <= m; i++)
          printf "%s at %d beside %d held: %.2f = %.2fx the baseline median, %.2fx the %d drain\n", name, base, last, b[i], b[i] / med, b[i] / l, last
      }'
  done
}

finished_jobs() { cat "$1"/*.exec 2>/dev/null | grep -c '"ev":"finish"' || true; }

# Throughput per tenth of one drain (jobs/s over the time its tenth of the finishes took): the first tenth ran
# with the whole backlog waiting, the last with almost none, so first/last compares backlog sizes within one run,
# on the same machine minutes apart. Prints "t1 t2 ... t10 last/first=R".
drain_tenths() { # dir
  cat "$1"/*.exec 2>/dev/null | grep '"ev":"finish"' | sed -n 's/.*"t_ms":\([0-9]*\).*/\1/p' | sort -n |
    awk '{t[NR] = $1} END {
      if (NR < 20) exit
      for (k = 1; k <= 10; k++) {
        a = int(NR * (k - 1) / 10) + 1; b = int(NR * k / 10)
        s = (t[b] - t[a]) / 1000; r[k] = (s > 0 ? (b - a) / s : 0); printf "%.1f ", r[k]
      }
      printf "last/first=%.2f\n", (r[1] > 0 ? r[10] / r[1] : 0)
    }'
}

# Wait until FILE has not grown for QUIET seconds (at most LIMIT): the recorder trails the queue under a large
# backlog, and the checker judges its lines, so it is stopped only once it has caught up.
wait_quiet() { # file quiet limit
  local size=-1 now since=$SECONDS start=$SECONDS
  while ((SECONDS - start < $3)); do
    now=$(stat -c %s "$1" 2>/dev/null || echo 0)
    if ((now != size)); then
      size=$now since=$SECONDS
    elif ((SECONDS - since >= $2)); then
      return 0
    fi
    sleep 1
  done
  echo "the recorder was still writing after $3 s" >&2
}

one_size() { # size label [beside: on the plane as it is, keeping what it holds]
  local n=$1 dir=$RUN_DIR/$2 i fresh=$FRESH_PLANE
  [ "${3:-}" = beside ] && fresh=0
  mkdir -p "$dir"
  echo
  echo "==> backlog of $n jobs${2#"$1"}"
  if ((fresh)); then
    { e2e/cluster.sh down && e2e/cluster.sh up; } >"$dir/control-plane.log" 2>&1 ||
      die "could not start the control plane afresh (log: $dir/control-plane.log)"
    eval "$(e2e/cluster.sh env)"
    echo "on a control plane started afresh"
  fi
  kubectl delete namespace "$NS" --wait=true --timeout=600s >/dev/null 2>&1 || true
  kubectl create namespace "$NS" >/dev/null
  local t0=$SECONDS api_rss0
  api_rss0=$(rss_mib "$(plane_pid kube-apiserver)")
  create_jobs "$dir" "$n"
  echo "created $n jobs in $((SECONDS - t0)) s"
  sleep 5 # let the apiserver's watch cache settle
  # The apiserver keeps every object of a watched resource in its watch cache; its resident memory before and after
  # the creates, per 10k jobs (noisy: garbage collection and other clients move it too). etcd stores each custom
  # resource as its JSON, managed fields included: one job's size as stored.
  local api_rss_per_10k stored_bytes
  api_rss_per_10k=$(awk -v a="$api_rss0" -v b="$(rss_mib "$(plane_pid kube-apiserver)")" -v n="$n" 'BEGIN {printf "%.1f", (b - a) * 10000 / n}')
  stored_bytes=$(stored_json -n "$NS" backgroundjob s-000001 | wc -c)
  "$WORKER" record-history --namespace "$NS" --dir "$dir" >"$dir/recorder.log" 2>&1 &
  RECORDER_PID=$!
  metrics_snapshot "$dir/metrics-before.txt"
  if ((ALLOC_PROFILE)); then
    kubectl get --raw /debug/pprof/allocs >"$dir/apiserver-allocs-before.pprof" 2>>"$dir/pprof.log" || true
  fi
  local api_pid api_cpu0 etcd_pid etcd_cpu0 rec_cpu0 busy0 runtime0
  api_pid=$(plane_pid kube-apiserver)
  runtime0=$(apiserver_runtime "$api_pid") || runtime0=""
  api_cpu0=$(cpu_seconds "$api_pid")
  etcd_pid=$(plane_pid etcd)
  etcd_cpu0=$(cpu_seconds "$etcd_pid")
  rec_cpu0=$(cpu_seconds "$RECORDER_PID")
  busy0=$(busy_cpu_seconds)
  BIN=$WORKER launch_replicas "$dir" "$PID_DIR" "$NS" "$REPLICAS" "$SLOTS" scale \
    --exec-log "$dir/replicas.exec" --retention "$RETENTION"
  local profiler="" perf_pid="" startup_cpu=""
  local done_before=-1 stalled_since=$SECONDS done_now
  while :; do
    done_now=$(finished_jobs "$dir")
    ((done_now >= n)) && break
    # The replicas' CPU until the first job finished (as seen by this loop, every 2 s): their start, their list of
    # the whole backlog and the first index of it.
    if [ -z "$startup_cpu" ] && ((done_now > 0)); then startup_cpu=$(replicas_cpu_seconds); fi
    # The profile starts once a tenth of the jobs finished: past the replicas' first list, in the steady drain.
    if ((PROFILE_SECONDS > 0)) && [ -z "$profiler" ] && ((done_now * 10 >= n)); then
      kubectl get --raw "/debug/pprof/profile?seconds=$PROFILE_SECONDS" >"$dir/apiserver.pprof" 2>"$dir/pprof.log" &
      profiler=$!
    fi
    if ((PERF_SECONDS > 0)) && [ -z "$perf_pid" ] && ((done_now * 10 >= n)); then
      perf record -q -F 99 -p "${REPLICA_PIDS[0]}" -o "$dir/replica-1.perf.data" -- sleep "$PERF_SECONDS" \
        >"$dir/perf.log" 2>&1 &
      perf_pid=$!
    fi
    if ((done_now != done_before)); then
      done_before=$done_now stalled_since=$SECONDS
    elif ((SECONDS - stalled_since > STALL)); then
      echo "no job finished for $STALL s ($done_now of $n): giving up on this size" >&2
      break
    fi
    sleep 2
  done
  sleep 3 # the last status writes
  # CPU and memory now, right after the drain (a replica that died would read as 0: refuse that).
  local cpu rss=0 r pid
  for pid in "${REPLICA_PIDS[@]}"; do
    kill -0 "$pid" 2>/dev/null || die "replica $pid died during the drain (logs in $dir)"
  done
  cpu=$(replicas_cpu_seconds)
  for pid in "${REPLICA_PIDS[@]}"; do
    r=$(peak_rss_mib "$pid")
    rss=$(awk -v a="$rss" -v b="$r" 'BEGIN {print (b > a ? b : a)}')
  done
  per_job_ms() { awk -v a="$1" -v b="$2" -v n="$n" 'BEGIN {printf "%.2f", (b - a) * 1000 / n}'; }
  local api_ms etcd_ms rec_ms busy_ms
  api_ms=$(per_job_ms "$api_cpu0" "$(cpu_seconds "$api_pid")")
  etcd_ms=$(per_job_ms "$etcd_cpu0" "$(cpu_seconds "$etcd_pid")")
  rec_ms=$(per_job_ms "$rec_cpu0" "$(cpu_seconds "$RECORDER_PID")")
  busy_ms=$(per_job_ms "$busy0" "$(busy_cpu_seconds)")
  local runtime1 api_alloc_kb api_gc_ms api_gc_cycles
  runtime1=$(apiserver_runtime "$api_pid") || runtime1=""
  printf 'before: %s\nafter: %s\n' "${runtime0:-unread}" "${runtime1:-unread}" >"$dir/apiserver-runtime.txt"
  read -r api_alloc_kb api_gc_ms api_gc_cycles < <(gc_figures "$n" "$runtime0" "$runtime1")
  if [ -n "$profiler" ]; then
    wait "$profiler" || true
    { "$GO" tool pprof -top -nodecount=40 "$dir/apiserver.pprof" && echo &&
      "$GO" tool pprof -top -cum -nodecount=80 "$dir/apiserver.pprof"; } >"$dir/apiserver-profile.txt" 2>>"$dir/pprof.log" || true
  fi
  if [ -n "$perf_pid" ]; then
    wait "$perf_pid" || true
    perf report -q --stdio --no-children --sort symbol --percent-limit 0.3 -i "$dir/replica-1.perf.data" \
      >"$dir/replica-1-profile.txt" 2>>"$dir/perf.log" || true
  fi
  metrics_snapshot "$dir/metrics-after.txt"
  if ((ALLOC_PROFILE)); then
    kubectl get --raw /debug/pprof/allocs >"$dir/apiserver-allocs-after.pprof" 2>>"$dir/pprof.log" || true
    "$GO" tool pprof -top -sample_index=alloc_space -nodecount=60 -base "$dir/apiserver-allocs-before.pprof" \
      "$dir/apiserver-allocs-after.pprof" >"$dir/apiserver-allocs.txt" 2>>"$dir/pprof.log" || true
    "$GO" tool pprof -top -cum -sample_index=alloc_space -nodecount=100 -base "$dir/apiserver-allocs-before.pprof" \
      "$dir/apiserver-allocs-after.pprof" >>"$dir/apiserver-allocs.txt" 2>>"$dir/pprof.log" || true
  fi
  wait_quiet "$dir/status.jsonl" 10 600
  cleanup
  local jobs_w leases_w refused span executed
  jobs_w=$(writes_between "$dir/metrics-before.txt" "$dir/metrics-after.txt" backgroundjobs '2..')
  leases_w=$(writes_between "$dir/metrics-before.txt" "$dir/metrics-after.txt" leases '2..')
  refused=$(claim_conflicts "$dir")
  # First start to last finish, from the replicas' audit trail: the oracle the tests and the demo share.
  "$HISTORY" audit "$dir" >"$dir/audit.json" || true # the checker line below reports duplicates
  span=$(jq -r '(.makespan_ms // 0) / 1000' "$dir/audit.json")
  executed=$(jq -r '.started // 0' "$dir/audit.json") # jobs that ran, from the audit trail
  local check
  # FIFO is judged against the bound the queue promises (ordering::FIFO_BOUND, 3 s).
  check=$("$HISTORY" check "$dir" --per-replica-cap "$SLOTS" --fifo-bound-ms 3000 2>&1 | head -n 20) || true
  echo "$check" >"$dir/check.txt"
  {
    printf 'backlog=%d%s jobs_per_s=%.1f replica_cpu_ms_per_job=%.2f peak_rss_mib=%s apiserver_cpu_ms_per_job=%s ' \
      "$n" "${2#"$1"}" "$(awk -v n="$executed" -v s="$span" 'BEGIN {print (s > 0 ? n / s : 0)}')" \
      "$(awk -v c="$cpu" -v n="$n" 'BEGIN {print c * 1000 / n}')" "$rss" "$api_ms"
    printf 'replica_startup_cpu_ms_per_job=%.2f ' "$(awk -v c="${startup_cpu:-0}" -v n="$n" 'BEGIN {print c * 1000 / n}')"
    printf 'etcd_cpu_ms_per_job=%s recorder_cpu_ms_per_job=%s machine_cpu_ms_per_job=%s ' "$etcd_ms" "$rec_ms" "$busy_ms"
    printf 'apiserver_alloc_kib_per_job=%s apiserver_gc_ms_per_job=%s apiserver_gc_cycles=%s ' \
      "$api_alloc_kb" "$api_gc_ms" "$api_gc_cycles"
    printf 'writes_per_job=%.2f (jobs %d, leases %d) refused_claims_per_job=%.2f apiserver_rss_mib_at_start=%s apiserver_rss_mib_per_10k_jobs=%s stored_job_bytes=%s\n' \
      "$(awk -v a="$jobs_w" -v b="$leases_w" -v n="$n" 'BEGIN {print (a + b) / n}')" "$jobs_w" "$leases_w" \
      "$(awk -v r="$refused" -v n="$n" 'BEGIN {print r / n}')" \
      "$api_rss0" "$api_rss_per_10k" "$stored_bytes"
    # The fleet's longest pause in dispatch: nothing started anywhere for this long (claims held up, e.g. by a walk).
    echo "  longest_dispatch_gap_ms=$(jq -r '.longest_start_gap_ms // 0' "$dir/audit.json")"
    echo "  jobs_per_s_by_tenth_of_drain: $(drain_tenths "$dir")"
    echo "  checker: $(head -n 1 <<<"$check")"
  } | tee "$dir/figures.txt"
  ((KEEP_NAMESPACE)) || kubectl delete namespace "$NS" --wait=false >/dev/null
}

e2e/cluster.sh up
eval "$(e2e/cluster.sh env)"
export KUBECONFIG
cargo build --release -p bgjobs-test-worker -p bgjobs-history
mkdir -p "$RUN_DIR" "$PID_DIR"
# Frozen copies: a concurrent `cargo build` must not swap the binaries mid-run.
cp target/release/bgjobs-test-worker target/release/bgjobs-history "$RUN_DIR/"
WORKER=$RUN_DIR/bgjobs-test-worker
HISTORY=$RUN_DIR/bgjobs-history
stop_leftover_replicas "$PID_DIR"/scale-*.pid -- "bgjobs-test-worker operator"
# A second apiserver on the same etcd (e2e/cluster.sh second-apiserver), which the guarantees and chaos tests start
# and stop, outlives a test that was killed. Its watch cache takes in every job too, so its CPU would be in every
# figure: refuse rather than measure it. (A fresh control plane per size stops it.)
api2=$(plane_pid kube-apiserver-2)
if ((!FRESH_PLANE)) && [ "$api2" != 0 ] && kill -0 "$api2" 2>/dev/null; then
  die "a second kube-apiserver (pid $api2, left by a test) runs on this etcd and would skew every figure; start afresh: e2e/cluster.sh down && e2e/cluster.sh up"
fi
echo "machine: $(nproc) CPUs, $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo); load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "$REPLICAS replicas x $SLOTS slots, --retention $RETENTION; results in ${RUN_DIR#"$ROOT"/}"
LABELS=()
BASELINE=${SIZES%% *}
LAST=${SIZES##* }
KEEP_NAMESPACE=0
for ((k = 1; k <= BASELINE_ROUNDS; k++)); do
  label=$BASELINE
  ((BASELINE_ROUNDS > 1)) && label=$BASELINE-round$k
  LABELS+=("$label")
  one_size "$BASELINE" "$label"
done
for n in ${SIZES#"$BASELINE"}; do
  LABELS+=("$n")
  # The last size's jobs stay for the rounds beside it.
  [ "$n" = "$LAST" ] && ((BESIDE_ROUNDS > 0)) && KEEP_NAMESPACE=1
  one_size "$n" "$n"
done
if ((KEEP_NAMESPACE)); then
  LAST_NS=$NS
  NS=$LAST_NS-beside KEEP_NAMESPACE=0
  echo
  # One item and the count of the rest: cheaper than listing 100,000 jobs.
  held=$(kubectl get --raw "/apis/bgjobs.dev/v1alpha1/namespaces/$LAST_NS/backgroundjobs?limit=1" |
    jq '(.items | length) + (.metadata.remainingItemCount // 0)')
  echo "==> beside the jobs the $LAST drain left: $held held in $LAST_NS"
  for ((k = 1; k <= BESIDE_ROUNDS; k++)); do
    label=$BASELINE-beside-$LAST
    ((BESIDE_ROUNDS > 1)) && label=$label-round$k
    LABELS+=("$label")
    one_size "$BASELINE" "$label" beside
  done
  kubectl delete namespace "$LAST_NS" --wait=false >/dev/null || true
  NS=$LAST_NS
fi
echo
echo "==> summary"
for label in "${LABELS[@]}"; do cat "$RUN_DIR/$label/figures.txt"; done | tee "$RUN_DIR/summary.txt"
echo
# The targets compare each larger size with the baseline: its rounds' median, their range beside it.
compare_with_baseline "$RUN_DIR/summary.txt" "$BASELINE" | tee -a "$RUN_DIR/summary.txt"
compare_beside "$RUN_DIR/summary.txt" "$BASELINE" "$LAST" | tee -a "$RUN_DIR/summary.txt"
echo
echo "the last size's namespace ($NS) is still being deleted: the namespace controller deletes its jobs one by one,"
echo "which loads the apiserver for minutes after a large size (tests run meanwhile may time out);"
echo "e2e/cluster.sh down && e2e/cluster.sh up starts afresh at once"
