#!/usr/bin/env bash
# Builds the local base image the Dockerfile's runtime stages start from, for machines that
# cannot pull images: a minimal Debian root file system made with debootstrap, imported with
# `docker import`. The mirror is read from this machine's own apt sources, so nothing here
# names a host. Idempotent: does nothing when the tag already exists.
#
#   scripts/base-image.sh [TAG]        (default pbft-base:bookworm)
set -euo pipefail

tag="${1:-pbft-base:bookworm}"
suite="$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")"

if docker image inspect "$tag" >/dev/null 2>&1; then
    echo "base image $tag exists"
    exit 0
fi

if ! command -v debootstrap >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap
fi

# The first deb822 `URIs:` or one-line `deb` entry of the machine's apt sources.
mirror="$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '/^URIs:/ {print $2; exit}')"
if [ -z "$mirror" ]; then
    mirror="$(grep -hE '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null | awk '{print $2; exit}')"
fi
if [ -z "$mirror" ]; then
    echo "no apt mirror found in /etc/apt: cannot debootstrap" >&2
    exit 1
fi

root="$(mktemp -d)"
trap 'rm -rf "$root"' EXIT
echo "debootstrap --variant=minbase $suite (takes about a minute)"
debootstrap --variant=minbase "$suite" "$root" "$mirror" >/dev/null
# Nothing in the runtime needs apt's caches, docs or locales.
rm -rf "$root"/var/cache/apt/* "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* \
    "$root"/usr/share/man/* "$root"/usr/share/locale/*
tar -C "$root" -c . | docker import - "$tag" >/dev/null
echo "base image $tag built"
