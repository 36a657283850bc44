#!/usr/bin/env bash
# Installs, with apt-get, the Debian 12 packages the tests and benchmarks drive (a real
# registry, containerd, podman, runc, FUSE, ...), skipping those already present. Idempotent;
# needs root. Used by .ci/run and `make test-deps` / the benchmark targets.
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive
need=()
for pkg_bin in iproute2:tc docker-registry:docker-registry curl:curl fuse3:fusermount3 \
  containerd:containerd stargz-snapshotter:ctr-remote runc:runc busybox-static:busybox \
  skopeo:skopeo umoci:umoci protobuf-compiler:protoc zstd:zstd podman:podman gcc-12:gcc-12; do
  pkg=${pkg_bin%%:*}; bin=${pkg_bin##*:}
  command -v "$bin" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "missing packages: ${need[*]}; run as root or: sudo apt-get install -y ${need[*]}" >&2
    exit 1
  fi
  echo "== installing ${need[*]}"
  apt-get update -qq
  apt-get install -y -qq "${need[@]}" >/dev/null
fi
# The compiler workload of the cold-start benchmark packs the host's gcc with libc6-dev.
if ! dpkg-query -W -f '${db:Status-Abbrev}' libc6-dev 2>/dev/null | grep -q '^ii'; then
  apt-get install -y -qq libc6-dev >/dev/null
fi
