// SPDX-License-Identifier: MIT
// Pieces shared by the two dense causal attention kernels: attention_dense.cu
// (mma.sync, any sm_80+ GPU) and attention_dense_sm90.cu (wgmma, sm_90a).
// Both see the same dense_params, enumerate the same tile slots (BM = 128 rows
// of one entry and one KV head, row r = token * g + j), cut the key range into
// splits the same way, keep each thread's two rows (r and r + 8 of an m16
// fragment) in the same register layout, and leave the same output or fp32
// partials (acc, m, l) for the same log-sum-exp combine kernel.  With
// p.lse (resa_ctx_step_attend_ex) the row's natural log-sum-exp,
// (m + log2 l) ln 2 (m is in log2 units of the scaled scores), is written
// where its output is: by store_rows for a single split, by the combine
// otherwise.
//
// QUERY_DENSE entries (context parallelism) have no causal mask: every row
// sees the keys [0, end), which row_pos() expresses as every row standing at
// position end - 1.  Only the mma.sync kernel takes them (attention_dense.cu
// routes a step that has one there); an entry with end = 0 (this context holds
// none of the sequence's keys) has no key tile, and the mma.sync kernel's
// split-0 CTAs write its rows as 0 with lse -inf (store_empty_rows).
#ifndef RESA_CUDA_ATTENTION_DENSE_CUH
#define RESA_CUDA_ATTENTION_DENSE_CUH

#include <float.h>

#include "common.cuh"

// The wgmma path (attention_dense_sm90.cu): whether this module holds its
// sm_90a machine code, and the launcher (D = 128 and 256, causal modes, T
// f16 / bf16, a T cache or the fp8 one).
bool resa_cuda_dense_sm90_built();
cudaError_t resa_cuda_dense_sm90(const resa_cuda_layer_args *a);

namespace {

using namespace resa;

constexpr int BM = 128;             // rows per tile
constexpr int CWARPS = 8;           // combine kernel: one warp per row
constexpr int MAX_SPLITS = 64;
constexpr int MIN_SPLIT_KEYS = 512; // a split reads at least this many keys (else fewer splits)

// Units of partial storage the workspace holds (each BM rows x (D + 2) floats).
inline int64_t partial_units(const resa_cuda_dims *dims)
{
    return 4 * (int64_t)(dims->num_sms > 0 ? dims->num_sms : 132);
}

struct dense_params {
    const void *q;
    void *out;
    const void *k, *v;      // T, or the fp8 cache's bytes
    const float *kscale, *vscale; // the fp8 cache's scales, else NULL
    const int32_t *page_tables;
    const resa_dev_entry *entries;
    const int32_t *dense_ids;
    float *ws;          // partial acc [units][BM][D], then (m, l) [units][BM][2]
    float *lse;         // [n_rows][hq] the rows' log-sum-exps, or NULL
    int64_t ws_units;
    int32_t n_dense, hq, hkv, g, b, log2_b, max_seq_blocks, splits;
    float scale_log2;   // softmax scale * log2(e): exp(x * scale) = exp2(x * scale_log2)
};

// ---- small PTX wrappers ----
__device__ __forceinline__ uint32_t smem_u32(const void *p)
{
    return (uint32_t)__cvta_generic_to_shared(p);
}
// 16-byte async copy, L2 only (K/V are streamed once); src_bytes 0 zero-fills.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void *src, int src_bytes)
{
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
                 "r"(src_bytes));
}
__device__ __forceinline__ float fast_exp2(float x)
{
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}
// Two floats as one register of two 16-bit values (lo in the low half).
template <typename T> __device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi)
{
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t *>(&h);
}
template <> __device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi)
{
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t *>(&h);
}

// ---- the tile a CTA works on ----
struct tile_ref {
    int entry;     // index into entries, -1 = no tile for this slot
    int tile;      // tile index within (entry, head), heaviest (last) first
};

// The pool row of position pos of KV head kvh on `page`: its head vector
// starts at element row * d, its fp8 scale is element row of kscale/vscale.
__device__ __forceinline__ size_t pool_row(const dense_params &p, int32_t page, int kvh,
                                           int64_t pos)
{
    return ((size_t)page * p.hkv + kvh) * p.b + (size_t)(pos & (p.b - 1));
}

__device__ __forceinline__ int tiles_of(int32_t n, int32_t g) { return (n * g + BM - 1) / BM; }

// The output row ([n_rows][hq], of out and lse) of row rr of entry e's tiles
// at KV head kvh: token rr / g of the entry, query head kvh * g + rr % g.
__device__ __forceinline__ size_t out_row(const dense_params &p, const resa_dev_entry &e, int rr,
                                          int kvh)
{
    return (size_t)(e.row + rr / p.g) * p.hq + (size_t)kvh * p.g + rr % p.g;
}

// The last key position row r of the entry attends (it sees [0, row_pos]):
// its own position for the causal modes, end - 1 for QUERY_DENSE.
__device__ __forceinline__ int row_pos(const resa_dev_entry &e, int r, int g)
{
    return e.mode == RESA_MODE_QUERY_DENSE ? (int)e.end - 1 : (int)e.start + r / g;
}

// Maps a linear tile slot to (entry, tile) with warp 0: prefix sums of the
// entries' tile counts, 32 entries per round.  Result in shared memory.
__device__ __forceinline__ void find_tile(const dense_params &p, int slot, tile_ref *out)
{
    if (threadIdx.x >= 32)
        return;
    const int lane = threadIdx.x;
    tile_ref r{-1, 0};
    for (int base = 0; base < p.n_dense; base += 32) {
        const int i = base + lane;
        const int e = i < p.n_dense ? p.dense_ids[i] : -1;
        const int cnt = e >= 0 ? tiles_of(p.entries[e].n, p.g) : 0;
        int incl = cnt;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            int t = __shfl_up_sync(0xffffffffu, incl, o);
            if (lane >= o)
                incl += t;
        }
        const int excl = incl - cnt;
        const unsigned hit = __ballot_sync(0xffffffffu, slot >= excl && slot < incl);
        if (hit) {
            const int src = __ffs(hit) - 1;
            const int ent = __shfl_sync(0xffffffffu, e, src);
            const int local = slot - __shfl_sync(0xffffffffu, excl, src);
            const int n_t = __shfl_sync(0xffffffffu, cnt, src);
            r.entry = ent;
            r.tile = n_t - 1 - local; // heavy (late, long key range) tiles are scheduled first
            break;
        }
        slot -= __shfl_sync(0xffffffffu, incl, 31);
    }
    if (lane == 0)
        *out = r;
}

// Key-range split of one tile in key tiles of BN: the attention kernel and the
// combine kernel of one launch must use the same BN.
struct split_plan {
    int64_t kend;  // keys [0, kend) are visible to some row of the tile
    int nt;        // key tiles of BN
    int sa;        // active splits
    int chunk;     // key tiles per split
};
template <int BN>
__device__ __forceinline__ split_plan plan_splits(const dense_params &p, const resa_dev_entry &e,
                                                  int tile)
{
    split_plan s;
    const int rows = e.n * p.g;
    const int r_last = min(rows, (tile + 1) * BM) - 1;
    s.kend = e.mode == RESA_MODE_QUERY_DENSE ? e.end : e.start + r_last / p.g + 1;
    s.nt = (int)((s.kend + BN - 1) / BN);
    const int by_len = (int)max((int64_t)1, s.kend / MIN_SPLIT_KEYS);
    s.sa = min(p.splits, by_len);
    s.chunk = (s.nt + s.sa - 1) / s.sa;
    return s;
}

// What one CTA of either attention kernel works on: its tile (found from the
// slot), the split plan and its key-tile range, the tile's rows.
struct work_item {
    resa_dev_entry e;
    split_plan sp;
    int kt_begin, kt_end; // key tiles of this split
    int rows, r0, valid;  // rows of the entry, first row of the tile, valid rows in it
    bool empty;           // split 0 of a tile with no key at all (QUERY_DENSE, end 0)
};
// Fills *w for blockIdx (slot, KV head, split); false when the CTA has no
// work (uniform over the CTA), with w->empty when it must write the tile's
// rows as empty (store_empty_rows).  tref: a __shared__ tile_ref of the caller.
template <int BN>
__device__ __forceinline__ bool begin_work(const dense_params &p, tile_ref *tref, work_item *w)
{
    const int split = blockIdx.z;
    w->empty = false;
    find_tile(p, blockIdx.x, tref);
    __syncthreads();
    const tile_ref tr = *tref;
    if (tr.entry < 0)
        return false;
    w->e = p.entries[tr.entry];
    w->sp = plan_splits<BN>(p, w->e, tr.tile);
    w->kt_begin = split * w->sp.chunk;
    w->kt_end = min(w->sp.nt, w->kt_begin + w->sp.chunk);
    w->rows = w->e.n * p.g;
    w->r0 = tr.tile * BM;
    w->valid = min(BM, w->rows - w->r0);
    w->empty = split == 0 && w->sp.kend <= 0;
    return split < w->sp.sa && w->kt_begin < w->kt_end;
}

// The valid rows of a tile that attends no key in this context: output 0
// and lse -inf (the neutral part of a merge; the CPU's empty rows), by the
// whole CTA.
template <typename T, int D>
__device__ void store_empty_rows(const dense_params &p, const work_item &w, int kvh)
{
    T *out = static_cast<T *>(p.out);
    for (int i = threadIdx.x; i < w.valid * (D / 2); i += blockDim.x) {
        const int lr = i / (D / 2), c = i % (D / 2);
        const size_t row = out_row(p, w.e, w.r0 + lr, kvh);
        *reinterpret_cast<uint32_t *>(out + row * D + 2 * c) = pack2<T>(0.f, 0.f);
        if (p.lse && c == 0)
            p.lse[row] = -INFINITY;
    }
}

// ---- one thread's part of an m16 x (8 NT) score fragment ----
// Register layout (mma.sync m16n8 C and wgmma m64nN accumulators alike):
// s[4 i + 0..1] = row lane/4, keys 8 i + 2 (lane & 3) + 0..1; s[4 i + 2..3] =
// row lane/4 + 8, same keys.  pos0 / pos1 are the two rows' positions.
template <int NT>
__device__ __forceinline__ void causal_mask(float *s, int kbase, int lane, int pos0, int pos1)
{
#pragma unroll
    for (int i = 0; i < NT; i++) {
        const int key = kbase + 8 * i + 2 * (lane & 3);
        if (key > pos0) s[4 * i + 0] = -INFINITY;
        if (key + 1 > pos0) s[4 * i + 1] = -INFINITY;
        if (key > pos1) s[4 * i + 2] = -INFINITY;
        if (key + 1 > pos1) s[4 * i + 3] = -INFINITY;
    }
}

// Online softmax step in the log2 domain: raw dot products in s become the
// unnormalized probabilities, (m, l) are updated (l per lane, reduced over the
// row's 4 lanes at the end) and c0 / c1 are the factors the accumulator rows
// must be scaled by.
// sl2_0 / sl2_1: the two rows' factors (the fp8 cache's wgmma path scales
// each row of Q by its own power of two; softmax_step below: one factor).
template <int NT>
__device__ __forceinline__ void softmax_step_rows(float *s, float sl2_0, float sl2_1, float &m0,
                                                  float &m1, float &l0, float &l1, float &c0,
                                                  float &c1)
{
    float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
    for (int i = 0; i < NT; i++) {
        mx0 = fmaxf(mx0, fmaxf(s[4 * i + 0], s[4 * i + 1]));
        mx1 = fmaxf(mx1, fmaxf(s[4 * i + 2], s[4 * i + 3]));
    }
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
    const float mn0 = fmaxf(m0, mx0 * sl2_0), mn1 = fmaxf(m1, mx1 * sl2_1);
    // a row with no visible key yet keeps m = -inf: use 0 as the reference
    // so that exp2(-inf - ref) is 0, never NaN
    const float ref0 = mn0 == -INFINITY ? 0.f : mn0, ref1 = mn1 == -INFINITY ? 0.f : mn1;
    c0 = fast_exp2(m0 - ref0);
    c1 = fast_exp2(m1 - ref1);
    m0 = mn0;
    m1 = mn1;
    float rs0 = 0.f, rs1 = 0.f;
#pragma unroll
    for (int i = 0; i < NT; i++) {
        s[4 * i + 0] = fast_exp2(fmaf(s[4 * i + 0], sl2_0, -ref0));
        s[4 * i + 1] = fast_exp2(fmaf(s[4 * i + 1], sl2_0, -ref0));
        s[4 * i + 2] = fast_exp2(fmaf(s[4 * i + 2], sl2_1, -ref1));
        s[4 * i + 3] = fast_exp2(fmaf(s[4 * i + 3], sl2_1, -ref1));
        rs0 += s[4 * i + 0] + s[4 * i + 1];
        rs1 += s[4 * i + 2] + s[4 * i + 3];
    }
    l0 = l0 * c0 + rs0;
    l1 = l1 * c1 + rs1;
}
template <int NT>
__device__ __forceinline__ void softmax_step(float *s, float sl2, float &m0, float &m1, float &l0,
                                             float &l1, float &c0, float &c1)
{
    softmax_step_rows<NT>(s, sl2, sl2, m0, m1, l0, l1, c0, c1);
}

template <int NT> __device__ __forceinline__ void scale_rows(float *o, float c0, float c1)
{
#pragma unroll
    for (int i = 0; i < NT; i++) {
        o[4 * i + 0] *= c0;
        o[4 * i + 1] *= c0;
        o[4 * i + 2] *= c1;
        o[4 * i + 3] *= c1;
    }
}

// P of key step kk (16 keys) as an m16k16 A fragment: the score n-tiles 2kk
// and 2kk + 1 are exactly its four registers.
template <typename T> __device__ __forceinline__ void pack_p(const float *s, int kk, uint32_t *a)
{
    a[0] = pack2<T>(s[8 * kk + 0], s[8 * kk + 1]);
    a[1] = pack2<T>(s[8 * kk + 2], s[8 * kk + 3]);
    a[2] = pack2<T>(s[8 * kk + 4], s[8 * kk + 5]);
    a[3] = pack2<T>(s[8 * kk + 6], s[8 * kk + 7]);
}

// ---- non-finite V on the causal diagonal (docs/API.md, "Non-finite values") ----
// A K/V tile on the causal diagonal holds keys that some rows of the tile
// attend and others mask.  Masked keys get P = 0, but 0 * NaN (and 0 * inf)
// in P V is NaN: a NaN or infinite V of a later token would reach earlier
// rows.  The V tile is shared by rows of different positions, so it cannot be
// zeroed "where masked".  Both kernels zero the non-finite V values of the
// keys the mask cuts through (mma.sync: in the B fragments, registers only,
// pv_step_causal in attention_dense.cu; wgmma: in the shared V slot, scrub_v
// in attention_dense_sm90.cu) and poison every row that attends one of them
// through its softmax sum (l = NaN makes the row NaN, directly or through the
// split combine).  Keys every row attends take the plain product, where NaN
// and inf propagate as usual; tiles off the diagonal are unchanged.

// 0xffff in each 16-bit half of x that is infinite or NaN (exponent all ones).
template <typename T> __device__ __forceinline__ uint32_t nonfinite_halves(uint32_t x)
{
    constexpr uint32_t E = dtype_of<T>::value == RESA_DTYPE_BF16 ? 0x7f80u : 0x7c00u;
    return ((x & E) == E ? 0x0000ffffu : 0u) | ((x & (E << 16)) == (E << 16) ? 0xffff0000u : 0u);
}
// Epilogue of one thread's two rows lr0, lr0 + 8 of the tile (o as above, D/8
// n-tiles of the output): the normalized output when the tile has a single
// split, else the fp32 partial of this split.
template <typename T, int D>
__device__ __forceinline__ void store_rows(const dense_params &p, const resa_dev_entry &e, int slot,
                                           int kvh, int split, int sa, int r0, int valid, int lr0,
                                           int lane, const float *o, float m0, float m1, float l0,
                                           float l1)
{
    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
    const int dcol = 2 * (lane & 3);
    if (sa == 1) {
        T *out = static_cast<T *>(p.out);
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int lr = lr0 + 8 * h;
            if (lr >= valid)
                continue;
            const int rr = r0 + lr;
            const float inv = 1.f / (h ? l1 : l0);
            const size_t row = out_row(p, e, rr, kvh);
            T *dst = out + row * D;
            if (p.lse && (lane & 3) == 0)
                p.lse[row] = lse_from_log2(h ? m1 : m0, h ? l1 : l0);
#pragma unroll
            for (int i = 0; i < D / 8; i++) {
                const uint32_t v = pack2<T>(o[4 * i + 2 * h] * inv, o[4 * i + 2 * h + 1] * inv);
                *reinterpret_cast<uint32_t *>(dst + 8 * i + dcol) = v;
            }
        }
    } else {
        const int64_t unit = ((int64_t)slot * p.hkv + kvh) * p.splits + split;
        float *acc = p.ws + unit * BM * D;
        float *ml = p.ws + p.ws_units * BM * D + unit * BM * 2;
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int lr = lr0 + 8 * h;
            if (lr >= valid)
                continue;
#pragma unroll
            for (int i = 0; i < D / 8; i++)
                *reinterpret_cast<float2 *>(acc + (size_t)lr * D + 8 * i + dcol) =
                    make_float2(o[4 * i + 2 * h], o[4 * i + 2 * h + 1]);
            if ((lane & 3) == 0)
                *reinterpret_cast<float2 *>(ml + 2 * lr) = make_float2(h ? m1 : m0, h ? l1 : l0);
        }
    }
}

// Log-sum-exp merge of the splits of every split tile: one warp per row,
// lanes over 4 consecutive dimensions; blockIdx.z picks CWARPS of the BM rows
// so that a batch-1 rectification (8 tiles) still spreads over 128 CTAs.
// BN: the key tile of the attention kernel that wrote the partials.
template <typename T, int D, int BN>
__global__ void __launch_bounds__(CWARPS * 32) dense_combine_kernel(const dense_params p)
{
    __shared__ tile_ref tref;
    const int slot = blockIdx.x, kvh = blockIdx.y;
    find_tile(p, slot, &tref);
    __syncthreads();
    const tile_ref tr = tref;
    if (tr.entry < 0)
        return;
    const resa_dev_entry e = p.entries[tr.entry];
    const split_plan sp = plan_splits<BN>(p, e, tr.tile);
    if (sp.sa == 1)
        return; // written directly by the attention kernel
    const int g = p.g, rows = e.n * g, r0 = tr.tile * BM, valid = min(BM, rows - r0);
    const int n_used = (sp.nt + sp.chunk - 1) / sp.chunk; // splits that had keys
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int64_t unit0 = ((int64_t)slot * p.hkv + kvh) * p.splits;
    const float *ml_base = p.ws + p.ws_units * BM * D;
    T *out = static_cast<T *>(p.out);
    const int r = blockIdx.z * CWARPS + warp;
    if (r >= valid)
        return;
    float mmax = -INFINITY;
    for (int s = 0; s < n_used; s++)
        mmax = fmaxf(mmax, ml_base[((unit0 + s) * BM + r) * 2]);
    // split 0 holds key 0, which every row sees: mmax is finite
    float lsum = 0.f;
    for (int s = 0; s < n_used; s++) {
        const float2 ml = *reinterpret_cast<const float2 *>(ml_base + ((unit0 + s) * BM + r) * 2);
        lsum += ml.y * exp2f(ml.x - mmax);
    }
    const float inv = 1.f / lsum;
    const int rr = r0 + r;
    const size_t row = out_row(p, e, rr, kvh);
    T *dst = out + row * D;
    if (p.lse && lane == 0)
        p.lse[row] = lse_from_log2(mmax, lsum);
    for (int c = lane * 4; c < D; c += 128) {
        float4 a = make_float4(0.f, 0.f, 0.f, 0.f);
        for (int s = 0; s < n_used; s++) {
            const float w = exp2f(ml_base[((unit0 + s) * BM + r) * 2] - mmax);
            const float4 x = *reinterpret_cast<const float4 *>(p.ws + ((unit0 + s) * BM + r) * D + c);
            a.x += w * x.x;
            a.y += w * x.y;
            a.z += w * x.z;
            a.w += w * x.w;
        }
        const uint32_t lo = pack2<T>(a.x * inv, a.y * inv);
        const uint32_t hi = pack2<T>(a.z * inv, a.w * inv);
        *reinterpret_cast<uint2 *>(dst + c) = make_uint2(lo, hi);
    }
}

// ---- host side ----
// Tile slots (sum over entries of ceil(n g / BM) <= (n_rows g + n_dense (BM - 1)) / BM)
// and the split count S: enough work items for `ctas_per_sm` full waves when
// the step has few tiles (rectification); none when it has many (prefill).
// Floor, so a wave is never overshot by a few CTAs; capped by the workspace.
inline dense_params make_params(const resa_cuda_layer_args *a, int ctas_per_sm, int64_t *slots_out)
{
    const resa_cuda_dims &dm = a->dims;
    const int g = dm.group;
    const int num_sms = dm.num_sms > 0 ? dm.num_sms : 132;
    const int64_t slots = (a->n_rows * g + (int64_t)a->n_dense * (BM - 1)) / BM;
    const int64_t tiles_est = (a->n_rows * g + BM - 1) / BM * dm.hkv;
    int64_t splits = tiles_est > 0 ? (int64_t)ctas_per_sm * num_sms / tiles_est : 1;
    splits = splits < 1 ? 1 : splits > MAX_SPLITS ? MAX_SPLITS : splits;
    const int64_t units = partial_units(&dm);
    if (splits > 1 && slots * dm.hkv * splits > units)
        splits = units / (slots * dm.hkv);
    if (splits < 2)
        splits = 1;
    *slots_out = slots;

    dense_params p;
    p.q = a->q;
    p.out = a->out;
    p.k = a->k;
    p.v = a->v;
    p.kscale = a->kscale;
    p.vscale = a->vscale;
    p.page_tables = a->page_tables;
    p.entries = a->entries;
    p.dense_ids = a->dense_ids;
    p.ws = static_cast<float *>(a->ws_dense);
    p.lse = a->lse;
    p.ws_units = units;
    p.n_dense = a->n_dense;
    p.hq = dm.hq;
    p.hkv = dm.hkv;
    p.g = g;
    p.b = dm.b;
    p.log2_b = dm.log2_b;
    p.max_seq_blocks = dm.max_seq_blocks;
    p.splits = (int)splits;
    p.scale_log2 = a->scale * 1.4426950408889634f;
    return p;
}

// The combine launch after a split attention launch (nothing when S == 1).
template <typename T, int D, int BN>
cudaError_t launch_combine(const dense_params &p, int64_t slots, const resa_cuda_layer_args *a)
{
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess || p.splits <= 1)
        return e;
    dense_combine_kernel<T, D, BN><<<dim3((unsigned)slots, (unsigned)p.hkv, BM / CWARPS),
                                     CWARPS * 32, 0, a->stream>>>(p);
    return cudaGetLastError();
}

} // namespace

#endif
