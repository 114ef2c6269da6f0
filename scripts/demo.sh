#!/usr/bin/env bash
# Builds docker-delete and runs it on a copy of the sample registry in examples/sample-registry:
# serves the copy with the real registry on a loopback port, deletes two images, lets
# docker-delete garbage-collect, restart and verify, then pulls what remains. The shipped sample
# is never modified.
set -euo pipefail
cd "$(dirname "$0")/.."

need() { command -v "$1" >/dev/null 2>&1; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
if ! need docker-registry && ! need registry; then
  echo "== installing Debian's docker-registry (the real registry, used to serve the sample)" >&2
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-registry >/dev/null
fi
REGISTRY_BIN=$(command -v docker-registry || command -v registry)

echo "== building docker-delete" >&2
cargo build --release --quiet
DD="$PWD/target/release/docker-delete"

work=$(mktemp -d /tmp/docker-delete-demo.XXXXXX)
cp -r examples/sample-registry/docker "$work/"
mkdir -p "$work/docker/registry/v2/blobs" "$work/docker/registry/v2/repositories"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' 2>/dev/null || echo 5099)
cat > "$work/config.yml" <<YML
version: 0.1
log:
  level: error
storage:
  filesystem:
    rootdirectory: $work
  cache:
    blobdescriptor: inmemory
http:
  addr: 127.0.0.1:$port
YML
# How the demo restarts its registry; on a real host this is e.g. `systemctl restart docker-registry`.
cat > "$work/restart.sh" <<SH
#!/bin/sh
[ -f "$work/pid" ] && kill \$(cat "$work/pid") 2>/dev/null && sleep 0.3
setsid "$REGISTRY_BIN" serve "$work/config.yml" >>"$work/registry.log" 2>&1 </dev/null &
echo \$! > "$work/pid"
SH
chmod +x "$work/restart.sh"
cleanup() { [ -f "$work/pid" ] && kill "$(cat "$work/pid")" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
"$work/restart.sh"
for _ in $(seq 50); do curl -fs "http://127.0.0.1:$port/v2/" >/dev/null 2>&1 && break; sleep 0.1; done

export NO_COLOR=1 DOCKER_REGISTRY_DIR="$work"
opts=(--config "$work/config.yml" --no-container --restart-cmd "$work/restart.sh")
show() { echo; echo "\$ docker-delete $*"; "$DD" "${opts[@]}" "$@"; }

echo "== sample registry copied to $work, served at 127.0.0.1:$port"
echo "== storage before: $(du -sh "$work/docker" | cut -f1)"
show ls
show ls demo/app
show --dry-run demo/app:v1 demo/multi:1
show --yes demo/app:v1 demo/multi:1
echo
echo "== storage after: $(du -sh "$work/docker" | cut -f1)"
show ls demo/app
echo
for ref in demo/app:v1 demo/multi:1 demo/app:latest demo/tools/cli:1.0; do
  code=$(curl -s -o /dev/null -w '%{http_code}' \
    -H 'Accept: application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.manifest.v1+json' \
    "http://127.0.0.1:$port/v2/${ref%:*}/manifests/${ref##*:}")
  echo "GET $ref -> $code"
done
