#!/usr/bin/env bash
# Builds the images a real node runs, with no registry but Debian's and crates.io:
#
#   e2e/image.sh operator   the repository's Dockerfile, as it is, with buildah -> bgjobs:<chart appVersion>
#   e2e/image.sh job        a 1 MiB job image from Debian's busybox-static   -> localhost/bgjobs/busybox:1
#   e2e/image.sh import [operator|job]
#                           both (or one), built if needed and imported into the node's containerd
#                           (e2e/cluster.sh up --node)
#   e2e/image.sh current operator
#                           exit 0 if the operator image was built from the sources as they are
#
# The Dockerfile's base images cannot be pulled here, so they are made here under the names it uses, and they are
# not the official ones:
#   debian:bookworm-slim   Debian bookworm, minbase variant, by mmdebstrap from Debian's archive;
#   rust:1.89-bookworm     the same plus a C toolchain, with this machine's Rust toolchain (rustup's, 1.89 or newer)
#                          and its CA bundle copied in; CARGO_HOME and PATH as in the official image.
# Images and archives are cached in ${BGJOBS_CACHE:-~/.cache/bgjobs}/images; the operator image is rebuilt when the
# sources it copies change. Each build compiles the operator in full (about 10 minutes on 2 cores) and keeps no build
# steps: kept, they cost 20-25 GB of disk (see keep_build_steps). BGJOBS_IMAGE_LAYERS=1 keeps them, so that a rebuild
# after a change to src/ reuses the compiled dependencies; they are then dropped when the dependencies change or when
# less than BGJOBS_IMAGE_MIN_FREE_GIB (25) GiB of disk is free.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${BGJOBS_CACHE:-$HOME/.cache/bgjobs}
IMAGES=$CACHE/images
STATE=${BGJOBS_CLUSTER_DIR:-$ROOT/.cluster}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
APP_VERSION=$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' "$ROOT/charts/bgjobs/Chart.yaml")
OPERATOR_IMAGE=docker.io/library/bgjobs:$APP_VERSION
JOB_IMAGE=localhost/bgjobs/busybox:1
# 1: keep the builder's build steps for the next build (keep_build_steps); below MIN_FREE_GIB of free disk, a build
# first drops them (prune_build_cache).
KEEP_LAYERS=${BGJOBS_IMAGE_LAYERS:-0}
MIN_FREE_GIB=${BGJOBS_IMAGE_MIN_FREE_GIB:-25}
STORE=(--root "$CACHE/buildah/root" --runroot "$CACHE/buildah/run" --storage-driver vfs)
# shellcheck source=e2e/steps.sh
. "$ROOT/e2e/steps.sh"

bah() { as_root buildah "${STORE[@]}" "$@"; }
have_image() { bah inspect --type image "$1" >/dev/null 2>&1; }

install_packages() {
  local missing=()
  command -v buildah >/dev/null || missing+=(buildah)
  command -v mmdebstrap >/dev/null || missing+=(mmdebstrap)
  dpkg -s busybox-static >/dev/null 2>&1 || missing+=(busybox-static) # /bin/busybox may be the dynamic one
  [ ${#missing[@]} -eq 0 ] || apt_install "$IMAGES/apt.log" "${missing[@]}"
}

# A root filesystem from Debian's archive, as a working container (FROM scratch plus one tar layer) in $NEW_CTR;
# $NEW_CTR is empty when the image exists already.
debian_image() { # name, mmdebstrap options...
  local name=$1 tar log=$IMAGES/base.log
  tar=$IMAGES/$(echo "$1" | tr '/:' '__').tar
  shift
  NEW_CTR=
  have_image "$name" && return 0
  step "making $name from Debian's archive (mmdebstrap; log: $log)"
  as_root mmdebstrap --variant=minbase --format=tar "$@" bookworm "$tar" "$MIRROR" >>"$log" 2>&1 ||
    fail "mmdebstrap $name" "$log"
  NEW_CTR=$(bah from scratch 2>>"$log") || fail "buildah from scratch" "$log"
  bah add "$NEW_CTR" "$tar" / >>"$log" 2>&1 || fail "add the root filesystem of $name" "$log"
  rm -f "$tar"
}

base_images() {
  local toolchain log=$IMAGES/base.log
  debian_image docker.io/library/debian:bookworm-slim
  if [ -n "$NEW_CTR" ]; then
    bah config --cmd '["bash"]' "$NEW_CTR" >>"$log" 2>&1
    bah commit --rm "$NEW_CTR" docker.io/library/debian:bookworm-slim >>"$log" 2>&1 || fail "commit debian" "$log"
  fi
  toolchain=$(rustc --print sysroot 2>/dev/null) || fail "find this machine's Rust toolchain (rustc --print sysroot)"
  debian_image docker.io/library/rust:1.89-bookworm --include=ca-certificates,gcc,libc6-dev,make,pkg-config
  if [ -n "$NEW_CTR" ]; then
    local ctr=$NEW_CTR
    step "copying the Rust toolchain $(rustc --version | cut -d' ' -f2) from $toolchain into rust:1.89-bookworm"
    # Its programs and libraries, not its documentation (share/: most of its size).
    local part
    for part in bin lib libexec etc; do
      [ -d "$toolchain/$part" ] || continue
      bah copy "$ctr" "$toolchain/$part" "/usr/local/rust/$part" >>"$log" 2>&1 || fail "copy the Rust toolchain" "$log"
    done
    # cargo fetches crates over TLS. This machine may reach crates.io only through a TLS-inspecting proxy whose CA
    # only this machine trusts (/usr/local/share/ca-certificates): the local builder trusts what this machine trusts.
    if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
      bah copy "$ctr" /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt >>"$log" 2>&1 ||
        fail "copy this machine's CA bundle" "$log"
    fi
    bah config --env CARGO_HOME=/usr/local/cargo --env RUSTUP_HOME=/usr/local/rustup \
      --env PATH=/usr/local/cargo/bin:/usr/local/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
      "$ctr" >>"$log" 2>&1
    bah commit --rm "$ctr" docker.io/library/rust:1.89-bookworm >>"$log" 2>&1 || fail "commit rust" "$log"
  fi
}

# What the Dockerfile copies; the image is rebuilt when it changes.
source_digest() {
  (cd "$ROOT" && cat Dockerfile Cargo.toml Cargo.lock e2e/*/Cargo.toml tests/Cargo.toml $(git ls-files src) | sha256sum | cut -c1-16)
}

# What the Dockerfile's dependency layer is built from: while it is unchanged, that cached layer is reused.
dependency_digest() {
  (cd "$ROOT" && cat Dockerfile Cargo.toml Cargo.lock e2e/*/Cargo.toml tests/Cargo.toml | sha256sum | cut -c1-16)
}

# Free GiB on the filesystem that holds the builder's storage.
free_gib() { df -P --block-size=1G "$CACHE/buildah" | awk 'NR == 2 {print $4}'; }

# With --layers every build step is an intermediate image, and with the vfs driver each is a full copy of its file
# system (1-4 GB in the builder stage, which grows with target/): one build keeps 20-25 GB of them, and a CI run whose
# disk had less room left ran out while committing one. Without --layers the builder stage is one working container,
# removed after the build. Kept (BGJOBS_IMAGE_LAYERS=1), they filled 39 GB of disk in a day of rebuilds, and a disk that
# ran short put the node under disk pressure, whose kubelet then removed the images built here: so they go before a
# build when the dependency layer cannot be reused anyway, and before or after one when the disk runs short (the next
# build then compiles the dependencies again); the tagged images and their parents stay.
keep_build_steps() { [ "$KEEP_LAYERS" = 1 ]; }

prune_build_cache() { # dependency digest, or "" after a build
  local deps=$1 stamp=$IMAGES/bgjobs-operator.deps-digest
  keep_build_steps || return 0
  if { [ -n "$deps" ] && [ "$(cat "$stamp" 2>/dev/null)" != "$deps" ]; } || [ "$(free_gib)" -lt "$MIN_FREE_GIB" ]; then
    step "removing the builder's cached intermediate images ($(free_gib) GiB free)"
    bah rmi --prune >>"$IMAGES/operator.log" 2>&1 || true
  fi
}

operator_image() {
  mkdir -p "$IMAGES"
  install_packages
  local digest deps archive=$IMAGES/bgjobs-operator.tar log=$IMAGES/operator.log
  digest=$(source_digest)
  if [ -f "$archive" ] && [ "$(cat "$archive.digest" 2>/dev/null)" = "$digest" ]; then return 0; fi
  base_images
  deps=$(dependency_digest)
  prune_build_cache "$deps"
  step "building $OPERATOR_IMAGE from the Dockerfile (a release build: about 10 minutes on 2 cores; log: $log)"
  local layers=--layers=false
  keep_build_steps && layers=--layers
  # Host networking: cargo fetches crates from crates.io and the runtime stage runs apt-get, nothing else.
  # --force-rm: a failed build's working container (the builder's whole file system) goes too.
  bah bud --network host --pull=never "$layers" --force-rm -t "$OPERATOR_IMAGE" -f "$ROOT/Dockerfile" "$ROOT" >"$log" 2>&1 ||
    fail "build the Dockerfile" "$log"
  bah push "$OPERATOR_IMAGE" "oci-archive:$archive.tmp:$OPERATOR_IMAGE" >>"$log" 2>&1 || fail "export the image" "$log"
  mv "$archive.tmp" "$archive"
  echo "$digest" >"$archive.digest"
  echo "$deps" >"$IMAGES/bgjobs-operator.deps-digest"
  prune_build_cache ""
}

job_image() {
  mkdir -p "$IMAGES"
  install_packages
  local archive=$IMAGES/job-busybox.tar log=$IMAGES/job.log ctr
  [ -f "$archive" ] && return 0
  step "building $JOB_IMAGE from Debian's busybox-static"
  # busybox and its applets as links, so a Pod's `sh -c ...` or `sleep 5` works.
  local root=$IMAGES/job-root applet
  rm -rf "$root" && mkdir -p "$root/bin"
  cp /bin/busybox "$root/bin/busybox"
  for applet in $(/bin/busybox --list); do [ -e "$root/bin/$applet" ] || ln -s busybox "$root/bin/$applet"; done
  ctr=$(bah from scratch 2>"$log") || fail "buildah from scratch" "$log"
  bah copy "$ctr" "$root" / >>"$log" 2>&1 || fail "copy busybox" "$log"
  rm -rf "$root"
  bah config --cmd '["sh"]' "$ctr" >>"$log" 2>&1
  bah commit --rm "$ctr" "$JOB_IMAGE" >>"$log" 2>&1 || fail "commit $JOB_IMAGE" "$log"
  bah push "$JOB_IMAGE" "oci-archive:$archive.tmp:$JOB_IMAGE" >>"$log" 2>&1 || fail "export $JOB_IMAGE" "$log"
  mv "$archive.tmp" "$archive"
}

import_images() { # [operator|job]
  local sock=$STATE/node/containerd/containerd.sock log=$IMAGES/import.log archives=() a
  [ -S "$sock" ] || fail "import: no node runs (e2e/cluster.sh up --node)"
  case "${1:-all}" in
    operator | all) operator_image && archives+=("$IMAGES/bgjobs-operator.tar") ;;&
    job | all) job_image && archives+=("$IMAGES/job-busybox.tar") ;;
    operator) ;;
    *) fail "import: say operator, job or nothing (both)" ;;
  esac
  for a in "${archives[@]}"; do
    as_root ctr --address "$sock" -n k8s.io images import "$a" >>"$log" 2>&1 || fail "import $a" "$log"
    step "imported $(basename "$a") into the node's containerd"
  done
}

# Exit 0 when the operator image was built from the sources as they are.
operator_current() {
  [ "$(cat "$IMAGES/bgjobs-operator.tar.digest" 2>/dev/null)" = "$(source_digest)" ] && return 0
  echo "the operator image was not built from the current sources (or not at all): e2e/image.sh import operator" >&2
  return 1
}

case "${1:-}" in
  operator) operator_image ;;
  current) [ "${2:-}" = operator ] || fail "current: say operator"; operator_current ;;
  job) job_image ;;
  import) import_images "${2:-all}" ;;
  *) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
