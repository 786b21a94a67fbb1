#!/usr/bin/env bash
# compute-sanitizer over the GPU suite with each test split into shards
# (RESA_TEST_SHARD=k/n, tests/harness.c th_add_loop), all shards of all tools
# at once, RESA_SANITIZE_JOBS of them running (default 6: 16 sanitized
# processes on one H100, beside 3 tests, all ran past 270 s without a
# summary on 2026-12-06, where 4 at once had finished).  Called by
# scripts/device-run.sh sanshards.
#   scripts/sanitize-shards.sh BUILD OUT
# Env: RESA_SANITIZE_TOOLS (default memcheck racecheck initcheck synccheck),
#      RESA_SANITIZE_SHARDS (default 4), RESA_SANITIZE_TIMEOUT (s, default 1800),
#      RESA_SANITIZE_TESTS (names from the list below, default all of them),
#      RESA_SANITIZE_PAIRS ("tool:test[/shards] ..." in the order to start them;
#      replaces the two above; /shards overrides RESA_SANITIZE_SHARDS for that
#      run, e.g. racecheck:check_cuda/8 beside memcheck:check_cuda/2),
#      RESA_SANITIZE_FLAGS (more compute-sanitizer flags for every run, e.g.
#      "--racecheck-report all", which prints each hazard with its kind,
#      RAW, WAR or WAW, beside the analysis),
#      RESA_SANITIZE_BUDGET (s from the start, default none): a run that would
#      start after it is listed as not run, and every run is cut at it, so
#      that a device call ends in time with the runs that finished reported.
# Writes OUT/sanshard-<tool>-<test>-<k>.log, OUT/sanshards-progress.txt (a line as
# each run ends) and prints one line per run and a
# summary; exit 0 only when every run exited 0 with "ERROR SUMMARY: 0 errors"
# (racecheck: "0 hazards").
set -uo pipefail
build=$1 out=$2
tools=${RESA_SANITIZE_TOOLS:-memcheck racecheck initcheck synccheck}
n=${RESA_SANITIZE_SHARDS:-4}
export RESA_CUDA_MODULE=$PWD/$build/cuda/libresa-cuda.so.0
export LD_LIBRARY_PATH=$PWD/$build/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
# name|environment|command: the GPU tests of tests/meson.build and
# tests/soak/meson.build with their environments; the fault tests and
# check_cuda_oom fault on purpose and stay out (device-run.sh says why).
# The non-finite tests run at RESA_TEST_QUICK=2, one poison case a
# configuration (every case over the eight): at 1 every tool's shard of
# eight ran past 650-900 s on an H100 (2026-12-07); memcheck passed both at 1
# on 2026-12-06
tests=(
  "check_cuda|RESA_TEST_QUICK=1|$build/tests/check_cuda"
  "check_cuda_cp_async|RESA_TEST_QUICK=1 RESA_CUDA_NO_TMA=1|$build/tests/check_cuda"
  "check_cuda_splits|RESA_TEST_QUICK=1 RESA_CUDA_SPLITS_MAX=3|$build/tests/check_cuda"
  "check_nonfinite_cuda|RESA_TEST_QUICK=2|$build/tests/check_nonfinite cuda"
  "check_nonfinite_cuda_mma|RESA_TEST_QUICK=2 RESA_CUDA_NO_WGMMA=1|$build/tests/check_nonfinite cuda"
  "check_cp_cuda||$build/tests/check_cp cuda"
  "soak_diff||$build/tests/soak/soak_diff 20"
)
# RESA_SANITIZE_PAIRS="tool:test ...", when set, replaces the tools x tests
# matrix with those runs, started in that order (the most wanted first, so
# that a budget cut drops the least wanted)
pairs=${RESA_SANITIZE_PAIRS:-}
if [ -z "$pairs" ]; then
  for tool in $tools; do
    for t in "${tests[@]}"; do
      name=${t%%|*}
      [[ " ${RESA_SANITIZE_TESTS:-$name} " == *" $name "* ]] && pairs="$pairs $tool:$name"
    done
  done
fi
jobs_file=$(mktemp)
for pair in $pairs; do
  tool=${pair%%:*} want=${pair#*:} found="" pn=$n
  [[ $want == */* ]] && { pn=${want#*/}; want=${want%%/*}; }
  for t in "${tests[@]}"; do
    IFS='|' read -r name env cmd <<<"$t"
    [ "$name" = "$want" ] || continue
    found=1
    # the soak has no sharded loops: one run
    shards=$pn; [[ $name == soak_diff ]] && shards=1
    for k in $(seq 0 $((shards - 1))); do
      echo "$tool|$name|$k|$shards|$env|$cmd" >>"$jobs_file"
    done
  done
  [ -n "$found" ] || { echo "sanitize-shards.sh: no test '$want' (RESA_SANITIZE_PAIRS '$pair')" >&2; exit 2; }
done
deadline=0
[ -n "${RESA_SANITIZE_BUDGET:-}" ] && deadline=$(( $(date +%s) + RESA_SANITIZE_BUDGET ))
run_one() {
  IFS='|' read -r tool name k shards env cmd <<<"$1"
  log="$out/sanshard-$tool-$name-$k.log"
  limit=${RESA_SANITIZE_TIMEOUT:-1800}
  if [ "$deadline" -gt 0 ]; then
    left=$(( deadline - $(date +%s) ))
    if [ "$left" -lt 10 ]; then
      echo "$tool $name shard $k/$shards: not run (RESA_SANITIZE_BUDGET spent)"
      return
    fi
    [ "$left" -lt "$limit" ] && limit=$left
  fi
  env $env RESA_TEST_SHARD=$k/$shards CK_FORK=no timeout $limit \
    compute-sanitizer --tool "$tool" --error-exitcode 99 --print-limit 100 ${RESA_SANITIZE_FLAGS:-} $cmd >"$log" 2>&1
  rc=$?
  sum=$(grep -h "ERROR SUMMARY\|RACECHECK SUMMARY" "$log" | grep -v "not printed" | tail -1)
  checks=$(grep -h "Checks:" "$log" | tail -1)
  line="$tool $name shard $k/$shards: exit $rc; ${checks:-no Check summary}; ${sum:-no sanitizer summary}"
  echo "$line" >>"$out/sanshards-progress.txt" # as each run ends (the summary is sorted at the end)
  echo "$line"
}
export -f run_one
export out deadline
xargs -a "$jobs_file" -d '\n' -P "${RESA_SANITIZE_JOBS:-6}" -I{} bash -c 'run_one "$@"' _ {} \
  | sort | tee "$out/sanshards.txt"
rm -f "$jobs_file"
bad=$(grep -vc "exit 0; .*\(ERROR SUMMARY: 0 errors\|0 hazards displayed (0 errors, 0 warnings)\)" "$out/sanshards.txt")
echo "sanitizer shards: $(wc -l <"$out/sanshards.txt") runs, $bad not clean"
[ "$bad" = 0 ]
