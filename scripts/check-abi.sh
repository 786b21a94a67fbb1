#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# The ABI gate: compares libresa.so with every committed baseline abi/libresa-*.abi
# (abidw output of a release built with debug info) using libabigail's abidiff,
# and fails only on an incompatible change.  docs/ABI.md, "The ABI gate".
#
# usage: scripts/check-abi.sh [LIBRESA_SO]
#          checks LIBRESA_SO (built with -g), or builds the working tree into
#          $ABI_BUILD_DIR (default build-abi-gate: -Dgpu=disabled -Dbuildtype=debug)
#        scripts/check-abi.sh --dump LIBRESA_SO OUT.abi [HEADERS_DIR]
#          writes a baseline (at a release; HEADERS_DIR defaults to include)
#
# Per baseline, two checks:
#  1. functions and the types they reach: abidiff BASE LIB --headers-dir2
#     include, with no suppression.  Exit bit 8 (ABIDIFF_ABI_INCOMPATIBLE_CHANGE)
#     fails, but libabigail 2.2 sets it only for a removed function: a changed
#     parameter type, an added parameter, a changed enumerator value or a
#     changed resa_allocator set only bit 4 (ABIDIFF_ABI_CHANGE), which mere
#     additions set too.  So the verdict comes from a run with
#     --no-added-syms: bit 8 or bit 4 there fails; abidiff itself files new
#     enumerators as harmless.  A first run with --harmless --leaf-changes-only
#     prints everything that changed, additions included.
#  2. public types no function reaches (resa_mode, resa_summary_format): the
#     library's own abidw dump against BASE with --non-reachable-types and
#     abi/public-types.suppr (types declared outside resa.h are not ABI; the
#     dump of a build also holds glibc types the library happens to use).
#     That suppression would hide a changed parameter type in check 1
#     (int32_t -> int64_t are types of <stdint.h>), so check 1 has none.
#     A removed or changed type fails; added types pass.
# A baseline whose SONAME differs from the library's is skipped with a note:
# a SONAME bump is the one way to make an incompatible change (docs/ABI.md);
# at least one baseline must have the library's SONAME.
# Exit status: 0 compatible, 1 incompatible change, 2 usage or tool error.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
suppr="$root/abi/public-types.suppr"

die() { echo "check-abi: $*" >&2; exit 2; }
for tool in abidw abidiff readelf; do
  command -v "$tool" >/dev/null 2>&1 ||
    die "$tool not found (Debian: apt-get install abigail-tools binutils)"
done

# The one way a baseline and the library's own dump are written.
dump() { # lib out headers_dir
  abidw --headers-dir "$3" --drop-private-types --load-all-types \
        --no-corpus-path --no-comp-dir-path --out-file "$2" "$1"
}

if [ "${1:-}" = "--dump" ]; then
  [ $# -ge 3 ] || die "usage: $0 --dump LIBRESA_SO OUT.abi [HEADERS_DIR]"
  dump "$2" "$3" "${4:-$root/include}" || die "abidw failed on $2"
  grep -q "<function-decl name='resa_ctx_create'" "$3" ||
    die "$3 has no resa_ctx_create with its types: was $2 built with -g?"
  echo "check-abi: wrote $3"
  exit 0
fi

shopt -s nullglob
baselines=("$root"/abi/libresa-*.abi)
[ ${#baselines[@]} -gt 0 ] || die "no baseline in $root/abi"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

if [ $# -ge 1 ]; then
  lib=$1
  [ -f "$lib" ] || die "$lib: no such file"
else
  dir=${ABI_BUILD_DIR:-$root/build-abi-gate}
  if [ ! -f "$dir/build.ninja" ]; then
    meson setup "$dir" "$root" -Dgpu=disabled -Dbuildtype=debug -Ddefault_library=shared \
      -Dtests=false -Dexamples=false >"$tmp/build.log" 2>&1 ||
      { cat "$tmp/build.log"; die "meson setup $dir failed"; }
  fi
  ninja -C "$dir" >"$tmp/build.log" 2>&1 || { cat "$tmp/build.log"; die "ninja -C $dir failed"; }
  lib=$(readlink -f "$dir/lib/libresa.so")
fi
headers="$root/include"
dump "$lib" "$tmp/lib.abi" "$headers" || die "abidw failed on $lib"
grep -q "<function-decl name='resa_ctx_create'" "$tmp/lib.abi" ||
  die "$lib has no debug info for resa_ctx_create: build it with -g (-Dbuildtype=debug)"
soname=$(readelf -d "$lib" | sed -n 's/.*(SONAME).*\[\(.*\)\].*/\1/p')

status=0
matching=0
for base in "${baselines[@]}"; do
  name=${base#"$root"/}
  base_soname=$(sed -n "1s/.* soname='\([^']*\)'.*/\1/p" "$base")
  if [ "$base_soname" != "$soname" ]; then
    echo "check-abi: $name: skipped: it is the ABI of $base_soname, the library is $soname" \
         "(after a SONAME bump the old baselines stay, unchecked: docs/ABI.md)"
    continue
  fi
  matching=$((matching + 1))
  echo "check-abi: == $name against $lib =="
  verdict=ok
  # 1. functions and the types they reach: what changed, additions and
  #    harmless changes (new enumerators) included, then the verdict
  abidiff --fail-no-debug-info --harmless --leaf-changes-only --headers-dir2 "$headers" \
    "$base" "$lib" >"$tmp/fn.txt" 2>&1
  rc=$?
  cat "$tmp/fn.txt"
  abidiff --fail-no-debug-info --no-added-syms --headers-dir2 "$headers" \
    "$base" "$lib" >"$tmp/changed.txt" 2>&1
  rc2=$?
  if [ $((rc & 3)) -ne 0 ] || [ $((rc2 & 3)) -ne 0 ]; then
    cat "$tmp/changed.txt"
    echo "check-abi: $name: abidiff failed (exit $rc, $rc2)"; verdict=error
  elif [ $((rc2 & 8)) -ne 0 ]; then
    echo "check-abi: $name: INCOMPATIBLE: a function was removed (abidiff exit $rc2)"
    verdict=break
  elif [ $((rc2 & 4)) -ne 0 ]; then
    echo "check-abi: $name: INCOMPATIBLE: a function's signature or a type it uses changed" \
         "(abidiff --no-added-syms exit $rc2)"
    verdict=break
  elif [ $((rc & 4)) -ne 0 ]; then
    echo "check-abi: $name: functions: additions only (abidiff exit $rc; 0 without additions)"
  fi
  # 2. public types no function reaches (resa_mode, resa_summary_format, ...)
  abidiff --non-reachable-types --no-added-syms --suppressions "$suppr" \
    "$base" "$tmp/lib.abi" >"$tmp/ty.txt" 2>&1
  rc=$?
  summary=$(grep '^Unreachable types summary:' "$tmp/ty.txt" || true)
  removed=$(sed -n 's/^Unreachable types summary: \([0-9]*\) removed.*/\1/p' <<<"$summary")
  changed=$(sed -n 's/^Unreachable types summary: [^,]*, \([0-9]*\) changed.*/\1/p' <<<"$summary")
  if [ $((rc & 3)) -ne 0 ]; then
    cat "$tmp/ty.txt"
    echo "check-abi: $name: abidiff --non-reachable-types failed (exit $rc)"; verdict=error
  elif [ "${removed:-0}" != 0 ] || [ "${changed:-0}" != 0 ]; then
    sed -n '/^Unreachable types summary:/,$p' "$tmp/ty.txt"
    echo "check-abi: $name: INCOMPATIBLE: a public type that no function takes was" \
         "removed or changed"
    verdict=break
  elif [ -n "$summary" ]; then
    sed -n '/^Unreachable types summary:/,$p' "$tmp/ty.txt"
  fi
  case $verdict in
    ok) echo "check-abi: $name: compatible" ;;
    break) [ $status -eq 2 ] || status=1 ;;
    error) status=2 ;;
  esac
done
if [ $matching -eq 0 ]; then
  echo "check-abi: no baseline is of $soname: a SONAME bump commits the first baseline of" \
       "the new SONAME with it (docs/ABI.md)"
  [ $status -eq 2 ] || status=1
fi
if [ $status -eq 0 ]; then
  echo "check-abi: PASS: $lib keeps the ABI of every baseline"
else
  echo "check-abi: FAIL: see above; docs/ABI.md says when an incompatible change is allowed"
fi
exit $status
