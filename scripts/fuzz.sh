#!/usr/bin/env bash
# Fuzzes the API for a bounded time: bash scripts/fuzz.sh [SECONDS] [libFuzzer options...]
#
# Builds tests/fuzz/fuzz_api with clang, libFuzzer, AddressSanitizer and
# UndefinedBehaviorSanitizer in build-fuzz (or $RESA_FUZZ_BUILD), copies the
# checked-in corpus (tests/fuzz/corpus) to a scratch directory and runs the
# target for SECONDS (default 60) of wall time, one process.  Exit 0 when
# nothing crashed; else the crash input (crash-*, leak-*, timeout-*, oom-*)
# is left in the scratch directory, named on stderr, with the command that
# reproduces it.  Extra arguments go to libFuzzer (for example -jobs=8
# -workers=8).  docs/fuzzing.md has the long runs and the corpus upkeep.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
seconds=${1:-60}
shift || true
case $seconds in ''|*[!0-9]*) echo "fuzz.sh: SECONDS must be a whole number, got '$seconds'" >&2; exit 2;; esac

export CC=${FUZZ_CC:-clang}
if ! command -v "$CC" >/dev/null 2>&1; then
  echo "fuzz.sh: $CC not found (Debian: apt-get install clang libclang-rt-14-dev)" >&2
  exit 2
fi
build=${RESA_FUZZ_BUILD:-$root/build-fuzz}
if [ ! -f "$build/build.ninja" ]; then
  meson setup "$build" -Db_sanitize=address,undefined -Db_lundef=false -Dfuzz=true \
    -Dgpu=disabled -Dbuildtype=debugoptimized -Dexamples=false >/dev/null
fi
ninja -C "$build" tests/fuzz/fuzz_api tests/fuzz/fuzz_replay >/dev/null

work=$(mktemp -d "${TMPDIR:-/tmp}/resa-fuzz.XXXXXX")
mkdir -p "$work/corpus"
cp tests/fuzz/corpus/* "$work/corpus/" 2>/dev/null || true
echo "fuzz.sh: ${seconds}s of $build/tests/fuzz/fuzz_api from $(find "$work/corpus" -type f | wc -l) corpus files; scratch $work"

export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1:allocator_may_return_null=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-halt_on_error=1:print_stacktrace=1}
rc=0
# -entropic=0: entropic scheduling's per-feature bookkeeping took most of the
# time on this target (2.5x fewer inputs per second).  -len_control=0 with
# -max_len=1024: sessions of up to ~200 calls from the start (more coverage
# per minute than growing the length slowly).  Later arguments win.
(cd "$work" && "$build/tests/fuzz/fuzz_api" -max_total_time="$seconds" -timeout=20 -rss_limit_mb=4096 \
   -max_len=1024 -len_control=0 -entropic=0 -print_final_stats=1 "$@" corpus) >"$work/fuzz.log" 2>&1 || rc=$?
tail -n 25 "$work/fuzz.log"
crashes=()
for c in "$work"/crash-* "$work"/leak-* "$work"/timeout-* "$work"/oom-*; do
  [ -e "$c" ] && crashes+=("$c")
done
if [ $rc -ne 0 ] || [ ${#crashes[@]} -gt 0 ]; then
  echo "fuzz.sh: FAILED (libFuzzer exit $rc); log $work/fuzz.log" >&2
  for c in "${crashes[@]}"; do
    echo "fuzz.sh: reproduce with: $build/tests/fuzz/fuzz_replay $c" >&2
  done
  exit 1
fi
echo "fuzz.sh: no crash, no sanitizer report, no model mismatch in ${seconds}s; new inputs in $work/corpus"
