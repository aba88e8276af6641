#!/usr/bin/env bash
# A real Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager, kube-scheduler) on loopback, or
# with a real node (`up --node`) on a bridge of its own (e2e/node.sh says why and how).
#
#   e2e/cluster.sh up       install + build once per machine (cached), start everything, install the CRDs
#   e2e/cluster.sh up --node
#                           the same plus a real node (containerd, runc, CNI bridge, kube-proxy, kubelet; e2e/node.sh)
#   e2e/cluster.sh down     stop exactly the processes `up` started (by PID) and remove the state
#   e2e/cluster.sh status   say what runs and where
#   e2e/cluster.sh env      print `export KUBECONFIG=...` for eval
#   e2e/cluster.sh build [--node]
#                           only install and build the binaries (and the node's, and its pause image) into the cache
#   e2e/cluster.sh restart apiserver|etcd|both
#                           fault injection: kill -9 and start again, same ports and data (waits until healthy)
#   e2e/cluster.sh second-apiserver [stop]
#                           fault injection: start a second kube-apiserver on the same etcd and write
#                           $STATE/kubeconfig-2 for it (an HA pair whose watch caches can lag each other);
#                           `stop` stops it (by PID)
#
# The binaries are built from Debian's `kubernetes` source package (v1.20.2) and cached under
# ${BGJOBS_CACHE:-~/.cache/bgjobs}; the running state (kubeconfig, certs, logs, PID files, etcd data) lives in
# ${BGJOBS_CLUSTER_DIR:-<repo>/.cluster}, which git ignores. Ports are picked free at start.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/steps.sh"
. "$(dirname "${BASH_SOURCE[0]}")/node.sh"

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${BGJOBS_CACHE:-$HOME/.cache/bgjobs}
K8S_VERSION=v1.20.2
BIN=$CACHE/kubernetes-$K8S_VERSION/bin
STATE=${BGJOBS_CLUSTER_DIR:-$ROOT/.cluster}
GO_BIN=/usr/lib/go-1.19/bin



# --- install ----------------------------------------------------------------------------------------------------

install_packages() {
  local missing=()
  [ -x /usr/bin/etcd ] || missing+=(etcd-server)
  [ -x $GO_BIN/go ] || missing+=(golang-1.19-go)
  command -v rsync >/dev/null || missing+=(rsync)
  command -v jq >/dev/null || missing+=(jq)
  command -v openssl >/dev/null || missing+=(openssl)
  # The scripts and the tests drive the cluster with kubectl; Debian's is the same v1.20.2 as the control plane.
  command -v kubectl >/dev/null || missing+=(kubernetes-client)
  [ -d /usr/share/gocode/src/github.com/modern-go/reflect2 ] || missing+=(golang-github-modern-go-reflect2-dev)
  [ ${#missing[@]} -eq 0 ] || apt_install "$CACHE/apt.log" "${missing[@]}"
}

fetch_source() {
  local dl=$CACHE/source
  if ls "$dl"/kubernetes_*.orig.tar.gz >/dev/null 2>&1; then return 0; fi
  step "fetching Debian's kubernetes source package"
  mkdir -p "$dl"
  local log=$CACHE/apt-source.log
  # The machine's apt list may carry only `Types: deb`; apt-get source needs a deb-src entry for bookworm main.
  local srclist=/etc/apt/sources.list.d/bgjobs-deb-src.list
  if ! grep -rqsE '^(deb-src|Types:.*deb-src)' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    echo "deb-src http://deb.debian.org/debian bookworm main" | as_root tee "$srclist" >/dev/null
    as_root apt-get update >"$log" 2>&1 || fail "apt-get update (deb-src)" "$log"
  fi
  (cd "$dl" && as_root apt-get source --download-only kubernetes) >>"$log" 2>&1 ||
    fail "apt-get source --download-only kubernetes" "$log"
}

# The control plane's binaries and, with --node, the node's (kubelet, kube-proxy, the pause program): whatever is
# missing, in one build of the source, as the two sets share most of their packages (built one after the other, the
# second build compiled them all again).
build_binaries() { # [--node]
  local want=() node=0
  [ "${1:-}" = --node ] && node=1
  if ! { [ -x "$BIN/kube-apiserver" ] && [ -x "$BIN/kube-controller-manager" ] && [ -x "$BIN/kube-scheduler" ]; }; then
    want+=(kube-apiserver kube-controller-manager kube-scheduler)
  fi
  if ((node)) && ! node_binaries_built; then want+=(kubelet kube-proxy); fi
  [ ${#want[@]} -gt 0 ] || return 0
  install_packages
  if ((node)); then install_node_packages; fi
  fetch_source
  step "building ${want[*]} (about $((${#want[@]} * 2 + 2)) minutes on 2 cores)"
  build_from_source "$CACHE/build.log" "${want[@]}"
  if ((node)); then build_pause "$CACHE/build.log"; fi
  step "cached binaries in $BIN; removing the build tree"
  rm -rf "$CACHE/build"
}

# Builds the named commands (cmd/<name>) from a freshly unpacked source tree into $BIN. The tree stays in
# $CACHE/build ($BUILT_TREE) for the caller to use and remove.
build_from_source() { # log, command names...
  local log=$1 tree b
  shift
  tree=$(unpack_source) || exit 1
  step "log: $log"
  (
    cd "$tree"
    export PATH=$GO_BIN:$PATH CGO_ENABLED=0 HOME=$CACHE/build/home GOCACHE=$CACHE/build/gocache \
      KUBE_GIT_VERSION_FILE=$CACHE/build/version.env
    mkdir -p "$HOME"
    make WHAT="${*/#/cmd/}"
  ) >"$log" 2>&1 || fail "build $*" "$log"
  mkdir -p "$BIN"
  for b in "$@"; do cp "$tree/_output/bin/$b" "$BIN/$b"; done
  BUILT_TREE=$tree
}

# Unpacks the source into $CACHE/build (outside any git tree, so its version script reads our version file) and
# prints the tree's path.
unpack_source() {
  local src=$CACHE/build
  step "unpacking the kubernetes source"
  rm -rf "$src" && mkdir -p "$src"
  tar -xzf "$(ls "$CACHE"/source/kubernetes_*.orig.tar.gz | head -n1)" -C "$src" || fail "unpack source"
  local tree
  tree=$(find "$src" -mindepth 1 -maxdepth 1 -type d | head -n1)
  # Trap: the vendored reflect2 v1.0.1 breaks at run time with Go >= 1.18; Debian ships the fixed 1.0.2.
  rm -rf "$tree/vendor/github.com/modern-go/reflect2"
  cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 "$tree/vendor/github.com/modern-go/reflect2"
  cat >"$src/version.env" <<EOF
KUBE_GIT_COMMIT='debian-source-package'
KUBE_GIT_TREE_STATE='clean'
KUBE_GIT_VERSION='$K8S_VERSION'
KUBE_GIT_MAJOR='1'
KUBE_GIT_MINOR='20'
EOF
  echo "$tree"
}

# --- run --------------------------------------------------------------------------------------------------------

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

running() { [ -f "$STATE/$1.pid" ] && kill -0 "$(cat "$STATE/$1.pid")" 2>/dev/null; }

start() { # name, command...
  local name=$1
  shift
  "$@" >"$STATE/logs/$name.log" 2>&1 &
  echo $! >"$STATE/$name.pid"
}

wait_for() { # what, log, command...
  local what=$1 log=$2
  shift 2
  for _ in $(seq 1 120); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.5
  done
  fail "wait for $what" "$log"
}

start_etcd() { # ports from $STATE/ports.env
  . "$STATE/ports.env"
  step "starting etcd on 127.0.0.1:$etcd_port"
  start etcd /usr/bin/etcd --data-dir "$STATE/etcd" --name bgjobs \
    --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
    --listen-peer-urls "http://127.0.0.1:$peer_port" --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
    --initial-cluster "bgjobs=http://127.0.0.1:$peer_port" --unsafe-no-fsync
  wait_for etcd "$STATE/logs/etcd.log" curl -sf "http://127.0.0.1:$etcd_port/health"
}

start_apiserver() { # name, port (on the etcd of $STATE/ports.env)
  local name=$1 port=$2
  . "$STATE/ports.env"
  local addr=${api_addr:-127.0.0.1} admission=--disable-admission-plugins=ServiceAccount
  # With a node, Pods are real: they get their ServiceAccount's token mounted, as in any cluster. The apiserver
  # reaches a kubelet (logs, exec) at its InternalIP, never by looking its name up in DNS.
  [ "${node:-0}" = 1 ] && admission=--enable-admission-plugins=ServiceAccount
  step "starting $name on https://$addr:$port"
  start "$name" "$BIN/kube-apiserver" --bind-address="$addr" --advertise-address="$addr" \
    --secure-port="$port" --cert-dir "$STATE/certs" --etcd-servers "http://127.0.0.1:$etcd_port" \
    --service-cluster-ip-range=10.0.0.0/24 --authorization-mode=RBAC --token-auth-file "$STATE/tokens.csv" \
    --service-account-issuer=https://kubernetes.default.svc --service-account-key-file "$STATE/certs/sa.pub" \
    --service-account-signing-key-file "$STATE/certs/sa.key" "$admission" \
    --kubelet-preferred-address-types=InternalIP
}

write_kubeconfig() { # path, port, token
  cat >"$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: bgjobs-local
  cluster:
    server: https://${api_addr:-127.0.0.1}:$2
    certificate-authority: $STATE/certs/apiserver.crt
users:
- name: admin
  user:
    token: $3
contexts:
- name: bgjobs-local
  context: {cluster: bgjobs-local, user: admin, namespace: default}
current-context: bgjobs-local
EOF
}

kill_now() { # name: SIGKILL by its PID file, and wait until it is gone
  running "$1" || return 0
  local pid
  pid=$(cat "$STATE/$1.pid")
  kill -9 "$pid" 2>/dev/null || true
  for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
}

restart() { # apiserver|etcd|both
  [ -f "$STATE/ports.env" ] || fail "restart: the control plane is not up"
  . "$STATE/ports.env"
  case "$1" in
    apiserver) kill_now kube-apiserver ;;
    etcd) kill_now etcd ;;
    both) kill_now kube-apiserver; kill_now etcd ;;
    *) fail "restart: say apiserver, etcd or both" ;;
  esac
  running etcd || start_etcd
  running kube-apiserver || start_apiserver kube-apiserver "$api_port"
  wait_for kube-apiserver "$STATE/logs/kube-apiserver.log" kubectl --kubeconfig "$STATE/kubeconfig" get --raw /readyz
}

second_apiserver() {
  [ -f "$STATE/ports.env" ] || fail "second-apiserver: the control plane is not up"
  if running kube-apiserver-2; then
    # Reused: one that a test killed outright may have left frozen (SIGSTOP).
    kill -CONT "$(cat "$STATE/kube-apiserver-2.pid")" 2>/dev/null || true
  else
    local port
    port=$(free_port)
    sed -i '/^api2_port=/d' "$STATE/ports.env"
    echo "api2_port=$port" >>"$STATE/ports.env"
    start_apiserver kube-apiserver-2 "$port"
    write_kubeconfig "$STATE/kubeconfig-2" "$port" "$(cut -d, -f1 "$STATE/tokens.csv")"
  fi
  wait_for kube-apiserver-2 "$STATE/logs/kube-apiserver-2.log" \
    kubectl --kubeconfig "$STATE/kubeconfig-2" get --raw /readyz
  echo "$STATE/kubeconfig-2"
}

all_running() { running etcd && running kube-apiserver && running kube-controller-manager && running kube-scheduler; }

up() { # [--node]
  local want_node=0
  [ "${1:-}" = --node ] && want_node=1
  if all_running && kubectl --kubeconfig "$STATE/kubeconfig" get --raw /healthz >/dev/null 2>&1; then
    local has_node=0
    grep -q '^node=1$' "$STATE/ports.env" && has_node=1
    # A node that was asked for must still run whole (containerd, kube-proxy and the kubelet).
    if ((has_node >= want_node)) && { ((!want_node)) || { running containerd && running kubelet && running kube-proxy; }; }; then
      step "control plane already up (KUBECONFIG=$STATE/kubeconfig)"
      install_crds
      return 0
    fi
    step "the control plane runs without a (whole) node; starting afresh with one"
  fi
  [ -d "$STATE" ] && down
  # Serialise the per-machine build so two parallel `up`s do not build twice.
  mkdir -p "$CACHE"
  # Installs first, also when the binaries come from a cache made elsewhere (each is a presence check, then apt).
  install_packages
  if ((want_node)); then install_node_packages; fi
  (flock 9 && build_binaries "${1:-}") 9>"$CACHE/build.lock"

  mkdir -p "$STATE/logs" "$STATE/certs" "$STATE/etcd"
  local etcd_port peer_port api_port token
  etcd_port=$(free_port)
  peer_port=$(free_port)
  api_port=$(free_port)
  token=$(openssl rand -hex 16)
  echo "$token,admin,admin,\"system:masters\"" >"$STATE/tokens.csv"
  openssl genrsa -out "$STATE/certs/sa.key" 2048 >/dev/null 2>&1 || fail "generate service-account key"
  openssl rsa -in "$STATE/certs/sa.key" -pubout -out "$STATE/certs/sa.pub" >/dev/null 2>&1 ||
    fail "derive service-account public key"

  printf 'etcd_port=%s\npeer_port=%s\napi_port=%s\n' "$etcd_port" "$peer_port" "$api_port" >"$STATE/ports.env"
  if ((want_node)); then
    # Recorded first, so that `down` cleans up after a network set up halfway.
    printf 'node=1\napi_addr=%s\n' "$NODE_ADDR" >>"$STATE/ports.env"
    create_node_network
  fi
  . "$STATE/ports.env"
  start_etcd
  start_apiserver kube-apiserver "$api_port"
  write_kubeconfig "$STATE/kubeconfig" "$api_port" "$token"
  wait_for kube-apiserver "$STATE/logs/kube-apiserver.log" \
    kubectl --kubeconfig "$STATE/kubeconfig" get --raw /healthz

  step "starting kube-controller-manager and kube-scheduler"
  start kube-controller-manager "$BIN/kube-controller-manager" --kubeconfig "$STATE/kubeconfig" \
    --leader-elect=false --service-account-private-key-file "$STATE/certs/sa.key" \
    --root-ca-file "$STATE/certs/apiserver.crt" \
    --bind-address=127.0.0.1 --secure-port=0 --port=0
  start kube-scheduler "$BIN/kube-scheduler" --kubeconfig "$STATE/kubeconfig" --leader-elect=false \
    --bind-address=127.0.0.1 --secure-port=0 --port=0
  sleep 1
  running kube-controller-manager || fail "kube-controller-manager start" "$STATE/logs/kube-controller-manager.log"
  running kube-scheduler || fail "kube-scheduler start" "$STATE/logs/kube-scheduler.log"
  wait_for "default namespace" "$STATE/logs/kube-apiserver.log" \
    kubectl --kubeconfig "$STATE/kubeconfig" get namespace default
  install_crds
  if ((want_node)); then start_node; fi
  step "control plane up: export KUBECONFIG=$STATE/kubeconfig"
}

install_crds() {
  local log=$STATE/logs/crds.log
  kubectl --kubeconfig "$STATE/kubeconfig" apply --server-side --force-conflicts -f "$ROOT/crds/" >"$log" 2>&1 ||
    fail "install CRDs from crds/" "$log"
  for f in "$ROOT"/crds/*.yaml; do
    local name
    name=$(sed -n 's/^  name: //p' "$f" | head -n1)
    wait_for "CRD $name Established" "$log" kubectl --kubeconfig "$STATE/kubeconfig" wait --for=condition=Established \
      --timeout=5s "crd/$name"
  done
}

stop_by_pid() { # name: SIGTERM, 5 s, then SIGKILL
  running "$1" || return 0
  local pid
  pid=$(cat "$STATE/$1.pid")
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then kill -9 "$pid" 2>/dev/null || true; fi
  rm -f "$STATE/$1.pid" # a stale PID file could name a reused PID later
}

down() {
  [ -d "$STATE" ] || return 0
  stop_node
  for name in kube-scheduler kube-controller-manager kube-apiserver-2 kube-apiserver etcd; do stop_by_pid "$name"; done
  rm -rf "$STATE"
  step "control plane stopped"
}

status() {
  local names=(etcd kube-apiserver kube-controller-manager kube-scheduler)
  grep -qs '^node=1$' "$STATE/ports.env" && names+=(containerd kube-proxy kubelet)
  for name in "${names[@]}"; do
    if running "$name"; then echo "$name: running (pid $(cat "$STATE/$name.pid"))"; else echo "$name: stopped"; fi
  done
  [ -f "$STATE/kubeconfig" ] && echo "KUBECONFIG=$STATE/kubeconfig"
  all_running
}

case "${1:-}" in
  up) up "${2:-}" ;;
  down) down ;;
  status) status ;;
  env) echo "export KUBECONFIG=$STATE/kubeconfig" ;;
  build)
    mkdir -p "$CACHE"
    (flock 9 && build_binaries "${2:-}" && if [ "${2:-}" = --node ]; then node_images; fi) 9>"$CACHE/build.lock"
    ;;
  restart) restart "${2:-}" ;;
  second-apiserver) if [ "${2:-}" = stop ]; then stop_by_pid kube-apiserver-2; else second_apiserver; fi ;;
  *) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
