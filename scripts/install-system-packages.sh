#!/usr/bin/env bash
# Installs the Debian 12 packages datalakefs, its demo lake and its tests need, and makes /dev/fuse
# usable by users. Idempotent: when every package is present it installs nothing (no apt-get update).
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
# Users mount FUSE filesystems through /dev/fuse: Debian's udev rule makes it 0666, but machines and
# containers without udev keep the kernel's 0600, and then only root can mount.
fuse_device_for_users() {
  [[ -c /dev/fuse ]] || return 0
  [[ $(stat -c %a /dev/fuse) == 666 ]] && return 0
  echo "making /dev/fuse usable by users (mode 0666, as Debian's udev rule does)"
  "${sudo[@]}" chmod 0666 /dev/fuse
}
sudo=()
[[ $(id -u) -eq 0 ]] || sudo=(sudo)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [[ ${#missing[@]} -eq 0 ]]; then fuse_device_for_users; exit 0; fi
echo "installing system packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -q
"${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
fuse_device_for_users
