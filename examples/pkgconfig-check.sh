#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# Builds examples/host_engine.c against an INSTALLED libresa through
# pkg-config, then runs it without LD_LIBRARY_PATH.  Exit status 0 on success.
#
#   usage: examples/pkgconfig-check.sh PREFIX
#
# PREFIX is meson's --prefix, or DESTDIR/prefix for a staged install
# (meson install --destdir /tmp/inst  ->  /tmp/inst/usr/local).
set -euo pipefail

[ $# -eq 1 ] || { echo "usage: $0 INSTALL_PREFIX" >&2; exit 2; }
prefix=$(cd "$1" && pwd)
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cc=${CC:-cc}

# meson's libdir: lib/<multiarch> on Debian (lib/x86_64-linux-gnu), else lib64 or lib.
multiarch=$($cc -print-multiarch 2>/dev/null || true)
pc_path=''
for d in ${multiarch:+lib/$multiarch} lib64 lib; do
    if [ -d "$prefix/$d/pkgconfig" ]; then pc_path=${pc_path:+$pc_path:}$prefix/$d/pkgconfig; fi
done
if [ -z "$pc_path" ]; then
    echo "pkgconfig-check: no lib*/pkgconfig directory under $prefix" >&2
    exit 1
fi
export PKG_CONFIG_PATH=$pc_path${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}
if ! pkg-config --exists resa; then
    echo "pkgconfig-check: resa.pc not found in $pc_path" >&2
    exit 1
fi

# resa.pc names the prefix meson was configured with.  After a DESTDIR
# install the files are elsewhere, so redefine prefix (resa.pc, from
# pkgconfig/resa.pc.in, derives libdir and includedir from it).
pc=(pkg-config --define-variable=prefix="$prefix")
echo "pkgconfig-check: resa $("${pc[@]}" --modversion resa): $("${pc[@]}" --cflags --libs resa)"

# Where the installed libresa is a directory the dynamic loader searches
# (a system prefix such as /usr/local, after meson install ran ldconfig),
# the program must run with no environment variables, as a user's would.
# Elsewhere (CI installs to a temporary prefix; a DESTDIR stage) the loader
# cannot find it by itself, so link with an rpath to the installed libdir
# (never LD_LIBRARY_PATH, which would also hide a missing ldconfig).
libdir=$("${pc[@]}" --variable=libdir resa)
loader_dirs=$(ldconfig -v -N -X 2>/dev/null | sed -n 's/^\([^[:space:]][^:]*\):.*/\1/p' \
              | while read -r d; do realpath -m "$d"; done || true)
rpath=()
if grep -qxF "$(realpath -m "$libdir")" <<<"$loader_dirs"; then
    echo "pkgconfig-check: $libdir is on the loader's path: no rpath, no LD_LIBRARY_PATH"
else
    rpath=("-Wl,-rpath,$libdir")
    echo "pkgconfig-check: $libdir is not on the loader's path: linking with ${rpath[0]}"
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# shellcheck disable=SC2046 # word splitting of the pkg-config flags is intended
$cc -std=c11 -Wall -Wextra -Werror -o "$tmp/host_engine" "$here/host_engine.c" \
    $("${pc[@]}" --cflags --libs resa) "${rpath[@]}"
env -u LD_LIBRARY_PATH "$tmp/host_engine"
echo "pkgconfig-check: OK"
