#!/usr/bin/env bash
# Builds the local control plane's binaries (kube-apiserver, kubectl, etcd, helm)
# from the Go module proxy into a cache directory, once. A second run with the
# same versions finds the stamp file and returns at once.
#
#   tests/tools/build.sh            # builds into $FERRY_TOOLS (default ~/.cache/ferry/tools)
#   FERRY_TOOLS=/opt/ferry tests/tools/build.sh
set -euo pipefail

KUBE_VERSION=v1.37.2
ETCD_VERSION=v3.7.3
HELM_VERSION=v3.22.0

here=$(cd "$(dirname "$0")" && pwd)
out=${FERRY_TOOLS:-$HOME/.cache/ferry/tools}
stamp="$out/.built-kube-$KUBE_VERSION-etcd-$ETCD_VERSION-helm-$HELM_VERSION-$(cat "$here"/kube/go.mod "$here"/etcd/go.mod | sha256sum | cut -c1-12)"
mkdir -p "$out/bin"

if [ -f "$stamp" ] && [ -x "$out/bin/kube-apiserver" ] && [ -x "$out/bin/kubectl" ] \
   && [ -x "$out/bin/etcd" ] && [ -x "$out/bin/helm" ]; then
  echo "tools: up to date in $out/bin"
  exit 0
fi

# The wrapper modules are builds of their own, not part of any workspace.
export GOWORK=off
export GOFLAGS="${GOFLAGS:--buildvcs=false} -mod=mod"
export CGO_ENABLED=0
# A build cache of its own, removed once the binaries are in place: it grows to several
# GiB and nothing reuses it, while the Rust build that follows needs the disk.
export GOCACHE="$out/go-build-cache"

major=${KUBE_VERSION#v}; major=${major%%.*}
minor=${KUBE_VERSION#v*.}; minor=${minor%%.*}
pkg=k8s.io/component-base/version
ldflags="-s -w -X $pkg.gitVersion=$KUBE_VERSION -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor \
 -X $pkg.gitCommit=0000000000000000000000000000000000000000 -X $pkg.gitTreeState=clean \
 -X $pkg.buildDate=1970-01-01T00:00:00Z"

start=$(date +%s)
echo "tools: building kube-apiserver and kubectl $KUBE_VERSION (first time: several minutes)"
(cd "$here/kube" && go build -trimpath -ldflags "$ldflags" -o "$out/bin/kube-apiserver" ./cmd/kube-apiserver)
(cd "$here/kube" && go build -trimpath -ldflags "$ldflags" -o "$out/bin/kubectl" ./cmd/kubectl)

echo "tools: building etcd $ETCD_VERSION"
(cd "$here/etcd" && go build -trimpath -ldflags "-s -w" -o "$out/bin/etcd" .)

echo "tools: building helm $HELM_VERSION"
GOBIN="$out/bin" go install -trimpath \
  -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" \
  "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"

# Only its own stamps: build-real.sh keeps a .built-real-* one beside them.
rm -f "$out"/.built-kube-*
touch "$stamp"
rm -rf "$GOCACHE"
echo "tools: built in $(( $(date +%s) - start ))s into $out/bin"
"$out/bin/kube-apiserver" --version
"$out/bin/etcd" --version | sed -n 1p  # not head: etcd writes line by line, and head closing early killed it with SIGPIPE under pipefail
"$out/bin/helm" version --short
