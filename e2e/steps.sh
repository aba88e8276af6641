# Step messages, failures that point at their log, root and Debian packages for the setup scripts
# (e2e/cluster.sh, e2e/node.sh, e2e/image.sh). Sourced, not run.

step() { printf '==> %s\n' "$*" >&2; }

fail() { # what failed, [its log]
  printf '%s: FAILED at step "%s"\n' "${0##*/}" "$1" >&2
  [ -n "${2:-}" ] && printf '  read the log: %s\n' "$2" >&2 && tail -n 20 "$2" >&2
  exit 1
}

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

apt_install() { # log, Debian packages...: install them, with what apt said in the log
  local log=$1
  shift
  step "installing Debian packages: $*"
  mkdir -p "$(dirname "$log")"
  as_root apt-get update >"$log" 2>&1 || fail "apt-get update" "$log"
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y --no-install-recommends "$@" >>"$log" 2>&1 ||
    fail "apt-get install $*" "$log"
}
