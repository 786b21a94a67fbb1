#!/usr/bin/env bash
# The GPU tests of a build, without meson and without a sanitizer, all at once:
# check_cuda's full set in shards, check_nonfinite and check_cp on the CUDA
# backend, and the CPU-vs-CUDA soak.  For a build made elsewhere and carried
# (scripts/device-prebuilt.sh), where `meson test` cannot run; called by
# scripts/device-run.sh suitebg (in the background, across calls).
#   scripts/gpu-tests.sh BUILD OUT
# Env: RESA_SUITE_SHARDS (check_cuda's shards, default 6),
#      RESA_SUITE_SOAK (soak seconds, default 120), RESA_SUITE_TIMEOUT (s a
#      run, default 1500); the caller's environment passes through (e.g.
#      RESA_CUDA_NO_SCORE_OVERLAP).
# Writes OUT/suite-<name>.log, OUT/suite-progress.txt (a line as each run
# ends) and OUT/suite.txt (sorted); exit 0 only when every run exited 0.
set -uo pipefail
build=$1 out=$2
mkdir -p "$out"
export RESA_CUDA_MODULE=$PWD/$build/cuda/libresa-cuda.so.0
export LD_LIBRARY_PATH=$PWD/$build/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
n=${RESA_SUITE_SHARDS:-6}
jobs=()
for k in $(seq 0 $((n - 1))); do jobs+=("check_cuda-$k|RESA_TEST_SHARD=$k/$n|$build/tests/check_cuda"); done
for k in 0 1 2; do jobs+=("check_nonfinite_cuda-$k|RESA_TEST_SHARD=$k/3|$build/tests/check_nonfinite cuda"); done
jobs+=("check_nonfinite_cuda_mma|RESA_CUDA_NO_WGMMA=1 RESA_TEST_QUICK=1|$build/tests/check_nonfinite cuda")
jobs+=("check_cp_cuda||$build/tests/check_cp cuda")
jobs+=("soak_diff||$build/tests/soak/soak_diff ${RESA_SUITE_SOAK:-120}")
run_one() {
  IFS='|' read -r name env cmd <<<"$1"
  log="$out/suite-$name.log"
  t0=$(date +%s)
  env $env timeout ${RESA_SUITE_TIMEOUT:-1500} $cmd >"$log" 2>&1
  rc=$?
  checks=$(grep -h "Checks:\|== soak_diff summary ==\|PASS\|FAIL" "$log" | tail -1)
  line="$name: exit $rc after $(( $(date +%s) - t0 )) s; ${checks:-no summary}"
  echo "$line" >>"$out/suite-progress.txt"
  echo "$line"
}
for j in "${jobs[@]}"; do run_one "$j" & done | sort >"$out/suite.txt"
wait
cat "$out/suite.txt"
bad=$(grep -vc ": exit 0 " "$out/suite.txt")
echo "GPU tests: $(wc -l <"$out/suite.txt") runs, $bad failed or cut"
[ "$bad" = 0 ]
