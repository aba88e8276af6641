# A real node beside the control plane of e2e/cluster.sh: containerd (CRI) with runc, a CNI bridge network,
# kube-proxy and a kubelet, all of Debian's packages or built from the same kubernetes source as the control plane.
# Sourced by e2e/cluster.sh (`up --node`, `down`, `status`); not run on its own.
#
# Status: brought up by hand (a Pod runs in a container, reaches the apiserver through the `kubernetes` Service,
# `kubectl logs` reads it through the kubelet; `down` with a Pod still running leaves no process, mount, rule,
# cgroup or device behind). The Pod executor tests, the chart's Deployment test (tests/chart_on_node.rs), the Pod
# benchmark and the demo's Pod section run on it.
#
# Addresses. The node lives on a bridge this script creates, `bgjobs0`, with 198.18.0.1/24 (RFC 2544's benchmarking
# range: reserved, never routed on the internet, not a private LAN range). With a node, the apiserver binds and
# advertises that address, so the `kubernetes` Service (10.0.0.1:443) leads Pods to it through kube-proxy's rules,
# the kubelet serves the apiserver on it, and Pods get their addresses from the same /24. IP forwarding stays off
# and a FORWARD rule drops anything from the bridge that would leave it: a Pod reaches this machine and other Pods,
# never a network beyond.
#
# Trust. The kubelet serves anonymous requests with authorization AlwaysAllow on 198.18.0.1 only; the kubelet and
# kube-proxy use the admin token. This is a throw-away node on one machine, not a hardening example.

NODE_NAME=bgjobs-node
NODE_BRIDGE=bgjobs0
NODE_ADDR=198.18.0.1
POD_CIDR=198.18.0.0/24
NODE_FORWARD_CHAIN=BGJOBS-NODE-FORWARD
PAUSE_IMAGE=localhost/bgjobs/pause:3.2
CNI_BIN=/usr/lib/cni
NO_PULL_PROXY=http://127.0.0.1:9

install_node_packages() {
  local missing=()
  command -v containerd >/dev/null || missing+=(containerd)
  command -v runc >/dev/null || missing+=(runc)
  [ -x $CNI_BIN/bridge ] || missing+=(containernetworking-plugins)
  command -v conntrack >/dev/null || missing+=(conntrack)
  command -v iptables >/dev/null || missing+=(iptables)
  command -v ip >/dev/null || missing+=(iproute2)
  command -v buildah >/dev/null || missing+=(buildah)
  command -v gcc >/dev/null || missing+=(gcc)
  [ -e /usr/lib/x86_64-linux-gnu/libc.a ] || [ -e /usr/lib/aarch64-linux-gnu/libc.a ] || missing+=(libc6-dev)
  [ ${#missing[@]} -eq 0 ] || apt_install "$CACHE/apt-node.log" "${missing[@]}"
}

# kubelet, kube-proxy and the pause program, built from the source package the control plane is built from (with
# it, by build_binaries --node).
node_binaries_built() { [ -x "$BIN/kubelet" ] && [ -x "$BIN/kube-proxy" ] && [ -x "$BIN/pause" ]; }

# The pause program holds a Pod's namespaces; static, so the image needs nothing else. From the tree just built.
build_pause() { # log
  gcc -Os -static -o "$BIN/pause" "$BUILT_TREE/build/pause/linux/pause.c" >>"$1" 2>&1 || fail "build pause" "$1"
}

# An image from one static binary: no registry is reachable, so images are made here and imported into containerd.
# buildah's vfs driver needs no overlay mounts of its own; its storage is the cache's.
build_static_image() { # name, binary, entrypoint path, archive
  local name=$1 binary=$2 entry=$3 archive=$4 log=$CACHE/images.log ctr
  [ -f "$archive" ] && return 0
  local store=(--root "$CACHE/buildah/root" --runroot "$CACHE/buildah/run" --storage-driver vfs)
  ctr=$(buildah "${store[@]}" from scratch 2>>"$log") || fail "buildah from scratch" "$log"
  buildah "${store[@]}" copy "$ctr" "$binary" "$entry" >>"$log" 2>&1 || fail "buildah copy $binary" "$log"
  buildah "${store[@]}" config --entrypoint "[\"$entry\"]" "$ctr" >>"$log" 2>&1 || fail "buildah config" "$log"
  buildah "${store[@]}" commit "$ctr" "$name" >>"$log" 2>&1 || fail "buildah commit $name" "$log"
  buildah "${store[@]}" rm "$ctr" >>"$log" 2>&1 || true
  buildah "${store[@]}" push "$name" "oci-archive:$archive.tmp:$name" >>"$log" 2>&1 || fail "buildah push $name" "$log"
  mv "$archive.tmp" "$archive"
}

node_images() {
  mkdir -p "$CACHE/images"
  build_static_image "$PAUSE_IMAGE" "$BIN/pause" /pause "$CACHE/images/pause.tar"
}

# --- run ------------------------------------------------------------------------------------------------------

# The bridge exists before the apiserver starts: the apiserver binds its address.
create_node_network() {
  if ! ip link show "$NODE_BRIDGE" >/dev/null 2>&1; then
    as_root ip link add "$NODE_BRIDGE" type bridge
    echo created >"$STATE/bridge.created"
  fi
  ip -4 addr show dev "$NODE_BRIDGE" | grep -q " $NODE_ADDR/" || as_root ip addr add "$NODE_ADDR/24" dev "$NODE_BRIDGE"
  as_root ip link set "$NODE_BRIDGE" up
  # Nothing from a Pod leaves the bridge for another interface, whatever else turns forwarding on.
  as_root iptables -N "$NODE_FORWARD_CHAIN" 2>/dev/null || as_root iptables -F "$NODE_FORWARD_CHAIN"
  as_root iptables -A "$NODE_FORWARD_CHAIN" -i "$NODE_BRIDGE" ! -o "$NODE_BRIDGE" -j DROP
  as_root iptables -C FORWARD -j "$NODE_FORWARD_CHAIN" 2>/dev/null || as_root iptables -I FORWARD -j "$NODE_FORWARD_CHAIN"
}

write_node_config() {
  local d=$STATE/node
  mkdir -p "$d/containerd" "$d/cni/net.d" "$d/kubelet" "$d/logs"
  cat >"$d/containerd/config.toml" <<EOF
version = 2
root = "$d/containerd/root"
state = "$d/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "$d/containerd/containerd.sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  # This machine refuses to lower a process's oom_score_adj (the kubelet asks -998 for a Pod's sandbox): keep
  # containers at containerd's own value or above.
  restrict_oom_score_adj = true
  # Pods' network namespaces under the state folder, where the script's down finds whatever a crash left.
  netns_mounts_under_state_dir = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "$CNI_BIN"
    conf_dir = "$d/cni/net.d"
EOF
  # isGateway stays off: the plugin would turn on IP forwarding. The bridge already has the gateway address.
  cat >"$d/cni/net.d/10-bgjobs.conflist" <<EOF
{
  "cniVersion": "0.4.0",
  "name": "bgjobs",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$NODE_BRIDGE",
      "isGateway": false,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "dataDir": "$d/cni/ipam",
        "ranges": [[{"subnet": "$POD_CIDR", "rangeStart": "198.18.0.10", "gateway": "$NODE_ADDR"}]],
        "routes": [{"dst": "0.0.0.0/0", "gw": "$NODE_ADDR"}]
      }
    }
  ]
}
EOF
  : >"$d/resolv.conf" # Pods resolve no names: no DNS server is reachable, and none is asked
  local kubelet_port healthz_port
  kubelet_port=$(free_port)
  healthz_port=$(free_port)
  printf 'kubelet_healthz_port=%s\n' "$healthz_port" >>"$STATE/ports.env"
  cat >"$d/kubelet/config.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $NODE_ADDR
port: $kubelet_port
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: $healthz_port
cgroupDriver: cgroupfs
failSwapOn: false
resolvConf: $d/resolv.conf
authentication:
  anonymous: {enabled: true}
  webhook: {enabled: false}
authorization: {mode: AlwaysAllow}
serializeImagePulls: false
# A test machine's disk is shared with builds (an operator image build in buildah's vfs store takes tens of GiB for
# a while): never evict for disk, and never collect the images built here (no registry can give them back). Under
# disk pressure the kubelet deletes every unused image whatever imageGCHighThresholdPercent says; once it deleted the
# pause image, and no Pod could start again until the node was restarted.
evictionHard: {memory.available: "100Mi", nodefs.available: "0%", imagefs.available: "0%"}
imageGCHighThresholdPercent: 100
EOF
}

start_node() {
  local d=$STATE/node
  step "starting containerd, the kubelet and kube-proxy (node $NODE_NAME on $NODE_ADDR)"
  write_node_config
  # No image is ever pulled: the node runs only images built here and imported. Should a Pod name another one, its
  # pull goes to a proxy on a loopback port where nothing listens (9, discard), so not even a name lookup leaves this
  # machine (Go's HTTP client asks the proxy to resolve).
  start containerd env HTTP_PROXY="$NO_PULL_PROXY" HTTPS_PROXY="$NO_PULL_PROXY" NO_PROXY= \
    containerd --config "$d/containerd/config.toml"
  wait_for containerd "$STATE/logs/containerd.log" ctr --address "$d/containerd/containerd.sock" version
  as_root tr '\0' '\n' <"/proc/$(cat "$STATE/containerd.pid")/environ" | grep -qx "HTTPS_PROXY=$NO_PULL_PROXY" ||
    fail "containerd runs without the no-pull proxy" "$STATE/logs/containerd.log"
  node_images
  ctr --address "$d/containerd/containerd.sock" -n k8s.io images import "$CACHE/images/pause.tar" \
    >"$d/logs/import.log" 2>&1 || fail "import the pause image" "$d/logs/import.log"
  # The conntrack flags at 0 leave the machine's conntrack settings alone.
  start kube-proxy "$BIN/kube-proxy" --kubeconfig "$STATE/kubeconfig" --hostname-override "$NODE_NAME" \
    --proxy-mode iptables --cluster-cidr "$POD_CIDR" --bind-address "$NODE_ADDR" \
    --healthz-bind-address "127.0.0.1:$(free_port)" --metrics-bind-address "127.0.0.1:$(free_port)" \
    --conntrack-max-per-core 0 --conntrack-tcp-timeout-established 0 --conntrack-tcp-timeout-close-wait 0
  # The kubelet's cAdvisor asks a cloud's metadata service (a link-local address) about the machine when the
  # machine's DMI names that cloud: GCE's client is pointed at a dead loopback port, AWS's is turned off.
  start kubelet env GCE_METADATA_HOST=127.0.0.1:9 AWS_EC2_METADATA_DISABLED=true \
    "$BIN/kubelet" --config "$d/kubelet/config.yaml" --kubeconfig "$STATE/kubeconfig" \
    --container-runtime remote --container-runtime-endpoint "unix://$d/containerd/containerd.sock" \
    --root-dir "$d/kubelet/root" --cert-dir "$d/kubelet/pki" --hostname-override "$NODE_NAME" \
    --node-ip "$NODE_ADDR"
  wait_for "node $NODE_NAME Ready" "$STATE/logs/kubelet.log" \
    kubectl --kubeconfig "$STATE/kubeconfig" wait --for=condition=Ready --timeout=5s "node/$NODE_NAME"
}

# The kubelet's own iptables chains (KUBE-FIREWALL, KUBE-MARK-*, canaries), which kube-proxy's cleanup leaves: the
# rules that jump to them first, then the chains.
drop_kube_chains() {
  local table rule chain
  for table in filter nat mangle; do
    as_root iptables -t "$table" -S 2>/dev/null | { grep -E '^-A [A-Z]+ .*-j KUBE-' || true; } |
      while read -r rule; do eval "as_root iptables -t $table ${rule/-A/-D}" 2>/dev/null || true; done
    # (eval: the rules' comments are quoted)
    for chain in $(as_root iptables -t "$table" -S 2>/dev/null | sed -n 's/^-N \(KUBE-[A-Z0-9-]*\)$/\1/p'); do
      as_root iptables -t "$table" -F "$chain" 2>/dev/null || true
    done
    for chain in $(as_root iptables -t "$table" -S 2>/dev/null | sed -n 's/^-N \(KUBE-[A-Z0-9-]*\)$/\1/p'); do
      as_root iptables -t "$table" -X "$chain" 2>/dev/null || true
    done
  done
}

node_running() { running containerd || running kubelet || running kube-proxy; }

# Stop what start_node started, then take away what its Pods left: containers, network namespaces, mounts,
# kube-proxy's rules, the bridge.
stop_node() {
  grep -qs '^node=1$' "$STATE/ports.env" || return 0
  local d=$STATE/node sock=$STATE/node/containerd/containerd.sock
  for name in kubelet kube-proxy; do stop_by_pid "$name"; done
  if running containerd; then
    local id
    for id in $(ctr --address "$sock" -n k8s.io tasks ls -q 2>/dev/null); do
      ctr --address "$sock" -n k8s.io tasks kill -s SIGKILL "$id" >/dev/null 2>&1 || true
    done
    sleep 1
    for id in $(ctr --address "$sock" -n k8s.io tasks ls -q 2>/dev/null); do
      ctr --address "$sock" -n k8s.io tasks delete -f "$id" >/dev/null 2>&1 || true
    done
    stop_by_pid containerd
  fi
  # Mounts under the state folder (overlay roots, shm, Secrets' tmpfs, network namespaces), deepest first.
  if [ -d "$d" ]; then
    findmnt -rn -o TARGET | { grep "^$d/" || true; } | sort -r | while read -r m; do as_root umount -l "$m" || true; done
  fi
  [ -x "$BIN/kube-proxy" ] && as_root "$BIN/kube-proxy" --cleanup >/dev/null 2>&1 || true
  drop_kube_chains
  if as_root iptables -C FORWARD -j "$NODE_FORWARD_CHAIN" 2>/dev/null; then
    as_root iptables -D FORWARD -j "$NODE_FORWARD_CHAIN"
  fi
  as_root iptables -F "$NODE_FORWARD_CHAIN" 2>/dev/null && as_root iptables -X "$NODE_FORWARD_CHAIN" 2>/dev/null || true
  if [ -f "$STATE/bridge.created" ]; then as_root ip link del "$NODE_BRIDGE" 2>/dev/null || true; fi
  # The kubelet's cgroups (cgroupfs driver), now empty.
  local c
  for c in /sys/fs/cgroup/*/kubepods; do
    [ -d "$c" ] && find "$c" -depth -type d -exec rmdir {} \; 2>/dev/null || true
  done
}
