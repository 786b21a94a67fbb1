// SPDX-License-Identifier: MIT
// ReSA decode attention (DECODE and QUERY_SPARSE rows) over the blocks chosen
// by select_blocks.cu: split-KV flash decoding, then a log-sum-exp combine.
// CPU twin: lib/cpu/attention_sparse.c (the attention half).
//
// attend_split: grid (splits, n_decode * hkv), 4 warps.  Split s of an
// (entry, head) takes list entries [s*per, min(n, (s+1)*per)) with n the
// pair's chosen-block count (a->sel_counts, written by select_blocks: the
// budget n_select for a whole sequence, any number from 0 for a split one)
// and per = ceil(n / splits); splits depends only on the shape (num_sms,
// n_decode, hkv), so a CUDA graph replays for any lengths, and empty splits
// exit at once.  A pair with n = 0 (a QUERY_SPARSE row that chose none of
// this context's blocks) gets a 0 output row and lse -inf from the combine,
// as the CPU's empty rows.
//  - Work unit: 16 keys (two half-tiles of 8 consecutive positions; a half is
//    one block when b = 8, part of one when b >= 16), so any power-of-two
//    block size b >= 8 maps onto one m16n8k16 MMA step.
//  - All g <= 16 query heads of the group are the 16 MMA rows (zero padded),
//    so every K/V byte is loaded once for the whole group.  S = Q K^T and
//    O += P V run on tensor cores (fp32 accumulation); P is rounded to the
//    IO type for the P V product, as in FlashAttention.
//  - Each warp owns a private cp.async pipeline of kStages units (K and V
//    tiles in shared memory, XOR-swizzled so that ldmatrix is conflict
//    free) and walks units warp, warp+4, ...: no CTA barrier in the loop.
//    Positions >= end (the partial last block) are zero-filled by cp.async
//    and masked to -inf, so stale pool contents (even NaN) never leak in.
//  - Page ids are fetched 16 units ahead, 2 windows deep, so the dependent
//    list -> page-table -> data chain never stalls the pipeline.
//  - The 4 warps' (m, l, acc) merge in shared memory; one partial per CTA
//    goes to ws_sparse.
// combine: one CTA per (entry, head, query row) merges the non-empty splits
// (lanes over splits for the weights, then the 4 warps over splits and lanes
// over d) and writes out in the IO dtype.
//
// The fp8 cache (F8, lib/kv_fp8.h): the pipeline stages hold the units' raw
// e4m3 bytes and their tokens' scales (cp.async, half the bytes of a T unit;
// positions >= end zero-filled, bytes and scales, so they read back as 0),
// and both products read the raw bytes as MMA operands, one
// cvt.f16x2.e4m3x2 per two values (exact: e4m3 is a subset of f16), in f16
// MMAs whatever the IO type.  Why: converting a unit into a T copy first
// (e4m3 * scale rounded to T, then ldmatrix) cost ~3x the unit's MMA and
// softmax instructions and held the fp8 step to ~61 % of copy bandwidth
// (docs/performance.md, v13).  The scales move to fp32 where they are per
// key anyway: S column j times k_scale[j]; P column j times
// v_scale[j] / c before P is rounded to f16, with c 2^-15 times the unit's
// largest v_scale (so P v_scale / c stays below 2^15) and c folded into the
// accumulator's factor.  Queries go to f16 times 2^-e per row (max |q| into [2^14, 2^15):
// exact for bf16 values in range), 2^e folded into that row's score scale.
// So the fp8 sparse path attends e4m3 * scale exactly, where the CPU and the
// dense kernels round each value to T first: within the rounding the tests
// allow (docs/API.md, "fp8 KV cache").  Operand layouts: the Q K^T
// reduction over d and the P V sum over keys may run in any order, so d is
// permuted to make each lane's K operand 8 contiguous bytes (f8_k_dim) and
// the output dimension to make its V operand D/8 contiguous bytes of a key
// (f8_v_dim); merge_warps writes the outputs back in d order.
//
// Supported: d in {64, 128, 256}; group 1..16; b any power of two >= 8.
#include <math.h>

#include "common.cuh"

namespace {

using namespace resa;

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kRows = 16;  // MMA M: the group's query rows, zero padded
constexpr int kKeys = 16;  // keys per unit: one MMA K step of P V
constexpr int kWindow = 16; // units per page-id window (2 lanes per unit)
constexpr size_t kSmemPerSm = 228 * 1024; // H100/H200, for the split count only
constexpr float kLog2e = 1.4426950408889634f;

template <int D, bool F8 = false>
struct Cfg {
    static constexpr int kStages = D >= 256 ? 2 : 3;
    static constexpr int kChunks = D / 8; // 16-byte chunks per row
    static constexpr int kTileElems = kKeys * D;
    static constexpr int kUnitBytes = 2 * kTileElems * 2; // K and V tiles
    // F8: a stage is K and V bytes [kKeys][D] each (swizzled, f8_chunk), then
    // K and V scales [kKeys]; the MMAs read it directly (no converted copy)
    static constexpr int kRawUnitBytes = 2 * kTileElems + 2 * kKeys * 4;
    static constexpr int kStageBytes = F8 ? kRawUnitBytes : kUnitBytes;
    static constexpr int kWarpPipeBytes = kStages * kStageBytes;
    static constexpr int kPipeBytes = kWarps * kWarpPipeBytes;
    static constexpr int kAccStride = D + 8; // merge buffer row (floats), spreads banks
    static constexpr int kMergeBytes = kWarps * kRows * (kAccStride + 2) * 4;
    static constexpr int kQBytes = kRows * D * 2;
    static constexpr int kNvBytes = kWarps * kStages * 2 * 4;
    static constexpr int kRowFBytes = F8 ? kRows * 4 : 0; // F8: each query row's 2^e (stage_queries_f8)
    static constexpr int kMainBytes = kPipeBytes > kMergeBytes ? kPipeBytes : kMergeBytes;
    static constexpr int kSmem = kMainBytes + kQBytes + kNvBytes + kRowFBytes;
    static constexpr bool kQInRegs = D <= 128; // d = 256 reloads Q fragments per unit
};

// ---- PTX wrappers ----

__device__ __forceinline__ uint32_t smem_addr(const void *p)
{
    return (uint32_t)__cvta_generic_to_shared(p);
}

// 16-byte async copy; src_bytes = 0 zero-fills the destination.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void *src, int src_bytes)
{
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
                 "r"(src_bytes));
}
// 4-byte async copy (the fp8 cache's scales); src_bytes = 0 zero-fills.
__device__ __forceinline__ void cp_async4(uint32_t dst, const void *src, int src_bytes)
{
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src),
                 "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit()
{
    asm volatile("cp.async.commit_group;\n" ::);
}
template <int N>
__device__ __forceinline__ void cp_async_wait()
{
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldsm_x4(uint32_t r[4], uint32_t addr)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t r[4], uint32_t addr)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// c += a b, m16n8k16, fp32 accumulators.
__device__ __forceinline__ void mma(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1,
                                    __nv_bfloat16)
{
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void mma(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1,
                                    __half)
{
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t pack2(float lo, float hi, __nv_bfloat16)
{
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t *>(&v);
}
__device__ __forceinline__ uint32_t pack2(float lo, float hi, __half)
{
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t *>(&v);
}

// Byte offset of 16-byte chunk c of row r in a swizzled [rows][D] tile: the
// chunk index is XORed with r & 7, so the 8 rows an ldmatrix reads hit 8
// different bank groups.
template <int D>
__device__ __forceinline__ uint32_t swz(int r, int c)
{
    return (uint32_t)((r * D + ((c ^ (r & 7)) << 3)) * 2);
}

// ---- the fp8 cache's operand layouts ----

// Byte offset of 16-byte chunk c of row r in a raw F8 tile (tile 0: K, 1: V),
// the chunk index XORed with a function of r chosen so that the lanes' loads
// in attend_unit_f8 hit distinct bank groups: K, 8-byte loads by 16 lanes
// at once (rows r0..r0+3, chunks 2p and 2p+1); V, 16-byte loads by 8 lanes
// (rows r0, r0+2, r0+4, r0+6, chunks 2q and 2q+1; d 256: 4q+s and 4q+2+s).
// d 64 has 4 chunks a row (two rows a bank line); its V loads keep a 2-way
// conflict.
template <int D>
__device__ __forceinline__ uint32_t f8_chunk(int tile, int r, int c)
{
    int x;
    if (tile == 0)
        x = D == 64 ? ((r >> 1) & 1) << 1 : (r & 3) << 1;
    else if (D == 256)
        x = ((r >> 1) & 1) | (((r >> 2) & 1) << 2);
    else
        x = (((r >> 1) & 3) << 1) & (D / 16 - 1);
    return (uint32_t)(r * D + ((c ^ x) << 4));
}

// The dimension of q and k that MMA k-index km (k-step km / 16) multiplies:
// lane quad t's B operand of k-steps 2p and 2p + 1 is bytes [32p + 8t, +8)
// of its key, k-step 2p + hi taking bytes 4 hi .. 4 hi + 3 in the order of
// the fragment's k-indices 2t, 2t + 1, 2t + 8, 2t + 9.
template <int D>
__device__ __forceinline__ int f8_k_dim(int km)
{
    const int kc = km >> 4, j = km & 15;
    const int t = (j & 7) >> 1, idx = ((j >> 3) << 1) | (j & 1);
    return 32 * (kc >> 1) + 8 * t + 4 * (kc & 1) + idx;
}
// The output dimension of column n (0..7) of the P V product's n-tile dt:
// lane group gid's B operand of every n-tile is bytes [gid D/8, +D/8) of
// each of its keys.
template <int D>
__device__ __forceinline__ int f8_v_dim(int dt, int n)
{
    return (D / 8) * n + dt;
}

// Two e4m3 bytes (low byte to the low half) as f16x2, exact.
__device__ __forceinline__ uint32_t e4m3x2_f16x2(uint32_t two)
{
    const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)(two & 0xffffu), __NV_E4M3);
    return (uint32_t)h.x | ((uint32_t)h.y << 16);
}

// ---- the split kernel ----

// The split's part of the chosen list, seen as 8-key half-tiles.
struct Chunk {
    const int32_t *list;  // chosen block indices of the (entry, head), ascending
    const int32_t *pt;    // the sequence's page table
    int lo;               // first list entry of the split
    int n8;               // half-tiles in the split
    int log2_hpb;         // log2(b / 8): half-tiles per block
    int b;
    int64_t end;          // sequence length: positions >= end are masked
};

// Page ids of one window: lane l holds half-tile l of the warp's units
// [16 w, 16 w + 16).  Two steps (list, then page table) so that each can be
// issued a window ahead of its use.
__device__ __forceinline__ int half_of(int warp, int wi, int lane)
{
    return 2 * (warp + kWarps * (kWindow * wi + (lane >> 1))) + (lane & 1);
}
__device__ __forceinline__ int fetch_block(const Chunk &c, int hh)
{
    return hh < c.n8 ? __ldg(c.list + c.lo + (hh >> c.log2_hpb)) : -1;
}
__device__ __forceinline__ void fetch_page(const Chunk &c, int hh, int blk, int &page, int &nv)
{
    page = blk >= 0 ? __ldg(c.pt + blk) : 0;
    const int64_t first = (int64_t)blk * c.b + ((hh & ((1 << c.log2_hpb) - 1)) << 3);
    nv = blk >= 0 ? (int)max((int64_t)0, min((int64_t)8, c.end - first)) : 0;
}

// Rolling page-id windows of one warp: cur for the window being issued,
// nxt (page-table loads in flight) and nn_blk (list loads in flight).
struct Windows {
    int wi, cur_page, cur_nv, nxt_page, nxt_nv, nn_blk;
};

__device__ __forceinline__ void windows_init(Windows &w, const Chunk &c, int warp, int lane)
{
    const int b0 = fetch_block(c, half_of(warp, 0, lane));
    const int b1 = fetch_block(c, half_of(warp, 1, lane));
    fetch_page(c, half_of(warp, 0, lane), b0, w.cur_page, w.cur_nv);
    fetch_page(c, half_of(warp, 1, lane), b1, w.nxt_page, w.nxt_nv);
    w.nn_blk = fetch_block(c, half_of(warp, 2, lane));
    w.wi = 0;
}

__device__ __forceinline__ void windows_advance(Windows &w, const Chunk &c, int warp, int lane)
{
    w.wi++;
    w.cur_page = w.nxt_page;
    w.cur_nv = w.nxt_nv;
    fetch_page(c, half_of(warp, w.wi + 1, lane), w.nn_blk, w.nxt_page, w.nxt_nv);
    w.nn_blk = fetch_block(c, half_of(warp, w.wi + 2, lane));
}

// Issues the cp.async copies of unit k of this warp into stage `st`.
template <typename T, int D, bool F8>
__device__ __forceinline__ void issue_unit(const resa_cuda_layer_args &a, const Chunk &c,
                                           Windows &w, int k, int h, uint8_t *stage, int *nv_slot,
                                           int warp, int lane)
{
    constexpr int CH = Cfg<D>::kChunks;
    if ((k / kWindow) != w.wi)
        windows_advance(w, c, warp, lane);
    const int j = k % kWindow;
    int page[2], nv[2], off[2];
    const int u = warp + kWarps * k;
#pragma unroll
    for (int hf = 0; hf < 2; hf++) {
        page[hf] = __shfl_sync(0xffffffffu, w.cur_page, 2 * j + hf);
        nv[hf] = __shfl_sync(0xffffffffu, w.cur_nv, 2 * j + hf);
        off[hf] = ((2 * u + hf) & ((1 << c.log2_hpb) - 1)) << 3;
    }
    if (lane == 0) {
        nv_slot[0] = nv[0];
        nv_slot[1] = nv[1];
    }
    const size_t hkv = a.dims.hkv;
    const uint32_t dst0 = smem_addr(stage);
    if constexpr (F8) {
        // bytes: 2 tiles x 16 rows x D/16 chunks = 2 D chunks, 32 per step
        constexpr int CH8 = D / 16;
        const uint8_t *base8[2] = {(const uint8_t *)a.k, (const uint8_t *)a.v};
        const int ch8 = lane % CH8;
#pragma unroll
        for (int it = 0; it < 2 * D / 32; it++) {
            constexpr int kRowsPerStep = 32 / CH8;
            const int kv = (32 * it) / (kKeys * CH8);
            const int rr = (it * kRowsPerStep + lane / CH8) % kKeys;
            const int hf = rr >> 3, r8 = rr & 7;
            const bool ok = r8 < nv[hf];
            const uint8_t *src =
                base8[kv] + (((size_t)page[hf] * hkv + h) * c.b + off[hf] + r8) * D + ch8 * 16;
            cp_async16(dst0 + kv * Cfg<D>::kTileElems + f8_chunk<D>(kv, rr, ch8),
                       ok ? src : base8[kv], ok ? 16 : 0);
        }
        // scales: lane l -> tile l / 16, row l % 16
        const int rr = lane & 15, r8 = rr & 7;
        const float *sbase = lane >> 4 ? a.vscale : a.kscale; // a select, not a local array
        const int pg = rr >> 3 ? page[1] : page[0], nvh = rr >> 3 ? nv[1] : nv[0];
        const int of = rr >> 3 ? off[1] : off[0];
        const bool ok = r8 < nvh;
        const float *src = sbase + ((size_t)pg * hkv + h) * c.b + of + r8;
        cp_async4(dst0 + 2 * Cfg<D>::kTileElems + lane * 4, ok ? src : sbase, ok ? 4 : 0);
        return;
    }
    const T *kv_base[2] = {(const T *)a.k, (const T *)a.v};
    // 2 tiles x 16 rows x CH chunks = 4 D chunks, 32 per step; CH divides 32
    // so kv is a compile-time constant of the step and ch depends on the lane.
    const int ch = lane % CH;
#pragma unroll
    for (int it = 0; it < 4 * D / 32; it++) {
        constexpr int kRowsPerStep = 32 / CH;
        const int kv = (32 * it) / (kKeys * CH);
        const int rr = (it * kRowsPerStep + lane / CH) % kKeys;
        const int hf = rr >> 3, r8 = rr & 7;
        const bool ok = r8 < nv[hf];
        const T *src = kv_base[kv] +
                       (((size_t)page[hf] * hkv + h) * c.b + off[hf] + r8) * D + ch * 8;
        cp_async16(dst0 + kv * Cfg<D>::kTileElems * 2 + swz<D>(rr, ch), ok ? src : kv_base[kv],
                   ok ? 16 : 0);
    }
}

// Online-softmax state of one warp: rows gid and gid + 8 of the MMA tile.
template <int D>
struct State {
    float m[2], l[2];
    float acc[D / 8][4];
    float kc;   // F8: the accumulator's factor (the true sum is acc * kc); 1 otherwise
    float kmax; // F8: the largest V scale so far
};

// Q fragments (A operand) of k-step kc from the swizzled Q tile.
template <int D>
__device__ __forceinline__ void load_q(uint32_t qf[4], uint32_t q_s, int kc, int lane)
{
    const int r = lane & 7, mi = lane >> 3;
    ldsm_x4(qf, q_s + swz<D>((mi & 1) * 8 + r, 2 * kc + (mi >> 1)));
}

// S = Q K^T for one unit: s[nt] is keys 8 nt .. 8 nt + 7.  Q fragments come
// from registers (d <= 128) or are reloaded from the Q tile (d = 256).
// The MMA accumulators of one unit's scores (two n-tiles of 8 keys) set to 0.
__device__ __forceinline__ void zero_scores(float s[2][4])
{
#pragma unroll
    for (int nt = 0; nt < 2; nt++)
#pragma unroll
        for (int e = 0; e < 4; e++)
            s[nt][e] = 0.0f;
}

template <typename T, int D, int QN>
__device__ __forceinline__ void unit_scores(float s[2][4], uint32_t k_s, uint32_t q_s,
                                            const uint32_t (&qf)[QN][4], int lane)
{
    const int r = lane & 7, mi = lane >> 3;
    zero_scores(s);
#pragma unroll
    for (int kc = 0; kc < D / 16; kc++) {
        uint32_t kb[4];
        ldsm_x4(kb, k_s + swz<D>((mi >> 1) * 8 + r, 2 * kc + (mi & 1)));
        if constexpr (Cfg<D>::kQInRegs) {
            mma(s[0], qf[kc], kb[0], kb[1], T());
            mma(s[1], qf[kc], kb[2], kb[3], T());
        } else {
            uint32_t qr[4];
            load_q<D>(qr, q_s, kc, lane);
            mma(s[0], qr, kb[0], kb[1], T());
            mma(s[1], qr, kb[2], kb[3], T());
        }
    }
}

__device__ __forceinline__ float quad_max(float x)
{
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
    return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

// The online softmax over one unit's masked scores (log2 units): s becomes
// the unnormalized probabilities, each row's m and l move on, and corr[hr]
// is the factor for the rows' accumulators (row gid: e = 0, 1; row gid + 8:
// e = 2, 3).
template <int D>
__device__ __forceinline__ void softmax_unit(State<D> &st, float s[2][4], float corr[2])
{
#pragma unroll
    for (int hr = 0; hr < 2; hr++) {
        const float mx = quad_max(fmaxf(fmaxf(s[0][2 * hr], s[0][2 * hr + 1]),
                                        fmaxf(s[1][2 * hr], s[1][2 * hr + 1])));
        const float m_new = fmaxf(st.m[hr], mx);
        const float base = m_new == -INFINITY ? 0.0f : m_new; // nothing valid yet
        corr[hr] = exp2f(st.m[hr] - base);
        float sum = 0.0f;
#pragma unroll
        for (int nt = 0; nt < 2; nt++)
#pragma unroll
            for (int e = 2 * hr; e < 2 * hr + 2; e++) {
                s[nt][e] = exp2f(s[nt][e] - base);
                sum += s[nt][e];
            }
        st.l[hr] = st.l[hr] * corr[hr] + sum;
        st.m[hr] = m_new;
    }
}

// One unit: scores, mask, online softmax, O += P V.
template <typename T, int D, int QN>
__device__ __forceinline__ void attend_unit(State<D> &st, uint32_t k_s, uint32_t v_s, uint32_t q_s,
                                            const uint32_t (&qf)[QN][4], const int *nv_slot,
                                            float scale_log2, int lane)
{
    float s[2][4];
    unit_scores<T, D, QN>(s, k_s, q_s, qf, lane);
    const int tig = lane & 3, r = lane & 7, mi = lane >> 3;
    const int nv0 = nv_slot[0], nv1 = nv_slot[1];
#pragma unroll
    for (int nt = 0; nt < 2; nt++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const int col = tig * 2 + (e & 1);
            s[nt][e] = col < (nt ? nv1 : nv0) ? s[nt][e] * scale_log2 : -INFINITY;
        }
    float corr[2];
    softmax_unit<D>(st, s, corr);
#pragma unroll
    for (int hr = 0; hr < 2; hr++)
#pragma unroll
        for (int dt = 0; dt < D / 8; dt++) {
            st.acc[dt][2 * hr] *= corr[hr];
            st.acc[dt][2 * hr + 1] *= corr[hr];
        }
    uint32_t pa[4];
    // The S accumulators of keys 0-7 and 8-15 are exactly P's A fragment.
    pa[0] = pack2(s[0][0], s[0][1], T());
    pa[1] = pack2(s[0][2], s[0][3], T());
    pa[2] = pack2(s[1][0], s[1][1], T());
    pa[3] = pack2(s[1][2], s[1][3], T());
#pragma unroll
    for (int dt = 0; dt < D / 16; dt++) {
        uint32_t vb[4];
        ldsm_x4_t(vb, v_s + swz<D>((mi & 1) * 8 + r, 2 * dt + (mi >> 1)));
        mma(st.acc[2 * dt], pa, vb[0], vb[1], T());
        mma(st.acc[2 * dt + 1], pa, vb[2], vb[3], T());
    }
}

// attend_unit for a raw F8 unit at `raw` (stage layout of Cfg<D, true>): the
// operands are built from the e4m3 bytes in registers (see the file comment),
// the MMAs are f16.  rowf[r]: query row r's 2^e times scale log2 e.
template <int D, int QN>
__device__ __forceinline__ void attend_unit_f8(State<D> &st, const uint8_t *raw, uint32_t q_s,
                                               const uint32_t (&qf)[QN][4], const int *nv_slot,
                                               const float rf[2], int lane)
{
    const int gid = lane >> 2, tig = lane & 3;
    const float *ksc = (const float *)(raw + 2 * Cfg<D>::kTileElems);
    const float *vsc = ksc + kKeys;
    // this lane's keys in S and P: 2 tig, 2 tig + 1 (n-tile 0) and 8 + those
    const float2 k01 = *(const float2 *)(ksc + 2 * tig), k89 = *(const float2 *)(ksc + 8 + 2 * tig);
    const float2 v01 = *(const float2 *)(vsc + 2 * tig), v89 = *(const float2 *)(vsc + 8 + 2 * tig);
    // S = Q K^T: lane (gid, tig) holds key row 8 nt + gid's bytes [32p + 8 tig, +8)
    float s[2][4];
    zero_scores(s);
#pragma unroll
    for (int p = 0; p < D / 32; p++) {
        uint32_t qa[4], qb[4];
        if constexpr (Cfg<D>::kQInRegs) {
#pragma unroll
            for (int x = 0; x < 4; x++) {
                qa[x] = qf[2 * p][x];
                qb[x] = qf[2 * p + 1][x];
            }
        } else {
            load_q<D>(qa, q_s, 2 * p, lane);
            load_q<D>(qb, q_s, 2 * p + 1, lane);
        }
#pragma unroll
        for (int nt = 0; nt < 2; nt++) {
            const int row = 8 * nt + gid;
            const uint2 w = *(const uint2 *)(raw + f8_chunk<D>(0, row, 2 * p + (tig >> 1)) +
                                             8 * (tig & 1));
            mma(s[nt], qa, e4m3x2_f16x2(w.x), e4m3x2_f16x2(w.x >> 16), __half());
            mma(s[nt], qb, e4m3x2_f16x2(w.y), e4m3x2_f16x2(w.y >> 16), __half());
        }
    }
    const int nv0 = nv_slot[0], nv1 = nv_slot[1];
    const float ks[2][2] = {{k01.x, k01.y}, {k89.x, k89.y}};
#pragma unroll
    for (int nt = 0; nt < 2; nt++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const int col = tig * 2 + (e & 1);
            s[nt][e] = col < (nt ? nv1 : nv0) ? s[nt][e] * (rf[e >> 1] * ks[nt][e & 1]) : -INFINITY;
        }
    // c: 2^-15 times this unit's largest V scale (4 a lane, then over the
    // quad), so that P v_scale / c <= 2^15 (f16 holds 65504) and a key keeps
    // f16's precision down to 2^-29 of its unit's largest scale times its
    // weight.  A running maximum instead lost every later key once
    // P v_scale / c fell below f16's range: one early token with a V scale
    // 2^16 above the rest and a small weight cost 7e-3 relative error, 2^24
    // 79 % (bench/quality/fp8_sparse_numerics.py, rules "running" and
    // "unit15": 1.9e-4 to 1e-3 up to 2^32).  The accumulator holds the true
    // sum / c, so c is kept within 2^64 of the largest scale so far (kmax: at
    // most #keys 448 2^79 stored, no overflow) and at least 2^-126 (1 / c
    // finite).  No positive finite scale here (every key zero-filled, or a
    // non-finite scale, which poisons the rows that attend it through
    // P v_scale anyway): c stays (0: nothing yet).
    float cu = fmaxf(fmaxf(v01.x, v01.y), fmaxf(v89.x, v89.y));
    cu = quad_max(cu);
    const bool valid = cu > 0.0f && cu <= 3.402823466e38f;
    st.kmax = valid ? fmaxf(st.kmax, cu) : st.kmax;
    const float c = valid ? fmaxf(fmaxf(cu * 0x1p-15f, 0x1p-126f), st.kmax * 0x1p-64f) : st.kc;
    const float rescale = c > 0.0f ? st.kc / c : 0.0f, inv_c = c > 0.0f ? 1.0f / c : 0.0f;
    st.kc = c;
    const float vs[2][2] = {{v01.x * inv_c, v01.y * inv_c}, {v89.x * inv_c, v89.y * inv_c}};
    float corr[2];
    softmax_unit<D>(st, s, corr); // l sums P itself
#pragma unroll
    for (int nt = 0; nt < 2; nt++)
#pragma unroll
        for (int e = 0; e < 4; e++)
            s[nt][e] *= vs[nt][e & 1]; // P v_scale / c, below 2^15
#pragma unroll
    for (int hr = 0; hr < 2; hr++)
#pragma unroll
        for (int dt = 0; dt < D / 8; dt++) {
            st.acc[dt][2 * hr] *= corr[hr] * rescale;
            st.acc[dt][2 * hr + 1] *= corr[hr] * rescale;
        }
    uint32_t pa[4];
    pa[0] = pack2(s[0][0], s[0][1], __half());
    pa[1] = pack2(s[0][2], s[0][3], __half());
    pa[2] = pack2(s[1][0], s[1][1], __half());
    pa[3] = pack2(s[1][2], s[1][3], __half());
    // O += P V: lane (gid, tig) holds keys 2 tig, 2 tig + 1, 2 tig + 8,
    // 2 tig + 9, bytes [gid D/8, +D/8) of each (dims f8_v_dim(dt, gid));
    // byte dt of two keys makes one f16x2 of the B operand (prmt, then cvt)
    constexpr int VB = D / 8; // bytes a lane reads of a key: 8, 16 or 32
    uint32_t vk[4][VB / 4];
#pragma unroll
    for (int x = 0; x < 4; x++) {
        const int key = 2 * tig + (x & 1) + 8 * (x >> 1);
        const uint8_t *vrow = raw + Cfg<D>::kTileElems;
        if constexpr (VB == 8) {
            const uint2 w = *(const uint2 *)(vrow + f8_chunk<D>(1, key, gid >> 1) + 8 * (gid & 1));
            vk[x][0] = w.x;
            vk[x][1] = w.y;
        } else {
#pragma unroll
            for (int y = 0; y < VB / 16; y++) {
                const uint4 w = *(const uint4 *)(vrow + f8_chunk<D>(1, key, (VB / 16) * gid + y));
                vk[x][4 * y] = w.x;
                vk[x][4 * y + 1] = w.y;
                vk[x][4 * y + 2] = w.z;
                vk[x][4 * y + 3] = w.w;
            }
        }
    }
#pragma unroll
    for (int wd = 0; wd < VB / 4; wd++) { // 4 n-tiles (dims) a word
        const uint32_t lo01 = __byte_perm(vk[0][wd], vk[1][wd], 0x5140); // dims 0, 1: keys 2t, 2t+1
        const uint32_t hi01 = __byte_perm(vk[0][wd], vk[1][wd], 0x7362); // dims 2, 3
        const uint32_t lo89 = __byte_perm(vk[2][wd], vk[3][wd], 0x5140);
        const uint32_t hi89 = __byte_perm(vk[2][wd], vk[3][wd], 0x7362);
        mma(st.acc[4 * wd], pa, e4m3x2_f16x2(lo01), e4m3x2_f16x2(lo89), __half());
        mma(st.acc[4 * wd + 1], pa, e4m3x2_f16x2(lo01 >> 16), e4m3x2_f16x2(lo89 >> 16), __half());
        mma(st.acc[4 * wd + 2], pa, e4m3x2_f16x2(hi01), e4m3x2_f16x2(hi89), __half());
        mma(st.acc[4 * wd + 3], pa, e4m3x2_f16x2(hi01 >> 16), e4m3x2_f16x2(hi89 >> 16), __half());
    }
}

// F8: the group's query rows into the swizzled [16][D] f16 tile in MMA
// k-order (f8_k_dim), each row times 2^-e with its largest |q| brought into
// [2^14, 2^15) (exact for 16-bit values, unless a value lies 2^38 below its
// row's largest; 0, inf or NaN rows keep e = 0, so non-finite values stay
// what they are); rowf[r] = 2^e scale log2 e.  Rows past g are 0.
template <typename T, int D>
__device__ void stage_queries_f8(const resa_cuda_layer_args &a, int64_t row, int h,
                                 uint8_t *q_tile, float *rowf, float scale_log2)
{
    const int g = a.dims.group;
    const T *q = (const T *)a.q + ((size_t)row * a.dims.hq + (size_t)h * g) * D;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    __shared__ int row_e[kRows];
    for (int r = warp; r < kRows; r += kWarps) {
        float mx = 0.0f;
        if (r < g)
            for (int x = lane; x < D; x += 32)
                mx = fmaxf(mx, fabsf(to_f32(q[(size_t)r * D + x])));
#pragma unroll
        for (int o = 16; o > 0; o >>= 1)
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
        // fmaxf drops NaN: a NaN row with finite values keeps their e, and its NaN stays NaN
        // (e kept in [-100, 113]: rowf stays a normal float)
        const int e = mx > 0.0f && mx <= 3.402823466e38f ? max(-100, ilogbf(mx) - 14) : 0;
        if (lane == 0) {
            row_e[r] = e;
            rowf[r] = ldexpf(scale_log2, e);
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < kRows * D; i += kThreads) {
        const int r = i / D, km = i % D;
        float v = 0.0f;
        if (r < g)
            v = ldexpf(to_f32(q[(size_t)r * D + f8_k_dim<D>(km)]), -row_e[r]);
        *(__half *)(q_tile + swz<D>(r, km >> 3) + 2 * (km & 7)) = __float2half_rn(v);
    }
}

// Loads the group's g query rows into the swizzled [16][D] tile, zero rows past g.
template <typename T, int D>
__device__ void stage_queries(const resa_cuda_layer_args &a, int64_t row, int h, uint8_t *q_tile)
{
    constexpr int CH = Cfg<D>::kChunks;
    const int g = a.dims.group;
    const T *q = (const T *)a.q + ((size_t)row * a.dims.hq + (size_t)h * g) * D;
    for (int i = threadIdx.x; i < kRows * CH; i += kThreads) {
        const int r = i / CH, ch = i % CH;
        uint4 v = make_uint4(0, 0, 0, 0);
        if (r < g)
            v = *(const uint4 *)(q + (size_t)r * D + ch * 8);
        *(uint4 *)(q_tile + swz<D>(r, ch)) = v;
    }
}

// The 4 warps' states into one partial (m, l in log2 units, unnormalized acc).
template <int D, bool F8>
__device__ void merge_warps(const State<D> &st, uint8_t *smem, float *part, int g, int warp,
                            int lane)
{
    constexpr int AS = Cfg<D>::kAccStride;
    float *acc_s = (float *)smem;                  // [kWarps][16][AS]
    float *m_s = acc_s + kWarps * kRows * AS;      // [kWarps][16]
    float *l_s = m_s + kWarps * kRows;             // [kWarps][16]
    const int gid = lane >> 2, tig = lane & 3;
#pragma unroll
    for (int hr = 0; hr < 2; hr++) {
        float l = st.l[hr];
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        const int row = gid + 8 * hr;
        if (tig == 0) {
            m_s[warp * kRows + row] = st.m[hr];
            l_s[warp * kRows + row] = l;
        }
        float *dst = acc_s + (warp * kRows + row) * AS;
        if constexpr (F8) { // columns 2 tig, 2 tig + 1 of n-tile dt are dims f8_v_dim
#pragma unroll
            for (int dt = 0; dt < D / 8; dt++) {
                dst[f8_v_dim<D>(dt, 2 * tig)] = st.acc[dt][2 * hr] * st.kc;
                dst[f8_v_dim<D>(dt, 2 * tig + 1)] = st.acc[dt][2 * hr + 1] * st.kc;
            }
        } else {
#pragma unroll
            for (int dt = 0; dt < D / 8; dt++)
                *(float2 *)(dst + tig * 2 + dt * 8) =
                    make_float2(st.acc[dt][2 * hr], st.acc[dt][2 * hr + 1]);
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < g * D; i += kThreads) {
        const int r = i / D, col = i % D;
        float M = -INFINITY;
#pragma unroll
        for (int w = 0; w < kWarps; w++)
            M = fmaxf(M, m_s[w * kRows + r]);
        float L = 0.0f, A = 0.0f;
        if (M != -INFINITY)
#pragma unroll
            for (int w = 0; w < kWarps; w++) {
                const float f = exp2f(m_s[w * kRows + r] - M);
                L += l_s[w * kRows + r] * f;
                A += acc_s[(w * kRows + r) * AS + col] * f;
            }
        part[2 * kRows + r * D + col] = A;
        if (col == 0) {
            part[2 * r] = M;
            part[2 * r + 1] = L;
        }
    }
}

// The pair chooses exactly its budget n_select (a whole sequence's DECODE with
// no two-phase thresholds), so its count need not be read from the selection's
// output (sel_counts holds the same number).
__device__ __forceinline__ bool chosen_is_budget(const resa_cuda_layer_args &a,
                                                 const resa_dev_entry &e)
{
    return e.mode == RESA_MODE_DECODE && e.first_block == 0 && a.thr_scores == nullptr;
}

template <typename T, int D, bool F8>
__global__ void __launch_bounds__(kThreads) attend_split(resa_cuda_layer_args a, float *parts)
{
    using C = Cfg<D, F8>;
    static_assert(C::kChunks == Cfg<D>::kChunks, "the T tiles are laid out alike");
    extern __shared__ __align__(128) uint8_t smem[];
    uint8_t *pipe = smem;
    uint8_t *q_tile = smem + C::kMainBytes;
    int *nv_all = (int *)(q_tile + C::kQBytes);
    float *rowf = (float *)(nv_all + kWarps * C::kStages * 2); // F8 only
    const resa_cuda_dims &Dm = a.dims;
    const int splits = gridDim.x, s = blockIdx.x, pair = blockIdx.y;
    const int i = pair / Dm.hkv, h = pair % Dm.hkv;
    const resa_dev_entry &e = a.entries[a.decode_ids[i]];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    // A whole sequence's DECODE without thresholds chooses exactly its budget,
    // known at launch: its empty splits leave before staging anything.  Any
    // other pair reads its count (select_blocks.cu) after the wait below.
    const bool budget_known = chosen_is_budget(a, e);
    int n = e.n_select, per = (n + splits - 1) / splits;
    int lo = s * per, hi = min(n, lo + per);
    if (budget_known && lo >= hi) { // the combine reads only the non-empty splits
        pdl_wait();
        pdl_trigger();
        return;
    }
    // The queries were written before the layer began: staged while the
    // select kernel finishes; the chosen list and its count only after it has.
    const float scale_log2 = a.scale * kLog2e;
    if constexpr (F8)
        stage_queries_f8<T, D>(a, e.row, h, q_tile, rowf, scale_log2);
    else
        stage_queries<T, D>(a, e.row, h, q_tile);
    pdl_wait();
    pdl_trigger(); // the combine may launch; it waits for our partials
    if (!budget_known) {
        n = a.sel_counts[pair], per = (n + splits - 1) / splits;
        lo = s * per, hi = min(n, lo + per);
        if (lo >= hi) // uniform over the CTA
            return;
    }

    Chunk c;
    c.list = (const int32_t *)a.ws_select + (size_t)pair * Dm.max_seq_blocks;
    c.pt = a.page_tables + (size_t)e.slot * Dm.max_seq_blocks;
    c.lo = lo;
    c.log2_hpb = Dm.log2_b - 3;
    c.n8 = (hi - lo) << c.log2_hpb;
    c.b = Dm.b;
    c.end = e.end;
    const int units = (c.n8 + 1) / 2;
    const int mine = units > warp ? (units - 1 - warp) / kWarps + 1 : 0;

    Windows w;
    windows_init(w, c, warp, lane);
    uint8_t *my_pipe = pipe + (size_t)warp * C::kWarpPipeBytes;
    int *my_nv = nv_all + warp * C::kStages * 2;
#pragma unroll
    for (int k = 0; k < C::kStages - 1; k++) {
        if (k < mine)
            issue_unit<T, D, F8>(a, c, w, k, h, my_pipe + k * C::kStageBytes, my_nv + 2 * k,
                                 warp, lane);
        cp_async_commit();
    }

    __syncthreads();
    const uint32_t q_s = smem_addr(q_tile);
    constexpr int QN = C::kQInRegs ? D / 16 : 1;
    uint32_t qf[QN][4];
    if constexpr (C::kQInRegs) {
#pragma unroll
        for (int kc = 0; kc < D / 16; kc++)
            load_q<D>(qf[kc], q_s, kc, lane);
    } else {
        qf[0][0] = qf[0][1] = qf[0][2] = qf[0][3] = 0u;
    }
    float rf[2] = {0.0f, 0.0f}; // F8: rows gid and gid + 8's 2^e scale log2 e
    if constexpr (F8) {
        rf[0] = rowf[lane >> 2];
        rf[1] = rowf[(lane >> 2) + 8];
    }

    State<D> st;
    st.m[0] = st.m[1] = -INFINITY;
    st.l[0] = st.l[1] = 0.0f;
    st.kc = F8 ? 0.0f : 1.0f; // F8: nothing accumulated yet
    st.kmax = 0.0f;
#pragma unroll
    for (int dt = 0; dt < D / 8; dt++)
        st.acc[dt][0] = st.acc[dt][1] = st.acc[dt][2] = st.acc[dt][3] = 0.0f;

    for (int k = 0; k < mine; k++) {
        cp_async_wait<C::kStages - 2>();
        __syncwarp(); // unit k visible to the warp; unit k-1's stage free
        const int nk = k + C::kStages - 1;
        if (nk < mine)
            issue_unit<T, D, F8>(a, c, w, nk, h, my_pipe + (nk % C::kStages) * C::kStageBytes,
                                 my_nv + 2 * (nk % C::kStages), warp, lane);
        cp_async_commit();
        const int sl = k % C::kStages;
        if constexpr (F8) {
            attend_unit_f8<D, QN>(st, my_pipe + sl * C::kStageBytes, q_s, qf, my_nv + 2 * sl, rf,
                                  lane);
        } else {
            const uint32_t k_s = smem_addr(my_pipe + sl * C::kStageBytes);
            attend_unit<T, D, QN>(st, k_s, k_s + C::kTileElems * 2, q_s, qf, my_nv + 2 * sl,
                                  scale_log2, lane);
        }
    }
    cp_async_wait<0>();
    __syncthreads(); // the pipeline buffers become the merge buffers
    const int stride = 2 * kRows + Dm.group * D;
    merge_warps<D, F8>(st, pipe, parts + ((size_t)pair * splits + s) * stride, Dm.group, warp, lane);
}

// ---- combine ----

// PER consecutive floats / IO elements of one lane (PER = D / 32: 2, 4, 8).
template <int PER>
__device__ __forceinline__ void load_floats(const float *p, float v[PER])
{
#pragma unroll
    for (int x = 0; x < PER; x += 2) {
        const float2 f = *(const float2 *)(p + x);
        v[x] = f.x;
        v[x + 1] = f.y;
    }
}
template <typename T, int PER>
__device__ __forceinline__ void store_row(T *dst, const float v[PER])
{
    union {
        T t[PER];
        uint32_t w[PER / 2];
    } u;
#pragma unroll
    for (int x = 0; x < PER; x++)
        u.t[x] = from_f32<T>(v[x]);
#pragma unroll
    for (int x = 0; x < PER / 2; x++)
        ((uint32_t *)dst)[x] = u.w[x];
}

// One CTA per (entry, head, query row).  Every warp finds the running max M
// and the sum L over all splits in one pass (lanes over splits, each lane an
// online max/sum, then a rescaling warp reduction); then warp w sums the
// splits w, w + 4, ... weighted by 2^(m_s - M) (lanes over d), and the 4
// sums meet in shared memory.  At batch 1 an (entry, head) has up to ~130
// splits: no loop here is a chain of dependent L2 round trips.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) combine(resa_cuda_layer_args a, int splits, const float *parts)
{
    constexpr int PER = D / 32; // dims per lane
    __shared__ float sums[kWarps - 1][D];
    const resa_cuda_dims &Dm = a.dims;
    const int g = Dm.group;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int item = blockIdx.x; // grid: exactly n_decode * hkv * g
    pdl_wait(); // attend_split's partials
    const int pair = item / g, r = item % g;
    const int i = pair / Dm.hkv, h = pair % Dm.hkv;
    const resa_dev_entry &e = a.entries[a.decode_ids[i]];
    T *const orow = (T *)a.out + ((size_t)e.row * Dm.hq + (size_t)h * g + r) * D;
    const int n = chosen_is_budget(a, e) ? e.n_select : a.sel_counts[pair];
    if (n <= 0) { // no block chosen here (uniform over the CTA): out 0, lse -inf
        if (warp == 0) {
            float zero[PER];
#pragma unroll
            for (int x = 0; x < PER; x++)
                zero[x] = 0.0f;
            store_row<T, PER>(orow + lane * PER, zero);
            if (a.lse && lane == 0)
                a.lse[(size_t)e.row * Dm.hq + (size_t)h * g + r] = -INFINITY;
        }
        return;
    }
    const int per = (n + splits - 1) / splits;
    const int used = (n + per - 1) / per;
    const int stride = 2 * kRows + g * D;
    const float *p = parts + (size_t)pair * splits * stride;
    float M = -INFINITY, L = 0.0f; // this lane's splits: L relative to M
#pragma unroll 4
    for (int s = lane; s < used; s += 32) {
        const float m_s = p[(size_t)s * stride + 2 * r], l_s = p[(size_t)s * stride + 2 * r + 1];
        const float m_new = fmaxf(M, m_s);
        L = L * exp2f(M - m_new) + l_s * exp2f(m_s - m_new); // M = -inf: 0 * 0
        M = m_new;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float m_o = __shfl_xor_sync(0xffffffffu, M, o), l_o = __shfl_xor_sync(0xffffffffu, L, o);
        const float m_new = fmaxf(M, m_o); // finite: split 0 always has keys
        L = (M == -INFINITY ? 0.0f : L * exp2f(M - m_new)) +
            (m_o == -INFINITY ? 0.0f : l_o * exp2f(m_o - m_new));
        M = m_new;
    }
    float acc[PER];
#pragma unroll
    for (int x = 0; x < PER; x++)
        acc[x] = 0.0f;
    const float *pa = p + 2 * kRows + r * D + lane * PER;
#pragma unroll 4
    for (int s = warp; s < used; s += kWarps) {
        float v[PER];
        load_floats<PER>(pa + (size_t)s * stride, v);
        const float f = exp2f(p[(size_t)s * stride + 2 * r] - M);
#pragma unroll
        for (int x = 0; x < PER; x++)
            acc[x] += v[x] * f;
    }
    if (warp > 0)
#pragma unroll
        for (int x = 0; x < PER; x++)
            sums[warp - 1][lane * PER + x] = acc[x];
    __syncthreads();
    if (warp > 0)
        return;
    const float inv = 1.0f / L;
#pragma unroll
    for (int x = 0; x < PER; x++) {
        for (int v = 0; v < kWarps - 1; v++)
            acc[x] += sums[v][lane * PER + x];
        acc[x] *= inv;
    }
    // resa_ctx_step_attend_ex: the row's natural log-sum-exp of scale q.k; M
    // and L are in log2 units (the scores were scaled by log2 e)
    if (a.lse && lane == 0)
        a.lse[(size_t)e.row * Dm.hq + (size_t)h * g + r] = lse_from_log2(M, L);
    store_row<T, PER>(orow + lane * PER, acc);
}

// ---- launch configuration (from the shape alone) ----

int smem_bytes(int d, bool f8)
{
    if (f8)
        return d == 64 ? Cfg<64, true>::kSmem : d == 128 ? Cfg<128, true>::kSmem
                                                        : Cfg<256, true>::kSmem;
    return d == 64 ? Cfg<64>::kSmem : d == 128 ? Cfg<128>::kSmem : Cfg<256>::kSmem;
}

// CTAs of attend_split<T, D, F8> an SM holds (registers and shared memory;
// at most 4), asked of the runtime once per instantiation (the same on every
// device of one architecture, which is all a module is built for); 0 if the
// runtime cannot say.
template <typename T, int D, bool F8>
int occupancy()
{
    static int cache; // 0 unknown (benign race: the same value)
    if (cache == 0) {
        int n = 0;
        if (cudaFuncSetAttribute(attend_split<T, D, F8>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                 Cfg<D, F8>::kSmem) != cudaSuccess ||
            cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, attend_split<T, D, F8>, kThreads,
                                                          Cfg<D, F8>::kSmem) != cudaSuccess ||
            n < 1)
            return 0;
        cache = min(n, 4);
    }
    return cache;
}
template <typename T>
int occupancy_d(int d, bool f8)
{
    if (f8)
        return d == 64 ? occupancy<T, 64, true>() : d == 128 ? occupancy<T, 128, true>()
                                                             : occupancy<T, 256, true>();
    return d == 64 ? occupancy<T, 64, false>() : d == 128 ? occupancy<T, 128, false>()
                                                          : occupancy<T, 256, false>();
}

// RESA_CUDA_SPLITS_MAX=n (n >= 1): at most n splits per (entry, head), read
// once (the workspace and every launch see the same count).  For measuring
// the small-batch trade-off between many short splits (one wave) and fewer
// long ones, whose partials the combine reads, without a rebuild
// (device-run.sh timeline); unset, malformed or < 1: no limit.
int splits_max()
{
    static int cache; // 0 unknown, -1 no limit (benign race: the same value)
    if (cache == 0) {
        const char *e = getenv("RESA_CUDA_SPLITS_MAX");
        char *end = nullptr;
        const long n = e ? strtol(e, &end, 10) : 0;
        cache = e && end != e && *end == '\0' && n >= 1 && n <= (1 << 20) ? (int)n : -1;
    }
    return cache;
}

// Splits per (entry, head): one wave of CTAs at the SM's occupancy (the
// fp8 cache's kernel at d 128 is held to 3 a SM by registers where its
// shared memory would allow 4); shared memory alone if the runtime cannot say.
int n_splits(const resa_cuda_dims *D, int n_decode)
{
    int per_sm = D->io_dtype == RESA_DTYPE_F16 ? occupancy_d<__half>(D->d, D->kv_fp8)
                                               : occupancy_d<__nv_bfloat16>(D->d, D->kv_fp8);
    if (per_sm <= 0)
        per_sm = (int)max((size_t)1, min((size_t)4, kSmemPerSm / (smem_bytes(D->d, D->kv_fp8) + 1024)));
    const int target = max(D->num_sms, 1) * per_sm;
    const int pairs = max(1, n_decode * D->hkv);
    const int n = max(1, min(target / pairs, max(D->max_seq_blocks, 1)));
    return splits_max() > 0 ? min(n, splits_max()) : n;
}

size_t part_floats(const resa_cuda_dims *D)
{
    return 2 * kRows + (size_t)D->group * D->d;
}

template <typename T, int D, bool F8>
cudaError_t launch(const resa_cuda_layer_args *a)
{
    const int splits = n_splits(&a->dims, a->n_decode);
    const int pairs = a->n_decode * a->dims.hkv;
    float *parts = (float *)a->ws_sparse;
    constexpr int smem = Cfg<D, F8>::kSmem;
    cudaError_t err = cudaFuncSetAttribute(attend_split<T, D, F8>,
                                           cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess)
        return err;
    // Both programmatic dependents of the kernel before them (common.cuh).
    err = launch_pdl(attend_split<T, D, F8>, dim3(splits, pairs), dim3(kThreads), smem,
                     a->stream, *a, parts);
    if (err != cudaSuccess)
        return err;
    const int items = pairs * a->dims.group;
    err = launch_pdl(combine<T, D>, dim3(items), dim3(kThreads), 0, a->stream, *a, splits,
                     (const float *)parts);
    if (err != cudaSuccess)
        return err;
    return cudaGetLastError();
}

template <typename T, bool F8>
cudaError_t launch_d(const resa_cuda_layer_args *a)
{
    switch (a->dims.d) {
    case 64:
        return launch<T, 64, F8>(a);
    case 128:
        return launch<T, 128, F8>(a);
    case 256:
        return launch<T, 256, F8>(a);
    default:
        return cudaErrorInvalidValue;
    }
}

} // namespace

size_t resa_cuda_sparse_workspace(const resa_cuda_dims *dims)
{
    // The most partials any n_decode can ask for.
    size_t most = 0;
    for (int nd = 1; nd <= dims->max_seqs; nd++)
        most = max(most, (size_t)nd * dims->hkv * n_splits(dims, nd));
    return most * part_floats(dims) * sizeof(float);
}

cudaError_t resa_cuda_attention_sparse(const resa_cuda_layer_args *a)
{
    if (a->n_decode <= 0)
        return cudaGetLastError();
    if (a->dims.group < 1 || a->dims.group > kRows || a->dims.b < 8)
        return cudaErrorInvalidValue;
    return RESA_DISPATCH_DTYPE(a->dims.io_dtype, T, [&] {
        return dispatch_f8(a->dims, [&](auto f8) { return launch_d<T, decltype(f8)::value>(a); });
    });
}
