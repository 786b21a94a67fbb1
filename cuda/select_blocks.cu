// SPDX-License-Identifier: MIT
// ReSA block selection for every DECODE and QUERY_SPARSE entry and KV head:
// pooled group query, block scores from the min/max summaries, forced
// sink/local blocks, top-n.  CPU twins: lib/cpu/attention_sparse.c
// (choose_blocks) and lib/cpu/block_scores.c (phase 1 of the two-phase
// selection, resa_cuda_block_scores).
//
// A sequence with a span (resa_seq_set_span) is selected in local block
// indices: this context's block j is the sequence's block first_block + j.
// The budget, the forced blocks (the sequence's first sink and last local
// blocks) and the candidate count K come from the whole sequence; the
// candidates here are the local blocks outside the forced ranges.  Without
// thresholds the tail takes the best min(K, candidates here) of them (ties:
// lower index, the same order as lower global index); with thresholds
// (resa_ctx_step_attend_ex) it takes every candidate ranking at or above the
// entry's (t, t_block): key > order_key(t), or key == order_key(t) and
// first_block + j <= t_block, counted by one sweep before the write sweep.
// Each (entry, head) leaves its number of chosen blocks in sel_counts for
// attention_sparse.cu.  Phase 1 (resa_cuda_block_scores, cp_counts set) runs
// the same scores and top-K search and writes the chosen candidates' scores
// and global indices to the host's lists instead of the selection.
//
// One launch per layer (score_select), no host synchronization, no allocation:
//  - scores: the summaries are 1/16 of the KV bytes and are read once, so
//    this is the bandwidth-bound half.  Grid (ctas_per_pair, pairs) of 1024
//    threads, one CTA per SM, one wave: each CTA scores a contiguous share of
//    one (entry, head)'s candidate blocks; a group of lanes reads one block's
//    kmin and kmax as 16-byte vectors (8 dimensions a lane for 16-bit
//    summaries, 16 for fp8), several blocks per lane in flight.  Scores are
//    stored as order-preserving uint32 keys (unsigned order == float order)
//    in the workspace, and each CTA merges the min and max of its keys into
//    its pair's cells with two global atomics.
//  - top-n, in the same launch: the last CTA of an (entry, head) to finish
//    its share (an arrival count in the pair's cells, which that CTA sets
//    back to zero with the key range, so graph replays need no reset) runs
//    it alone.  Warp w owns a 32-aligned segment of the pair's blocks
//    throughout.  Pass 1 reads the keys once from L2, staging them in shared
//    memory (when max_seq_blocks <= 40960; beyond, the passes read them from
//    global memory, where they are L2-resident), into a 2048-bin histogram
//    over the key range: bins linear in the score when the range is finite
//    (clustered scores spread whatever their exponents), else linear in the
//    key; any monotone binning keeps each bin one interval of keys.  The bin
//    of the k-th largest key is found by a block scan; a filter sweep then
//    counts the keys of higher bins as taken (per warp segment) and moves the
//    bin's keys with their indices to a shared buffer (typically ~10-30
//    keys).  Further passes (histogram, pick, filter) run over that buffer
//    alone, or over all keys of the bin's key range if it overflows 1024;
//    a set of <= 32 keys is ranked by one warp, which yields the threshold
//    key T, the last index jT taken among keys == T (the CPU's tie rule:
//    score desc, then lower index) and the remaining per-segment counts; a
//    set of equal keys is resolved by one index-ordered counting sweep.
//    Finally one sweep writes the list ascending (warp w from the sum of the
//    counts of segments < w) and, when recording, the bitmap: a block is
//    taken if forced, if key > T, or if key == T and index <= jT.
//    Typically 3 sweeps over the keys (histogram+stage, filter, write) and
//    ~7 barriers; no sort.
//  - launched as a programmatic dependent of kv_write's last kernel
//    (common.cuh): pdl_wait before the summaries are read, or, when the
//    entry's written block is not a candidate, after the scoring loop (which
//    then runs beside the write kernel) and before the tail.
//
// Workspace (resa_cuda_select_workspace):
//   lists    [max_seqs][hkv][max_seq_blocks] int32  (resa_cuda_sel_list)
//   keys     [max_seqs][hkv][max_seq_blocks] uint32 (scores as ordered keys)
//   cells    [max_seqs][hkv] PairCells: zero at rest (resa_cuda_select_init once)
//   hscores  [max_seqs][hkv][group][max_seq_blocks] float: GROUP_SCORE HEAD_SHARE's
//            per-head block scores in logits (the tail turns them into keys)
//   hparts   HEAD_SHARE's per-CTA partial log-sum-exps
//   counts   [max_seqs][hkv] int32: blocks chosen per (entry, head) (resa_cuda_select_counts)
#include <cuda_fp8.h>
#include <limits.h>

#include <type_traits>

#include "common.cuh"
#include "summary_fp8.h"

namespace {

using namespace resa;

constexpr int kScoreThreads = 1024;   // also the top-n tail's threads
constexpr int kScoreUnroll = 4;       // 8-dimension lane groups: blocks in flight per step (fp8 at
                                      // 16 dimensions: 2, the same 64 bytes a lane)
constexpr int kScoreCtasPerSm = 1;    // 1024 threads at <= 64 registers: the grid is one full wave
constexpr size_t kKeysSmemMax = 160 * 1024; // keys staged in shared memory up to 40960 blocks
constexpr int kMaxGroup = 16;         // query heads per KV head (the backend's lock check)

// Per (entry, head), zero between launches: the arrival count of the score
// CTAs and the range of their keys (minimum complemented, so zero = empty).
struct PairCells {
    uint32_t count, not_min, max, pad;
};

// One (sparse entry, KV head) as both kernels see it, in this context's
// local block indices (global index = fb + local index).
struct Pair {
    int32_t slot, entry;     // sequence slot, index of the entry in the step
    int32_t M;               // blocks of this context the row may attend
    int32_t all;             // the budget covers the whole sequence: every block
    int32_t cand_lo, cand_hi; // candidates [cand_lo, cand_hi): neither sink nor local
    int32_t k;               // candidates to choose here: min(the sequence's n minus
                             // its forced blocks, cand_hi - cand_lo); 0: none by score
    int32_t fb;              // first_block: global index of local block 0
    int64_t row;             // the entry's query row
};

// lib/cpu/attention_sparse.c, candidate_range: the global forced ranges
// [0, sink) and [M - local, M) cut out of the local blocks [0, Ml).
__device__ Pair load_pair(const resa_cuda_layer_args &a, int i)
{
    const int ei = a.decode_ids[i];
    const resa_dev_entry &e = a.entries[ei];
    Pair p;
    p.slot = e.slot;
    p.entry = ei;
    p.row = e.row;
    p.fb = e.first_block;
    const int M = e.n_blocks, Ml = e.local_blocks;
    p.M = Ml;
    p.all = e.n_select >= M;
    const int sink = min(max(a.sink_blocks, 0), M);
    const int local_from = M - min(max(a.local_blocks, 0), M);
    p.cand_lo = min(max(sink - p.fb, 0), Ml);
    p.cand_hi = min(max(local_from - p.fb, p.cand_lo), Ml); // the forced ranges may overlap
    p.k = !p.all && e.n_pick > 0 ? min(e.n_pick, p.cand_hi - p.cand_lo) : 0;
    return p;
}

// Unsigned order of the key == numeric order of the score (-0 folded to +0
// so that equal scores give equal keys, as the CPU's == compares them).  A
// NaN score (a NaN query, or infinite summaries: inf - inf, 0 * inf) is
// stored as -inf, below every number, as the CPU does (choose_blocks): the
// key order stays total, a NaN never outranks a block (a positive NaN's bits
// would sort above +inf) and both backends take the same blocks.  One select
// on a value already in a register: no cost in this memory-bound kernel.
__device__ __forceinline__ uint32_t order_key(float s)
{
    if (s == 0.0f)
        s = 0.0f;
    if ((__float_as_uint(s) & 0x7fffffffu) > 0x7f800000u) // NaN (bit test: no fast-math folding)
        s = -INFINITY;
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

// This lane's share of sum_j max(q_j kmax_j, q_j kmin_j) over its 8 dimensions
// (w == 1, the paper's bound), or of the box centre plus w times its
// half-width, sum_j (q_j (kmax_j + kmin_j) + w |q_j| (kmax_j - kmin_j)) / 2.
// w is uniform over the launch, so the branch never diverges.
template <typename T>
__device__ __forceinline__ float score8(const float q[8], uint4 mn, uint4 mx, float w)
{
    float a[8], b[8];
    unpack8(mn, a, T());
    unpack8(mx, b, T());
    float s = 0.0f;
    if (w == 1.0f) {
#pragma unroll
        for (int i = 0; i < 8; i++)
            s += fmaxf(q[i] * b[i], q[i] * a[i]);
    } else {
#pragma unroll
        for (int i = 0; i < 8; i++)
            s += 0.5f * (q[i] * (b[i] + a[i]) + w * fabsf(q[i]) * (b[i] - a[i]));
    }
    return s;
}

// The same over 16 fp8 dimensions (one 16-byte load of kmin and of kmax):
// the lane's two halves in order, so the sum is the one of two score8 calls
// added together.
__device__ __forceinline__ float score16(const float q[16], uint4 mn, uint4 mx, float w)
{
    return score8<fp8_e4m3>(q, mn, mx, w) +
           score8<fp8_e4m3>(q + 8, make_uint4(mn.z, mn.w, 0, 0), make_uint4(mx.z, mx.w, 0, 0), w);
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

// ---- top-n tail ----

constexpr int kWarps = kScoreThreads / 32;
constexpr int kBins = 2 * kScoreThreads; // 11-bit digits: two bins per thread in pick_bin
constexpr int kCap = kScoreThreads;      // candidate buffer: one entry per thread
constexpr int kResolve = 32;             // candidate sets this small: one warp finishes
static_assert(kWarps == 32, "one lane per warp in the warp-level scans");

// Shared state of the tail (static: ~25 KB, next to the dynamic keys staging).
struct TailShared {
    uint32_t hist[kBins];
    uint32_t ckey[2][kCap]; // candidate buffers (ping-pong): key, block index
    int32_t cidx[2][kCap];
    int seg_take[kWarps];   // per warp segment: blocks known to be taken so far
    uint32_t wsum[kWarps];  // scan scratch
    uint32_t lo, hi;        // key range of the candidate set (from the score CTAs, then per pass)
    uint32_t nlo, nhi;      // key range of the chosen bin, built by filter()
    int ndst;               // entries appended to the destination buffer
    int bin, need, cnt;     // pick_bin's answer
    uint32_t T;             // threshold: take keys > T ...
    int jT;                 // ... and keys == T at block index <= jT
    int last;               // this CTA runs the tail
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

// Sum of the kWarps values v[0 .. warp) (v in shared memory, one per warp),
// for every lane of the calling warp: one load and one warp scan, no barrier.
__device__ __forceinline__ uint32_t warps_before(const uint32_t *v)
{
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const uint32_t incl = warp_scan(v[lane]);
    const uint32_t prev = __shfl_sync(0xffffffffu, incl, max(warp - 1, 0));
    return warp > 0 ? prev : 0u;
}

// The score a key stands for (inverse of order_key).
__device__ __forceinline__ float key_value(uint32_t k)
{
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// A monotone map of the keys in [lo, hi] onto kBins bins (key1 <= key2 ->
// bin1 <= bin2, so every bin holds one interval of keys).  Linear in the
// score where lo and hi are finite and apart (clustered scores spread over
// the bins whatever their exponents and signs), else linear in the key
// (each such pass shrinks the range 2048-fold: at most 3 passes to one key).
struct Binner {
    uint32_t lo;
    float vlo, scale;
    uint64_t mul;
    bool flt;
    __device__ __forceinline__ int operator()(uint32_t key) const
    {
        if (flt) // v - vlo >= 0 and * scale are rounded monotonically; vhi lands on kBins
            return min(__float2int_rz(__fmul_rn(__fsub_rn(key_value(key), vlo), scale)), kBins - 1);
        return (int)(((uint64_t)(key - lo) * mul) >> 32); // < kBins for key <= hi
    }
};

__device__ __forceinline__ Binner make_binner(uint32_t lo, uint32_t hi, bool allow_float)
{
    Binner b;
    b.lo = lo;
    b.mul = ((uint64_t)kBins << 32) / ((uint64_t)(hi - lo) + 1u);
    b.vlo = key_value(lo);
    const float vhi = key_value(hi), w = vhi - b.vlo;
    b.scale = (float)kBins / w;
    b.flt = allow_float && isfinite(b.vlo) && isfinite(vhi) && w > 0.0f && isfinite(w) &&
            isfinite(b.scale) && b.scale > 0.0f;
    return b;
}

// Warp w's blocks: [w0, w1), 32-aligned; its candidates [c0, c1) within them.
struct Seg {
    int seg, w0, w1, c0, c1;
};
__device__ __forceinline__ Seg warp_seg(const Pair &p)
{
    Seg s;
    const int warp = threadIdx.x >> 5;
    s.seg = ((p.M + kWarps - 1) / kWarps + 31) & ~31;
    s.w0 = min(p.M, warp * s.seg);
    s.w1 = min(p.M, s.w0 + s.seg);
    s.c0 = max(s.w0, p.cand_lo);
    s.c1 = max(s.c0, min(s.w1, p.cand_hi));
    return s;
}

// f(j, key, in) for j in [s0, s1) of the calling warp, 32 lanes at a time,
// U loads in flight; every lane calls f the same number of times (in: j < s1).
// Only keys in [l0, l1) are loaded (others are 0): a sweep over a whole
// segment must not read the never-written key slots of forced blocks.
template <bool kGlobal, typename F>
__device__ __forceinline__ void sweep(const uint32_t *src, int s0, int s1, int l0, int l1, F f)
{
    constexpr int U = 4; // 8 spills under the 64-register cap
    const int lane = threadIdx.x & 31;
    for (int base = s0; base < s1; base += 32 * U) {
        uint32_t v[U];
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int j = base + u * 32 + lane;
            v[u] = j < s1 && j >= l0 && j < l1 ? (kGlobal ? __ldcg(src + j) : src[j]) : 0u;
        }
#pragma unroll
        for (int u = 0; u < U; u++)
            f(base + u * 32 + lane, v[u], base + u * 32 + lane < s1);
    }
}
template <bool kGlobal, typename F>
__device__ __forceinline__ void sweep(const uint32_t *src, int s0, int s1, F f)
{
    sweep<kGlobal>(src, s0, s1, s0, s1, f);
}
template <typename F>
__device__ __forceinline__ void sweep_any(const uint32_t *src, bool global, int s0, int s1, int l0,
                                          int l1, F f)
{
    if (global)
        sweep<true>(src, s0, s1, l0, l1, f);
    else
        sweep<false>(src, s0, s1, l0, l1, f);
}
template <typename F>
__device__ __forceinline__ void sweep_any(const uint32_t *src, bool global, int s0, int s1, F f)
{
    sweep_any(src, global, s0, s1, s0, s1, f);
}

// The bin holding the need-th largest key of the histogram, the count still
// needed inside it and its size (ts.bin, ts.need, ts.cnt); zeroes the
// histogram for the next pass and resets the filter's outputs.  2 barriers.
__device__ void pick_bin(TailShared &ts, int need)
{
    const int t = threadIdx.x, lane = t & 31, warp = t >> 5;
    const int b0 = kBins - 1 - 2 * t; // t ascending = bins descending: b0, then b0 - 1
    const uint32_t c0 = ts.hist[b0], c1 = ts.hist[b0 - 1];
    ts.hist[b0] = 0u; // only this thread reads these two bins here
    ts.hist[b0 - 1] = 0u;
    const uint32_t s = c0 + c1, incl = warp_scan(s);
    if (lane == 31)
        ts.wsum[warp] = incl;
    if (t == 0) {
        ts.nlo = 0xffffffffu;
        ts.nhi = 0u;
        ts.ndst = 0;
    }
    __syncthreads();
    const uint32_t excl = warps_before(ts.wsum) + incl - s, u = (uint32_t)need;
    if (excl < u && u <= excl + c0) {
        ts.bin = b0;
        ts.need = need - (int)excl;
        ts.cnt = (int)c0;
    } else if (excl + c0 < u && u <= excl + s) {
        ts.bin = b0 - 1;
        ts.need = need - (int)(excl + c0);
        ts.cnt = (int)c1;
    }
    __syncthreads();
}

// Threshold search over the candidates [cand_lo, cand_hi) (keys in kg, global;
// staged into keys_s on the first pass when keys_s): sets ts.T, ts.jT so that
// exactly k candidates satisfy key > T || (key == T && j <= jT) (the CPU's
// order: score desc, then lower index), and adds every taken candidate to
// ts.seg_take of its warp segment.  Each pass: histogram of the candidate set
// (first pass: all candidates, straight from L2), the bin of the k-th key,
// then a filter that counts the keys of higher bins as taken and moves the
// bin's keys (with their indices) to a shared buffer; later passes run over
// that buffer only (over all keys in the bin's key range if it overflows).
// A set of <= 32 keys is finished by one warp; a set of equal keys by one
// index-ordered sweep.
__device__ void find_threshold(TailShared &ts, const Pair &p, const Seg &sg, const uint32_t *kg,
                               uint32_t *keys_s)
{
    const int t = threadIdx.x, lane = t & 31, warp = t >> 5;
    const bool stage = keys_s != nullptr;
    const uint32_t *kp = stage ? keys_s : kg; // all keys, after the first pass
    uint32_t lo = ts.lo, hi = ts.hi;
    int n_set = p.cand_hi - p.cand_lo, need = p.k;
    int src = -1; // candidate set: -1 all keys in [lo, hi], else buffer src
    for (int pass = 0;; pass++) {
        if (pass > 0 && (lo == hi || (src >= 0 && n_set <= kResolve)))
            break;
        const Binner bn = make_binner(lo, hi, pass < 2);
        // histogram
        if (pass == 0) {
            sweep<true>(kg, sg.c0, sg.c1, [&](int j, uint32_t key, bool in) {
                if (in) {
                    if (stage)
                        keys_s[j] = key;
                    atomicAdd(&ts.hist[bn(key)], 1u);
                }
            });
        } else if (src < 0) {
            sweep_any(kp, !stage, sg.c0, sg.c1, [&](int, uint32_t key, bool in) {
                if (in && key >= lo && key <= hi)
                    atomicAdd(&ts.hist[bn(key)], 1u);
            });
        } else if (t < n_set) {
            atomicAdd(&ts.hist[bn(ts.ckey[src][t])], 1u);
        }
        __syncthreads();
        pick_bin(ts, need);
        const int bin = ts.bin, cnt = ts.cnt;
        need = ts.need;
        const int dst = cnt <= kCap ? (src < 0 ? 0 : 1 - src) : -1;
        // filter: higher bins are taken; the bin's keys form the next set
        uint32_t mn = 0xffffffffu, mx = 0u;
        auto keep = [&](int j, uint32_t key, bool hit) {
            if (hit) {
                mn = min(mn, key);
                mx = max(mx, key);
            }
            if (dst >= 0) {
                const unsigned bal = __ballot_sync(0xffffffffu, hit);
                if (bal) {
                    int at = 0;
                    if (lane == 0)
                        at = atomicAdd(&ts.ndst, __popc(bal));
                    at = __shfl_sync(0xffffffffu, at, 0) + __popc(bal & lanemask_lt());
                    if (hit) {
                        ts.ckey[dst][at] = key;
                        ts.cidx[dst][at] = j;
                    }
                }
            }
        };
        if (src < 0) {
            int above = 0;
            sweep_any(kp, !stage, sg.c0, sg.c1, [&](int j, uint32_t key, bool in) {
                const bool inr = in && key >= lo && key <= hi;
                const int b = inr ? bn(key) : -1;
                above += __popc(__ballot_sync(0xffffffffu, b > bin));
                keep(j, key, b == bin);
            });
            if (lane == 0)
                ts.seg_take[warp] += above; // this warp's entry alone
        } else {
            // one entry per thread; warps past the set skip (warp-uniform)
            if ((t & ~31) < n_set) {
                const bool in = t < n_set;
                const uint32_t key = in ? ts.ckey[src][t] : 0u;
                const int j = in ? ts.cidx[src][t] : 0;
                const int b = in ? bn(key) : -1;
                if (b > bin)
                    atomicAdd(&ts.seg_take[j / sg.seg], 1);
                keep(j, key, b == bin);
            }
        }
        mn = __reduce_min_sync(0xffffffffu, mn);
        mx = __reduce_max_sync(0xffffffffu, mx);
        if (lane == 0 && mx >= mn) {
            atomicMin(&ts.nlo, mn);
            atomicMax(&ts.nhi, mx);
        }
        __syncthreads();
        lo = ts.nlo;
        hi = ts.nhi;
        n_set = cnt;
        src = dst;
    }
    if (src >= 0 && n_set <= kResolve) {
        // one warp: rank the <= 32 keys left, need-th largest is T
        if (warp == 0) {
            const bool v = lane < n_set;
            const uint32_t key = v ? ts.ckey[src][lane] : 0u;
            const int j = v ? ts.cidx[src][lane] : INT_MAX;
            int gt = 0, eq = 0;
            for (int i = 0; i < n_set; i++) {
                const uint32_t o = __shfl_sync(0xffffffffu, key, i);
                gt += o > key;
                eq += o == key;
            }
            const unsigned hit = __ballot_sync(0xffffffffu, v && gt < need && need <= gt + eq);
            const int at = __ffs(hit) - 1; // hit != 0: the set holds the need-th key
            const uint32_t T = __shfl_sync(0xffffffffu, key, at);
            const int eq_take = need - __shfl_sync(0xffffffffu, gt, at);
            const int eq_all = __shfl_sync(0xffffffffu, eq, at);
            const bool tie = v && key == T;
            int rank = 0; // ties before this one by index
            for (int i = 0; i < n_set; i++) {
                const uint32_t o = __shfl_sync(0xffffffffu, key, i);
                const int oj = __shfl_sync(0xffffffffu, j, i);
                rank += o == T && oj < j;
            }
            const bool tie_take = tie && rank < eq_take;
            const int jT = eq_take >= eq_all ? INT_MAX : __reduce_max_sync(0xffffffffu, tie_take ? j : -1);
            if (v && (key > T || tie_take))
                atomicAdd(&ts.seg_take[j / sg.seg], 1);
            if (lane == 0) {
                ts.T = T;
                ts.jT = jT;
            }
        }
        __syncthreads();
        return;
    }
    // lo == hi: the set is every key == lo; take the `need` lowest-index ones
    const uint32_t T = lo;
    int n_eq = 0;
    sweep_any(kp, !stage, sg.c0, sg.c1, [&](int, uint32_t key, bool in) {
        n_eq += __popc(__ballot_sync(0xffffffffu, in && key == T));
    });
    if (lane == 0)
        ts.wsum[warp] = (uint32_t)n_eq;
    if (t == 0) {
        ts.T = T;
        ts.jT = INT_MAX;
    }
    __syncthreads();
    const int before = (int)warps_before(ts.wsum);
    if (lane == 0)
        ts.seg_take[warp] += min(max(need - before, 0), n_eq);
    if (need < n_set && before < need && need <= before + n_eq) { // the last tie taken is here
        int r = need - before;
        for (int base = sg.c0; base < sg.c1; base += 32) {
            const int j = base + lane;
            unsigned bal = __ballot_sync(0xffffffffu, j < sg.c1 && kp[j] == T);
            const int c = __popc(bal);
            if (r <= c) {
                for (int i = 1; i < r; i++)
                    bal &= bal - 1;
                if (lane == 0)
                    ts.jT = base + __ffs(bal) - 1;
                break;
            }
            r -= c;
        }
    }
    __syncthreads();
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

// Phase 1 (a.cp_counts set): the best k candidates of this context (the same
// search as select_tail's mode 2), written as (score, global block) to the
// host's lists at x * cp_capacity, x = entry * hkv + head, in index order,
// and their number to cp_counts[x].  The score is key_value(key): NaN was
// stored as -inf, -0 as +0 (equal under ==, the order's comparison).
__device__ void export_tail(const resa_cuda_layer_args &a, const Pair &p, int pair,
                            const uint32_t *kg, uint32_t *keys_s, TailShared &ts)
{
    const resa_cuda_dims &Dm = a.dims;
    const size_t x = (size_t)p.entry * Dm.hkv + pair % Dm.hkv;
    const int ncand = p.cand_hi - p.cand_lo;
    // 0: nothing chosen by score here; 1: every candidate; 2: threshold on the keys
    const int mode = p.all || p.k <= 0 ? 0 : p.k >= ncand ? 1 : 2;
    if (mode == 0) { // uniform over the CTA
        if (threadIdx.x == 0)
            a.cp_counts[x] = 0;
        return;
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const Seg sg = warp_seg(p);
    if (lane == 0) // candidates of the segment taken so far (find_threshold adds its own)
        ts.seg_take[warp] = mode == 1 ? sg.c1 - sg.c0 : 0;
    __syncthreads();
    const uint32_t *kp = kg;
    bool global = true;
    uint32_t T = 0u;
    int jT = INT_MAX;
    if (mode == 2) {
        find_threshold(ts, p, sg, kg, keys_s);
        kp = keys_s ? keys_s : kg;
        global = keys_s == nullptr;
        T = ts.T;
        jT = ts.jT;
    }
    int pos = (int)warps_before((const uint32_t *)ts.seg_take);
    float *so = a.cp_scores + x * (size_t)a.cp_capacity;
    int32_t *bo = a.cp_blocks + x * (size_t)a.cp_capacity;
    sweep_any(kp, global, sg.c0, sg.c1, [&](int j, uint32_t key, bool in) {
        const bool take = in && (mode == 1 || key > T || (key == T && j <= jT));
        const unsigned bt = __ballot_sync(0xffffffffu, take);
        if (take) {
            const int r = pos + __popc(bt & lanemask_lt());
            so[r] = key_value(key);
            bo[r] = p.fb + j;
        }
        pos += __popc(bt);
    });
    if (warp == kWarps - 1 && lane == 0) // the last segment ends at the total
        a.cp_counts[x] = pos;
}

// The top-n of one (entry, head) by one CTA, once every score of it is in
// `kg` (global, written by this grid: read through L2 after the acquire
// fence) and ts.lo / ts.hi hold their key range; keys_s: shared staging of
// max_seq_blocks keys, or null.  One index-ordered write sweep at the end:
// warp w writes its segment's taken blocks at sum(seg_take[< w]); the last
// warp's end is the pair's count (sel_counts).  With thresholds
// (a.thr_scores) a counting sweep over the candidates comes first.
// kExport: phase 1 (export_tail) instead, its own instantiation so that the
// decode kernel does not carry its code (register pressure).
template <bool kExport>
__device__ void select_tail(const resa_cuda_layer_args &a, const Pair &p, int pair,
                            const uint32_t *kg, uint32_t *keys_s, TailShared &ts)
{
    if constexpr (kExport) {
        export_tail(a, p, pair, kg, keys_s, ts);
        return;
    }
    const resa_cuda_dims &Dm = a.dims;
    const int h = pair % Dm.hkv;
    int32_t *list = (int32_t *)a.ws_select + (size_t)pair * Dm.max_seq_blocks;
    uint32_t *bits = a.selection
                         ? a.selection + ((size_t)p.slot * Dm.n_layers * Dm.hkv + h) * Dm.sel_words
                         : nullptr;
    if (p.all) {
        take_all(p.M, list, bits, Dm.sel_words);
        if (threadIdx.x == 0)
            a.sel_counts[pair] = p.M;
        return;
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const Seg sg = warp_seg(p);
    const int ncand = p.cand_hi - p.cand_lo;
    // 0: only forced blocks; 1: every block; 2: threshold on the keys (this
    // context's top k); 3: the thresholds of resa_ctx_step_thresholds
    const int mode = p.k <= 0 ? 0 : a.thr_scores ? 3 : p.k >= ncand ? 1 : 2;
    if (lane == 0) // forced blocks of the segment (all of it in mode 1)
        ts.seg_take[warp] = (sg.w1 - sg.w0) - (mode == 1 ? 0 : sg.c1 - sg.c0);
    __syncthreads();
    const uint32_t *kp = nullptr;
    bool global = false;
    uint32_t T = 0u;
    int jT = 0;
    if (mode == 2) {
        find_threshold(ts, p, sg, kg, keys_s);
        kp = keys_s ? keys_s : kg;
        global = keys_s == nullptr;
        T = ts.T;
        jT = ts.jT;
    } else if (mode == 3) {
        // (t, t_block) of this entry and head; the local index of t_block
        // (clamped: j <= jT keeps its meaning for any int32 t_block)
        const size_t at = (size_t)p.entry * Dm.hkv + h;
        T = order_key(a.thr_scores[at]); // NaN as -inf, -0 as +0: the CPU's finite_or_low and ==
        const int64_t tb = (int64_t)a.thr_blocks[at] - p.fb;
        jT = (int)max((int64_t)-1, min((int64_t)INT_MAX, tb));
        kp = kg;
        global = true;
        int n = 0;
        sweep<true>(kg, sg.c0, sg.c1, [&](int j, uint32_t key, bool in) {
            n += __popc(__ballot_sync(0xffffffffu, in && (key > T || (key == T && j <= jT))));
        });
        if (lane == 0)
            ts.seg_take[warp] += n;
        __syncthreads();
    }
    int pos = (int)warps_before((const uint32_t *)ts.seg_take);
    auto write = [&](int j, uint32_t key, bool in) {
        const bool cand = j >= p.cand_lo && j < p.cand_hi;
        const bool take = in && (!cand || mode == 1 ||
                                 (mode >= 2 && (key > T || (key == T && j <= jT))));
        const unsigned bt = __ballot_sync(0xffffffffu, take);
        if (take)
            list[pos + __popc(bt & lanemask_lt())] = j;
        if (bits && lane == 0 && j < sg.w1)
            bits[j >> 5] = bt;
        pos += __popc(bt);
    };
    // the segment is 32-aligned, so each 32-step of the sweep is one bitmap
    // word; only the candidates' keys are loaded (write ignores the key of a
    // forced block, and its slot was never written: compute-sanitizer's
    // initcheck reported the load)
    if (mode >= 2)
        sweep_any(kp, global, sg.w0, sg.w1, sg.c0, sg.c1,
                  [&](int j, uint32_t key, bool in) { write(j, key, in); });
    else
        for (int base = sg.w0; base < sg.w1; base += 32)
            write(base + lane, 0u, base + lane < sg.w1);
    if (warp == kWarps - 1 && lane == 0) // the last segment ends at the total
        a.sel_counts[pair] = pos;
    if (bits)
        for (int w = (p.M + 31) / 32 + threadIdx.x; w < Dm.sel_words; w += blockDim.x)
            bits[w] = 0u;
}

// ---- GROUP_SCORE HEAD_SHARE (CPU twin: head_share_scores, lib/cpu/attention_sparse.c) ----
//
// The score CTAs store every candidate's g per-head logits (hs, [g][max_seq_blocks]
// per pair) and fold them into per-CTA partial log-sum-exps per head (part,
// [pair][cta][g] (m, l) pairs); the pair's last CTA adds the forced blocks, merges
// the partials into each head's lse_h and writes the keys
// order_key(log sum_h exp(s_hj - lse_h)) for the unchanged top-n tail.  One pass
// over the g x M logits after the scores, issued g loads at a time.

// The g query vectors of the group, unscaled, fp32: qs[j * D + t].
template <typename T, int D>
__device__ void group_queries(const resa_cuda_layer_args &a, int64_t row, int h, float *qs)
{
    const int g = a.dims.group;
    const T *q = (const T *)a.q + ((size_t)row * a.dims.hq + (size_t)h * g) * D;
    for (int t = threadIdx.x; t < g * D; t += blockDim.x)
        qs[t] = to_f32(q[t]);
    __syncthreads();
}

// This lane's V dimensions of a block's kmin (lo) and kmax (hi) as fp32.
template <typename S, int V>
__device__ __forceinline__ void unpack_box(uint4 mn, uint4 mx, float lo[V], float hi[V])
{
    unpack8(mn, lo, S());
    unpack8(mx, hi, S());
    if constexpr (V == 16) {
        unpack8(make_uint4(mn.z, mn.w, 0, 0), lo + 8, S());
        unpack8(make_uint4(mx.z, mx.w, 0, 0), hi + 8, S());
    }
}

// The box of this lane's V dimensions as centre c = (hi + lo) / 2 and weighted
// half-width r = w (hi - lo) / 2, once per block for all g heads.  The score
// q.c + |q|.r is the width score; at w = 1 it equals sum max(q hi, q lo), the
// paper's bound, up to rounding (the CPU computes that form).
template <typename S, int V>
__device__ __forceinline__ void box_centre_radius(uint4 mn, uint4 mx, float w, float c[V],
                                                  float r[V])
{
    float lo[V], hi[V];
    unpack_box<S, V>(mn, mx, lo, hi);
#pragma unroll
    for (int e = 0; e < V; e++) {
        c[e] = 0.5f * (hi[e] + lo[e]);
        r[e] = 0.5f * w * (hi[e] - lo[e]);
    }
}

// This lane's share of one head's width score over its V dimensions: q.c +
// |q|.r (|q| is an operand modifier: 2 FMAs a dimension).  q is 16-byte
// aligned (qp, V a multiple of 4): 128-bit shared loads, a quarter of the
// load instructions of the scalar form.
template <int V>
__device__ __forceinline__ float box_dot(const float *q, const float c[V], const float r[V])
{
    float s = 0.0f;
#pragma unroll
    for (int e = 0; e < V; e += 4) {
        const float4 x = *reinterpret_cast<const float4 *>(q + e);
        s = fmaf(fabsf(x.x), r[e], fmaf(x.x, c[e], s));
        s = fmaf(fabsf(x.y), r[e + 1], fmaf(x.y, c[e + 1], s));
        s = fmaf(fabsf(x.z), r[e + 2], fmaf(x.z, c[e + 2], s));
        s = fmaf(fabsf(x.w), r[e + 3], fmaf(x.w, c[e + 3], s));
    }
    return s;
}

// One head's score of a block, in logits, summed over the TD lanes of the
// block (every lane gets it): q.c + |q|.r times f = the fp8 block scale times
// the softmax scale; NaN becomes -inf, as order_key and the CPU treat it.  q:
// this lane's V dimensions of the head's query, in shared memory, 16-byte
// aligned.  (The score CTAs reduce g heads at once: reduce_scatter.)
template <int V, int TD>
__device__ __forceinline__ float box_logit(const float *q, const float c[V], const float r[V],
                                           float f)
{
    const float s = group_sum<TD>(box_dot<V>(q, c, r)) * f;
    return s == s ? s : -INFINITY;
}

// HEAD_SHARE's reduce-scatter of the GP per-head shares of the TD lanes of a
// block (GP: the group padded to a power of two).  At each butterfly level a
// lane that still holds C > 1 heads gives its partner the half it drops and
// adds the partner's shares of the half it keeps: GP - 1 + (levels left)
// shuffles for all heads, where one group_sum per head takes GP log2(TD).
// Each head's total is added up over the lanes in group_sum's xor order, so
// the totals are bitwise group_sum's.  On return v[0 .. KP) hold the totals of
// heads share_base(sub) + i, KP = max(GP / TD, 1).
template <int O, int C>
__device__ __forceinline__ void reduce_scatter(float *v, int sub)
{
    if constexpr (O > 0) {
        if constexpr (C > 1) {
            constexpr int H = C / 2;
            const bool up = (sub & O) != 0; // this lane keeps the upper half
#pragma unroll
            for (int i = 0; i < H; i++) {
                const float give = up ? v[i] : v[i + H];
                const float keep = up ? v[i + H] : v[i];
                v[i] = keep + __shfl_xor_sync(0xffffffffu, give, O);
            }
            reduce_scatter<O / 2, H>(v, sub);
        } else {
            v[0] += __shfl_xor_sync(0xffffffffu, v[0], O);
            reduce_scatter<O / 2, 1>(v, sub);
        }
    }
}
// The first head whose total lane `sub` holds after reduce_scatter<TD / 2, GP>.
template <int TD, int GP>
__device__ __forceinline__ int share_base(int sub)
{
    int b = 0, c = GP;
#pragma unroll
    for (int o = TD / 2; o > 0; o >>= 1)
        if (c > 1) {
            c /= 2;
            if (sub & o)
                b += c;
        }
    return b;
}
// Whether lane `sub` is the one of its block that keeps its heads' (m, l):
// with GP < TD, TD / GP lanes hold each total; the lowest of them keeps it.
template <int TD, int GP>
__device__ __forceinline__ bool share_keeper(int sub)
{
    return GP >= TD || (sub & (TD / GP - 1)) == 0;
}

// (m, l) of an online log-sum-exp: add one value, or merge another pair;
// -inf maxima give (-inf, 0), an infinite maximum makes l NaN (the head is
// then left out, as its maximum is not finite).
__device__ __forceinline__ void lse_add(float &m, float &l, float s)
{
    if (s > m) {
        l = l * expf(m - s) + 1.0f;
        m = s;
    } else if (s > -INFINITY) {
        l += expf(s - m);
    }
}
__device__ __forceinline__ void lse_merge(float &m, float &l, float m2, float l2)
{
    const float mm = fmaxf(m, m2);
    if (mm == -INFINITY) {
        m = mm;
        l = 0.0f;
        return;
    }
    l = l * expf(m - mm) + l2 * expf(m2 - mm);
    m = mm;
}

// The per-head partial (m, l) of this CTA, from KP pairs per lane (the keeper
// lanes of a block hold heads share_base(sub) + k), into part[hh] (global):
// warp shuffles over the blocks of a warp, then red (shared,
// [kWarps][kMaxGroup] x 2) over warps.
template <int TD, int GP>
__device__ void cta_partials(const float *pm, const float *pl, int g, float *red, float2 *part)
{
    constexpr int KP = GP > TD ? GP / TD : 1;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int hb = share_base<TD, GP>(lane % TD);
    const bool keeper = share_keeper<TD, GP>(lane % TD);
#pragma unroll
    for (int k = 0; k < KP; k++) {
        float m = pm[k], l = pl[k];
#pragma unroll
        for (int o = TD; o < 32; o <<= 1) {
            const float m2 = __shfl_xor_sync(0xffffffffu, m, o);
            const float l2 = __shfl_xor_sync(0xffffffffu, l, o);
            lse_merge(m, l, m2, l2);
        }
        const int hh = hb + k;
        if (lane < TD && keeper && hh < g) {
            red[(warp * kMaxGroup + hh) * 2] = m;
            red[(warp * kMaxGroup + hh) * 2 + 1] = l;
        }
    }
    __syncthreads();
    if (threadIdx.x < g) {
        float m = -INFINITY, l = 0.0f;
        for (int w = 0; w < kWarps; w++)
            lse_merge(m, l, red[(w * kMaxGroup + threadIdx.x) * 2],
                      red[(w * kMaxGroup + threadIdx.x) * 2 + 1]);
        part[threadIdx.x] = make_float2(m, l);
    }
}

// The last CTA of a HEAD_SHARE pair, once every CTA's logits (hs) and partials
// (parts: [gridDim.x][g]) are visible: the forced blocks' logits (the per-head
// normalisers run over all M blocks), each head's lse_h (a head whose maximum
// is not finite is left out), then the candidates' keys into `keys` with their
// range in ts.lo / ts.hi, for select_tail.
template <typename S, int D>
__device__ void head_share_keys(const resa_cuda_layer_args &a, const Pair &p, int h,
                                const float *qs, float *hs, const float2 *parts, uint32_t *keys,
                                TailShared &ts)
{
    constexpr bool F8 = sizeof(S) == 1;
    constexpr int V = F8 ? 16 : 8, TD = D / V, PER_WARP = 32 / TD;
    const resa_cuda_dims &Dm = a.dims;
    const int g = Dm.group, M = p.M, stride = Dm.max_seq_blocks;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __shared__ float lse_s[kMaxGroup];
    // 1. the forced blocks' logits: items (forced block, head), PER_WARP per warp
    const int n_sink = p.cand_lo, n_forced = p.cand_lo + (M - p.cand_hi);
    // the f-th forced block: the sink blocks, then the local ones
    auto forced_block = [&](int f) { return f < n_sink ? f : p.cand_hi + (f - n_sink); };
    const int sub = lane % TD;
    const int32_t *pt = a.page_tables + (size_t)p.slot * stride;
    const size_t page_stride = (size_t)Dm.hkv * D;
    for (int base = warp * PER_WARP; base < n_forced * g; base += kWarps * PER_WARP) {
        const int item = min(base + lane / TD, n_forced * g - 1); // whole warps shuffle
        const int f = item / g, hh = item % g;
        const int j = forced_block(f);
        const int page = __ldg(pt + j);
        const S *kmin = (const S *)a.kmin + (size_t)page * page_stride + (size_t)h * D + sub * V;
        const S *kmax = (const S *)a.kmax + (size_t)page * page_stride + (size_t)h * D + sub * V;
        float c[V], r[V];
        box_centre_radius<S, V>(__ldcg((const uint4 *)kmin), __ldcg((const uint4 *)kmax),
                                a.score_width, c, r);
        const float fs = (F8 ? ldexpf(1.0f, (int)__ldg(a.kexp + (size_t)page * Dm.hkv + h)) : 1.0f) *
                         a.scale;
        const float s = box_logit<V, TD>(qs + hh * D + sub * V, c, r, fs);
        if (sub == 0 && base + lane / TD < n_forced * g)
            hs[(size_t)hh * stride + j] = s;
    }
    __syncthreads();
    // 2. per head: the CTAs' partials and the forced blocks
    if (threadIdx.x < g) {
        const int hh = threadIdx.x;
        float m = -INFINITY, l = 0.0f;
        for (int c = 0; c < (int)gridDim.x; c++) {
            const float2 pr = __ldcg(parts + (size_t)c * g + hh);
            lse_merge(m, l, pr.x, pr.y);
        }
        for (int f = 0; f < n_forced; f++)
            lse_add(m, l, hs[(size_t)hh * stride + forced_block(f)]);
        lse_s[hh] = (m > -INFINITY && m < INFINITY) ? m + logf(l) : __int_as_float(0x7fc00000);
    }
    __syncthreads();
    // 3. the candidates' keys and their range; a head left out is skipped
    float lse[kMaxGroup];
#pragma unroll
    for (int hh = 0; hh < kMaxGroup; hh++)
        lse[hh] = hh < g ? lse_s[hh] : __int_as_float(0x7fc00000);
    uint32_t kmn = 0xffffffffu, kmx = 0u;
#pragma unroll 2
    for (int j = p.cand_lo + threadIdx.x; j < p.cand_hi; j += blockDim.x) {
        float t[kMaxGroup];
#pragma unroll
        for (int hh = 0; hh < kMaxGroup; hh++) // g loads in flight at once
            t[hh] = hh < g && lse[hh] == lse[hh] ? __ldcg(hs + (size_t)hh * stride + j) - lse[hh]
                                                 : -INFINITY;
        float m = -INFINITY;
#pragma unroll
        for (int hh = 0; hh < kMaxGroup; hh++)
            m = fmaxf(m, t[hh]);
        float sum = 0.0f;
        if (m > -INFINITY) {
            // g is uniform over the launch: heads past it cost neither a load
            // nor an exponential (they used to be 16 expf a block whatever g)
#pragma unroll
            for (int hh = 0; hh < kMaxGroup; hh++)
                if (hh < g)
                    sum += expf(t[hh] - m);
        }
        const uint32_t key = order_key(m > -INFINITY ? m + logf(sum) : -INFINITY);
        keys[j] = key;
        kmn = min(kmn, key);
        kmx = max(kmx, key);
    }
    kmn = __reduce_min_sync(0xffffffffu, kmn);
    kmx = __reduce_max_sync(0xffffffffu, kmx);
    if (lane == 0) {
        ts.wsum[warp] = kmn;
        ts.seg_take[warp] = (int)kmx;
    }
    __syncthreads();
    if (warp == 0) {
        kmn = __reduce_min_sync(0xffffffffu, ts.wsum[lane]);
        kmx = __reduce_max_sync(0xffffffffu, (uint32_t)ts.seg_take[lane]);
        if (lane == 0) {
            ts.lo = kmn;
            ts.hi = kmx;
        }
    }
    __syncthreads();
}

template <int D>
struct alignas(16) ShareQueries {
    float v[kMaxGroup * D];
};
template <int D>
struct PooledQuery {
    float v[kMaxGroup * D];
};

// Grid (ctas_per_pair, pairs).  Each CTA scores a contiguous share of one
// (entry, head)'s candidate blocks into `keys` and merges the share's key
// range into cells[pair]; with kTop, the last CTA of the pair to finish
// (counted in cells[pair].count; it sets the cells back to zero for the next
// launch) runs the top-n over all of them.  Pairs that need no score
// (n >= M, or only forced blocks) are selected by their CTA 0 alone.
// (The 64-register cap of 1024 threads at 1 CTA/SM keeps 64 bytes of
// summaries per lane in flight; dynamic shared memory: the keys staging of
// the tail.)  A lane reads 16 bytes of kmin and of kmax per block: V = 8
// dimensions of 16-bit summaries or 16 of fp8 ones (fp8 at 8 dimensions and
// 8-byte loads measured ~2 us slower at 8 x 256K, bench/harness/NOTES.md).
template <typename T, typename S, int D, bool kTop, int kShareG, bool kExport>
__global__ void __launch_bounds__(kScoreThreads, 1)
score_select(resa_cuda_layer_args a, uint32_t *keys, PairCells *cells, float *hscores,
             float2 *hparts, int stage_keys, int overlap)
{
    constexpr bool F8 = sizeof(S) == 1;       // S: summary element, T or fp8_e4m3
    constexpr int V = F8 ? 16 : 8;            // summary dimensions per lane
    constexpr int TD = D / V;                 // lanes per block
    constexpr int U = V == 16 ? kScoreUnroll / 2 : kScoreUnroll; // blocks per lane in flight
    constexpr int G = kScoreThreads / TD;     // blocks per CTA per unrolled slot
    constexpr int STEP = G * U;
    extern __shared__ uint32_t keys_s[];
    // the pooled query, or HEAD_SHARE: the g queries, 16-byte aligned (box_dot
    // loads float4).  POOLED keeps its former declaration: with the aligned
    // array ptxas spilled in the fp8 instantiations.
    __shared__ std::conditional_t<kShareG != 0, ShareQueries<D>, PooledQuery<D>> qbuf;
    float *const qp = qbuf.v;
    __shared__ float red[kWarps * kMaxGroup * 2]; // HEAD_SHARE: per-warp partials
    __shared__ TailShared ts;
    const resa_cuda_dims &Dm = a.dims;
    const int pair = blockIdx.y;
    const int i = pair / Dm.hkv, h = pair % Dm.hkv;
    const Pair p = load_pair(a, i); // step metadata: written before the layer began
    uint32_t *out = keys + (size_t)pair * Dm.max_seq_blocks;
    if (p.all || p.k <= 0) { // everything or only forced blocks: no score needed
        pdl_wait();
        pdl_trigger();
        if (kTop && blockIdx.x == 0)
            select_tail<kExport>(a, p, pair, out, nullptr, ts);
        return;
    }
    // GROUP_SCORE HEAD_SHARE: its own instantiations, one per group size
    // padded to a power of two (kShareG); 0: POOLED
    constexpr bool share = kShareG > 0;
    constexpr int GP = share ? kShareG : 1;
    const int g = Dm.group;
    float *hs = hscores + (size_t)pair * g * Dm.max_seq_blocks; // [g][max_seq_blocks]
    if constexpr (share)
        group_queries<T, D>(a, p.row, h, qp);
    else
        pooled_query<T, D>(a, p.row, h, qp); // the queries: written before the layer began
    // The loop below reads the candidates' summaries only.  Unless the block
    // this entry writes in this step is one of them (local_blocks 0, or a
    // span whose forced ranges lie elsewhere), they were all final before
    // the layer began, so the loop does not wait for the write kernel (the
    // summaries of the step's writes): it runs beside it, which at batch 1 is
    // most of that kernel's latency.  The wait then comes after the loop:
    // before the tail (HEAD_SHARE reads the forced blocks' summaries there),
    // and before this grid completes, since the kernels after it wait for
    // this grid alone.  Other entries write other sequences' pages (a
    // forked page is copied before it is written), and a QUERY_SPARSE entry
    // writes nothing.
    const resa_dev_entry &pe = a.entries[p.entry];
    const int64_t wb = pe.start >> Dm.log2_b; // the entry's written block, local index
    const bool wait_late =
        overlap && (pe.mode == RESA_MODE_QUERY_SPARSE || wb < p.cand_lo || wb >= p.cand_hi);
    if (!wait_late)
        pdl_wait(); // the summaries of this step's writes
    pdl_trigger();
    const int ncand = p.cand_hi - p.cand_lo;
    const int per = (ncand + gridDim.x - 1) / gridDim.x;
    const int lo = p.cand_lo + blockIdx.x * per, hi = min(p.cand_hi, lo + per);

    const int sub = threadIdx.x % TD, grp = threadIdx.x / TD;
    float q[V];
#pragma unroll
    for (int e = 0; e < V; e++)
        q[e] = qp[sub * V + e];
    const int32_t *pt = a.page_tables + (size_t)p.slot * Dm.max_seq_blocks;
    const S *kmin = (const S *)a.kmin + (size_t)h * D + sub * V;
    const S *kmax = (const S *)a.kmax + (size_t)h * D + sub * V;
    const int8_t *kexp = a.kexp + h; // F8: the scale exponent of (page, h) at page * hkv
    const size_t page_stride = (size_t)Dm.hkv * D;
    uint32_t kmn = 0xffffffffu, kmx = 0u; // range of the keys this thread stores
    constexpr int KP = GP > TD ? GP / TD : 1; // HEAD_SHARE: heads a lane holds after reduce_scatter
    const int hb = share_base<TD, GP>(sub);    // the first of them
    const bool keeper = share_keeper<TD, GP>(sub);
    float pm[KP], pl[KP];                      // their partial (m, l), kept by the keeper lanes
#pragma unroll
    for (int k = 0; k < KP; k++) {
        pm[k] = -INFINITY;
        pl[k] = 0.0f;
    }

    // Uniform trip count across the CTA so that the shuffles see full warps.
    for (int base = lo; base < hi; base += STEP) {
        // Loads are unconditional (past the end: the last block again) so
        // that all 2 * U of them are in flight at once.
        int page[U];
#pragma unroll
        for (int u = 0; u < U; u++)
            page[u] = __ldg(pt + min(base + u * G + grp, hi - 1));
        uint4 mn[U], mx[U];
        int ex[U];
#pragma unroll
        for (int u = 0; u < U; u++) {
            mn[u] = load_stream(kmin + (size_t)page[u] * page_stride);
            mx[u] = load_stream(kmax + (size_t)page[u] * page_stride);
            ex[u] = F8 ? __ldg(kexp + (size_t)page[u] * Dm.hkv) : 0;
        }
        if constexpr (share) { // every head of the group scores the block, in logits
#pragma unroll
            for (int u = 0; u < U; u++) {
                const int j = base + u * G + grp;
                const bool live = j < hi;
                float c[V], r[V]; // the box, once for the g heads
                box_centre_radius<S, V>(mn[u], mx[u], a.score_width, c, r);
                const float f = (F8 ? ldexpf(1.0f, ex[u]) : 1.0f) * a.scale;
                float v[GP]; // this lane's share of each head's score (padding heads: 0)
#pragma unroll
                for (int hh = 0; hh < GP; hh++)
                    v[hh] = hh < g ? box_dot<V>(qp + hh * D + sub * V, c, r) : 0.0f;
                reduce_scatter<TD / 2, GP>(v, sub);
#pragma unroll
                for (int k = 0; k < KP; k++) { // one store and one exp per block and kept head
                    const int hh = hb + k;
                    float s = v[k] * f; // in logits; NaN ranks as -inf (box_logit's rule)
                    s = s == s ? s : -INFINITY;
                    if (keeper && live && hh < g) {
                        hs[(size_t)hh * Dm.max_seq_blocks + j] = s;
                        lse_add(pm[k], pl[k], s);
                    }
                }
            }
        } else {
#pragma unroll
            for (int u = 0; u < U; u++) {
                float s;
                if constexpr (V == 16)
                    s = score16(q, mn[u], mx[u], a.score_width);
                else
                    s = score8<S>(q, mn[u], mx[u], a.score_width);
                s = group_sum<TD>(s);
                if (F8)
                    s = ldexpf(s, ex[u]); // 2^e * sum, as the CPU (exact scaling)
                const int j = base + u * G + grp;
                if (sub == 0 && j < hi) {
                    const uint32_t key = order_key(s);
                    out[j] = key;
                    kmn = min(kmn, key);
                    kmx = max(kmx, key);
                }
            }
        }
    }
    if (wait_late)
        pdl_wait(); // (above): before the tail, and before this grid completes
    if (!kTop)
        return;
    float2 *parts = hparts + (size_t)pair * gridDim.x * g; // HEAD_SHARE: [cta][g] of this pair
    if constexpr (share) // this CTA's per-head partials, released with the keys below
        cta_partials<TD, GP>(pm, pl, g, red, parts + (size_t)blockIdx.x * g);
    // Last CTA of the pair (the threadFenceReduction pattern): merge our key
    // range, release our keys, count, and the last one acquires everyone's.
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    kmn = __reduce_min_sync(0xffffffffu, kmn);
    kmx = __reduce_max_sync(0xffffffffu, kmx);
    if (lane == 0) {
        ts.wsum[warp] = kmn;
        ts.seg_take[warp] = (int)kmx;
    }
    for (int t = threadIdx.x; t < kBins; t += blockDim.x)
        ts.hist[t] = 0u; // the tail's first histogram
    __syncthreads();
    if (warp == 0) {
        kmn = __reduce_min_sync(0xffffffffu, ts.wsum[lane]);
        kmx = __reduce_max_sync(0xffffffffu, (uint32_t)ts.seg_take[lane]);
        if (lane == 0) {
            PairCells *c = cells + pair;
            if (kmx >= kmn) { // zero at rest: the minimum is kept complemented
                atomicMax(&c->not_min, ~kmn);
                atomicMax(&c->max, kmx);
            }
            __threadfence();
            const unsigned prev = atomicAdd(&c->count, 1u);
            const int last = prev == gridDim.x - 1;
            if (last) { // every CTA of this launch has counted: reset for the next
                __threadfence();
                ts.lo = ~atomicExch(&c->not_min, 0u);
                ts.hi = atomicExch(&c->max, 0u);
                c->count = 0u;
                __threadfence();
            }
            ts.last = last;
        }
    }
    __syncthreads();
    if (!ts.last)
        return;
    // POOLED: the pair again, from the step metadata (unchanged since the
    // step began): keeping all of it live across the score loop cost spills
    // under the 64-register cap (the loads cannot be merged with the first
    // ones across this CTA's global stores and fences).  HEAD_SHARE keeps it
    // (there the reload spilled more).
    Pair pr = p;
    if constexpr (!share)
        pr = load_pair(a, i);
    if constexpr (share)
        head_share_keys<S, D>(a, pr, h, qp, hs, parts, out, ts);
    select_tail<kExport>(a, pr, pair, out, stage_keys ? keys_s : nullptr, ts);
}

size_t list_elems(const resa_cuda_dims *D)
{
    return (size_t)D->max_seqs * D->hkv * D->max_seq_blocks;
}

size_t counters_offset(const resa_cuda_dims *D)
{
    return 2 * list_elems(D) * sizeof(int32_t); // after lists and keys
}

size_t cells_bytes(const resa_cuda_dims *D)
{
    return (size_t)D->max_seqs * D->hkv * sizeof(PairCells);
}

size_t hscores_offset(const resa_cuda_dims *D)
{
    return (counters_offset(D) + cells_bytes(D) + 255) & ~(size_t)255;
}

// HEAD_SHARE's per-CTA partials, [pairs x ctas_per_pair][g] (m, l): a launch has
// pairs * ctas <= max(num_sms, pairs) CTAs (score_grid).
size_t hparts_offset(const resa_cuda_dims *D)
{
    return (hscores_offset(D) + list_elems(D) * (size_t)D->group * sizeof(float) + 255) &
           ~(size_t)255;
}
size_t hparts_bytes(const resa_cuda_dims *D)
{
    return ((size_t)D->max_seqs * D->hkv + (size_t)D->num_sms) * D->group * sizeof(float2);
}

// The chosen-block counts of every (entry, head), [max_seqs][hkv] int32.
size_t sel_counts_offset(const resa_cuda_dims *D)
{
    return (hparts_offset(D) + hparts_bytes(D) + 255) & ~(size_t)255;
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

// RESA_CUDA_NO_SCORE_OVERLAP=1: score_select waits for the write kernel before
// its scoring loop in every case, as before the overlap (A/B timing, and a
// way back); read once.
bool score_overlap()
{
    static int cache; // 0 unknown, 1 off, 2 on (benign race: the same value)
    if (cache == 0)
        cache = env_switch("RESA_CUDA_NO_SCORE_OVERLAP") ? 1 : 2;
    return cache == 2;
}

// Phase 1 (a->cp_counts) is a plain launch: the first kernel of its call,
// whose inputs (q) may come straight from the host's kernels, which know
// nothing of programmatic launches (kv_write.cu's first kernel is plain for
// the same reason); the selection of step_attend is a programmatic dependent
// of kv_write's last kernel.
template <typename T, typename S, int D, bool kTop, int kShare, bool kExport>
cudaError_t launch_score_e(const resa_cuda_layer_args *a, dim3 grid, uint32_t *keys,
                           PairCells *cells, float *hs, float2 *hp)
{
    const size_t smem = kTop ? keys_smem(a->dims) : 0;
    if (smem > 0) {
        cudaError_t err = cudaFuncSetAttribute(score_select<T, S, D, kTop, kShare, kExport>,
                                               cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               (int)smem);
        if (err != cudaSuccess)
            return err;
    }
    if constexpr (kExport) {
        score_select<T, S, D, kTop, kShare, true><<<grid, kScoreThreads, smem, a->stream>>>(
            *a, keys, cells, hs, hp, smem > 0 ? 1 : 0, 0);
        return cudaGetLastError();
    }
    return launch_pdl(score_select<T, S, D, kTop, kShare, kExport>, grid, dim3(kScoreThreads),
                      smem, a->stream, *a, keys, cells, hs, hp, smem > 0 ? 1 : 0,
                      score_overlap() ? 1 : 0);
}

// Phase 1 (a->cp_counts) only with POOLED (kShare 0).
template <typename T, typename S, int D, bool kTop, int kShare>
cudaError_t launch_score_d(const resa_cuda_layer_args *a, dim3 grid, uint32_t *keys,
                           PairCells *cells, float *hs, float2 *hp)
{
    if constexpr (kShare == 0)
        if (a->cp_counts)
            return launch_score_e<T, S, D, kTop, 0, true>(a, grid, keys, cells, hs, hp);
    if (a->cp_counts)
        return cudaErrorInvalidValue;
    return launch_score_e<T, S, D, kTop, kShare, false>(a, grid, keys, cells, hs, hp);
}

template <typename T, typename S, bool kTop, int kShare>
cudaError_t launch_score(const resa_cuda_layer_args *a, dim3 grid, uint32_t *keys,
                         PairCells *cells, float *hs, float2 *hp)
{
    switch (a->dims.d) {
    case 64:
        return launch_score_d<T, S, 64, kTop, kShare>(a, grid, keys, cells, hs, hp);
    case 128:
        return launch_score_d<T, S, 128, kTop, kShare>(a, grid, keys, cells, hs, hp);
    case 256:
        return launch_score_d<T, S, 256, kTop, kShare>(a, grid, keys, cells, hs, hp);
    default:
        return cudaErrorInvalidValue;
    }
}

// HEAD_SHARE: the instantiation of the group size padded to a power of two
// (the backend's lock check keeps it <= kMaxGroup).
template <typename T, typename S>
cudaError_t launch_share(const resa_cuda_layer_args *a, dim3 grid, uint32_t *keys,
                         PairCells *cells, float *hs, float2 *hp)
{
    // (g = 1 and 2 pad to 4: padding heads cost one shuffle and no arithmetic,
    // and three instantiations per type, dimension and summary keep the build short)
    const int g = a->dims.group;
    if (g <= 4)
        return launch_score<T, S, true, 4>(a, grid, keys, cells, hs, hp);
    if (g <= 8)
        return launch_score<T, S, true, 8>(a, grid, keys, cells, hs, hp);
    static_assert(kMaxGroup == 16, "one instantiation per power of two up to kMaxGroup");
    return launch_score<T, S, true, 16>(a, grid, keys, cells, hs, hp);
}

} // namespace

size_t resa_cuda_select_workspace(const resa_cuda_dims *dims)
{
    // lists, keys, the cells of every (entry, head), zero between launches, then
    // the per-head scores of HEAD_SHARE (g floats a block: 4g bytes next to the
    // 2 b d bytes of its K/V, since the mode may be chosen at any step), the
    // chosen-block counts
    return sel_counts_offset(dims) + (size_t)dims->max_seqs * dims->hkv * sizeof(int32_t);
}

int32_t *resa_cuda_select_counts(const resa_cuda_dims *dims, void *ws_select)
{
    return (int32_t *)((char *)ws_select + sel_counts_offset(dims));
}

cudaError_t resa_cuda_select_init(const resa_cuda_dims *dims, void *ws_select, cudaStream_t stream)
{
    cudaError_t err = cudaMemsetAsync((char *)ws_select + counters_offset(dims), 0,
                                      cells_bytes(dims), stream);
    if (err != cudaSuccess)
        return err;
    return cudaStreamSynchronize(stream);
}

cudaError_t resa_cuda_block_scores(const resa_cuda_layer_args *a)
{
    // POOLED only (the core refuses HEAD_SHARE with sparse entries here)
    if (!a->cp_counts || a->group_score != 0)
        return cudaErrorInvalidValue;
    return resa_cuda_select_blocks(a);
}

cudaError_t resa_cuda_select_blocks(const resa_cuda_layer_args *a)
{
    if (a->n_decode <= 0)
        return cudaGetLastError();
    const resa_cuda_dims &D = a->dims;
    uint32_t *keys = (uint32_t *)a->ws_select + list_elems(&D);
    PairCells *cells = (PairCells *)((char *)a->ws_select + counters_offset(&D));
    float *hs = (float *)((char *)a->ws_select + hscores_offset(&D));
    float2 *hp = (float2 *)((char *)a->ws_select + hparts_offset(&D));
    const dim3 grid = score_grid(D, a->n_decode);
    cudaError_t err = RESA_DISPATCH_DTYPE(D.io_dtype, T, [&] { // T: the summaries
        if (a->group_score == 1) // RESA_GROUP_SCORE_HEAD_SHARE
            return D.sum_fp8 ? launch_share<T, fp8_e4m3>(a, grid, keys, cells, hs, hp)
                             : launch_share<T, T>(a, grid, keys, cells, hs, hp);
        return D.sum_fp8 ? launch_score<T, fp8_e4m3, true, 0>(a, grid, keys, cells, hs, hp)
                         : launch_score<T, T, true, 0>(a, grid, keys, cells, hs, hp);
    });
    if (err != cudaSuccess)
        return err;
    return cudaGetLastError();
}
