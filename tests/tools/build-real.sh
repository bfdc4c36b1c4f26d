#!/usr/bin/env bash
# Builds the binaries of a real kubelet node into $FERRY_TOOLS (the same cache as
# tests/tools/build.sh), once: kubelet, kube-scheduler, kube-controller-manager and
# kube-proxy from the k8s.io/kubernetes module, containerd, ctr and the runc shim from
# the containerd module, and four CNI plugins, all from the Go module proxy; runc,
# iptables, conntrack, iproute2 and util-linux (nsenter) from Debian when missing.
# A second run with the same versions and go.mod/go.sum finds the stamp and returns
# at once. What the node needs at run time: shared/notes/real-node.md.
#
#   tests/tools/build-real.sh       # builds into $FERRY_TOOLS (default ~/.cache/ferry/tools)
set -euo pipefail

KUBE_VERSION=v1.37.2
CONTAINERD_VERSION=v2.4.2
# The newest github.com/containernetworking/plugins the module proxy served when this was written.
CNI_VERSION=v1.10.0

here=$(cd "$(dirname "$0")" && pwd)
out=${FERRY_TOOLS:-$HOME/.cache/ferry/tools}
sums=$(cat "$here"/kube/go.mod "$here"/kube/go.sum "$here"/containerd/go.mod "$here"/containerd/go.sum \
  | sha256sum | cut -c1-12)
stamp="$out/.built-real-kube-$KUBE_VERSION-containerd-$CONTAINERD_VERSION-cni-$CNI_VERSION-$sums"
kube_bins=(kubelet kube-scheduler kube-controller-manager kube-proxy)
containerd_bins=(containerd ctr containerd-shim-runc-v2)
cni_bins=(loopback bridge host-local portmap)
mkdir -p "$out/bin" "$out/cni/bin"

# Debian's packages, for the commands the node runs that are not Go modules here:
# runc (containerd's runtime), iptables (kubelet's and kube-proxy's chains, the CNI
# portmap plugin), conntrack (kube-proxy clears stale UDP entries with it), ip and
# nsenter (a second node in its own network namespace).
need=()
command -v runc >/dev/null || need+=(runc)
command -v iptables >/dev/null || need+=(iptables)
command -v conntrack >/dev/null || need+=(conntrack)
command -v ip >/dev/null || need+=(iproute2)
command -v nsenter >/dev/null || need+=(util-linux)
if [ ${#need[@]} -gt 0 ]; then
  echo "tools-real: installing ${need[*]} from Debian"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

built() {
  local b
  for b in "${kube_bins[@]}" "${containerd_bins[@]}"; do [ -x "$out/bin/$b" ] || return 1; done
  for b in "${cni_bins[@]}"; do [ -x "$out/cni/bin/$b" ] || return 1; done
}
# The real nodes' sandbox image (no registry to pull registry.k8s.io/pause from).
FERRY_TOOLS="$out" "$here/pause-image.sh"
if [ -f "$stamp" ] && built; then
  echo "tools-real: up to date in $out/bin and $out/cni/bin"
  exit 0
fi

# As in build.sh: wrapper modules of their own, static binaries, and a build cache of
# its own removed at the end (it grows to several GiB; the disk is shared).
export GOWORK=off
export GOFLAGS="${GOFLAGS:--buildvcs=false} -mod=mod"
export CGO_ENABLED=0
export GOCACHE="$out/go-build-cache-real"
trap 'rm -rf "$GOCACHE"' EXIT

start=$(date +%s)
step() { echo "tools-real: [$(( $(date +%s) - start ))s] $*"; }

# The same version ldflags as build.sh's kube-apiserver and kubectl.
major=${KUBE_VERSION#v}; major=${major%%.*}
minor=${KUBE_VERSION#v*.}; minor=${minor%%.*}
pkg=k8s.io/component-base/version
ldflags="-s -w -X $pkg.gitVersion=$KUBE_VERSION -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor \
 -X $pkg.gitCommit=0000000000000000000000000000000000000000 -X $pkg.gitTreeState=clean \
 -X $pkg.buildDate=1970-01-01T00:00:00Z"
step "building ${kube_bins[*]} $KUBE_VERSION (first time: ten minutes or more)"
(cd "$here/kube" && go build -trimpath -ldflags "$ldflags" -o "$out/bin/" "${kube_bins[@]/#/./cmd/}")

# Tags as containerd's own Makefile takes them for a static build without the
# snapshotters that need cgo or host tools (btrfs, devmapper, zfs); the shim also
# without gRPC, as the Makefile builds it.
cpkg=github.com/containerd/containerd/v2/version
cldflags="-s -w -X $cpkg.Version=$CONTAINERD_VERSION -X $cpkg.Package=github.com/containerd/containerd/v2"
tags="no_btrfs no_devmapper no_zfs"
step "building containerd and ctr $CONTAINERD_VERSION"
(cd "$here/containerd" && go build -trimpath -tags "$tags" -ldflags "$cldflags" -o "$out/bin/" ./cmd/containerd ./cmd/ctr)
step "building containerd-shim-runc-v2 $CONTAINERD_VERSION"
(cd "$here/containerd" && go build -trimpath -tags "$tags no_grpc" -ldflags "$cldflags" \
  -o "$out/bin/containerd-shim-runc-v2" ./cmd/containerd-shim-runc-v2)

# CNI plugins: the module has no replace lines, so `go install pkg@version` builds it
# as released. CNI looks for them in a directory of their own (cni/bin).
step "building CNI plugins ${cni_bins[*]} $CNI_VERSION"
m=github.com/containernetworking/plugins
GOBIN="$out/cni/bin" go install -trimpath \
  -ldflags "-s -w -X $m/pkg/utils/buildversion.BuildVersion=$CNI_VERSION" \
  "$m/plugins/main/loopback@$CNI_VERSION" "$m/plugins/main/bridge@$CNI_VERSION" \
  "$m/plugins/ipam/host-local@$CNI_VERSION" "$m/plugins/meta/portmap@$CNI_VERSION"

built || { echo "tools-real: a binary is missing after the build" >&2; exit 1; }
rm -f "$out"/.built-real-*
touch "$stamp"
rm -rf "$GOCACHE"
step "built into $out/bin and $out/cni/bin"

for b in "${kube_bins[@]}"; do printf '%-26s %s\n' "$b" "$("$out/bin/$b" --version)"; done
printf '%-26s %s\n' containerd "$("$out/bin/containerd" --version)"
printf '%-26s %s\n' ctr "$("$out/bin/ctr" --version)"
printf '%-26s %s\n' containerd-shim-runc-v2 "$("$out/bin/containerd-shim-runc-v2" -v | sed -n 's/^ *Version: *//p')"
# A CNI plugin called without CNI_COMMAND prints its "about" line (and the CNI versions) and exits.
# sed, not head, throughout: a writer that head has stopped reading dies of SIGPIPE under pipefail.
for b in "${cni_bins[@]}"; do printf '%-26s %s\n' "cni/$b" "$("$out/cni/bin/$b" 2>&1 | sed -n 1p)"; done
printf '%-26s %s\n' runc "$(runc --version | sed -n 1p)"
printf '%-26s %s\n' iptables "$(iptables --version)"
printf '%-26s %s\n' conntrack "$(conntrack --version)"
printf '%-26s %s\n' ip "$(ip -V)"
printf '%-26s %s\n' nsenter "$(nsenter --version)"
du -sh "$out/bin"/{kubelet,kube-scheduler,kube-controller-manager,kube-proxy,containerd,ctr,containerd-shim-runc-v2} \
  "$out/cni/bin"/* | sed "s|$out/||"
echo "tools-real: done in $(( $(date +%s) - start ))s"
