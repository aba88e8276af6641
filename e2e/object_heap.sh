#!/usr/bin/env bash
# object_heap.sh [-n NAMESPACE] JOB...: how much of the apiserver's memory each BackgroundJob holds, at least. Reads
# each job from the local control plane with its managed fields and decodes it as the apiserver's watch cache holds
# it (e2e/object-heap, with the Go that built this apiserver). The apiserver keeps every job of the cluster this way,
# waiting or finished, so a job's bytes held times the jobs kept is what a backlog and its retention cost it, plus
# the watch cache's own records and recent events (docs/benchmarks.md).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
GO=/usr/lib/go-1.19/bin/go # installed by e2e/cluster.sh to build the control plane
usage() { echo "usage: e2e/object_heap.sh [-n NAMESPACE] JOB..." >&2; exit 2; }
ns=()
while [ $# -gt 0 ]; do
  case $1 in
    -n | --namespace) [ $# -ge 2 ] || usage; ns=(-n "$2"); shift 2 ;;
    --namespace=*) ns=(-n "${1#*=}"); shift ;;
    -*) usage ;;
    *) break ;;
  esac
done
[ $# -gt 0 ] || usage
[ -x "$GO" ] || { echo "object_heap.sh: $GO is missing: run e2e/cluster.sh up first" >&2; exit 1; }
env=$("$ROOT/e2e/cluster.sh" env)
eval "$env"
# shellcheck source=e2e/lib.sh
. "$ROOT/e2e/lib.sh"
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
files=()
for job in "$@"; do
  file="$dir/$(printf '%s' "$job" | tr '/' '_').json"
  stored_json "${ns[@]}" backgroundjob "$job" >"$file"
  files+=("$file")
done
cd "$ROOT/e2e/object-heap"
"$GO" run . "${files[@]}" 2>&1 | sed "s|$dir/||; s|\.json:|:|"
