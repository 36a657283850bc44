#!/usr/bin/env bash
# Demo of what exists today: a throw-away local registry, a small image pushed into it, and
# lazypull resolving it and fetching a verified blob. (`lazypull run` replaces this once the
# runtime lands.) Needs root only for apt-get; installs docker-registry and skopeo if missing.
set -euo pipefail
cd "$(dirname "$0")/.."

for pkg in docker-registry skopeo; do
  command -v "$pkg" >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$pkg" >/dev/null; }
done
cargo build --release -q -p lazypull
LAZYPULL=$PWD/target/release/lazypull

work=$(mktemp -d)
reg_pid=
cleanup() { [ -n "$reg_pid" ] && kill "$reg_pid" 2>/dev/null; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > "$work/registry.yml" <<YML
version: 0.1
log: {level: error}
storage: {filesystem: {rootdirectory: $work/storage}}
http: {addr: 127.0.0.1:$port}
YML
docker-registry serve "$work/registry.yml" >"$work/registry.log" 2>&1 &
reg_pid=$!
for _ in $(seq 50); do curl -fs "http://127.0.0.1:$port/v2/" >/dev/null && break; sleep 0.1; done

echo "== building a one-layer image in an OCI layout"
mkdir -p "$work/rootfs/etc" "$work/oci/blobs/sha256"
echo "hello from a lazily pulled layer" > "$work/rootfs/etc/motd"
tar -C "$work/rootfs" -cf - . | gzip -n > "$work/layer.tar.gz"
layer=$(sha256sum "$work/layer.tar.gz" | cut -d' ' -f1); lsize=$(stat -c %s "$work/layer.tar.gz")
diffid=$(gzip -dc "$work/layer.tar.gz" | sha256sum | cut -d' ' -f1)
cp "$work/layer.tar.gz" "$work/oci/blobs/sha256/$layer"
printf '{"architecture":"amd64","os":"linux","config":{"Cmd":["cat","/etc/motd"]},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]}}' "$diffid" > "$work/config.json"
cfg=$(sha256sum "$work/config.json" | cut -d' ' -f1); csize=$(stat -c %s "$work/config.json")
cp "$work/config.json" "$work/oci/blobs/sha256/$cfg"
printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:%s","size":%s}]}' "$cfg" "$csize" "$layer" "$lsize" > "$work/manifest.json"
man=$(sha256sum "$work/manifest.json" | cut -d' ' -f1); msize=$(stat -c %s "$work/manifest.json")
cp "$work/manifest.json" "$work/oci/blobs/sha256/$man"
echo '{"imageLayoutVersion":"1.0.0"}' > "$work/oci/oci-layout"
printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"annotations":{"org.opencontainers.image.ref.name":"latest"}}]}' "$man" "$msize" > "$work/oci/index.json"
skopeo copy -q "oci:$work/oci:latest" "docker://127.0.0.1:$port/demo/hello:latest" --dest-tls-verify=false

echo "== lazypull inspect 127.0.0.1:$port/demo/hello"
"$LAZYPULL" inspect "127.0.0.1:$port/demo/hello"
echo "== lazypull fetch (verified) of the layer"
"$LAZYPULL" fetch "127.0.0.1:$port/demo/hello" "sha256:$layer" -o "$work/layer.out"
tar -xzOf "$work/layer.out" ./etc/motd
