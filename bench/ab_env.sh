#!/usr/bin/env bash
# A/B of one CUDA module under two environments, alternated round by round so
# that drift (clocks, heat, neighbours) falls on both sides alike: resa-bench's
# CSV rows, each prefixed with its round and side.  The order of the sides
# rotates from round to round (A B C, B C A, C A B; two sides: A B, B A), so
# that no side always runs first.  For a switch the module
# reads from the environment (e.g. RESA_CUDA_NO_SCORE_OVERLAP=1).
#   bench/ab_env.sh BUILD ROUNDS "ENV_A" "ENV_B" RESA-BENCH-ARGS...
# e.g. bench/ab_env.sh .pre 3 "RESA_CUDA_NO_SCORE_OVERLAP=1" "" \
#        --batch 1 --contexts 32768,262144 --modes sparse --cold
# ENV_A / ENV_B: space-separated NAME=VALUE words ("" for none).  Two
# modules: ENV_B "RESA_CUDA_MODULE=$PWD/OTHER/cuda/libresa-cuda.so.0" (it
# overrides BUILD's module for side B; docs/performance.md's V-release A/B).
# RESA_AB_ENV_C: a third side, C, in each round after B (same form).
# RESA_AB_TIMEOUT: seconds a resa-bench run may take (default: no limit).
set -uo pipefail
build=$1 rounds=$2 env_a=$3 env_b=$4
shift 4
export RESA_CUDA_MODULE=$PWD/$build/cuda/libresa-cuda.so.0
export LD_LIBRARY_PATH=$PWD/$build/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
header=""
sides=(A B ${RESA_AB_ENV_C+C})
for r in $(seq 1 "$rounds"); do
  for i in "${!sides[@]}"; do
    side=${sides[$(( (i + r - 1) % ${#sides[@]} ))]}
    e=$env_a; [ $side = B ] && e=$env_b; [ $side = C ] && e=$RESA_AB_ENV_C
    rows=$(env $e timeout ${RESA_AB_TIMEOUT:-0} "$build/tools/resa-bench" --backend cuda --csv "$@" 2>/dev/null)
    [ -z "$header" ] && header=1 && echo "round,side,env,$(head -1 <<<"$rows")"
    tail -n +2 <<<"$rows" | sed "s|^|$r,$side,${e:-(none)},|"
  done
done
