#!/usr/bin/env bash
# Installs the Debian 12 packages datalakefs, its demo lake and its tests need. Idempotent: when
# every package is present it does nothing (no apt-get update).
set -euo pipefail
packages=(
  python3 python3-venv python3-dev gcc pkg-config
  fuse3 libfuse3-dev attr
  postgresql
  nginx libnginx-mod-http-dav-ext
  xrootd-server xrootd-server-plugins xrootd-client xrootd-client-plugins xrootd-scitokens-plugins xrootd-fuse
  rclone rsync openssl curl iproute2 procps
  systemd strace  # the tests: systemd-analyze/systemd-escape check the units, strace counts xattr calls
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[[ ${#missing[@]} -eq 0 ]] && exit 0
echo "installing system packages: ${missing[*]}"
sudo=()
[[ $(id -u) -eq 0 ]] || sudo=(sudo)
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -q
"${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
