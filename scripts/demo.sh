#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# Quick start: installs the build dependencies if any is missing (Debian 12,
# apt), builds libresa in build-demo/, and runs resa-demo on the CPU backend.
# Arguments are passed to resa-demo.   usage: bash scripts/demo.sh [ARGS...]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

packages=(meson ninja-build pkg-config check libsubunit-dev gcc python3)

missing=()
if command -v dpkg-query >/dev/null 2>&1; then
    for p in "${packages[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' ||
            missing+=("$p")
    done
else # not Debian: look for the tools themselves
    for c in meson ninja pkg-config gcc python3; do
        command -v "$c" >/dev/null 2>&1 || missing+=("$c")
    done
fi

if [ ${#missing[@]} -gt 0 ]; then
    echo "demo.sh: installing ${missing[*]}" >&2
    sudo=()
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1; then
            sudo=(sudo)
        else
            echo "demo.sh: not root and no sudo; install: ${packages[*]}" >&2
            exit 1
        fi
    fi
    export DEBIAN_FRONTEND=noninteractive
    "${sudo[@]}" apt-get update
    "${sudo[@]}" apt-get install -y "${packages[@]}"
fi

if [ ! -f build-demo/build.ninja ]; then
    meson setup build-demo
fi
ninja -C build-demo
exec ./build-demo/examples/resa-demo "$@"
