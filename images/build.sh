#!/usr/bin/env bash
# make images: OCI images of the operator and the agent, built without a container
# engine from Debian's packages and the workspace's release binaries.
#
# For each image in images/<name>/ (image.env: variant, binaries, entrypoint, user;
# packages: the Debian packages):
#   1. mmdebstrap builds the root file system from Debian bookworm as a tar, with
#      bookworm-updates and bookworm-backports as sources (a package is taken from
#      backports only when its list says NAME/bookworm-backports, as the agent's QEMU) (the
#      operator: the packages extracted only, no shell; the agent: Debian's minimal
#      base and the packages installed, without recommends and without docs);
#   2. a second layer holds the binaries in /usr/local/bin (and, for an image
#      without a base, /etc/passwd and /etc/group naming its user);
#   3. umoci makes an OCI image layout of the two layers and the config, and the
#      layout is packed into target/images/ferry-<name>-<tag>.oci.tar, which
#      `ctr images import`, `podman load` and `kind load image-archive` read.
# Environment: TAG (default: the chart's appVersion), REPOSITORY (default: the
# chart's image.repository), OUT (default: target/images), DEBIAN_MIRROR,
# FERRY_BIN_DIR (binaries already built; default: a release build).
set -euo pipefail
cd "$(dirname "$0")/.."

chart=charts/ferry
TAG=${TAG:-$(sed -n 's/^appVersion: "\(.*\)"$/\1/p' "$chart/Chart.yaml")}
REPOSITORY=${REPOSITORY:-$(sed -n 's/^  repository: //p' "$chart/values.yaml" | head -n1)}
OUT=${OUT:-target/images}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm
IMAGES=(operator agent)

need=()
command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
command -v umoci >/dev/null || need+=(umoci)
if [ ${#need[@]} -gt 0 ]; then
  echo "images: installing ${need[*]} (Debian packages)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

binaries=()
for image in "${IMAGES[@]}"; do
  # shellcheck disable=SC1090
  binaries+=($(. "images/$image/image.env"; echo "$BINARIES"))
done
# FERRY_BIN_DIR: binaries built already (e.g. by the caller), else a release build.
if [ -z "${FERRY_BIN_DIR:-}" ]; then
  cargo build --release --locked $(printf -- '--bin %s ' "${binaries[@]}")
  FERRY_BIN_DIR=target/release
fi

mkdir -p "$OUT"
work=$(mktemp -d "${TMPDIR:-/tmp}/ferry-images.XXXXXX")
trap 'rm -rf "$work"' EXIT

rows=()
for image in "${IMAGES[@]}"; do
  (
    # shellcheck disable=SC1090
    . "images/$image/image.env"
    name="ferry-$image"
    packages=$(grep -v '^#' "images/$image/packages" | xargs | tr ' ' ',')
    dir="$work/$image"
    mkdir -p "$dir/layer/usr/local/bin"
    echo "images: $name: root file system from Debian $SUITE ($VARIANT: $packages)"
    mmdebstrap --quiet --variant="$VARIANT" --include="$packages" \
      --aptopt='APT::Install-Recommends "false"' \
      --dpkgopt='path-exclude=/usr/share/doc/*' \
      --dpkgopt='path-include=/usr/share/doc/*/copyright' \
      --dpkgopt='path-exclude=/usr/share/man/*' \
      --dpkgopt='path-exclude=/usr/share/locale/*' \
      --format=tar "$SUITE" "$dir/base.tar" \
      "deb $MIRROR $SUITE main" "deb $MIRROR $SUITE-updates main" \
      "deb $MIRROR $SUITE-backports main"
    for bin in $BINARIES; do
      install -m 0755 "$FERRY_BIN_DIR/$bin" "$dir/layer/usr/local/bin/$bin"
    done
    if [ "$VARIANT" = extract ]; then
      # No base system: the user the image runs as, and a /tmp.
      uid=${USER%%:*} gid=${USER##*:}
      mkdir -p "$dir/layer/etc" "$dir/layer/tmp"
      chmod 1777 "$dir/layer/tmp"
      printf 'root:x:0:0:root:/:/nonexistent\nnonroot:x:%s:%s:nonroot:/:/nonexistent\n' \
        "$uid" "$gid" > "$dir/layer/etc/passwd"
      printf 'root:x:0:\nnonroot:x:%s:\n' "$gid" > "$dir/layer/etc/group"
    fi
    tar --numeric-owner --owner=0 --group=0 -C "$dir/layer" -cf "$dir/ferry.tar" .

    layout="$dir/oci"
    umoci init --layout "$layout"
    umoci new --image "$layout:$TAG"
    umoci raw add-layer --image "$layout:$TAG" "$dir/base.tar"
    umoci raw add-layer --image "$layout:$TAG" "$dir/ferry.tar"
    umoci config --image "$layout:$TAG" --os linux --architecture amd64 \
      --config.entrypoint "$ENTRYPOINT" --config.user "$USER" \
      --config.env PATH=/usr/local/bin:/usr/bin:/bin \
      --config.label "org.opencontainers.image.title=$name" \
      --config.label "org.opencontainers.image.version=$TAG" \
      --config.label "org.opencontainers.image.source=$(git remote get-url origin 2>/dev/null || echo ferry)" \
      --config.label "org.opencontainers.image.revision=$(git rev-parse HEAD)"
    umoci gc --layout "$layout"
    # The full name for importers: containerd (and so kind and nerdctl) read
    # io.containerd.image.name; the OCI ref.name stays the tag.
    python3 - "$layout/index.json" "$REPOSITORY/$name:$TAG" <<'PY'
import json, sys
path, ref = sys.argv[1], sys.argv[2]
index = json.load(open(path))
for m in index["manifests"]:
    m.setdefault("annotations", {})["io.containerd.image.name"] = ref
json.dump(index, open(path, "w"))
PY
    archive="$OUT/$name-$TAG.oci.tar"
    tar --numeric-owner --owner=0 --group=0 -C "$layout" -cf "$archive" .
    packed=$(du -b "$archive" | cut -f1)
    unpacked=$(( $(du -b "$dir/base.tar" | cut -f1) + $(du -b "$dir/ferry.tar" | cut -f1) ))
    printf '%s\t%s\t%s\t%s\n' "$REPOSITORY/$name:$TAG" "$packed" "$unpacked" "$archive" \
      > "$work/$image.row"
  )
  rows+=("$(cat "$work/$image.row")")
done

mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
echo
printf '%-44s %12s %12s  %s\n' IMAGE COMPRESSED UNPACKED ARCHIVE
for row in "${rows[@]}"; do
  IFS=$'\t' read -r ref packed unpacked archive <<< "$row"
  printf '%-44s %12s %12s  %s\n' "$ref" "$(mib "$packed")" "$(mib "$unpacked")" "$archive"
done
echo
echo "Load into containerd: ctr -n k8s.io images import <archive>; kind: kind load image-archive <archive>; podman: podman load -i <archive>."
