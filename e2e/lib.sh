# Shared by the e2e scripts (demo and benchmarks): operator replicas as background processes, started and stopped by PID.
# Callers define `die MESSAGE`, set BIN (the bgjobs binary) and keep the started PIDs in the array REPLICA_PIDS.

# wait_gone PID SECONDS: true once PID has exited.
wait_gone() {
  local pid=$1 i
  for ((i = 0; i < $2 * 10; i++)); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.1
  done
  return 1
}

# stop_leftover_replicas PIDFILE... -- CMDLINE_PATTERN: a replica of an aborted run (SIGKILLed script, closed
# terminal) would steal jobs and CPU. Stop it, but only after checking that the PID in its file still runs a
# command line matching the pattern (PIDs get reused).
stop_leftover_replicas() {
  local files=() f pid
  while [ "$1" != "--" ]; do files+=("$1"); shift; done
  local pattern=$2
  for f in "${files[@]}"; do
    [ -e "$f" ] || continue
    pid=$(cat "$f")
    if [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null &&
      tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$pattern"; then
      echo "stopping a replica left over from an earlier run (pid $pid)"
      kill -TERM "$pid" 2>/dev/null || true
      wait_gone "$pid" 40 || kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$f"
  done
}

# launch_replicas DIR PID_DIR NAMESPACE COUNT SLOTS ID_PREFIX [EXTRA_FLAGS...]: start COUNT replicas named
# ID_PREFIX-1.., logs and invocation logs in DIR/replica-N.{log,inv}, PID files in PID_DIR; return once every
# replica has synced its caches (so all of them compete from the first job on). Finished jobs are kept (no
# retention) because the runs audit every job at the end; EXTRA_FLAGS come later and may override that.
launch_replicas() {
  local dir=$1 pid_dir=$2 ns=$3 n=$4 slots=$5 prefix=$6 i
  shift 6
  mkdir -p "$dir" "$pid_dir"
  for ((i = 1; i <= n; i++)); do
    "$BIN" operator --namespace "$ns" --identity "$prefix-$i" --max-concurrent-jobs-per-instance "$slots" --retention finished=never "$@" \
      --invocation-log "$dir/replica-$i.inv" >"$dir/replica-$i.log" 2>&1 &
    REPLICA_PIDS+=($!)
    echo $! >"$pid_dir/$prefix-$i.pid"
  done
  echo "started $n replica(s) (pids ${REPLICA_PIDS[*]}), logs in ${dir#"$ROOT"/}/replica-N.log"
  local deadline=$((SECONDS + ${SYNC_SECONDS:-60}))
  for ((i = 1; i <= n; i++)); do
    until grep -q "caches synced" "$dir/replica-$i.log" 2>/dev/null; do
      if ! kill -0 "${REPLICA_PIDS[${#REPLICA_PIDS[@]} - n + i - 1]}" 2>/dev/null; then
        tail -n 20 "$dir/replica-$i.log" >&2
        die "replica $prefix-$i exited during start-up (log above: $dir/replica-$i.log)"
      fi
      ((SECONDS < deadline)) || die "replica $prefix-$i did not sync its caches within ${SYNC_SECONDS:-60} s ($dir/replica-$i.log)"
      sleep 0.1
    done
  done
}

# stop_replicas PID_DIR ID_PREFIX: stop exactly the replicas this run started. SIGTERM lets each finish its running
# jobs (up to its shutdown grace), hand back the rest and print its counters. Idempotent: safe from an exit trap.
stop_replicas() {
  local pid_dir=$1 prefix=$2 pid alive=()
  for pid in ${REPLICA_PIDS[@]+"${REPLICA_PIDS[@]}"}; do
    if kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid" 2>/dev/null && alive+=("$pid")
    fi
  done
  if [ ${#alive[@]} -gt 0 ]; then
    echo "stopping replicas (pids ${alive[*]}); running jobs get their shutdown grace to finish"
  fi
  for pid in ${alive[@]+"${alive[@]}"}; do
    wait_gone "$pid" 40 || {
      echo "replica pid $pid did not stop within 40 s of SIGTERM: killing it" >&2
      kill -KILL "$pid" 2>/dev/null || true
    }
  done
  for pid in ${REPLICA_PIDS[@]+"${REPLICA_PIDS[@]}"}; do
    wait "$pid" 2>/dev/null || true # reap, so bash does not report "Terminated" later
  done
  REPLICA_PIDS=()
  rm -f "$pid_dir/$prefix"-*.pid
}

# Process figures for the benchmarks, read from /proc (0 once the process is gone).
# cpu_seconds PID: user + system CPU seconds so far. Field 2 (comm) has no spaces for the processes measured.
cpu_seconds() { awk -v tck="$(getconf CLK_TCK)" '{printf "%.2f", ($14 + $15) / tck}' "/proc/$1/stat" 2>/dev/null || echo 0; }
# replicas_cpu_seconds: the CPU seconds of the replicas in REPLICA_PIDS so far, together.
replicas_cpu_seconds() {
  local pid total=0
  for pid in ${REPLICA_PIDS[@]+"${REPLICA_PIDS[@]}"}; do
    total=$(awk -v a="$total" -v b="$(cpu_seconds "$pid")" 'BEGIN {printf "%.2f", a + b}')
  done
  echo "$total"
}
# busy_cpu_seconds: CPU seconds the whole machine spent busy so far (every core; /proc/stat's first line without
# idle and iowait), to see where a benchmark's CPU went besides the processes it measures one by one.
busy_cpu_seconds() { awk -v tck="$(getconf CLK_TCK)" '/^cpu / {printf "%.2f", ($2 + $3 + $4 + $7 + $8 + $9) / tck; exit}' /proc/stat; }
# rss_mib PID / peak_rss_mib PID: resident memory now / at its peak (VmHWM), in MiB.
rss_mib() { awk '/^VmRSS:/ {printf "%.1f", $2 / 1024}' "/proc/$1/status" 2>/dev/null || echo 0; }
peak_rss_mib() { awk '/^VmHWM:/ {printf "%.1f", $2 / 1024}' "/proc/$1/status" 2>/dev/null || echo 0; }
# plane_pid NAME: a control plane process's PID from e2e/cluster.sh's PID file (read only: never signalled).
plane_pid() { cat "${BGJOBS_CLUSTER_DIR:-$ROOT/.cluster}/$1.pid" 2>/dev/null || echo 0; }

# stored_json KUBECTL_GET_ARGS...: one object as compact JSON, managed fields included, as etcd stores it. kubectl
# before 1.21 (Debian's) prints managed fields unasked and knows no --show-managed-fields.
stored_json() {
  { kubectl get "$@" -o json --show-managed-fields 2>/dev/null || kubectl get "$@" -o json; } | jq -c .
}

# The apiserver's request counters, for counting API writes between two snapshots. They have no namespace label:
# on a shared control plane they count other clients too (run the benchmarks alone).
metrics_snapshot() { kubectl get --raw /metrics | grep -E '^apiserver_request_total\{' >"$1"; }
# Writes to one resource between two snapshots: every response code (a refused write costs the apiserver too), or
# only those matching CODES (a regex, e.g. '2..' for the writes that landed).
writes_between() { # before after resource [codes]
  awk -v res="$3" -v codes="${4:-.*}" '
    function value(line) { n = split(line, f, " "); return f[n] }
    FNR == NR { before[$1] = value($0); next }
    /^apiserver_request_total\{/ && $0 ~ "resource=\"" res "\"" && $0 ~ /verb="(POST|PUT|PATCH|DELETE|DELETECOLLECTION)"/ \
      && $0 ~ "code=\"" codes "\"" {
      sum += value($0) - before[$1]
    }
    END { printf "%d", sum }' "$1" "$2"
}
