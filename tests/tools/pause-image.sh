#!/usr/bin/env bash
# The sandbox (pause) image of the real nodes (make up REAL=1, make test-real), built
# here from tests/tools/pause and packed with umoci (a Debian package) into
# $FERRY_TOOLS/images/pause.oci.tar as ferry.test/pause:3.10, which each node's
# containerd imports and pins as its sandbox image. Once; a second run returns at once.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${FERRY_TOOLS:-$HOME/.cache/ferry/tools}
ref=ferry.test/pause:3.10
archive="$out/images/pause.oci.tar"
stamp="$out/images/.built-pause-$(cat "$here/pause/main.go" "$here/pause/go.mod" "$0" | sha256sum | cut -c1-12)"
if [ -f "$stamp" ] && [ -f "$archive" ]; then
  echo "pause image: up to date in $archive"
  exit 0
fi
command -v umoci >/dev/null || {
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq --no-install-recommends umoci >/dev/null
}
mkdir -p "$out/images"
work=$(mktemp -d "${TMPDIR:-/tmp}/ferry-pause.XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/rootfs"
(cd "$here/pause" && GOWORK=off CGO_ENABLED=0 GOCACHE="$work/go-cache" \
  go build -trimpath -ldflags "-s -w" -o "$work/rootfs/pause" .)
tar --numeric-owner --owner=0 --group=0 -C "$work/rootfs" -cf "$work/layer.tar" .
umoci init --layout "$work/oci"
umoci new --image "$work/oci:3.10"
umoci raw add-layer --image "$work/oci:3.10" "$work/layer.tar"
umoci config --image "$work/oci:3.10" --os linux --architecture amd64 \
  --config.entrypoint /pause --config.user 65535:65535
umoci gc --layout "$work/oci"
python3 - "$work/oci/index.json" "$ref" <<'PY'
import json, sys
path, ref = sys.argv[1], sys.argv[2]
index = json.load(open(path))
for m in index["manifests"]:
    m.setdefault("annotations", {})["io.containerd.image.name"] = ref
json.dump(index, open(path, "w"))
PY
tar --numeric-owner --owner=0 --group=0 -C "$work/oci" -cf "$archive" .
rm -f "$out"/images/.built-pause-*
touch "$stamp"
echo "pause image: $ref in $archive ($(du -h "$archive" | cut -f1))"
