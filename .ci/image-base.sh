#!/usr/bin/env bash
# A stand-in for python:3.11-slim-bookworm, built from Debian's packages (no registry can be
# pulled here), imported into buildah's storage as $BASE (default localhost/visionserve-base).
# The Dockerfile relies on three things of the official image, made true here: `python` and
# `pip` on PATH, `pip install` outside a venv (Debian refuses it, PEP 668: its marker is
# removed), and pip reaching the registry (this machine's CA bundle is copied in). Cached as a
# tarball under $CACHE; rebuilt only when missing.  Usage: .ci/image-base.sh
set -euo pipefail
BASE=${BASE:-localhost/visionserve-base:bookworm}
CACHE=${CACHE:-$HOME/.cache/visionserve}
tarball="$CACHE/debian-bookworm-python3.11.tar"
mkdir -p "$CACHE"
if buildah inspect --type image "$BASE" >/dev/null 2>&1; then
  echo "base image $BASE is present"; exit 0
fi
if [ ! -s "$tarball" ]; then
  root=$(mktemp -d "$CACHE/rootfs.XXXXXX")
  trap 'rm -rf --one-file-system "$root"' EXIT
  echo "debootstrap bookworm (minbase + python3.11) into $root (about 70 s)"
  debootstrap --variant=minbase \
    --include=python3.11,python3.11-venv,python3-distutils,python3-pip,ca-certificates \
    bookworm "$root" http://deb.debian.org/debian >"$CACHE/debootstrap.log" 2>&1 \
    || { tail -20 "$CACHE/debootstrap.log"; exit 1; }
  rm -f "$root"/usr/lib/python3*/EXTERNALLY-MANAGED
  ln -sf python3.11 "$root/usr/bin/python"
  ln -sf pip3 "$root/usr/bin/pip"
  cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  tar -C "$root" -cf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball"
fi
container=$(buildah from scratch)
trap 'buildah rm "$container" >/dev/null 2>&1 || true' EXIT
mnt=$(buildah mount "$container")
tar -C "$mnt" -xf "$tarball"
buildah umount "$container" >/dev/null
buildah config --env PATH=/usr/local/bin:/usr/local/sbin:/usr/bin:/usr/sbin:/bin:/sbin \
  --env LANG=C.UTF-8 --cmd python3 "$container"
buildah commit --quiet --rm "$container" "$BASE" >/dev/null
echo "base image $BASE imported from $tarball"
