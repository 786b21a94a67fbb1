// SPDX-License-Identifier: MIT
// ReSA block selection for every DECODE entry and KV head: pooled group query,
// block scores from the min/max summaries, forced sink/local blocks, top-n.
// CPU twin: lib/cpu/attention_sparse.c (choose_blocks).
//
// One launch per layer (score_select), no host synchronization, no allocation:
//  - scores: the summaries are 1/16 of the KV bytes and are read once, so
//    this is the bandwidth-bound half.  Grid (ctas_per_pair, pairs) of 1024
//    threads, one CTA per SM, one wave: each CTA scores a contiguous share of
//    one (entry, head)'s candidate blocks; d/8 lanes read one block's kmin and
//    kmax as 16-byte vectors, several blocks per lane in flight.  Scores are
//    stored as order-preserving uint32 keys (unsigned order == float order)
//    in the workspace.
//  - top-n, in the same launch: the last CTA of an (entry, head) to finish
//    its share (an arrival counter per pair in the workspace, which that CTA
//    sets back to zero, so graph replays need no reset) stages the pair's
//    keys in shared memory (when max_seq_blocks <= 40960; beyond, the passes
//    read them from global memory, where they are L2-resident).  Radix select
//    over key - min(keys) (digits of 8 bits, most significant varying bit
//    first, shared-memory histograms, early exit once a whole bin is taken)
//    finds the threshold key T and how many keys equal to T to take; then an
//    index-ordered pass takes every forced block, every key > T and the
//    lowest-index keys == T (the CPU's tie rule: score desc, then lower
//    index), writing the list ascending and, when recording, the bitmap.
//    O(M) per pass, a handful of passes, no sort.
//  - launched as a programmatic dependent of kv_write's last kernel
//    (common.cuh: pdl_wait before the summaries are read).
//
// Workspace (resa_cuda_select_workspace):
//   lists    [max_seqs][hkv][max_seq_blocks] int32  (resa_cuda_sel_list)
//   keys     [max_seqs][hkv][max_seq_blocks] uint32 (scores as ordered keys)
//   counters [max_seqs][hkv] uint32: zero at rest (resa_cuda_select_init once)
#include <cuda_fp8.h>
#include <limits.h>

#include "common.cuh"
#include "summary_fp8.h"

namespace {

using namespace resa;

constexpr int kScoreThreads = 1024;   // also the top-n tail's threads
constexpr int kScoreUnroll = 4;       // blocks per lane group in flight per step
constexpr int kScoreCtasPerSm = 1;    // 1024 threads at <= 64 registers: the grid is one full wave
constexpr size_t kKeysSmemMax = 160 * 1024; // keys staged in shared memory up to 40960 blocks

// One (decode entry, KV head) as both kernels see it.
struct Pair {
    int32_t slot, M, n;      // blocks so far, budget
    int32_t cand_lo, cand_hi; // candidates [cand_lo, cand_hi): neither sink nor local
    int32_t k;               // candidates to choose: n minus the forced blocks
    int64_t row;             // the entry's query row
};

__device__ Pair load_pair(const resa_cuda_layer_args &a, int i)
{
    const resa_dev_entry &e = a.entries[a.decode_ids[i]];
    Pair p;
    p.slot = e.slot;
    p.M = e.n_blocks;
    p.n = e.n_select;
    p.row = e.row;
    const int sink = min(max(a.sink_blocks, 0), p.M);
    const int local_from = p.M - min(max(a.local_blocks, 0), p.M);
    p.cand_lo = sink;
    p.cand_hi = max(local_from, sink); // the two forced ranges may overlap
    p.k = p.n - (sink + (p.M - p.cand_hi));
    return p;
}

// Unsigned order of the key == numeric order of the score (-0 folded to +0
// so that equal scores give equal keys, as the CPU's == compares them).
__device__ __forceinline__ uint32_t order_key(float s)
{
    if (s == 0.0f)
        s = 0.0f;
    const uint32_t u = __float_as_uint(s);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ void unpack8(uint4 v, float out[8], __half)
{
    const __half2 *h = reinterpret_cast<const __half2 *>(&v);
#pragma unroll
    for (int i = 0; i < 4; i++) {
        float2 f = __half22float2(h[i]);
        out[2 * i] = f.x;
        out[2 * i + 1] = f.y;
    }
}
__device__ __forceinline__ void unpack8(uint4 v, float out[8], __nv_bfloat16)
{
    const __nv_bfloat162 *h = reinterpret_cast<const __nv_bfloat162 *>(&v);
#pragma unroll
    for (int i = 0; i < 4; i++) {
        float2 f = __bfloat1622float2(h[i]);
        out[2 * i] = f.x;
        out[2 * i + 1] = f.y;
    }
}

// fp8 summaries (RESA_SUMMARY_FP8_E4M3, lib/summary_fp8.h): 8 dimensions are
// 8 bytes, in v.x and v.y.  e4m3 -> f16 is exact, so the hardware conversion
// (sm_89+) gives the codec's resa_e4m3_to_f32 values.
struct fp8_e4m3 {
    uint8_t bits;
};
__device__ __forceinline__ void unpack8(uint4 v, float out[8], fp8_e4m3)
{
    const uint32_t w[2] = {v.x, v.y};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const __nv_fp8x2_storage_t pair = (__nv_fp8x2_storage_t)(w[i / 2] >> (16 * (i % 2)));
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
        const __half2 h(__nv_cvt_fp8x2_to_halfraw2(pair, __NV_E4M3));
        const float2 f = __half22float2(h);
#else
        const float2 f = make_float2(resa_e4m3_to_f32((uint8_t)(pair & 0xff)),
                                     resa_e4m3_to_f32((uint8_t)(pair >> 8)));
#endif
        out[2 * i] = f.x;
        out[2 * i + 1] = f.y;
    }
}

// Streaming 16-byte load: summaries are read once per step, keep them out of L1.
// Not volatile, so that the scheduler may hoist all loads of a step together.
__device__ __forceinline__ uint4 load_stream(const void *p)
{
    uint4 v;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}
// The same for the 8 bytes of fp8 summaries (in .x, .y).
__device__ __forceinline__ uint4 load_stream8(const void *p)
{
    uint4 v = make_uint4(0, 0, 0, 0);
    asm("ld.global.nc.L1::no_allocate.v2.u32 {%0,%1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(p));
    return v;
}
template <typename S> __device__ __forceinline__ uint4 load_summary8(const S *p)
{
    if constexpr (sizeof(S) == 1)
        return load_stream8(p);
    else
        return load_stream(p);
}

// Pooled query of the group: mean of the g query vectors, unscaled, fp32.
template <typename T, int D>
__device__ void pooled_query(const resa_cuda_layer_args &a, int64_t row, int h, float *qp)
{
    const int g = a.dims.group;
    const T *q = (const T *)a.q + ((size_t)row * a.dims.hq + (size_t)h * g) * D;
    for (int t = threadIdx.x; t < D; t += blockDim.x) {
        float s = 0.0f;
        for (int j = 0; j < g; j++)
            s += to_f32(q[(size_t)j * D + t]);
        qp[t] = s / (float)g;
    }
    __syncthreads();
}

// This lane's share of sum_j max(q_j kmax_j, q_j kmin_j) over its 8 dimensions.
template <typename T>
__device__ __forceinline__ float score8(const float q[8], uint4 mn, uint4 mx)
{
    float a[8], b[8];
    unpack8(mn, a, T());
    unpack8(mx, b, T());
    float s = 0.0f;
#pragma unroll
    for (int i = 0; i < 8; i++)
        s += fmaxf(q[i] * b[i], q[i] * a[i]);
    return s;
}

// Sum over aligned groups of W lanes.
template <int W>
__device__ __forceinline__ float group_sum(float s)
{
#pragma unroll
    for (int o = W / 2; o > 0; o >>= 1)
        s += __shfl_xor_sync(0xffffffffu, s, o);
    return s;
}

// ---- select_top ----

struct Threshold {
    uint32_t key;    // take keys > key ...
    int32_t eq_take; // ... and the eq_take lowest-index keys == key
};

__device__ __forceinline__ unsigned lanemask_lt()
{
    return (1u << (threadIdx.x & 31)) - 1u;
}

// Inclusive prefix sum over the warp.
__device__ __forceinline__ uint32_t warp_scan(uint32_t x)
{
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        uint32_t y = __shfl_up_sync(0xffffffffu, x, o);
        if (lane >= o)
            x += y;
    }
    return x;
}

// Sum of v over the warps before this one (v given by lane 0 of each warp).
// Two barriers; s_cnt may be reused after it returns.
__device__ __forceinline__ int warps_before(int v, int *s_cnt)
{
    const int warp = threadIdx.x >> 5;
    if ((threadIdx.x & 31) == 0)
        s_cnt[warp] = v;
    __syncthreads();
    int sum = 0;
    for (int w = 0; w < warp; w++)
        sum += s_cnt[w];
    __syncthreads();
    return sum;
}

// Smallest and largest candidate key.  Scores of one head share a few
// exponents, so radix passes over key - min start at the first bit that
// actually varies instead of spending a pass on the common exponent.
__device__ void key_range(const uint32_t *keys, int lo, int hi, uint32_t *out_min, uint32_t *out_max)
{
    __shared__ uint32_t s_min[32], s_max[32];
    uint32_t mn = 0xffffffffu, mx = 0u;
    for (int j = lo + threadIdx.x; j < hi; j += blockDim.x) {
        const uint32_t k = keys[j];
        mn = min(mn, k);
        mx = max(mx, k);
    }
    mn = __reduce_min_sync(0xffffffffu, mn);
    mx = __reduce_max_sync(0xffffffffu, mx);
    if ((threadIdx.x & 31) == 0) {
        s_min[threadIdx.x >> 5] = mn;
        s_max[threadIdx.x >> 5] = mx;
    }
    __syncthreads();
    mn = 0xffffffffu;
    mx = 0u;
    for (int w = 0; w < (int)(blockDim.x >> 5); w++) {
        mn = min(mn, s_min[w]);
        mx = max(mx, s_max[w]);
    }
    *out_min = mn;
    *out_max = mx;
}

// Histogram of the digit (x >> shift) & (2^width - 1) of x = key - base over
// the keys whose bits of x above shift + width equal `prefix`.
__device__ void digit_histogram(const uint32_t *keys, int lo, int hi, uint32_t base,
                                uint32_t prefix, uint32_t mask, int shift, int width,
                                uint32_t *hist)
{
    for (int t = threadIdx.x; t < 256; t += blockDim.x)
        hist[t] = 0;
    __syncthreads();
    const uint32_t dmask = (1u << width) - 1u;
    for (int j = lo + threadIdx.x; j < hi; j += blockDim.x) {
        const uint32_t x = keys[j] - base;
        if ((x & mask) == prefix)
            atomicAdd(&hist[(x >> shift) & dmask], 1u);
    }
    __syncthreads();
}

// The digit whose bin holds the need-th largest key, counting from the top
// bin; returns it with the count still needed inside that bin and the bin size.
__device__ void pick_digit(const uint32_t *hist, int need, int *s_digit, int *s_need,
                           int *s_cnt, uint32_t *s_warp)
{
    const int t = threadIdx.x, lane = t & 31;
    uint32_t cnt = 0, incl = 0;
    if (t < 256) {
        cnt = hist[255 - t]; // t ascending = digits descending
        incl = warp_scan(cnt);
        if (lane == 31)
            s_warp[t >> 5] = incl;
    }
    __syncthreads();
    if (t < 256) {
        for (int w = 0; w < (t >> 5); w++)
            incl += s_warp[w];
        if (incl >= (uint32_t)need && incl - cnt < (uint32_t)need) {
            *s_digit = 255 - t;
            *s_need = need - (int)(incl - cnt);
            *s_cnt = (int)cnt;
        }
    }
    __syncthreads();
}

// Radix select of the k-th largest key among [lo, hi): digits of up to 8
// bits of key - min, most significant first, over the bits that vary only;
// stops as soon as every key of the chosen bin is taken.
__device__ Threshold radix_threshold(const uint32_t *keys, int lo, int hi, int k)
{
    __shared__ uint32_t hist[256];
    __shared__ uint32_t s_warp[8];
    __shared__ int s_digit, s_need, s_cnt;
    if (k <= 0)
        return {0xffffffffu, 0};
    if (k >= hi - lo)
        return {0u, INT_MAX};
    uint32_t kmin, kmax;
    key_range(keys, lo, hi, &kmin, &kmax);
    uint32_t prefix = 0, mask = 0;
    int need = k;
    for (int rem = 32 - __clz((int)(kmax - kmin)); rem > 0;) {
        const int width = min(rem, 8), shift = rem - width;
        digit_histogram(keys, lo, hi, kmin, prefix, mask, shift, width, hist);
        pick_digit(hist, need, &s_digit, &s_need, &s_cnt, s_warp);
        const int digit = s_digit, left = s_need, cnt = s_cnt;
        __syncthreads(); // everyone has read the picks before the next pass
        prefix |= (uint32_t)digit << shift;
        mask |= ((1u << width) - 1u) << shift;
        need = left;
        rem = shift;
        if (left == cnt) // the whole bin is taken: every key >= this prefix
            return {kmin + prefix, INT_MAX};
    }
    return {kmin + prefix, need}; // all bits fixed (or all keys equal)
}

// Index-ordered selection.  Warp w owns a contiguous, 32-aligned range of
// [0, M); three sweeps over it with ballots (count keys == T; count the
// taken; write) and one exclusive scan over warps between sweeps, so the
// whole pass costs four barriers whatever M is.  A block is taken if forced,
// if its key > T, or if its key == T and fewer than eq_take equal keys come
// before it.  One warp step of 32 blocks is one bitmap word.
__device__ void compact(const uint32_t *keys, const Pair &p, Threshold th, int32_t *list,
                        uint32_t *bits, int sel_words)
{
    __shared__ int s_cnt[32];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
    const int seg = ((p.M + nw - 1) / nw + 31) & ~31;
    const int w0 = min(p.M, warp * seg), w1 = min(p.M, w0 + seg);
    auto flags = [&](int j, bool &eq, bool &sure) {
        const bool in = j < w1, cand = in && j >= p.cand_lo && j < p.cand_hi;
        const uint32_t key = cand && keys ? keys[j] : 0u; // no keys: k <= 0, none taken
        eq = cand && key == th.key;
        sure = (in && !cand) || (cand && key > th.key);
    };
    int n_eq = 0;
    for (int base = w0; base < w1; base += 32) {
        bool eq, sure;
        flags(base + lane, eq, sure);
        n_eq += __popc(__ballot_sync(0xffffffffu, eq));
    }
    const int eq_first = warps_before(n_eq, s_cnt);
    int n_take = 0;
    for (int base = w0, eq_at = eq_first; base < w1; base += 32) {
        bool eq, sure;
        flags(base + lane, eq, sure);
        const unsigned beq = __ballot_sync(0xffffffffu, eq);
        const bool take = sure || (eq && eq_at + __popc(beq & lanemask_lt()) < th.eq_take);
        n_take += __popc(__ballot_sync(0xffffffffu, take));
        eq_at += __popc(beq);
    }
    int pos = warps_before(n_take, s_cnt);
    for (int base = w0, eq_at = eq_first; base < w1; base += 32) {
        bool eq, sure;
        flags(base + lane, eq, sure);
        const unsigned beq = __ballot_sync(0xffffffffu, eq);
        const bool take = sure || (eq && eq_at + __popc(beq & lanemask_lt()) < th.eq_take);
        const unsigned bt = __ballot_sync(0xffffffffu, take);
        if (take)
            list[pos + __popc(bt & lanemask_lt())] = base + lane;
        if (bits && lane == 0)
            bits[base >> 5] = bt;
        pos += __popc(bt);
        eq_at += __popc(beq);
    }
    if (bits)
        for (int w = (p.M + 31) / 32 + threadIdx.x; w < sel_words; w += blockDim.x)
            bits[w] = 0u;
}

// n >= M: every block, in order.
__device__ void take_all(int M, int32_t *list, uint32_t *bits, int sel_words)
{
    for (int j = threadIdx.x; j < M; j += blockDim.x)
        list[j] = j;
    if (bits)
        for (int w = threadIdx.x; w < sel_words; w += blockDim.x) {
            const int left = M - 32 * w;
            bits[w] = left >= 32 ? 0xffffffffu : left <= 0 ? 0u : (1u << left) - 1u;
        }
}

// The top-n of one (entry, head) by one CTA, once every score of it is in
// `kg` (global, written by this grid: read through L2 after the acquire
// fence); keys_s: shared staging of max_seq_blocks keys, or null.
__device__ void select_tail(const resa_cuda_layer_args &a, const Pair &p, int pair,
                            const uint32_t *kg, uint32_t *keys_s)
{
    const resa_cuda_dims &Dm = a.dims;
    const int h = pair % Dm.hkv;
    int32_t *list = (int32_t *)a.ws_select + (size_t)pair * Dm.max_seq_blocks;
    uint32_t *bits = a.selection
                         ? a.selection + ((size_t)p.slot * Dm.n_layers * Dm.hkv + h) * Dm.sel_words
                         : nullptr;
    if (p.n >= p.M) {
        take_all(p.M, list, bits, Dm.sel_words);
        return;
    }
    const uint32_t *kp = nullptr; // k <= 0: only forced blocks, no key is read
    if (p.k > 0) {
        kp = kg;
        if (keys_s) { // one read from L2, 8 loads in flight per thread
            constexpr int U = 8;
            for (int j0 = p.cand_lo + threadIdx.x; j0 < p.cand_hi; j0 += U * blockDim.x) {
                uint32_t v[U];
#pragma unroll
                for (int u = 0; u < U; u++) {
                    const int j = j0 + u * blockDim.x;
                    v[u] = j < p.cand_hi ? __ldcg(kg + j) : 0u;
                }
#pragma unroll
                for (int u = 0; u < U; u++) {
                    const int j = j0 + u * blockDim.x;
                    if (j < p.cand_hi)
                        keys_s[j] = v[u];
                }
            }
            __syncthreads();
            kp = keys_s;
        }
    }
    const Threshold th = radix_threshold(kp, p.cand_lo, p.cand_hi, p.k);
    compact(kp, p, th, list, bits, Dm.sel_words);
}

// Grid (ctas_per_pair, pairs).  Each CTA scores a contiguous share of one
// (entry, head)'s candidate blocks into `keys`; with kTop, the last CTA of
// the pair to finish (counted in counters[pair], which it sets back to zero
// for the next launch) runs the top-n over all of them.  Pairs that need no
// score (n >= M, or only forced blocks) are selected by their CTA 0 alone.
// (The 64-register cap of 1024 threads at 1 CTA/SM keeps 4 blocks per lane
// in flight; dynamic shared memory: the keys staging of the tail.)
template <typename T, typename S, int D, bool kTop>
__global__ void __launch_bounds__(kScoreThreads, 1)
score_select(resa_cuda_layer_args a, uint32_t *keys, uint32_t *counters, int stage_keys)
{
    constexpr int TD = D / 8;                 // lanes per block: 8 dimensions of kmin + kmax each
    constexpr bool F8 = sizeof(S) == 1;       // S: summary element, T or fp8_e4m3
    constexpr int G = kScoreThreads / TD;     // blocks per CTA per unrolled slot
    constexpr int STEP = G * kScoreUnroll;
    extern __shared__ uint32_t keys_s[];
    __shared__ float qp[D];
    __shared__ int s_last;
    const resa_cuda_dims &Dm = a.dims;
    const int pair = blockIdx.y;
    const int i = pair / Dm.hkv, h = pair % Dm.hkv;
    const Pair p = load_pair(a, i); // step metadata: written before the layer began
    uint32_t *out = keys + (size_t)pair * Dm.max_seq_blocks;
    if (p.n >= p.M || p.k <= 0) { // everything or only forced blocks: no score needed
        pdl_wait();
        pdl_trigger();
        if (kTop && blockIdx.x == 0)
            select_tail(a, p, pair, out, nullptr);
        return;
    }
    pooled_query<T, D>(a, p.row, h, qp); // the queries: written before the layer began
    pdl_wait(); // the summaries of this step's writes
    pdl_trigger();
    const int ncand = p.cand_hi - p.cand_lo;
    const int per = (ncand + gridDim.x - 1) / gridDim.x;
    const int lo = p.cand_lo + blockIdx.x * per, hi = min(p.cand_hi, lo + per);

    const int sub = threadIdx.x % TD, grp = threadIdx.x / TD;
    float q[8];
#pragma unroll
    for (int e = 0; e < 8; e++)
        q[e] = qp[sub * 8 + e];
    const int32_t *pt = a.page_tables + (size_t)p.slot * Dm.max_seq_blocks;
    const S *kmin = (const S *)a.kmin + (size_t)h * D + sub * 8;
    const S *kmax = (const S *)a.kmax + (size_t)h * D + sub * 8;
    const int8_t *kexp = a.kexp + h; // F8: the scale exponent of (page, h) at page * hkv
    const size_t page_stride = (size_t)Dm.hkv * D;

    // Uniform trip count across the CTA so that the shuffles see full warps.
    for (int base = lo; base < hi; base += STEP) {
        // Loads are unconditional (past the end: the last block again) so
        // that all 2 * kScoreUnroll of them are in flight at once.
        int page[kScoreUnroll];
#pragma unroll
        for (int u = 0; u < kScoreUnroll; u++)
            page[u] = __ldg(pt + min(base + u * G + grp, hi - 1));
        uint4 mn[kScoreUnroll], mx[kScoreUnroll];
        int ex[kScoreUnroll];
#pragma unroll
        for (int u = 0; u < kScoreUnroll; u++) {
            mn[u] = load_summary8(kmin + (size_t)page[u] * page_stride);
            mx[u] = load_summary8(kmax + (size_t)page[u] * page_stride);
            ex[u] = F8 ? __ldg(kexp + (size_t)page[u] * Dm.hkv) : 0;
        }
#pragma unroll
        for (int u = 0; u < kScoreUnroll; u++) {
            float s = group_sum<TD>(score8<S>(q, mn[u], mx[u]));
            if (F8)
                s = ldexpf(s, ex[u]); // 2^e * sum, as the CPU (exact scaling)
            const int j = base + u * G + grp;
            if (sub == 0 && j < hi)
                out[j] = order_key(s);
        }
    }
    if (!kTop)
        return;
    // Last CTA of the pair (the threadFenceReduction pattern): release our
    // keys, count, and the last one acquires everyone's.
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();
        const unsigned prev = atomicAdd(counters + pair, 1u);
        const int last = prev == gridDim.x - 1;
        if (last) {
            counters[pair] = 0u; // every CTA of this launch has counted: ready for the next
            __threadfence();
        }
        s_last = last;
    }
    __syncthreads();
    if (!s_last)
        return;
    select_tail(a, p, pair, out, stage_keys ? keys_s : nullptr);
}

size_t list_elems(const resa_cuda_dims *D)
{
    return (size_t)D->max_seqs * D->hkv * D->max_seq_blocks;
}

size_t counters_offset(const resa_cuda_dims *D)
{
    return 2 * list_elems(D) * sizeof(int32_t); // after lists and keys
}

// Shared staging of the keys for the top-n tail, when it fits (0: none).
size_t keys_smem(const resa_cuda_dims &D)
{
    const size_t smem = (size_t)D.max_seq_blocks * sizeof(uint32_t);
    return smem <= kKeysSmemMax ? smem : 0;
}

// CTAs per (entry, head): one wave over the chip from the shape alone
// (rounded down: a second, nearly empty wave would double the tail), at most
// one per 64 blocks of the longest possible sequence.
dim3 score_grid(const resa_cuda_dims &D, int n_decode)
{
    const int pairs = n_decode * D.hkv;
    const int want = max(D.num_sms, 1) * kScoreCtasPerSm / pairs;
    return dim3(max(1, min(want, (D.max_seq_blocks + 63) / 64)), pairs);
}

template <typename T, typename S, int D, bool kTop>
cudaError_t launch_score_d(const resa_cuda_layer_args *a, dim3 grid, uint32_t *keys,
                           uint32_t *counters)
{
    const size_t smem = kTop ? keys_smem(a->dims) : 0;
    if (smem > 48 * 1024) {
        cudaError_t err = cudaFuncSetAttribute(score_select<T, S, D, kTop>,
                                               cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               (int)smem);
        if (err != cudaSuccess)
            return err;
    }
    return launch_pdl(score_select<T, S, D, kTop>, grid, dim3(kScoreThreads), smem, a->stream, *a,
                      keys, counters, smem > 0 ? 1 : 0);
}

template <typename T, typename S, bool kTop>
cudaError_t launch_score(const resa_cuda_layer_args *a, dim3 grid, uint32_t *keys,
                         uint32_t *counters)
{
    switch (a->dims.d) {
    case 64:
        return launch_score_d<T, S, 64, kTop>(a, grid, keys, counters);
    case 128:
        return launch_score_d<T, S, 128, kTop>(a, grid, keys, counters);
    case 256:
        return launch_score_d<T, S, 256, kTop>(a, grid, keys, counters);
    default:
        return cudaErrorInvalidValue;
    }
}

} // namespace

size_t resa_cuda_select_workspace(const resa_cuda_dims *dims)
{
    // lists, keys, then one arrival counter per (entry, head), zero between launches
    return counters_offset(dims) + (size_t)dims->max_seqs * dims->hkv * sizeof(uint32_t);
}

cudaError_t resa_cuda_select_init(const resa_cuda_dims *dims, void *ws_select, cudaStream_t stream)
{
    cudaError_t err = cudaMemsetAsync((char *)ws_select + counters_offset(dims), 0,
                                      (size_t)dims->max_seqs * dims->hkv * sizeof(uint32_t), stream);
    if (err != cudaSuccess)
        return err;
    return cudaStreamSynchronize(stream);
}

cudaError_t resa_cuda_select_blocks(const resa_cuda_layer_args *a)
{
    if (a->n_decode <= 0)
        return cudaGetLastError();
    const resa_cuda_dims &D = a->dims;
    uint32_t *keys = (uint32_t *)a->ws_select + list_elems(&D);
    uint32_t *counters = (uint32_t *)((char *)a->ws_select + counters_offset(&D));
    const dim3 grid = score_grid(D, a->n_decode);
    cudaError_t err = RESA_DISPATCH_DTYPE(D.kv_dtype, T, [&] {
        return D.sum_fp8 ? launch_score<T, fp8_e4m3, true>(a, grid, keys, counters)
                         : launch_score<T, T, true>(a, grid, keys, counters);
    });
    if (err != cudaSuccess)
        return err;
    return cudaGetLastError();
}
