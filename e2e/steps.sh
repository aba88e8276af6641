# Step messages, failures that point at their log, and root for the setup scripts (e2e/cluster.sh, e2e/image.sh).
# Sourced, not run.

step() { printf '==> %s\n' "$*" >&2; }

fail() { # what failed, [its log]
  printf '%s: FAILED at step "%s"\n' "${0##*/}" "$1" >&2
  [ -n "${2:-}" ] && printf '  read the log: %s\n' "$2" >&2 && tail -n 20 "$2" >&2
  exit 1
}

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
