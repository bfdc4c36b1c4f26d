#!/usr/bin/env bash
# QEMU 10.0, the release Ferry supports, from Debian's bookworm-backports suite (bookworm
# itself has 7.2): adds the suite to apt's sources if it is missing, then installs
# qemu-system-x86 from it (an older QEMU is upgraded). Needs root. Idempotent: a QEMU 10
# already installed is left as it is.
set -euo pipefail

want_major=10
have=$(qemu-system-x86_64 --version 2>/dev/null | sed -n 's/^QEMU emulator version \([0-9]*\)\..*/\1/p' || true)
if [ -n "$have" ] && [ "$have" -ge "$want_major" ]; then
  echo "qemu: $(qemu-system-x86_64 --version | head -n1)"
  exit 0
fi

sources=/etc/apt/sources.list.d/bookworm-backports.sources
if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
  echo "qemu: adding Debian bookworm-backports to apt's sources ($sources)"
  cat > "$sources" <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
fi
echo "qemu: installing qemu-system-x86 from bookworm-backports${have:+ (replacing QEMU $have)}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends -t bookworm-backports qemu-system-x86 >/dev/null
echo "qemu: $(qemu-system-x86_64 --version | head -n1)"
