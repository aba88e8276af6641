#!/usr/bin/env bash
# object_heap.sh [-n NAMESPACE] JOB...: how much of the apiserver's memory each BackgroundJob holds. Reads each job
# from the local control plane with its managed fields and decodes it as the apiserver's watch cache holds it
# (e2e/object-heap). The apiserver keeps every job of the cluster this way, waiting or finished, so a job's bytes
# held times the jobs kept is what a backlog and its retention cost the apiserver (docs/benchmarks.md).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
GO=/usr/lib/go-1.19/bin/go # installed by e2e/cluster.sh to build the control plane
[ -x "$GO" ] || { echo "object_heap.sh: $GO is missing: run e2e/cluster.sh up first" >&2; exit 1; }
ns=()
if [ "${1:-}" = -n ]; then ns=(-n "$2"); shift 2; fi
[ $# -gt 0 ] || { echo "usage: e2e/object_heap.sh [-n NAMESPACE] JOB..." >&2; exit 2; }
eval "$("$ROOT/e2e/cluster.sh" env)"
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
files=()
for job in "$@"; do
  kubectl get "${ns[@]}" backgroundjob "$job" -o json --show-managed-fields | jq -c . >"$dir/$job.json"
  files+=("$dir/$job.json")
done
cd "$ROOT/e2e/object-heap"
"$GO" run . "${files[@]}" | sed "s|$dir/||; s|\.json:|:|"
