#!/usr/bin/env bash
# `make demo`: starts a container from a ~430 MB python-shaped image (23,000 files; its entry
# point reads the ~320 files an `import numpy, pandas` would) two ways, from a throw-away
# registry on this machine:
#   - `lazypull run --rm IMAGE`: layers mounted lazily (eStargz), chunks fetched on demand;
#   - a full pull: `skopeo copy` + `umoci raw unpack` + `runc run`;
# and says how long each took until the container printed its first line, and how many bytes
# each fetched. The work is done by the run-bench benchmark in its demo mode
# (benches/src/bin/run-bench.rs; `make bench` runs the full version).
#
# For a fresh Debian 12 machine: installs what is missing with apt-get (docker-registry, runc,
# fuse3, busybox-static, skopeo, umoci, curl) and builds lazypull in release mode (needs a Rust
# toolchain >= 1.85, e.g. from rustup). Needs root. Can be run again: installs and builds are
# skipped when done, and everything it starts or creates lives under one temp directory that
# is removed on exit, also after a failure or Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\n== %s\n' "$*"; }

if [ "$(id -u)" != 0 ]; then
  echo "demo: needs root (FUSE and overlayfs mounts, runc); try: sudo make demo" >&2
  exit 1
fi

# Packages to install: one per missing command.
missing=()
need() { command -v "$1" >/dev/null 2>&1 || missing+=("$2"); }
need docker-registry docker-registry
need runc runc
need fusermount3 fuse3
need skopeo skopeo
need umoci umoci
need curl curl
# The image's entry point is the host's busybox; it must be the static build.
dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q 'ok installed' ||
  missing+=(busybox-static)
if ((${#missing[@]})); then
  say "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if [ ! -e /dev/fuse ]; then
  modprobe fuse 2>/dev/null || true
  [ -e /dev/fuse ] || { echo "demo: /dev/fuse is missing and \`modprobe fuse\` did not help" >&2; exit 1; }
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "demo: no Rust toolchain: install one (>= 1.85) from https://rustup.rs, then run make demo again" >&2
  exit 1
fi

say "building lazypull and the benchmark (release; the first build takes a few minutes)"
cargo build --release -p lazypull
cargo build --release -p lazypull-benches --bin run-bench

# Everything the demo creates (registry storage, lazypull roots, the full pull's bundle) goes
# under $work: temp files follow TMPDIR. On exit, processes started from there (by PID, found
# through their command line naming $work), containers and mounts under it go, then the
# directory. run-bench cleans up after itself; this is for when it could not (killed).
work=$(mktemp -d /tmp/lazypull-demo.XXXXXX)
cleanup() {
  local status=$?
  set +e
  trap - EXIT INT TERM
  local pid pids=()
  for cmdline in /proc/[0-9]*/cmdline; do
    pid=${cmdline#/proc/}
    pid=${pid%/cmdline}
    [ "$pid" = $$ ] && continue
    if tr '\0' ' ' 2>/dev/null <"$cmdline" | grep -qF -- "$work"; then
      kill "$pid" 2>/dev/null && pids+=("$pid")
    fi
  done
  for _ in $(seq 50); do
    alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && break
    sleep 0.1
  done
  for root in "$work"/*/runc; do
    [ -d "$root" ] || continue
    for id in $(runc --root "$root" list -q 2>/dev/null); do
      runc --root "$root" delete --force "$id" >/dev/null 2>&1 || true
    done
  done
  # Deepest mount points first.
  awk -v w="$work" 'index($5, w) == 1 { print length($5), $5 }' /proc/self/mountinfo |
    sort -rn | cut -d' ' -f2- | while read -r mp; do umount -l "$mp" 2>/dev/null || true; done
  rm -rf "$work"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

say "running the demo (builds and pushes the image, then one cold start each way; about 2 minutes)"
TMPDIR=$work cargo run --release -q -p lazypull-benches --bin run-bench -- --demo
