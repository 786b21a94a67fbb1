// SPDX-License-Identifier: MIT
// Dense causal attention of every APPEND and RECTIFY entry (prompt chunks and
// rectification), and the unmasked one of QUERY_DENSE entries (context
// parallelism: every row sees [0, end), attention_dense.cuh's row_pos), on
// tensor cores.  CPU twin: lib/cpu/attention_dense.c.
//
// Tiling (same as the CPU): a tile is BM = 128 "rows" of one entry and one KV
// head, row r = token * g + j for the g query heads j of the group, so every
// K/V tile that reaches shared memory serves all g heads of up to 128/g tokens
// (GQA packing).  A rectification of f = 32 tokens with g = 4 is exactly one
// tile per KV head and reads the sequence's K/V once.
//
// Work items: (tile slot, KV head, split).  Tile slots enumerate the tiles of
// all dense entries (found on the device from the entry list, so the grid
// depends only on n_rows / n_dense / dims, never on sequence lengths).  The key
// range [0, last position of the tile] is cut into `sa` splits (sa <= the
// launch's split count S, fewer for short contexts, decided on the device);
// a tile with sa == 1 writes its output directly, otherwise each split writes
// an unnormalized fp32 partial (acc, m, l) to the workspace and a second
// kernel merges them by log-sum-exp.
//
// Per CTA (this file, any sm_80+ GPU; attention_dense_sm90.cu has the wgmma
// kernel that Hopper uses for d = 128 and 256): 8 warps, each owns 16 rows (one m16 MMA tile) of the 128; K/V tiles
// of BN keys stream through a STAGES-deep cp.async ring in shared memory,
// XOR-swizzled by 16-byte chunk so ldmatrix is conflict-free.  S = Q K^T and
// O += P V use mma.sync m16n8k16 (f16 or bf16 inputs, fp32 accumulate);
// softmax is online in the log2 domain; P is repacked from the S accumulator
// registers into A fragments without touching shared memory.
//
// The fp8 cache (F8, lib/kv_fp8.h) runs here at d = 64, for QUERY_DENSE
// steps, before Hopper, and with RESA_CUDA_NO_WGMMA=1 (on Hopper the wgmma
// kernel takes it otherwise, with f16 MMAs on the e4m3 values and the scales
// applied in fp32: produce_fp8 in attention_dense_sm90.cu, one rounding fewer
// than here): the ring holds each tile's raw e4m3 bytes and
// its tokens' scales (cp.async, zero-filled past kend), and once a tile has
// landed the CTA converts it into one T tile pair, swizzled as above, each
// value T(e4m3 * scale) as the CPU reads it back (common.cuh, fp8x8_read); a
// barrier later the MMA code reads it exactly as a T tile.
#include <stdlib.h>

#include "attention_dense.cuh"

namespace {

constexpr int NWARPS = BM / 16;   // one m16 tile per warp
constexpr int NTHREADS = NWARPS * 32;

template <int D> struct tile_cfg;
// Q fragments stay in registers for d <= 128 (D/16 * 4 registers); for d = 256
// they are re-read from shared memory each k-step, which keeps the 128-register
// accumulator plus S under the 255 limit without spills.  MINB = CTAs per SM
// the register budget is cut for (__launch_bounds__); the split heuristic
// fills MINB * num_sms CTAs.
template <> struct tile_cfg<64> { static constexpr int BN = 64, STAGES = 4, MINB = 1; static constexpr bool Q_REGS = true; };
// d = 128: measured on the H200 against (BN 32, Q in shared memory, 2 CTAs/SM,
// 3 or 4 stages) and (BN 64, Q in shared memory, 2 CTAs/SM, 2 stages): this
// one was fastest on both rectification (by 5-15%) and prefill (by 0-10%).
template <> struct tile_cfg<128> { static constexpr int BN = 64, STAGES = 3, MINB = 1; static constexpr bool Q_REGS = true; };
template <> struct tile_cfg<256> { static constexpr int BN = 32, STAGES = 3, MINB = 1; static constexpr bool Q_REGS = false; };

// F8: per stage K and V bytes [BN][D] each, then K and V scales [BN] floats.
template <int D> constexpr size_t raw_stage_bytes()
{
    return (size_t)2 * tile_cfg<D>::BN * D + (size_t)2 * tile_cfg<D>::BN * 4;
}
// Q, then the ring: T tiles; F8: one T tile pair (the converted tile) and
// the raw stages.
template <int D, bool F8> constexpr size_t smem_bytes()
{
    return F8 ? (size_t)(BM * D + 2 * tile_cfg<D>::BN * D) * 2 +
                    tile_cfg<D>::STAGES * raw_stage_bytes<D>()
              : (size_t)(BM * D + 2 * tile_cfg<D>::STAGES * tile_cfg<D>::BN * D) * 2;
}

// ---- small PTX wrappers ----
template <int N> __device__ __forceinline__ void cp_async_wait()
{
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// 4-byte async copy (the fp8 cache's scales); src_bytes 0 zero-fills.
__device__ __forceinline__ void cp_async4(uint32_t dst, const void *src, int src_bytes)
{
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src),
                 "r"(src_bytes));
}
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], uint32_t addr)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}
// c (one m16n8 fp32 tile, 4 registers) += a (m16k16) * b (k16n8)
template <typename T>
__device__ __forceinline__ void mma16816(float *c, const uint32_t (&a)[4], uint32_t b0, uint32_t b1)
{
    if constexpr (dtype_of<T>::value == RESA_DTYPE_BF16)
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                     "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    else
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                     "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Zeroes the non-finite values of one k16n8 B fragment (b0: keys 2q, 2q + 1;
// b1: keys 2q + 8, 2q + 9 of the step, q = lane & 3) and returns which of
// those 4 keys had one, as bits 0..3.
template <typename T> __device__ __forceinline__ uint32_t scrub_b(uint32_t &b0, uint32_t &b1)
{
    const uint32_t m0 = nonfinite_halves<T>(b0), m1 = nonfinite_halves<T>(b1);
    b0 &= ~m0;
    b1 &= ~m1;
    return (m0 & 1u) | ((m0 >> 15) & 2u) | ((m1 & 1u) << 2) | ((m1 >> 13) & 8u);
}
// Of the keys k, k + 1, k + 8, k + 9 (bits 0..3), those a row at position pos attends.
__device__ __forceinline__ uint32_t attended4(int k, int pos)
{
    return (uint32_t)(k <= pos) | (uint32_t)(k + 1 <= pos) << 1 | (uint32_t)(k + 8 <= pos) << 2 |
           (uint32_t)(k + 9 <= pos) << 3;
}

// O += P V for the 16 keys [key0, key0 + 16) of a tile on the causal diagonal,
// for one warp's 16 rows (mma.sync m16n8k16; o as in store_rows, D/8 n-tiles).
// Steps every row of the warp masks are skipped (they add nothing, and that
// also saves their products); in steps the mask cuts through, non-finite V
// values are zeroed in the B fragments and the rows that attend one of those
// keys are poisoned (attention_dense.cuh).
// a: P of these keys as the A fragment (pack_p); vaddr(j): the shared address
// of this lane's ldmatrix.trans row for dimensions [16 j, 16 j + 16) of these
// keys.  pos0 / pos1: this thread's rows' positions; wpos_min / wpos_max: the
// warp's first and last; l0 / l1: the rows' softmax sums, NaN when poisoned.
template <typename T, int D, typename VAddr>
__device__ __forceinline__ void pv_step_causal(float *o, const uint32_t *pa, int key0, int lane,
                                               int pos0, int pos1, int wpos_min, int wpos_max,
                                               float &l0, float &l1, VAddr vaddr)
{
    const uint32_t a[4] = {pa[0], pa[1], pa[2], pa[3]};
    if (key0 > wpos_max)
        return; // every row of the warp masks these keys (warp-uniform)
    if (key0 + 15 <= wpos_min) { // every row attends them
#pragma unroll
        for (int j = 0; j < D / 16; j++) {
            uint32_t bv[4];
            ldsm_x4_t(bv, vaddr(j));
            mma16816<T>(o + 8 * j, a, bv[0], bv[1]);
            mma16816<T>(o + 8 * j + 4, a, bv[2], bv[3]);
        }
        return;
    }
    uint32_t bad = 0;
#pragma unroll
    for (int j = 0; j < D / 16; j++) {
        uint32_t bv[4];
        ldsm_x4_t(bv, vaddr(j));
        bad |= scrub_b<T>(bv[0], bv[1]) | scrub_b<T>(bv[2], bv[3]);
        mma16816<T>(o + 8 * j, a, bv[0], bv[1]);
        mma16816<T>(o + 8 * j + 4, a, bv[2], bv[3]);
    }
    // the lanes holding the same keys (lane & 3) for other dimensions
    bad |= __shfl_xor_sync(0xffffffffu, bad, 4);
    bad |= __shfl_xor_sync(0xffffffffu, bad, 8);
    bad |= __shfl_xor_sync(0xffffffffu, bad, 16);
    // each lane of a row's quad checks its 4 keys; l is summed over the quad
    const int k = key0 + 2 * (lane & 3);
    if (bad & attended4(k, pos0))
        l0 = __int_as_float(0x7fffffff);
    if (bad & attended4(k, pos1))
        l1 = __int_as_float(0x7fffffff);
}

// Element offset of (row, 16-byte chunk) in a swizzled [rows][D] tile: the
// chunk index is XORed with row & 7, so the 8 rows one ldmatrix reads at the
// same logical chunk land in 8 different bank groups.
template <int D> __device__ __forceinline__ int swz(int row, int chunk)
{
    return row * D + ((chunk ^ (row & 7)) << 3);
}

template <typename T, int D, bool F8>
__global__ void __launch_bounds__(NTHREADS, tile_cfg<D>::MINB) dense_attention_kernel(const dense_params p)
{
    constexpr int BN = tile_cfg<D>::BN, STAGES = tile_cfg<D>::STAGES;
    constexpr bool Q_REGS = tile_cfg<D>::Q_REGS;
    constexpr int CH = D / 8; // 16-byte chunks per row
    constexpr int TSTAGES = F8 ? 1 : STAGES; // T tiles: the ring, or F8's converted pair
    extern __shared__ __align__(128) unsigned char smem_raw[];
    T *sQ = reinterpret_cast<T *>(smem_raw);
    T *sK = sQ + BM * D;              // [TSTAGES][BN][D]
    T *sV = sK + TSTAGES * BN * D;    // [TSTAGES][BN][D]
    unsigned char *sRaw = reinterpret_cast<unsigned char *>(sV + TSTAGES * BN * D); // F8 ring
    (void)sRaw; // only F8 reads it
    __shared__ tile_ref tref;

    const int slot = blockIdx.x, kvh = blockIdx.y, split = blockIdx.z;
    work_item w;
    if (!begin_work<BN>(p, &tref, &w)) { // uniform over the CTA
        if (w.empty)
            store_empty_rows<T, D>(p, w, kvh);
        return;
    }
    const resa_dev_entry &e = w.e;
    const split_plan &sp = w.sp;
    const int kt_begin = w.kt_begin, kt_end = w.kt_end;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = p.g;
    const int r0 = w.r0, valid = w.valid;
    const int64_t kend = sp.kend;
    const int32_t *ptab = p.page_tables + (size_t)e.slot * p.max_seq_blocks;

    // ---- Q tile: row r -> token (r0 + r) / g, head kvh * g + (r0 + r) % g ----
    {
        const T *q = static_cast<const T *>(p.q);
        for (int i = tid; i < BM * CH; i += NTHREADS) {
            const int r = i / CH, c = i % CH;
            const int rr = r0 + r;
            const bool ok = r < valid;
            const int t = ok ? rr / g : 0, j = ok ? rr % g : 0;
            const T *src = q + ((size_t)(e.row + t) * p.hq + (size_t)kvh * g + j) * D + c * 8;
            cp_async16(smem_u32(sQ + swz<D>(r, c)), ok ? (const void *)src : p.q, ok ? 16 : 0);
        }
    }
    // ---- K/V tile loader: keys past kend are zero-filled (their pages may not
    // exist); each key's page comes from the page table ----
    auto load_kv = [&](int kt, int stage) {
        if constexpr (F8) { // bytes and scales into raw stage `stage`
            constexpr int CH8 = D / 16; // 16-byte chunks of a row of bytes
            unsigned char *raw = sRaw + stage * raw_stage_bytes<D>();
            const unsigned char *k8 = static_cast<const unsigned char *>(p.k);
            const unsigned char *v8 = static_cast<const unsigned char *>(p.v);
            const int64_t base = (int64_t)kt * BN;
#pragma unroll
            for (int i = 0; i < BN * CH8 / NTHREADS; i++) {
                const int idx = tid + i * NTHREADS;
                const int key = idx / CH8, c = idx % CH8;
                const int64_t pos = base + key;
                const bool ok = pos < kend;
                size_t off = 0;
                if (ok) {
                    const int32_t page = __ldg(ptab + (pos >> p.log2_b));
                    off = pool_row(p, page, kvh, pos) * D + c * 16;
                }
                cp_async16(smem_u32(raw + key * D + c * 16), k8 + off, ok ? 16 : 0);
                cp_async16(smem_u32(raw + BN * D + key * D + c * 16), v8 + off, ok ? 16 : 0);
            }
            if (tid < 2 * BN) { // thread t: the K (t < BN) or V scale of key t % BN
                const int key = tid % BN, is_v = tid / BN;
                const int64_t pos = base + key;
                const bool ok = pos < kend;
                size_t off = 0;
                if (ok) {
                    const int32_t page = __ldg(ptab + (pos >> p.log2_b));
                    off = pool_row(p, page, kvh, pos);
                }
                cp_async4(smem_u32(raw + 2 * BN * D + tid * 4), (is_v ? p.vscale : p.kscale) + off,
                          ok ? 4 : 0);
            }
            return;
        }
        T *dk = sK + stage * BN * D, *dv = sV + stage * BN * D;
        const int64_t base = (int64_t)kt * BN;
#pragma unroll
        for (int i = 0; i < BN * CH / NTHREADS; i++) {
            const int idx = tid + i * NTHREADS;
            const int key = idx / CH, c = idx % CH;
            const int64_t pos = base + key;
            const uint32_t ok = pos < kend;
            const T *ks = static_cast<const T *>(p.k), *vs = static_cast<const T *>(p.v);
            if (ok) {
                const int32_t page = __ldg(ptab + (pos >> p.log2_b));
                const size_t off = pool_row(p, page, kvh, pos) * D + c * 8;
                ks += off;
                vs += off;
            }
            cp_async16(smem_u32(dk + swz<D>(key, c)), ks, ok ? 16 : 0);
            cp_async16(smem_u32(dv + swz<D>(key, c)), vs, ok ? 16 : 0);
        }
    };

    // prologue: Q joins the first group
#pragma unroll
    for (int s = 0; s < STAGES - 1; s++) {
        if (kt_begin + s < kt_end)
            load_kv(kt_begin + s, s);
        cp_async_commit();
    }

    // ---- this thread's two rows (lane/4 and lane/4 + 8 of the warp's 16) ----
    // Padding rows (past `valid`) take the last valid row's position so that
    // they never see an empty key set; they are not stored.
    const int wr0 = warp * 16;
    const bool warp_active = wr0 < valid;
    const int lr0 = wr0 + (lane >> 2), lr1 = lr0 + 8;
    // Positions as int: a sequence holds at most max_seq_blocks * b < 2^31 tokens.
    // QUERY_DENSE: every row at end - 1 (row_pos), so nothing below end is masked.
    const int pos0 = row_pos(e, r0 + min(lr0, valid - 1), g);
    const int pos1 = row_pos(e, r0 + min(lr1, valid - 1), g);
    const int wpos_min = row_pos(e, r0 + min(wr0, valid - 1), g);
    const int wpos_max = row_pos(e, r0 + min(wr0 + 15, valid - 1), g);

    float o[D / 2]; // D/8 n-tiles of 4 (layout of causal_mask in attention_dense.cuh)
#pragma unroll
    for (int i = 0; i < D / 2; i++)
        o[i] = 0.f;
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;
    uint32_t qa[Q_REGS ? D / 16 : 1][4];

    // ldmatrix lane addressing (see the fragment layouts of m16n8k16):
    //  A (Q, 16x16): lane l -> row l & 15, chunk +(l >> 4)
    //  B from K (non-trans, two n8 tiles x k16): key (l & 7) + ((l >> 4) << 3), chunk +((l >> 3) & 1)
    //  B from V (trans, k16 x two n8 tiles): key (l & 7) + (((l >> 3) & 1) << 3), chunk +(l >> 4)
    const int qrow = wr0 + (lane & 15), qch = lane >> 4;
    const int krow = (lane & 7) + ((lane >> 4) << 3), kch = (lane >> 3) & 1;
    const int vrow = (lane & 7) + (((lane >> 3) & 1) << 3), vch = lane >> 4;

    if constexpr (Q_REGS) {
        cp_async_wait<STAGES - 2>();
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++)
            ldsm_x4(qa[kk], smem_u32(sQ + swz<D>(qrow, 2 * kk + qch)));
    }

    const float sl2 = p.scale_log2;
    for (int kt = kt_begin, it = 0; kt < kt_end; kt++, it++) {
        cp_async_wait<STAGES - 2>();
        __syncthreads(); // tile kt landed for all; buffer of tile kt-1 free for reuse
        {
            const int nk = kt + STAGES - 1;
            if (nk < kt_end)
                load_kv(nk, (it + STAGES - 1) % STAGES);
            cp_async_commit(); // possibly empty: keeps the group count uniform
        }
        if constexpr (F8) {
            // tile kt's bytes (landed for all: the barrier above) into the T
            // pair, which every warp finished reading before that barrier;
            // every thread converts, active warp or not
            const unsigned char *raw = sRaw + (it % STAGES) * raw_stage_bytes<D>();
            const float *scales = reinterpret_cast<const float *>(raw + 2 * BN * D);
#pragma unroll
            for (int i = 0; i < 2 * BN * CH / NTHREADS; i++) {
                const int idx = tid + i * NTHREADS;
                const int is_v = idx / (BN * CH), key = (idx / CH) % BN, c = idx % CH;
                const uint2 b = *reinterpret_cast<const uint2 *>(raw + is_v * BN * D + key * D +
                                                                 c * 8);
                *reinterpret_cast<uint4 *>((is_v ? sV : sK) + swz<D>(key, c)) =
                    fp8x8_read<T>(b, scales[is_v * BN + key]);
            }
            __syncthreads(); // the converted tile, for every warp
        }
        const int kbase = kt * BN;
        if (!warp_active || kbase > wpos_max)
            continue; // every key of this tile is in the future of all 16 rows
        const T *tK = sK + (F8 ? 0 : (it % STAGES) * BN * D);
        const T *tV = sV + (F8 ? 0 : (it % STAGES) * BN * D);

        // S = Q K^T (raw dot products, fp32)
        float s[BN / 2];
#pragma unroll
        for (int i = 0; i < BN / 2; i++)
            s[i] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++) {
            uint32_t a[4];
            if constexpr (Q_REGS) {
#pragma unroll
                for (int x = 0; x < 4; x++)
                    a[x] = qa[kk][x];
            } else {
                ldsm_x4(a, smem_u32(sQ + swz<D>(qrow, 2 * kk + qch)));
            }
#pragma unroll
            for (int j = 0; j < BN / 16; j++) {
                uint32_t bk[4];
                ldsm_x4(bk, smem_u32(tK + swz<D>(16 * j + krow, 2 * kk + kch)));
                mma16816<T>(s + 8 * j, a, bk[0], bk[1]);
                mma16816<T>(s + 8 * j + 4, a, bk[2], bk[3]);
            }
        }

        // causal mask, only on tiles that reach past the earliest row's position
        const bool diagonal = kbase + BN - 1 > wpos_min; // warp-uniform
        if (diagonal)
            causal_mask<BN / 8>(s, kbase, lane, pos0, pos1);
        // online softmax (log2 domain); a row's BN keys live on 4 lanes
        float c0, c1;
        softmax_step<BN / 8>(s, sl2, m0, m1, l0, l1, c0, c1);
        scale_rows<D / 8>(o, c0, c1);

        // O += P V: the S accumulators of n-tiles 2kk, 2kk+1 are exactly the A
        // fragment of k-step kk
        if (!diagonal) {
#pragma unroll
            for (int kk = 0; kk < BN / 16; kk++) {
                uint32_t a[4];
                pack_p<T>(s, kk, a);
#pragma unroll
                for (int j = 0; j < D / 16; j++) {
                    uint32_t bv[4];
                    ldsm_x4_t(bv, smem_u32(tV + swz<D>(16 * kk + vrow, 2 * j + vch)));
                    mma16816<T>(o + 8 * j, a, bv[0], bv[1]);
                    mma16816<T>(o + 8 * j + 4, a, bv[2], bv[3]);
                }
            }
        } else { // masked keys must not add 0 * NaN (pv_step_causal)
#pragma unroll
            for (int kk = 0; kk < BN / 16; kk++) {
                uint32_t a[4];
                pack_p<T>(s, kk, a);
                pv_step_causal<T, D>(o, a, kbase + 16 * kk, lane, pos0, pos1, wpos_min, wpos_max,
                                     l0, l1, [&](int j) {
                                         return smem_u32(tV + swz<D>(16 * kk + vrow, 2 * j + vch));
                                     });
            }
        }
    }
    cp_async_wait<0>(); // no copy may still target shared memory at exit

    if (warp_active)
        store_rows<T, D>(p, e, slot, kvh, split, sp.sa, r0, valid, lr0, lane, o, m0, m1, l0, l1);
}

// Whether the wgmma kernel (attention_dense_sm90.cu) serves a d = 128 or 256 launch:
// the module holds its sm_90a code, the device is compute capability 9.0
// exactly (sm_90a code runs nowhere else), and the environment allows it:
// RESA_CUDA_NO_WGMMA=1 forces the mma.sync kernel, RESA_CUDA_WGMMA=1 asks for
// the wgmma one where WGMMA_BY_DEFAULT is false (both read at every launch, so
// that a test can switch paths).
constexpr bool WGMMA_BY_DEFAULT = true;
inline bool wgmma_enabled()
{
    static int cache[64]; // 0 unknown, 1 no, 2 yes (benign race: same value)
    int dev = 0;
    if (!resa_cuda_dense_sm90_built() || cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64)
        return false;
    if (cache[dev] == 0) {
        int major = 0, minor = 0;
        const bool ok =
            cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess &&
            cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) == cudaSuccess &&
            major == 9 && minor == 0;
        cache[dev] = ok ? 2 : 1;
    }
    return cache[dev] == 2 && !env_switch("RESA_CUDA_NO_WGMMA") &&
           (WGMMA_BY_DEFAULT || env_switch("RESA_CUDA_WGMMA"));
}

// A step with a QUERY_DENSE entry takes this kernel (the wgmma kernel knows
// only the causal positions); the fp8 cache goes to the wgmma one like a T
// cache (resa_cuda_dense_sm90 reads kv_fp8).
template <typename T, int D, bool F8>
cudaError_t launch(const resa_cuda_layer_args *a)
{
    if ((D == 128 || D == 256) && a->n_query_dense == 0 && wgmma_enabled())
        return resa_cuda_dense_sm90(a);
    int64_t slots;
    const dense_params p = make_params(a, tile_cfg<D>::MINB, &slots);
    if (slots <= 0)
        return cudaGetLastError();
    constexpr size_t smem = smem_bytes<D, F8>();
    // every call (cheap, host-side, legal during graph capture, and per device)
    cudaError_t err = cudaFuncSetAttribute(dense_attention_kernel<T, D, F8>,
                                           cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (err != cudaSuccess)
        return err;
    dim3 grid((unsigned)slots, (unsigned)p.hkv, (unsigned)p.splits);
    dense_attention_kernel<T, D, F8><<<grid, NTHREADS, smem, a->stream>>>(p);
    return launch_combine<T, D, tile_cfg<D>::BN>(p, slots, a);
}

template <typename T, bool F8> cudaError_t launch_d(const resa_cuda_layer_args *a)
{
    switch (a->dims.d) {
    case 64: return launch<T, 64, F8>(a);
    case 128: return launch<T, 128, F8>(a);
    case 256: return launch<T, 256, F8>(a);
    default: return cudaErrorInvalidValue;
    }
}

} // namespace

size_t resa_cuda_dense_workspace(const resa_cuda_dims *dims)
{
    return (size_t)partial_units(dims) * BM * ((size_t)dims->d + 2) * sizeof(float);
}

cudaError_t resa_cuda_attention_dense(const resa_cuda_layer_args *a)
{
    if (a->n_dense <= 0 || a->n_rows <= 0)
        return cudaGetLastError();
    if (a->dims.io_dtype != RESA_DTYPE_F16 && a->dims.io_dtype != RESA_DTYPE_BF16)
        return cudaErrorInvalidValue;
    return RESA_DISPATCH_DTYPE(a->dims.io_dtype, T, [&] {
        return dispatch_f8(a->dims, [&](auto f8) { return launch_d<T, decltype(f8)::value>(a); });
    });
}
