#!/usr/bin/env bash
# One device call: build (or use PREBUILT=path, a dh built elsewhere with the
# same lines), SASS census of the wgmma kernel, check, time (mma.sync and
# wgmma side by side), PyTorch SDPA (SDPA=0 skips), sanitizers (SAN=0 skips
# both, RACE=0 racecheck alone).  CHECK=0 / TIME=0 skip those steps;
# DH_TIME_CASES (substrings, comma-separated) and DH_TIME_PATHS=wgmma narrow
# `time` (see dense_harness.cu).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/dense-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader
build() { # $1: output binary
  local f="-std=c++17 -O3 -lineinfo -Xptxas -v -I include -I lib -I cuda"
  nvcc $f -gencode arch=compute_90a,code=sm_90a -DRESA_CUDA_SM90A=1 -c cuda/attention_dense_sm90.cu \
    -o "$1.sm90.o" && \
  nvcc $f -gencode arch=compute_90,code=sm_90 bench/harness/dense_harness.cu cuda/attention_dense.cu \
    "$1.sm90.o" -o "$1"
}
DH=/tmp/dh
if [ -n "${PREBUILT:-}" ] && "$PREBUILT" none >/dev/null 2>&1; then
  DH=$PREBUILT; echo "using $DH"
else
  build /tmp/dh >"$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
  grep -E "registers|spill" "$OUT/build.log" | sort | uniq -c
fi
"$DH" none
if command -v cuobjdump >/dev/null; then
  cuobjdump -sass "$DH" >"$OUT/sass.txt" 2>/dev/null
  echo "SASS: HGMMA $(grep -c HGMMA "$OUT/sass.txt") LDL/STL $(grep -cE '\b(LDL|STL)\b' "$OUT/sass.txt")" \
       "WARPGROUP.DEPBAR $(grep -c 'WARPGROUP.DEPBAR' "$OUT/sass.txt") USETMAXREG $(grep -c USETMAXREG "$OUT/sass.txt")"
fi
if [ "${CHECK:-1}" = 1 ]; then
  timeout ${CHECK_S:-240} "$DH" check >"$OUT/check.log" 2>&1; echo "check rc $?"
  grep -v "^ok" "$OUT/check.log" | tail -12
fi
[ "${TIME:-1}" = 1 ] && timeout ${TIME_S:-150} "$DH" time 2>&1 | tee "$OUT/time.log" | tail -9
[ "${SDPA:-1}" = 1 ] && PYTHONUNBUFFERED=1 timeout 150 python3 bench/harness/sdpa_bench.py 2>&1 | tee "$OUT/sdpa.log" | grep -E "BEST|prefill|Error"
if [ "${SAN:-1}" = 1 ]; then
  timeout 60 compute-sanitizer --tool memcheck --error-exitcode 99 "$DH" quick >"$OUT/memcheck.log" 2>&1; echo "memcheck rc $?"; tail -3 "$OUT/memcheck.log"
  if [ "${RACE:-1}" = 1 ]; then
    timeout 90 compute-sanitizer --tool racecheck --error-exitcode 99 "$DH" quick >"$OUT/racecheck.log" 2>&1; echo "racecheck rc $?"; tail -3 "$OUT/racecheck.log"
  fi
fi
