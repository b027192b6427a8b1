#!/usr/bin/env bash
# Build the Containerfile into a real OCI image where no registry but the package indexes is
# reachable (CI, this project's machines): the base image is made from Debian's own packages
# (bookworm's python3 is 3.11, as python:3.11-slim-bookworm's), and the build sees this
# machine's pip configuration and local package indexes, so pip inside it installs exactly
# as pip outside does. Production builds keep the default PYTHON_IMAGE and need none of this.
#
#   deploy/build-image.sh [TAG [BUILDAH-BUD-ARGS...]]   # default TAG: localhost/gguf-serve:ci
#   deploy/build-image.sh localhost/gguf-serve:ci --build-arg MODEL=hf:org/repo:Q4_K_M
#
# Needs buildah, podman (for `import`) and debootstrap (.ci/run installs them). Idempotent:
# the base is made once per machine, and buildah reuses unchanged layers.
set -euo pipefail
cd "$(dirname "$0")/.."
tag=${1:-localhost/gguf-serve:ci}
shift $(( $# > 0 ? 1 : 0 ))
base=localhost/py311-bookworm
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

if ! podman image exists "$base"; then
    rootfs=$(mktemp -d)
    trap 'rm -rf "$rootfs" "$rootfs.log"' EXIT
    debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
        bookworm "$rootfs" "$mirror" >"$rootfs.log" 2>&1 || { tail -20 "$rootfs.log"; exit 1; }
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | podman import -q - "$base" >/dev/null
fi

# What makes pip and apt work here, mounted read-only into every RUN (never into the image).
mounts=()
for path in /etc/pip.conf /etc/xdg/pip /opt/pypi /opt/pypi-more /opt/wheels \
            /etc/ssl/certs/ca-certificates.crt /etc/apt/apt.conf.d/99artifact-registry; do
    if [ -e "$path" ]; then mounts+=(-v "$path:$path:ro"); fi
done

buildah bud --isolation chroot --network host --layers --quiet --format docker \
    --build-arg PYTHON_IMAGE="$base" "${mounts[@]}" "$@" -t "$tag" .
