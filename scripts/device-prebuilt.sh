#!/usr/bin/env bash
# Builds here what a device call runs, and gathers it into one folder to carry
# (the device tool's `carry`, 64 MiB a call): libresa, the CUDA module, the GPU
# tests (check_cuda, check_nonfinite, check_cp, the fault and OOM tests,
# soak_diff), resa-bench and resa-e2e, with libsubunit beside the library (the
# tests link Check's libsubunit dynamically here; the device has none).  nvcc
# and cuBLAS are all it needs, no GPU: about 2 minutes on 2 cores for sm_90a,
# where a build on the device spends device time.
#   scripts/device-prebuilt.sh [DEST (default .pre)] [BUILD (default build-pre)]
# Env: RESA_GPU_ARCH (default 90).  Then, on the device:
#   RESA_BUILD=.pre scripts/device-run.sh PHASES
# for the phases that run binaries directly (cudashards, sanshards,
# sanmatrixbg, soak, soakbg, profile, timeline, bench, fp8kv, e2e, ...);
# those that go through `meson test` (test, gputest, gpusuite, sanitize,
# sanbg) need a meson tree built on the device.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-.pre} build=${2:-build-pre}
[ -d "$build" ] || meson setup "$build" -Dgpu=enabled -Dgpu_arch="${RESA_GPU_ARCH:-90}" \
  -Dbuildtype=release >/dev/null
targets="cuda/libresa-cuda.so.0 tests/check_cuda tests/check_nonfinite tests/check_cp
  tests/check_cuda_fault tests/check_cuda_oom tests/soak/soak_diff tools/resa-bench examples/resa-e2e"
ninja -C "$build" $targets >/dev/null
rm -rf "$dest" && mkdir -p "$dest"/{lib,cuda,tests/soak,tools,examples}
cp -a "$build"/lib/libresa.so* "$dest/lib/"
rm -rf "$dest"/lib/*.p
cp "$build/cuda/libresa-cuda.so.0" "$dest/cuda/"
cp "$build"/tests/{check_cuda,check_nonfinite,check_cp,check_cuda_fault,check_cuda_oom} "$dest/tests/"
cp "$build/tests/soak/soak_diff" "$dest/tests/soak/"
cp "$build/tools/resa-bench" "$dest/tools/"
cp "$build/examples/resa-e2e" "$dest/examples/"
sub=$(ldd "$dest/tests/check_cuda" | awk '/libsubunit/ { print $3 }')
[ -n "$sub" ] && [ -f "$sub" ] && cp -L "$sub" "$dest/lib/"
# the tests and tools find libresa through their runpath ($ORIGIN/../lib and
# deeper); resa-e2e's is this machine's absolute build path, so device-run.sh
# puts $RESA_BUILD/lib on LD_LIBRARY_PATH
for b in "$dest"/tests/check_cuda "$dest"/tests/soak/soak_diff "$dest"/tools/resa-bench; do
  ldd "$b" | grep -q "not found" && { echo "device-prebuilt.sh: $b misses a library:" >&2; ldd "$b" | grep "not found" >&2; exit 1; }
done
echo "$dest: $(du -sh "$dest" | cut -f1) ($(git rev-parse --short HEAD)$(git diff --quiet HEAD -- cuda lib include tests tools examples || echo ', with uncommitted changes')); carry [\"$dest\"], run with RESA_BUILD=$dest"
