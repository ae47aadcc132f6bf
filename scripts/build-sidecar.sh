#!/usr/bin/env bash
# `make sidecar`: build the sidecar image (docker/Dockerfile) with Debian's buildah, on a base image
# made by debootstrap, so that no container registry is needed. The Python packages are downloaded
# on this machine into docker/wheelhouse/ and the build installs from there only.
#
#   IMAGE   the image to build (default localhost/datalakefs-sidecar:latest)
#   BASE    the base image; made with debootstrap when missing (default localhost/debian:bookworm-debootstrap)
#   MIRROR  the Debian mirror for debootstrap (default http://deb.debian.org/debian)
#   ISOLATION  how buildah runs the RUN steps (default chroot: it needs no OCI runtime and no cgroup
#           controllers; crun refuses to run inside a machine whose cgroups are in hybrid mode)
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE=${IMAGE:-localhost/datalakefs-sidecar:latest}
BASE=${BASE:-localhost/debian:bookworm-debootstrap}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
ISOLATION=${ISOLATION:-chroot}
PYTHON=${PYTHON:-.venv/bin/python}
sudo=()
[[ $(id -u) -eq 0 ]] || sudo=(sudo)

missing=()
# podman and runc run it (make sidecar-test)
for tool in buildah debootstrap podman runc; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if [[ ${#missing[@]} -gt 0 ]]; then
  echo "installing ${missing[*]}"
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

if ! buildah inspect --type image "$BASE" >/dev/null 2>&1; then
  echo "making $BASE with debootstrap from $MIRROR"
  rootfs=$(mktemp -d /var/tmp/datalakefs-rootfs.XXXXXX)
  trap 'rm -rf "$rootfs"' EXIT
  "${sudo[@]}" debootstrap --variant=minbase bookworm "$rootfs" "$MIRROR"
  container=$(buildah from scratch)
  mountpoint=$(buildah mount "$container")
  cp -a "$rootfs"/. "$mountpoint"/
  buildah umount "$container"
  buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --cmd /bin/bash "$container"
  buildah commit --rm "$container" "$BASE"
fi

echo "downloading the Python packages into docker/wheelhouse/"
requirements=$("$PYTHON" -c 'import tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
print("\n".join(project["dependencies"] + project["optional-dependencies"]["fuse"]))')
# pyfuse3 as source (the builder compiles it), with what its build needs
"$PYTHON" -m pip download --quiet --disable-pip-version-check --dest docker/wheelhouse --no-binary pyfuse3 \
  $requirements setuptools setuptools_scm Cython wheel

buildah bud --layers --isolation "$ISOLATION" --build-arg BASE="$BASE" --build-arg PIP_OPTIONS=--no-index -f docker/Dockerfile \
  -t "$IMAGE" .
echo "built $IMAGE"
