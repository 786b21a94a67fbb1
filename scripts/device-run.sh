#!/usr/bin/env bash
# Build, GPU tests, compute-sanitizer and benchmarks on a GPU machine, in one
# call (the device tool's run, or any CUDA machine).  Usage:
#   scripts/device-run.sh [all|build|test|gputest|gpusuite|cudashards|sanitize|sanshards|sanmatrixbg|sanmatrixwait|suitebg|suitewait|sanbg|sanwait|soak|soakbg|soakwait|defaults|profile|timeline|e2e|e2eprof|e2etp|bench|fp8kv|fp8check|kf8ab|params|sweep|levers|quality] ...
# Results go to $OUT (default ./device-out): CSV tables and reports, the logs
# packed in logs-<phases>.tgz (the device tool brings back at most 8 files).
# Check comes from .device-deps (../shared/tools/device-deps.sh) when the
# machine has none installed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/device-out}
mkdir -p "$OUT"
[ -d .device-deps/pkgconfig ] && export PKG_CONFIG_PATH=$PWD/.device-deps/pkgconfig${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}
export PATH=$PATH:/usr/local/cuda/bin
phases=${1:-all}
build=${RESA_BUILD:-build-device} # RESA_BUILD: another build tree (one built elsewhere and carried)
# a carried build's binaries may hold this machine's absolute runpaths
# (resa-e2e): its library first
[ -d "$build/lib" ] && export LD_LIBRARY_PATH=$PWD/$build/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
arch=${RESA_GPU_ARCH:-90}
say() { printf '\n== %s ==\n' "$*"; }
# bg_start DIR SCRIPT LOG: copies the build's library, CUDA module and GPU
# test binaries to DIR/b and scripts/SCRIPT to DIR, then runs "bash SCRIPT b
# DIR/out" there in its own process session (a warm machine keeps it across
# calls; a call's carried files, RESA_BUILD, do not outlive the call); its
# output goes to DIR/out/LOG, its exit status to DIR/out/rc
bg_start() {
  local bg=$1 script=$2 log=$3
  rm -rf "$bg" && mkdir -p "$bg"/b/lib "$bg"/b/cuda "$bg"/b/tests/soak "$bg"/out
  cp -a $build/lib/*.so* "$bg"/b/lib/ && cp $build/cuda/libresa-cuda.so.0 "$bg"/b/cuda/ &&
    cp $build/tests/check_cuda $build/tests/check_nonfinite $build/tests/check_cp "$bg"/b/tests/ &&
    cp $build/tests/soak/soak_diff "$bg"/b/tests/soak/ && cp scripts/"$script" "$bg"/ ||
    echo "$script: the build lacks a file above"
  (cd "$bg" && setsid nohup bash -c "bash $script b $bg/out >$bg/out/$log 2>&1; echo \$? >$bg/out/rc" \
     </dev/null >/dev/null 2>&1 &)
}
# FlashInfer's rows (bench/peers/flashinfer_bench.py ARGS, batch 1,8, 20 reps):
# installed, or carried as a pruned archive in .whl/ (scripts/flashinfer-setup.sh;
# carry .whl), in a subshell, under RESA_FLASHINFER_TIMEOUT
flashinfer_rows() {
  ( source scripts/flashinfer-setup.sh
    PYTHONUNBUFFERED=1 timeout ${RESA_FLASHINFER_TIMEOUT:-300} python3 bench/peers/flashinfer_bench.py \
      --batch 1,8 --reps 20 "$@" )
}
# Python packages the GPU machine lacks, carried as wheels in .whl/ (its README):
# gguf (resa-eval reads the GGUF model) and ml_dtypes (bf16 numpy arrays) where missing.
for w in .whl/gguf-*.whl .whl/ml_dtypes-*.whl; do
  [ -f "$w" ] || continue
  mod=$(basename "$w" | cut -d- -f1)
  python3 -c "import $mod" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --no-compile "$w"
done
# The quality model travels in parts (.model/*.part-*, under the 64 MiB a call),
# with the texts (.model/texts).  A call's carried files do not outlive it, so
# each part is also kept in $RESA_MODEL_STASH, which a warm machine keeps;
# once all parts are there the model is put together and fetch-model.sh
# checks its sha256.
export RESA_MODELS=${RESA_MODELS:-$PWD/.model}
stash=${RESA_MODEL_STASH:-/tmp/resa-model-stash}
model_file=SmolLM2-135M-Instruct.Q4_1.gguf
if [ -d .model ]; then mkdir -p "$stash" && cp -r .model/. "$stash/"; fi
if [ ! -f "$RESA_MODELS/$model_file" ] && ls "$stash"/*.part-* >/dev/null 2>&1; then
  parts=$(ls "$stash"/*.part-* | wc -l)
  if [ "$parts" -ge "${RESA_MODEL_PARTS:-2}" ]; then
    mkdir -p "$RESA_MODELS"
    cat "$stash"/*.part-* > "$RESA_MODELS/$model_file"
    bash scripts/fetch-model.sh "$RESA_MODELS" || rm -f "$RESA_MODELS/$model_file"
  else
    echo "model: $parts part(s) of ${RESA_MODEL_PARTS:-2} in $stash; kept for the next call"
  fi
fi
[ -d "$stash/texts" ] && [ ! -d "$RESA_MODELS/texts" ] && cp -r "$stash/texts" "$RESA_MODELS/"

if [[ $phases == all || $phases == *build* ]]; then
  say "machine"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader | tee "$OUT/card.txt"
  nvcc --version | tail -1
  say "build (sm_$arch)"
  [ -d $build ] || meson setup $build -Dgpu=enabled -Dgpu_arch="$arch" -Dbuildtype=release >"$OUT/setup.log" 2>&1 \
    || { cat "$OUT/setup.log"; exit 1; }
  ninja -C $build >"$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
  grep -E "registers|spill" "$OUT/build.log" | sort | uniq -c | sort -rn | head -20
fi
if [[ $phases == all || $phases == *test* && $phases != *gputest* ]]; then
  say "tests (CPU and GPU)"
  meson test -C $build --print-errorlogs --num-processes 8 2>&1 | tee "$OUT/test.log" | tail -25
fi
if [[ $phases == *cudashards* ]]; then
  # check_cuda's full set in RESA_CUDA_SHARDS processes at once (RESA_TEST_SHARD=k/n):
  # the float64 reference is the long part, and one process uses one core
  n=${RESA_CUDA_SHARDS:-6}
  say "check_cuda (full set) in $n shards"
  for k in $(seq 0 $((n - 1))); do
    RESA_TEST_SHARD=$k/$n RESA_CUDA_MODULE=$PWD/$build/cuda/libresa-cuda.so.0 \
      LD_LIBRARY_PATH=$PWD/$build/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} \
      timeout ${RESA_SHARD_TIMEOUT:-600} $build/tests/check_cuda >"$OUT/check_cuda-shard$k.log" 2>&1 &
    pids="${pids:-} $!"
  done
  rcs=""; for pid in $pids; do wait $pid; rcs="$rcs $?"; done
  echo "check_cuda shards: exit statuses$rcs"
  grep -h "Checks\|:F:\|:E:" "$OUT"/check_cuda-shard*.log | head -20
fi
if [[ $phases == *gputest* ]]; then
  # the GPU suite only (CI runs the CPU tests)
  say "tests (suite gpu)"
  # RESA_GPU_TESTS: only these tests of the suite (names), e.g. all but check_cuda when
  # cudashards runs that one.  check_cuda_oom wants the GPU to itself: another
  # process allocating between its two free-memory readings fails it
  meson test -C $build --print-errorlogs --num-processes ${RESA_TEST_JOBS:-8} \
    ${RESA_GPU_TESTS:---suite gpu} 2>&1 \
    | tee "$OUT/${RESA_GPU_LOG:-test-gpu}.log" | grep -E "^ *[0-9]+/[0-9]+ |^(Ok|Fail|Skipped|Timeout|Expected)"
fi
if [[ $phases == *gpusuite* ]]; then
  # the whole GPU suite the quickest safe way (2026-12-06: check_cuda_oom
  # failed beside other GPU processes, and tests beside 16 sanitized ones ran
  # out of time): check_cuda_oom alone, then check_cuda's full set in
  # RESA_CUDA_SHARDS shards beside the other GPU tests, nothing else running
  say "GPU suite: check_cuda_oom alone, then check_cuda in shards beside the rest"
  RESA_NO_PACK=1 RESA_GPU_LOG=test-gpu-oom RESA_GPU_TESTS=check_cuda_oom bash "$0" gputest
  RESA_NO_PACK=1 RESA_CUDA_SHARDS=${RESA_CUDA_SHARDS:-5} bash "$0" cudashards &
  RESA_GPU_TESTS="check_cuda_cp_async check_cuda_splits check_cuda_fault_end check_cuda_fault_sync check_cuda_fault_begin soak_diff check_nonfinite_cuda check_nonfinite_cuda_mma check_cp_cuda python_torch_cuda" \
    RESA_NO_PACK=1 RESA_TEST_JOBS=${RESA_TEST_JOBS:-5} bash "$0" gputest
  wait
fi
# every GPU test of the suite under one compute-sanitizer tool, through
# meson's --wrapper so that each keeps its own environment
# (check_nonfinite_cuda_mma's RESA_CUDA_NO_WGMMA=1); left out: the fault
# tests, which fault on purpose, check_cuda_oom, whose cudaMalloc failures are
# on purpose too (memcheck counts each failed API call as an error), and the
# torch test (an uninstrumentable interpreter).  RESA_TEST_QUICK=1 shrinks
# check_cuda; soak_diff runs its short test length.  Each tool keeps its own
# meson log (--logbase), so that several tools can run at once.
san_tests=${RESA_SANITIZE_TESTS:-check_cuda check_cuda_cp_async check_cuda_splits check_nonfinite_cuda check_nonfinite_cuda_mma check_cp_cuda soak_diff}
sanitize_one() { # tool -> $OUT/sanitize-$tool.log, sanitize-$tool-testlog.log, summary line
  local tool=$1
  RESA_TEST_QUICK=1 CK_FORK=no meson test -C $build --no-rebuild --print-errorlogs \
    --num-processes ${RESA_SANITIZE_JOBS:-1} --logbase sanitize-$tool \
    --timeout-multiplier ${RESA_SANITIZE_TIMEOUT_MULT:-20} \
    --wrapper "compute-sanitizer --tool $tool --error-exitcode 99 --print-limit 1000" $san_tests \
    >"$OUT/sanitize-$tool.log" 2>&1
  local rc=$?
  # every test's own summary line (meson keeps each test's output in its log)
  cat $build/meson-logs/sanitize-$tool*.txt >"$OUT/sanitize-$tool-testlog.log" # meson appends the wrapper name
  echo "$tool: exit $rc; ERROR SUMMARY lines: $(grep -h 'ERROR SUMMARY' "$OUT/sanitize-$tool-testlog.log" | grep -v 'not printed' | sort | uniq -c | tr '\n' ';')"
  grep -E "^ *[0-9]+/[0-9]+ " "$OUT/sanitize-$tool.log" | tail -8
}
if [[ $phases == all || $phases == *sanitize* ]]; then
  say "compute-sanitizer over the GPU suite: ${RESA_SANITIZE_TOOLS:-memcheck racecheck initcheck synccheck}"
  for tool in ${RESA_SANITIZE_TOOLS:-memcheck racecheck initcheck synccheck}; do sanitize_one $tool; done
fi
if [[ $phases == *sanshards* ]]; then
  # every tool over the GPU suite, each test in RESA_SANITIZE_SHARDS shards, all
  # at once (scripts/sanitize-shards.sh): the quickest way to the whole matrix
  say "compute-sanitizer, sharded: ${RESA_SANITIZE_TOOLS:-memcheck racecheck initcheck synccheck}"
  bash scripts/sanitize-shards.sh $build "$OUT" | tail -60
fi
if [[ $phases == *sanmatrixwait* ]]; then
  # up to RESA_SANMATRIX_WAIT s (default 540) for sanmatrixbg's runs, then
  # their summary lines so far and every log, packed (sanmatrix.tgz)
  bg=/tmp/resa-sanmatrix
  say "compute-sanitizer matrix (background): waiting up to ${RESA_SANMATRIX_WAIT:-540} s"
  if [ -d $bg/out ]; then
    end=$(( $(date +%s) + ${RESA_SANMATRIX_WAIT:-540} ))
    while [ $(date +%s) -lt $end ]; do
      [ -f $bg/out/rc ] && { [ -z "${RESA_BG_SOAK_SECONDS:-}" ] || [ -f $bg/out/soak.rc ]; } && break
      sleep 5
    done
    echo "t = $(( $(date +%s) - $(cat $bg/t0) )) s; matrix exit: $(cat $bg/out/rc 2>/dev/null || echo running); soak exit: $(cat $bg/out/soak.rc 2>/dev/null || echo -)"
    sort $bg/out/sanshards-progress.txt 2>/dev/null
    echo "still running: $(pgrep -fc 'compute-sanitizer --tool') sanitized processes"
    sed -n '/== soak_diff summary ==/,$p' $bg/out/soak.log 2>/dev/null
    (cd $bg && tar czf "$OUT/sanmatrix.tgz" out)
  else
    echo "sanmatrixwait: no $bg (not started, or the machine was not warm)"
  fi
fi
if [[ $phases == *sanbg* ]]; then
  # the tools at once, in their own process session so that they outlive this
  # call (a warm machine keeps setsid processes); "sanwait" collects them
  say "compute-sanitizer in the background: ${RESA_SANITIZE_TOOLS:-memcheck racecheck initcheck synccheck}"
  mkdir -p /tmp/resa-san
  for tool in ${RESA_SANITIZE_TOOLS:-memcheck racecheck initcheck synccheck}; do
    rm -rf /tmp/resa-san/$tool && mkdir -p /tmp/resa-san/$tool
    OUT=/tmp/resa-san/$tool setsid nohup bash -c "cd $PWD; source <(sed -n '/^sanitize_one()/,/^}/p' scripts/device-run.sh); \
      build=$build san_tests='$san_tests' sanitize_one $tool >/tmp/resa-san/$tool/summary.txt 2>&1; \
      echo done >/tmp/resa-san/$tool/rc" </dev/null >/dev/null 2>&1 &
  done
  sleep 2; echo "started: $(ls /tmp/resa-san)"
fi
if [[ $phases == *sanwait* ]]; then
  say "compute-sanitizer (background): waiting"
  for d in /tmp/resa-san/*/; do
    while [ ! -f $d/rc ]; do sleep 5; done
    cat $d/summary.txt; cp $d/sanitize-*.log "$OUT/"
  done
fi
if [[ $phases == *soakbg* ]]; then
  # the soak below, started in its own process session so that it outlives this
  # call (the device tool keeps setsid processes of a warm machine): a 10-minute
  # soak does not fit one call next to the build.  Later calls on the same warm
  # machine run other phases meanwhile; "soakwait" collects it.
  say "differential soak in the background, ${RESA_SOAK_SECONDS:-600} s"
  mkdir -p /tmp/resa-soak && rm -f /tmp/resa-soak/*
  RESA_CUDA_MODULE=$PWD/$build/cuda/libresa-cuda.so.0 setsid nohup bash -c \
    "timeout $(( ${RESA_SOAK_SECONDS:-600} + 120 )) $PWD/$build/tests/soak/soak_diff ${RESA_SOAK_SECONDS:-600} \
       >/tmp/resa-soak/soak.log 2>&1; echo \$? >/tmp/resa-soak/rc" </dev/null >/dev/null 2>&1 &
  sleep 2; echo "started (uid $(id -u)); log so far:"; head -5 /tmp/resa-soak/soak.log
fi
if [[ $phases == *soakwait* ]]; then
  say "differential soak (background): waiting for it"
  while [ ! -f /tmp/resa-soak/rc ]; do sleep 5; done
  cp /tmp/resa-soak/soak.log "$OUT/soak.log"
  echo "soak_diff: exit $(cat /tmp/resa-soak/rc)"
  sed -n '/== soak_diff summary ==/,$p' "$OUT/soak.log" | tee "$OUT/soak.txt"
  grep -m 20 MISMATCH "$OUT/soak.log" | tee -a "$OUT/soak.txt"
fi
if [[ $phases == *soak* && $phases != *soakbg* && $phases != *soakwait* ]]; then
  # the CPU-vs-CUDA differential soak (tests/soak/soak_diff.c, docs/reliability.md);
  # RESA_SOAK_SEED reproduces a run
  say "differential soak, CUDA against CPU, ${RESA_SOAK_SECONDS:-600} s"
  export RESA_CUDA_MODULE=$PWD/$build/cuda/libresa-cuda.so.0
  timeout $(( ${RESA_SOAK_SECONDS:-600} + 120 )) $build/tests/soak/soak_diff ${RESA_SOAK_SECONDS:-600} \
    >"$OUT/soak.log" 2>&1
  echo "soak_diff: exit $?"
  sed -n '/== soak_diff summary ==/,$p' "$OUT/soak.log" | tee "$OUT/soak.txt"
  grep -m 20 MISMATCH "$OUT/soak.log" | tee -a "$OUT/soak.txt"
fi
if [[ $phases == *profile* ]]; then
  # RESA_PROFILE_ARGS: extra resa-bench flags, e.g. "--shapes 28/4x128 --summary fp8";
  # RESA_PROFILE_BATCH / RESA_PROFILE_CONTEXTS: the points (default 8 x 262144).
  # The sparse step's kernels are taken from its third graph replay on, warm
  # (-s skips the first two steps' kernels), one ncu pass each.
  # RESA_PROFILE_MODULE: another build's CUDA module (default this build's)
  pb=${RESA_PROFILE_BATCH:-8}
  say "ncu: the kernels of one sparse decode step and one rectification, $pb x ${RESA_PROFILE_CONTEXTS:-262144} ${RESA_PROFILE_ARGS:-}"
  export RESA_CUDA_MODULE=${RESA_PROFILE_MODULE:-$PWD/$build/cuda/libresa-cuda.so.0}
  metrics=gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,dram__bytes_read.sum,sm__throughput.avg.pct_of_peak_sustained_elapsed,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,launch__grid_size
  for ctx in ${RESA_PROFILE_CONTEXTS:-262144}; do
    tag=$pb-$ctx
    ncu --clock-control none --cache-control none --metrics $metrics -k 'regex:write_decode|score|select|attend|combine|topn' \
      -s ${RESA_PROFILE_SKIP:-8} -c ${RESA_PROFILE_COUNT:-8} \
      $build/tools/resa-bench --backend cuda --batch $pb --contexts $ctx --modes sparse --reps 3 ${RESA_PROFILE_ARGS:-} \
      >"$OUT/ncu-sparse-$tag.txt" 2>&1
    [ "${RESA_PROFILE_RECTIFY:-1}" = 0 ] || ncu --clock-control none --metrics $metrics -k 'regex:dense_' -c 2 \
      $build/tools/resa-bench --backend cuda --batch $pb --contexts $ctx --modes rectify --reps 1 ${RESA_PROFILE_ARGS:-} \
      >"$OUT/ncu-rectify-$tag.txt" 2>&1
    grep -E "^  [a-z_]+.*\(|gpu__time|dram__throughput|dram__bytes|sm__throughput|hmma|grid_size" \
      "$OUT"/ncu-*-$tag.txt | sed 's#.*/##' | head -80
    # RESA_PROFILE_SOURCE=1: where the rectification kernel's warps stall, per
    # SASS instruction (ncu's PC sampling: the source page as CSV, and the
    # warp-state summary), e.g. the fp8 producer's conversion against the
    # consumers' wgmma; one kernel, a separate pass from the timed metrics
    if [ "${RESA_PROFILE_SOURCE:-0}" = 1 ]; then
      ncu --clock-control none --section SourceCounters --section WarpStateStats --section Occupancy \
        -k 'regex:dense_' -c 1 -f -o "$OUT/ncu-rectify-src-$tag" \
        $build/tools/resa-bench --backend cuda --batch $pb --contexts $ctx --modes rectify --reps 1 ${RESA_PROFILE_ARGS:-} \
        >"$OUT/ncu-rectify-src-$tag.log" 2>&1
      ncu -i "$OUT/ncu-rectify-src-$tag.ncu-rep" --page details >"$OUT/ncu-rectify-src-$tag-details.txt" 2>&1
      ncu -i "$OUT/ncu-rectify-src-$tag.ncu-rep" --page source --print-source sass --csv \
        >"$OUT/ncu-rectify-src-$tag-sass.csv" 2>&1
      echo "source page: $(wc -l <"$OUT/ncu-rectify-src-$tag-sass.csv") lines"; head -3 "$OUT/ncu-rectify-src-$tag-sass.csv" | cut -c1-300
      grep -iE "stall|warp cycles|issued" "$OUT/ncu-rectify-src-$tag-details.txt" | head -30
    fi
  done
fi
if [[ $phases == *timeline* ]]; then
  # every kernel of resa-bench's sparse step with its GPU start and end, graph
  # replays included (CUPTI, bench/profile/kernel_timeline.c), then the
  # account by kernel and gap (bench/profile/timeline_account.py), next to
  # untraced runs of the same point with L2 warm and overwritten before each
  # replay (--cold; the traced run is cold): what ncu cannot show at batch 1, where the
  # step is a chain of dependent latencies.  RESA_TIMELINE_BATCH (default 1),
  # RESA_TIMELINE_CONTEXTS, RESA_TIMELINE_ARGS (resa-bench flags; default the
  # 0.3.0 defaults, "--fraction 0.15 --interval 128 --summary fp8"; add
  # "--kv-dtype fp8" for the fp8 cache), RESA_TIMELINE_SPLITS (split limits to
  # sweep, below).
  tb=${RESA_TIMELINE_BATCH:-1}
  say "kernel timeline (CUPTI) of the sparse step: $tb x ${RESA_TIMELINE_CONTEXTS:-32768 262144} ${RESA_TIMELINE_ARGS:-(0.3.0 defaults)}"
  # CUPTI: the toolkit's (include/ and lib64/, or extras/CUPTI/), else the
  # pip wheel's that torch brings (nvidia/cu13 or nvidia/cuda_cupti)
  cuda=$(dirname "$(dirname "$(command -v nvcc)")")
  cupti_inc="" cupti_so=""
  for d in "$cuda" "$cuda/extras/CUPTI" \
           $(python3 -c 'import nvidia, os; [print(os.path.join(p, s)) for p in nvidia.__path__ for s in ("cu13", "cuda_cupti")]' 2>/dev/null); do
    [ -z "$cupti_inc" ] && [ -f "$d/include/cupti.h" ] && cupti_inc=$d/include
    [ -z "$cupti_so" ] && cupti_so=$(ls "$d"/lib64/libcupti.so* "$d"/lib/libcupti.so* 2>/dev/null | head -1)
  done
  cupti_lib=$(dirname "${cupti_so:-/nonexistent/x}")
  echo "CUPTI: headers $cupti_inc, library $cupti_so"
  if [ -n "$cupti_inc" ] && [ -n "$cupti_so" ] && \
     gcc -std=c11 -D_POSIX_C_SOURCE=200809L -O2 -Wall -shared -fPIC -I"$cupti_inc" \
       bench/profile/kernel_timeline.c "$cupti_so" -Wl,-rpath,"$cupti_lib" -o $build/kernel_timeline.so; then
    export RESA_CUDA_MODULE=$PWD/$build/cuda/libresa-cuda.so.0
    # the point ${bench[@]} cold, untraced, then traced into timeline-$tag$1.csv
    cold_runs() {
      "${bench[@]}" --cold >"$OUT/timeline-untraced-cold-$tag$1.log" 2>&1
      RESA_TIMELINE_OUT=$OUT/timeline-$tag$1.csv LD_PRELOAD=$PWD/$build/kernel_timeline.so \
        LD_LIBRARY_PATH=$cupti_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} \
        "${bench[@]}" --cold >"$OUT/timeline-traced-$tag$1.log" 2>&1
    }
    for ctx in ${RESA_TIMELINE_CONTEXTS:-32768 262144}; do
      tag=$tb-$ctx
      bench=($build/tools/resa-bench --backend cuda --batch $tb --contexts $ctx --modes sparse
             --reps ${RESA_TIMELINE_REPS:-50} ${RESA_TIMELINE_ARGS:---fraction 0.15 --interval 128 --summary fp8})
      "${bench[@]}" >"$OUT/timeline-untraced-$tag.log" 2>&1
      cold_runs ""
      echo "-- $tag, resa-bench's row (sparse_ms: ms a layer): untraced, untraced --cold, traced --cold:"
      tail -1 "$OUT/timeline-untraced-$tag.log"
      tail -1 "$OUT/timeline-untraced-cold-$tag.log"
      grep -v kernel_timeline "$OUT/timeline-traced-$tag.log" | tail -1
      grep kernel_timeline "$OUT/timeline-traced-$tag.log"
      python3 bench/profile/timeline_account.py "$OUT/timeline-$tag.csv" 2>&1 | tee "$OUT/timeline-$tag.log"
      # RESA_TIMELINE_SPLITS="8 16 ...": the same point with at most that many
      # splits per (entry, head) (RESA_CUDA_SPLITS_MAX), untraced and traced, cold
      for sm in ${RESA_TIMELINE_SPLITS:-}; do
        RESA_CUDA_SPLITS_MAX=$sm cold_runs -s$sm
        echo "-- $tag, RESA_CUDA_SPLITS_MAX=$sm: untraced --cold, then the traced account:"
        tail -1 "$OUT/timeline-untraced-cold-$tag-s$sm.log"
        python3 bench/profile/timeline_account.py "$OUT/timeline-$tag-s$sm.csv" 2>&1 | tee "$OUT/timeline-$tag-s$sm.log"
      done
    done
  else
    echo "timeline: kernel_timeline.so did not build (CUPTI headers '$cupti_inc', library '$cupti_so')"
  fi
fi
# NCCL (resa-e2e --tp): no NVLink multicast on these shared hosts
export NCCL_NVLS_ENABLE=0
e2e_only=${phases//e2eprof/}; e2e_only=${e2e_only//e2etp/}
if [[ $e2e_only == *e2e* ]]; then # (not e2eprof or e2etp alone)
  # RESA_E2E_KV=fp8: libresa's KV cache in fp8 e4m3 for every mode, next to the
  # dense bf16 baseline (each at its own largest batch for "max"; the tput/d16
  # column); RESA_E2E_TP=N: tensor parallel over N GPUs (NCCL);
  # RESA_E2E_MODES overrides the modes, RESA_E2E_ARGS adds flags (--params defaults ...)
  # (fp8 without RESA_E2E_MODES: dense, sparse, ReSA from fp8 and dense:bf16)
  kv=${RESA_E2E_KV:-bf16}
  tag=${RESA_E2E_SUMMARY:-kv}-kv$kv${RESA_E2E_TP:+-tp$RESA_E2E_TP}
  say "end to end: Qwen2.5-7B-shaped decoder (random weights), ${RESA_E2E_MODES:-dense / sparse / ReSA}, KV $kv${RESA_E2E_TP:+, TP $RESA_E2E_TP}"
  export RESA_CUDA_MODULE=$PWD/$build/cuda/libresa-cuda.so.0
  $build/examples/resa-e2e --contexts ${RESA_E2E_CONTEXTS:-16384,65536,131072,262144} \
    --batch ${RESA_E2E_BATCH:-1,max} --steps ${RESA_E2E_STEPS:-64} \
    --summary ${RESA_E2E_SUMMARY:-kv} --kv-dtype $kv ${RESA_E2E_MODES:+--modes $RESA_E2E_MODES} \
    ${RESA_E2E_TP:+--tp $RESA_E2E_TP} ${RESA_E2E_ARGS:-} 2>&1 | tee "$OUT/e2e-$tag.txt" | tail -40
fi
if [[ $phases == *e2etp* ]]; then
  # tensor parallelism through NCCL (resa-e2e --tp): the agreement check (tokens
  # and logits with and without TP, bf16 and fp8 caches, 8K x 2), then a short
  # timing at 256K without TP and with it (~1-2 min on one H100 at TP 1).
  # RESA_E2E_TP=N for N GPUs (default 1: the NCCL path on one GPU).
  n=${RESA_E2E_TP:-1}
  say "resa-e2e --tp $n: agreement check, then 256K timing without and with TP"
  export RESA_CUDA_MODULE=$PWD/$build/cuda/libresa-cuda.so.0
  timeout ${RESA_E2ETP_TIMEOUT:-300} $build/examples/resa-e2e --check-tp --tp $n --kv-dtype bf16,fp8 \
    >"$OUT/e2etp-check.txt" 2>"$OUT/e2etp-check.log"
  rc=$?
  echo "check-tp: exit $rc"
  grep -E "^check-tp|^# check-tp|^# tensor" "$OUT/e2etp-check.txt"
  [ $rc = 0 ] || tail -5 "$OUT/e2etp-check.log" # (a build without NCCL says so here)
  rm -f "$OUT/e2etp-timing.txt"
  for tp in "" "--tp $n"; do
    timeout ${RESA_E2ETP_TIMEOUT:-300} $build/examples/resa-e2e --contexts 262144 \
      --batch ${RESA_E2ETP_BATCH:-1} --modes dense,resa --steps 32 $tp 2>>"$OUT/e2etp-timing.log" \
      | tee -a "$OUT/e2etp-timing.txt" | grep -E "^# tensor|^context|^mode|^dense|^resa|skipped"
  done
fi
if [[ $phases == *e2eprof* ]]; then
  # one decode step per mode under ncu (RESA_E2E_PROFILE_STEP), summed by kernel
  say "ncu: the kernels of one resa-e2e decode step, 256K, batch 8 (dense, ReSA) and batch 1 (ReSA)"
  export RESA_CUDA_MODULE=$PWD/$build/cuda/libresa-cuda.so.0
  m=gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum
  for point in "8 dense,resa 2" "1 resa 1"; do
    set -- $point
    RESA_E2E_PROFILE_STEP=3 ncu --profile-from-start off --cache-control none --clock-control none \
      --metrics $m --csv --print-units base $build/examples/resa-e2e --contexts 262144 --batch $1 \
      --modes $2 --steps 32 --warmup 8 --summary ${RESA_E2E_SUMMARY:-fp8} >"$OUT/ncu-e2e-b$1.csv" 2>"$OUT/ncu-e2e-b$1.log"
    python3 bench/profile/ncu_step_account.py "$OUT/ncu-e2e-b$1.csv" $3 | tee "$OUT/e2e-kernels-b$1.txt"
    rm -f "$OUT/ncu-e2e-b$1.csv"
  done
fi
if [[ $phases == *params* ]]; then
  say "resa-bench: method parameters (summary format, dtype, r, f) at 1 x 32K, 8 x 64K, 8 x 256K"
  export RESA_CUDA_MODULE=$PWD/$build/cuda/libresa-cuda.so.0
  pb() { $build/tools/resa-bench --backend cuda --batch 1,8 --contexts 32768,65536,262144 \
           --reps ${RESA_PARAMS_REPS:-15} --csv "$@" 2>/dev/null; }
  { pb --summary kv; pb --summary fp8 | tail -n +2; pb --dtype f16 | tail -n +2
    pb --dtype f16 --summary fp8 | tail -n +2
    for r in 0.05 0.2; do pb --fraction $r --modes sparse | tail -n +2; done
    for f in 16 64; do pb --interval $f --modes rectify,sparse | tail -n +2; done
  } | tee "$OUT/params.csv" | cut -d, -f1,2,7,9-12,19-21
fi
if [[ $phases == *sweep* ]]; then
  say "resa-bench sweep: shapes, contexts, batches (CSV)"
  export RESA_CUDA_MODULE=$PWD/$build/cuda/libresa-cuda.so.0
  $build/tools/resa-bench --backend cuda --batch ${RESA_SWEEP_BATCH:-1,8} \
    --shapes ${RESA_SWEEP_SHAPES:-32/8x128,28/4x128,16/2x256} \
    --contexts ${RESA_SWEEP_CONTEXTS:-4096,16384,32768,65536,131072,262144} \
    --reps ${RESA_SWEEP_REPS:-10} --csv 2>/dev/null | tee "$OUT/sweep.csv"
fi
if [[ $phases == all || $phases == *bench* ]]; then
  say "benchmarks: resa-bench (CUDA) and PyTorch SDPA peers, same card, same run"
  export RESA_CUDA_MODULE=$PWD/$build/cuda/libresa-cuda.so.0
  { $build/tools/resa-bench --backend cuda --batch 1,8 --contexts ${RESA_CONTEXTS:-32768,65536,262144} \
      --reps 30 --csv 2>/dev/null
    $build/tools/resa-bench --backend cuda --batch 1,8 --contexts ${RESA_CONTEXTS:-32768,65536,262144} \
      --reps 30 --csv --summary fp8 2>/dev/null | tail -n +2; } | tee "$OUT/resa-bench.csv"
  python3 bench/peers/peer_bench.py --batch 1,8 --contexts ${RESA_CONTEXTS:-32768,65536,262144} --csv \
    2>"$OUT/peer-errors.log" | tee "$OUT/peers.csv"
  # FlashInfer: same CSV rows.  Its comments (version, first plan() time, or
  # why it could not run) go to the log.
  flashinfer_rows --contexts ${RESA_CONTEXTS:-32768,65536,262144} \
    2>>"$OUT/peer-errors.log" | tee "$OUT/flashinfer.txt" | grep -v '^peer,\|^#' >>"$OUT/peers.csv"
  grep '^#' "$OUT/flashinfer.txt"
  say "ratios (bench/peers/compare.py)"
  python3 bench/peers/compare.py "$OUT/peers.csv" "$OUT/resa-bench.csv" | tee "$OUT/ratios.txt"
fi

if [[ $phases == *levers* ]]; then
  # the quality levers on the same kernels: the paper's method (sink 0, width 1)
  # and the candidates, interleaved so that clocks drift evenly over them
  say "resa-bench: the sparse step with the quality levers, 8 x 256K and 1 x 256K, 32/8 x 128 and 9/3 x 64"
  export RESA_CUDA_MODULE=$PWD/$build/cuda/libresa-cuda.so.0
  { for round in 1 2; do
      for lever in ${RESA_LEVERS:-"--sink 0 --width 1" "--sink 1 --width 0.5" "--sink 1 --width 0.5 --group-score head-share"}; do
        for shape in "--heads 32/8 --dim 128" "--heads 9/3 --dim 64"; do
          $build/tools/resa-bench --backend cuda --batch 1,8 --contexts 262144 --modes sparse \
            --reps ${RESA_LEVER_REPS:-30} --csv $lever $shape 2>/dev/null | tail -n +2 | sed "s/^/$round,$lever,/"
        done
      done
    done; } | tee "$OUT/levers-bench.csv"
fi
if [[ $phases == *fp8kv* ]]; then
  # issue 15: the ReSA step with an fp8 KV cache next to the 16-bit cache and
  # the dense peers (cuDNN SDPA, bf16), same card, same run; library defaults
  # and the paper's settings
  say "resa-bench: fp8 KV cache against bf16, and the dense peers"
  export RESA_CUDA_MODULE=$PWD/$build/cuda/libresa-cuda.so.0
  { for round in $(seq 1 ${RESA_FP8KV_ROUNDS:-2}); do
      for cfg in "--kv-dtype io --fraction 0.15 --interval 128 --summary fp8" \
                 "--kv-dtype fp8 --fraction 0.15 --interval 128 --summary fp8" \
                 "--kv-dtype io --fraction 0.1 --interval 32 --summary kv" \
                 "--kv-dtype fp8 --fraction 0.1 --interval 32 --summary kv" \
                 "--kv-dtype fp8 --fraction 0.1 --interval 32 --summary fp8"; do
        $build/tools/resa-bench --backend cuda --batch 1,8 --contexts ${RESA_CONTEXTS:-32768,262144} \
          --reps ${RESA_FP8KV_REPS:-20} --csv $cfg 2>/dev/null | tail -n +2 | sed "s/^/$round,$cfg,/"
      done
    done; } | tee "$OUT/fp8kv-bench.csv" | cut -c1-160
  python3 bench/peers/peer_bench.py --batch 1,8 --contexts ${RESA_CONTEXTS:-32768,262144} --csv \
    2>"$OUT/peer-errors.log" | tee "$OUT/peers.csv"
  # FlashInfer's paged decode on a bf16 and on an fp8 e4m3 KV cache (rows
  # flashinfer[-tc] and flashinfer[-tc]-fp8), one timeout each; comments to the log
  { for kvd in bf16 fp8; do
      flashinfer_rows --contexts ${RESA_CONTEXTS:-32768,262144} --kv-dtype $kvd
    done; } 2>>"$OUT/peer-errors.log" | tee "$OUT/flashinfer-fp8kv.txt" | grep -v '^peer,\|^#' >>"$OUT/peers.csv"
  grep '^#' "$OUT/flashinfer-fp8kv.txt"
fi
if [[ $phases == *defaults* ]]; then
  # candidate defaults against the 0.2.0 ones, the whole ReSA step (sparse +
  # rectify / f) and dense in the same rounds, interleaved so that clocks
  # drift evenly over them (docs/quality.md, performance.md)
  say "resa-bench: 0.2.0 defaults against candidates, 32/8 x 128 and 9/3 x 64"
  export RESA_CUDA_MODULE=$PWD/$build/cuda/libresa-cuda.so.0
  { for round in 1 2; do
      for cfg in ${RESA_DEFAULTS_CFGS:-"--fraction 0.1 --interval 32" \
                 "--fraction 0.1 --interval 32 --group-score head-share" \
                 "--fraction 0.15 --interval 128 --summary fp8" \
                 "--fraction 0.15 --interval 128 --summary fp8 --group-score head-share"}; do
        for shape in "--heads 32/8 --dim 128" "--heads 9/3 --dim 64"; do
          $build/tools/resa-bench --backend cuda --batch 1,8 --contexts ${RESA_DEFAULTS_CONTEXTS:-32768,262144} \
            --reps ${RESA_DEFAULTS_REPS:-20} --csv $cfg $shape 2>/dev/null | tail -n +2 | sed "s/^/$round,$cfg,/"
        done
      done
    done; } | tee "$OUT/defaults-bench.csv"
fi
if [[ $phases == *quality* ]]; then
  # needs the model (.model/, in parts) and texts (.model/texts, scripts/fetch-texts.sh)
  say "quality on SmolLM2-135M-Instruct, CUDA bf16: resa-eval, then the lever simulation"
  export RESA_LIBRARY=${RESA_LIBRARY:-$PWD/$build/lib/libresa.so} RESA_CUDA_MODULE=$PWD/$build/cuda/libresa-cuda.so.0
  export PYTHONPATH=$PWD/bindings/python${PYTHONPATH:+:$PYTHONPATH} RESA_TEXTS=${RESA_TEXTS:-$PWD/.model/texts}
  if [ "${RESA_EVAL:-1}" != 0 ]; then # RESA_EVAL=0: the simulation only
    # RESA_EVAL_TAG names the run's folder and log (several runs in one call)
    tag=${RESA_EVAL_TAG:-quality}
    PYTHONUNBUFFERED=1 timeout ${RESA_EVAL_TIMEOUT:-420} python3 -m resa.eval.cli --device cuda --dtype bfloat16 \
      --out "$OUT/$tag" ${RESA_EVAL_ARGS:-} 2>&1 | grep -v Warning | tee "$OUT/$tag.log" | tail -70
    rm -f "$OUT/$tag/steps.npz"
  fi
  if [ -f scripts/sim-variants.json ] && [ "${RESA_SIM:-1}" != 0 ]; then
    PYTHONUNBUFFERED=1 timeout ${RESA_SIM_TIMEOUT:-240} python3 bench/quality/sparse_sim.py --device cuda \
      --tokens 8192 --start 1024 --text austen-persuasion --text debian-reference \
      --variants "$(cat scripts/sim-variants.json)" 2>"$OUT/sim.log" | tee "$OUT/levers-sim.md"
  fi
fi

if [[ $phases == *fp8check* ]]; then
  # the fp8 cache's GPU tests alone, all at once, for a change to its kernels
  # (kernel v17, 2026-12-07: ~130 s on an H100): check_cuda's fp8 dense test
  # (TMA and cp.async producers), V-outlier test, mixed batch and decode cases
  # (QUICK), check_nonfinite's rectification test, the fp8 dense and rectification
  # tests again with RESA_CUDA_NO_KF8=1; then, with
  # RESA_FP8CHECK_TOOLS="racecheck synccheck ...", each tool over the fp8 dense
  # test with either producer in 4 shards (sanitize-shards.sh).  A line a run in $OUT/fp8check.txt, the logs in
  # fp8check.tgz; RESA_FP8CHECK_TIMEOUT (s a run, default 240)
  say "the fp8 cache's GPU tests${RESA_FP8CHECK_TOOLS:+, then $RESA_FP8CHECK_TOOLS over the fp8 dense test}"
  lim=${RESA_FP8CHECK_TIMEOUT:-240}
  fd=$OUT/fp8check; rm -rf "$fd" "$OUT/fp8check.txt"; mkdir -p "$fd"
  fp8_run() { # tag, then NAME=VALUE words and the command
    local tag=$1; shift
    ( t0=$(date +%s)
      env RESA_CUDA_MODULE=$PWD/$build/cuda/libresa-cuda.so.0 "$@" >"$fd/$tag.log" 2>&1
      echo "$tag: exit $? after $(( $(date +%s) - t0 )) s; $(grep -h 'Checks:' "$fd/$tag.log" | tail -1)$(grep -h 'ERROR SUMMARY\|RACECHECK SUMMARY' "$fd/$tag.log" | tail -1)" \
        >>"$OUT/fp8check.txt" ) &
  }
  T="timeout $lim"
  fp8_run fp8_dense RESA_TEST_QUICK=1 RESA_TEST_ONLY=test_cuda_fp8_dense $T $build/tests/check_cuda
  fp8_run fp8_dense_cp_async RESA_CUDA_NO_TMA=1 RESA_TEST_QUICK=1 RESA_TEST_ONLY=test_cuda_fp8_dense $T $build/tests/check_cuda
  fp8_run v_outlier RESA_TEST_ONLY=test_cuda_fp8_v_outlier $T $build/tests/check_cuda
  fp8_run v_outlier_cp_async RESA_CUDA_NO_TMA=1 RESA_TEST_ONLY=test_cuda_fp8_v_outlier $T $build/tests/check_cuda
  fp8_run mixed_batch RESA_TEST_QUICK=1 RESA_TEST_ONLY=test_cuda_mixed_batch $T $build/tests/check_cuda
  # the f16-MMA path the KF8 kernel replaces at d 128 (RESA_CUDA_NO_KF8=1): its fp8 dense
  # and non-finite rectification tests too (d 256 takes that path by default)
  fp8_run fp8_dense_no_kf8 RESA_CUDA_NO_KF8=1 RESA_TEST_QUICK=1 RESA_TEST_ONLY=test_cuda_fp8_dense $T $build/tests/check_cuda
  fp8_run nonfinite_rectify_no_kf8 RESA_CUDA_NO_KF8=1 RESA_TEST_QUICK=1 RESA_TEST_ONLY=test_rectify $T $build/tests/check_nonfinite cuda
  for k in 0 1 2 3; do
    fp8_run decode-$k RESA_TEST_QUICK=1 RESA_TEST_ONLY=test_cuda_decode RESA_TEST_SHARD=$k/4 $T $build/tests/check_cuda
    fp8_run nonfinite_rectify-$k RESA_TEST_QUICK=1 RESA_TEST_ONLY=test_rectify RESA_TEST_SHARD=$k/4 $T $build/tests/check_nonfinite cuda
  done
  wait
  sort "$OUT/fp8check.txt"
  echo "fp8 tests: $(grep -c . "$OUT/fp8check.txt") runs, $(grep -c ': exit 77 ' "$OUT/fp8check.txt") skipped (no GPU)," \
    "$(grep -vc ': exit 0 \|: exit 77 ' "$OUT/fp8check.txt") failed or cut"
  if [ -n "${RESA_FP8CHECK_TOOLS:-}" ]; then
    # scripts/sanitize-shards.sh over the fp8 dense test alone (RESA_TEST_ONLY
    # passes through), both producers (check_cuda, check_cuda_cp_async), 4 shards each
    pairs=""; for tool in $RESA_FP8CHECK_TOOLS; do pairs="$pairs $tool:check_cuda/4 $tool:check_cuda_cp_async/4"; done
    RESA_TEST_ONLY=test_cuda_fp8_dense RESA_SANITIZE_PAIRS=$pairs RESA_SANITIZE_TIMEOUT=$lim \
      bash scripts/sanitize-shards.sh $build "$fd" | tail -20
  fi
  (cd "$OUT" && tar czf fp8check.tgz fp8check && rm -rf fp8check) # every log, one file
fi
if [[ $phases == *kf8ab* ]]; then
  # the fp8 cache's rectification with QK^T on fp8 MMAs (KF8, the default at
  # d 128, side C) against the f16 MMAs it replaces (RESA_CUDA_NO_KF8=1, side
  # B), one module, and against main's module (side A: .pre-main/ holds it,
  # as libresa-cuda.so.0.xz or .so.0), sides alternated round by round
  # (bench/ab_env.sh), f queries at 8 x 256K and batch 1; the bf16 cache
  # (code unchanged) as the control
  # a module carried in DIR (libresa-cuda.so.0.xz or .so.0) as a side's
  # environment, RESA_CUDA_MODULE=...; fails where DIR holds none
  carried_module_env() {
    [ -f "$1/libresa-cuda.so.0.xz" ] && xz -dkf "$1/libresa-cuda.so.0.xz"
    [ -f "$1/libresa-cuda.so.0" ] && echo "RESA_CUDA_MODULE=$PWD/$1/libresa-cuda.so.0"
  }
  A=$(carried_module_env .pre-main) || A="RESA_CUDA_NO_KF8=1"
  # RESA_KF8AB_B: side B's environment instead of RESA_CUDA_NO_KF8=1: NAME=VALUE
  # words, or a directory with a variant module (RESA_KF8AB_B=DIR)
  B=${RESA_KF8AB_B:-RESA_CUDA_NO_KF8=1}
  if [[ $B != *=* ]] && ! B=$(carried_module_env "$B"); then
    echo "kf8ab: RESA_KF8AB_B=${RESA_KF8AB_B}: no module there; side B is RESA_CUDA_NO_KF8=1"
    B="RESA_CUDA_NO_KF8=1"
  fi
  say "fp8 rectification: A ($A), B ($B), C (KF8, this build)"
  export RESA_AB_ENV_C=""
  ab() { bash bench/ab_env.sh $build "$@"; }
  # a first KF8 run alone, under a limit: a new kernel that hangs costs a minute, not the call
  if ! RESA_CUDA_MODULE=$PWD/$build/cuda/libresa-cuda.so.0 timeout 60 $build/tools/resa-bench --backend cuda \
       --batch 1 --contexts 32768 --modes rectify --interval 32 --kv-dtype fp8 --reps 3 --csv; then
    echo "kf8ab: the KF8 smoke run failed or hung; no A/B"
  else
  export RESA_AB_TIMEOUT=${RESA_AB_TIMEOUT:-90}
  # RESA_KF8AB_ROUNDS: rounds of the four measurements (default "3 2 2 1"; 0 skips one)
  read -r n1 n2 n3 n4 <<<"${RESA_KF8AB_ROUNDS:-3 2 2 1}"
  { [ "$n1" -gt 0 ] && ab $n1 "$A" "$B" --batch 8 --contexts 262144 --modes rectify --interval 128 --kv-dtype fp8
    [ "$n2" -gt 0 ] && ab $n2 "$A" "$B" --batch 8 --contexts 262144 --modes rectify --interval 32 --kv-dtype fp8 | tail -n +2
    [ "$n3" -gt 0 ] && ab $n3 "$A" "$B" --batch 1 --contexts 32768,262144 --modes rectify --interval 32 --kv-dtype fp8 | tail -n +2
    [ "$n4" -gt 0 ] && RESA_AB_ENV_C="RESA_CUDA_NO_KF8=1" ab $n4 "$A" "" --batch 8 --contexts 262144 --modes rectify --interval 128 --kv-dtype io | tail -n +2
  } | tee "$OUT/kf8-ab.csv" | cut -d, -f1-2,4-5,13,24,25
  fi
fi
if [[ $phases == *suitebg* ]]; then
  # scripts/gpu-tests.sh (the GPU tests without meson or a sanitizer) on a
  # copy of the build's binaries in /tmp, in its own process session, as
  # sanmatrixbg below: for a carried build (RESA_BUILD), beside the matrix;
  # "suitewait" collects it.  The call's environment passes through.
  bg=/tmp/resa-suitebg
  say "GPU tests in the background ($build)"
  bg_start $bg gpu-tests.sh suite-all.txt
  sleep 1; date +%s >$bg/t0
fi
if [[ $phases == *suitewait* ]]; then
  # up to RESA_SUITE_WAIT s (default 0: no wait) for suitebg, then its lines so far, packed (suite.tgz)
  bg=/tmp/resa-suitebg
  say "GPU tests (background)"
  if [ -d $bg/out ]; then
    end=$(( $(date +%s) + ${RESA_SUITE_WAIT:-0} ))
    while [ ! -f $bg/out/rc ] && [ $(date +%s) -lt $end ]; do sleep 5; done
    echo "t = $(( $(date +%s) - $(cat $bg/t0) )) s; exit: $(cat $bg/out/rc 2>/dev/null || echo running)"
    sort $bg/out/suite-progress.txt 2>/dev/null
    (cd $bg && tar czf "$OUT/suite.tgz" out)
  else
    echo "suitewait: no $bg (not started, or the machine was not warm)"
  fi
fi
if [[ $phases == *sanmatrixbg* ]]; then
  # scripts/sanitize-shards.sh (RESA_SANITIZE_PAIRS, _JOBS, _BUDGET as for
  # sanshards) on a copy of the build's test binaries in /tmp, in its own
  # process session: the matrix takes longer than one call (racecheck over
  # the non-finite tests ran past 900 s a shard on an H100, 2026-12-07), a
  # warm machine keeps setsid processes, and a call's carried files (a build
  # made elsewhere, RESA_BUILD) do not outlive it.  RESA_BG_SOAK_SECONDS=n
  # also runs the CPU-vs-CUDA soak for n s beside it.  "sanmatrixwait", in a
  # later call on the same warm machine, collects both.  It runs after every
  # other phase of its call, so that benchmarks named with it ("timeline,
  # fp8kv,sanmatrixbg") run first on a quiet GPU.
  # Without RESA_SANITIZE_PAIRS: the whole matrix, most wanted first (racecheck
  # and initcheck where v15 drew reports, then memcheck and synccheck, the
  # quickest, then the long racecheck and initcheck runs), racecheck over
  # check_cuda in 8 shards and the non-finite tests (RESA_TEST_QUICK=2 in
  # sanitize-shards.sh) in 4, so that a budget cut drops the least wanted
  export RESA_SANITIZE_PAIRS=${RESA_SANITIZE_PAIRS:-"racecheck:check_cuda/8 memcheck:check_cuda/4
    synccheck:check_cuda/4 initcheck:check_cp_cuda/3 racecheck:check_nonfinite_cuda/4
    memcheck:check_cp_cuda/3 synccheck:check_cp_cuda/3 memcheck:check_nonfinite_cuda/4
    synccheck:check_nonfinite_cuda/4 racecheck:check_nonfinite_cuda_mma/4
    memcheck:check_nonfinite_cuda_mma/4 synccheck:check_nonfinite_cuda_mma/4
    memcheck:check_cuda_cp_async/4 synccheck:check_cuda_cp_async/4 memcheck:check_cuda_splits/4
    synccheck:check_cuda_splits/4 memcheck:soak_diff synccheck:soak_diff racecheck:soak_diff
    initcheck:soak_diff racecheck:check_cp_cuda/6 initcheck:check_nonfinite_cuda/4
    initcheck:check_nonfinite_cuda_mma/4 racecheck:check_cuda_cp_async/8
    racecheck:check_cuda_splits/8 initcheck:check_cuda_cp_async/4 initcheck:check_cuda_splits/4"}
  bg=/tmp/resa-sanmatrix
  say "compute-sanitizer matrix in the background: $(echo $RESA_SANITIZE_PAIRS | wc -w) tool x test pairs"
  bg_start $bg sanitize-shards.sh matrix.txt
  if [ -n "${RESA_BG_SOAK_SECONDS:-}" ]; then
    (cd $bg && RESA_CUDA_MODULE=$bg/b/cuda/libresa-cuda.so.0 setsid nohup bash -c \
       "timeout $((RESA_BG_SOAK_SECONDS + 120)) b/tests/soak/soak_diff $RESA_BG_SOAK_SECONDS >$bg/out/soak.log 2>&1; echo \$? >$bg/out/soak.rc" \
       </dev/null >/dev/null 2>&1 &)
  fi
  sleep 2; echo "started at $(date +%s) (epoch s), in $bg"; date +%s >$bg/t0
fi
# pack the logs (the device tool brings back at most 8 files); not in a
# sub-invocation (RESA_NO_PACK=1, gpusuite), whose sibling may still write its logs
logs=$(cd "$OUT" && ls *.log ncu-*.txt timeline-*.csv 2>/dev/null)
if [ -n "$logs" ] && [ "${RESA_NO_PACK:-0}" != 1 ]; then
  tag=$(echo "$phases" | tr -c 'a-z0-9\n' '-')
  (cd "$OUT" && tar czf "logs-$tag.tgz" $logs && rm -f $logs)
fi
