#!/usr/bin/env bash
# One device call: build, check, time, PyTorch SDPA side by side, sanitizer.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/dense-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader
nvcc -std=c++17 -O3 -lineinfo -gencode arch=compute_90,code=sm_90 -Xptxas -v -I include -I lib -I cuda \
  cuda/harness/dense_harness.cu cuda/attention_dense.cu -o /tmp/dh >"$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
grep -E "registers|spill" "$OUT/build.log" | sort | uniq -c
/tmp/dh check 2>&1 | tee "$OUT/check.log" | grep -v "^ok"
tail -1 "$OUT/check.log"
/tmp/dh time 2>&1 | tee "$OUT/time.log"
[ "${SDPA:-1}" = 1 ] && PYTHONUNBUFFERED=1 timeout 150 python3 cuda/harness/sdpa_bench.py 2>&1 | tee "$OUT/sdpa.log" | grep -E "BEST|prefill|Error" 
if [ "${SAN:-1}" = 1 ]; then
  timeout 60 compute-sanitizer --tool memcheck --error-exitcode 99 /tmp/dh quick >"$OUT/memcheck.log" 2>&1; echo "memcheck rc $?"; tail -4 "$OUT/memcheck.log"
  timeout 90 compute-sanitizer --tool racecheck --error-exitcode 99 /tmp/dh quick >"$OUT/racecheck.log" 2>&1; echo "racecheck rc $?"; tail -4 "$OUT/racecheck.log"
fi
