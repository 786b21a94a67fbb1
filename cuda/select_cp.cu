// SPDX-License-Identifier: MIT
// Context parallelism: the thresholds of the two-phase selection
// (resa_ctx_step_thresholds, docs/API.md "Context parallelism").
// CPU twin: lib/cpu/block_scores.c (threshold_item); phase 1 is in
// select_blocks.cu (resa_cuda_block_scores).
//
// One CTA of kThreads per (entry, KV head), one plain launch, no host
// synchronization: the K-th largest of the gathered (score, block) pairs as
// one unsigned 64-bit key (the score's order-preserving bits above, NaN as
// -inf and -0 as +0, the complemented block index below), built bit by bit
// from the top exactly as the CPU does: a bit is kept when at least K keys
// are at or above the prefix with it.  64 counting passes over the n_ranks
// lists (L1/L2 resident; a few hundred pairs per rank), each a block sum.
// K = min(n_pick, the pairs gathered); K <= 0 gives (+inf, -1), which takes
// nothing.
#include <math.h>

#include "common.cuh"

namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;

// lib/cpu/block_scores.c, rank_key.
__device__ __forceinline__ uint64_t rank_key(float s, int32_t block)
{
    if (s != s)
        s = -INFINITY;
    if (s == 0.0f)
        s = 0.0f;
    uint32_t u = __float_as_uint(s);
    u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
    return ((uint64_t)u << 32) | (uint64_t)(0xffffffffu - (uint32_t)block);
}

__device__ __forceinline__ int64_t clamp_count(int32_t c, int64_t capacity)
{
    return c < 0 ? 0 : c > capacity ? capacity : (int64_t)c;
}

__global__ void __launch_bounds__(kThreads)
thresholds_kernel(const resa_dev_entry *entries, int32_t hkv, int32_t n_entries, int32_t n_ranks,
                  int64_t capacity, const float *scores, const int32_t *blocks,
                  const int32_t *counts, float *thr_scores, int32_t *thr_blocks)
{
    __shared__ int64_t part[2][kWarps]; // ping-pong: pass i writes part[i & 1]
    const int64_t item = blockIdx.x;
    const int64_t pairs = (int64_t)n_entries * hkv;
    const resa_dev_entry &e = entries[item / hkv];
    const bool sparse = e.mode == RESA_MODE_DECODE || e.mode == RESA_MODE_QUERY_SPARSE;
    int64_t k = sparse ? e.n_pick : 0, total = 0;
    for (int32_t r = 0; r < n_ranks; r++)
        total += clamp_count(counts[r * pairs + item], capacity);
    k = k < total ? k : total;
    if (k <= 0) { // nothing chosen by score: (+inf, -1) takes nothing (uniform)
        if (threadIdx.x == 0) {
            thr_scores[item] = INFINITY;
            thr_blocks[item] = -1;
        }
        return;
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    uint64_t prefix = 0;
    for (int bit = 63; bit >= 0; bit--) {
        const uint64_t want = prefix | ((uint64_t)1 << bit);
        int64_t n = 0;
        for (int32_t r = 0; r < n_ranks; r++) {
            const int64_t c = clamp_count(counts[r * pairs + item], capacity);
            const size_t at = ((size_t)r * (size_t)pairs + (size_t)item) * (size_t)capacity;
            for (int64_t i = threadIdx.x; i < c; i += kThreads)
                n += rank_key(scores[at + (size_t)i], blocks[at + (size_t)i]) >= want;
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1)
            n += __shfl_xor_sync(0xffffffffu, n, o);
        if (lane == 0)
            part[bit & 1][warp] = n;
        __syncthreads(); // also: every thread has read part[(bit + 1) & 1] of the last pass
        int64_t sum = 0;
#pragma unroll
        for (int w = 0; w < kWarps; w++)
            sum += part[bit & 1][w];
        if (sum >= k) // the same in every thread
            prefix = want;
    }
    if (threadIdx.x == 0) { // lib/cpu/block_scores.c, key_split
        uint32_t u = (uint32_t)(prefix >> 32);
        u = (u & 0x80000000u) ? (u & 0x7fffffffu) : ~u;
        thr_scores[item] = __uint_as_float(u);
        thr_blocks[item] = (int32_t)(0xffffffffu - (uint32_t)prefix);
    }
}

} // namespace

cudaError_t resa_cuda_thresholds(const resa_dev_entry *entries, int32_t n_entries, int32_t hkv,
                                 int32_t n_ranks, int64_t capacity, const float *scores,
                                 const int32_t *blocks, const int32_t *counts, float *thr_scores,
                                 int32_t *thr_blocks, cudaStream_t stream)
{
    const int64_t items = (int64_t)n_entries * hkv;
    if (items <= 0)
        return cudaGetLastError();
    // A plain launch: the gathered lists come from the host's collective.
    thresholds_kernel<<<(unsigned)items, kThreads, 0, stream>>>(
        entries, hkv, n_entries, n_ranks, capacity, scores, blocks, counts, thr_scores,
        thr_blocks);
    return cudaGetLastError();
}
