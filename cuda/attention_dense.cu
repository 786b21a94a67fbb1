// SPDX-License-Identifier: MIT
// Dense causal attention of every APPEND and RECTIFY entry (prompt chunks and
// rectification) on tensor cores.  CPU twin: lib/cpu/attention_dense.c.
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
// Per CTA: 8 warps, each owns 16 rows (one m16 MMA tile) of the 128; K/V tiles
// of BN keys stream through a STAGES-deep cp.async ring in shared memory,
// XOR-swizzled by 16-byte chunk so ldmatrix is conflict-free.  S = Q K^T and
// O += P V use mma.sync m16n8k16 (f16 or bf16 inputs, fp32 accumulate);
// softmax is online in the log2 domain; P is repacked from the S accumulator
// registers into A fragments without touching shared memory.
#include <float.h>

#include "common.cuh"

namespace {

using namespace resa;

constexpr int BM = 128;           // rows per tile
constexpr int NWARPS = BM / 16;   // one m16 tile per warp
constexpr int NTHREADS = NWARPS * 32;
constexpr int MAX_SPLITS = 64;
constexpr int MIN_SPLIT_KEYS = 512; // a split reads at least this many keys (else fewer splits)

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

template <int D> constexpr size_t smem_bytes()
{
    return (size_t)(BM * D + 2 * tile_cfg<D>::STAGES * tile_cfg<D>::BN * D) * 2;
}

// Units of partial storage the workspace holds (each BM rows x (D + 2) floats).
inline int64_t partial_units(const resa_cuda_dims *dims)
{
    return 4 * (int64_t)(dims->num_sms > 0 ? dims->num_sms : 132);
}

struct dense_params {
    const void *q;
    void *out;
    const void *k, *v;
    const int32_t *page_tables;
    const resa_dev_entry *entries;
    const int32_t *dense_ids;
    float *ws;          // partial acc [units][BM][D], then (m, l) [units][BM][2]
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
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait()
{
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
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
template <typename T> struct mma_op;
template <> struct mma_op<__nv_bfloat16> {
    static __device__ __forceinline__ void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                               uint32_t b1)
    {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                     "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
    static __device__ __forceinline__ uint32_t pack(float lo, float hi)
    {
        __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
        return *reinterpret_cast<uint32_t *>(&h);
    }
};
template <> struct mma_op<__half> {
    static __device__ __forceinline__ void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                               uint32_t b1)
    {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                     "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
    static __device__ __forceinline__ uint32_t pack(float lo, float hi)
    {
        __half2 h = __floats2half2_rn(lo, hi);
        return *reinterpret_cast<uint32_t *>(&h);
    }
};
__device__ __forceinline__ float fast_exp2(float x)
{
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

// Element offset of (row, 16-byte chunk) in a swizzled [rows][D] tile: the
// chunk index is XORed with row & 7, so the 8 rows one ldmatrix reads at the
// same logical chunk land in 8 different bank groups.
template <int D> __device__ __forceinline__ int swz(int row, int chunk)
{
    return row * D + ((chunk ^ (row & 7)) << 3);
}

// ---- the tile a CTA works on ----
struct tile_ref {
    int entry;     // index into entries, -1 = no tile for this slot
    int tile;      // tile index within (entry, head), heaviest (last) first
};

__device__ __forceinline__ int tiles_of(int32_t n, int32_t g) { return (n * g + BM - 1) / BM; }

// Maps a linear tile slot to (entry, tile) with warp 0: prefix sums of the
// entries' tile counts, 32 entries per round.  Result in shared memory.
__device__ void find_tile(const dense_params &p, int slot, tile_ref *out)
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

// Key-range split of one tile, the same in both kernels.
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
    s.kend = e.start + r_last / p.g + 1;
    s.nt = (int)((s.kend + BN - 1) / BN);
    const int by_len = (int)max((int64_t)1, s.kend / MIN_SPLIT_KEYS);
    s.sa = min(p.splits, by_len);
    s.chunk = (s.nt + s.sa - 1) / s.sa;
    return s;
}

template <typename T, int D>
__global__ void __launch_bounds__(NTHREADS, tile_cfg<D>::MINB) dense_attention_kernel(const dense_params p)
{
    constexpr int BN = tile_cfg<D>::BN, STAGES = tile_cfg<D>::STAGES;
    constexpr bool Q_REGS = tile_cfg<D>::Q_REGS;
    constexpr int CH = D / 8; // 16-byte chunks per row
    extern __shared__ __align__(128) unsigned char smem_raw[];
    T *sQ = reinterpret_cast<T *>(smem_raw);
    T *sK = sQ + BM * D;              // [STAGES][BN][D]
    T *sV = sK + STAGES * BN * D;     // [STAGES][BN][D]
    __shared__ tile_ref tref;

    const int slot = blockIdx.x, kvh = blockIdx.y, split = blockIdx.z;
    find_tile(p, slot, &tref);
    __syncthreads();
    const tile_ref tr = tref;
    if (tr.entry < 0)
        return;
    const resa_dev_entry e = p.entries[tr.entry];
    const split_plan sp = plan_splits<BN>(p, e, tr.tile);
    const int kt_begin = split * sp.chunk;
    const int kt_end = min(sp.nt, kt_begin + sp.chunk);
    if (split >= sp.sa || kt_begin >= kt_end)
        return; // uniform over the CTA

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = p.g;
    const int rows = e.n * g;
    const int r0 = tr.tile * BM;
    const int valid = min(BM, rows - r0);
    const int64_t kend = sp.kend;
    const int32_t *ptab = p.page_tables + (size_t)e.slot * p.max_seq_blocks;
    const T *kpool = static_cast<const T *>(p.k);
    const T *vpool = static_cast<const T *>(p.v);

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
        T *dk = sK + stage * BN * D, *dv = sV + stage * BN * D;
        const int64_t base = (int64_t)kt * BN;
#pragma unroll
        for (int i = 0; i < BN * CH / NTHREADS; i++) {
            const int idx = tid + i * NTHREADS;
            const int key = idx / CH, c = idx % CH;
            const int64_t pos = base + key;
            const uint32_t ok = pos < kend;
            const T *ks = kpool, *vs = vpool;
            if (ok) {
                const int32_t page = __ldg(ptab + (pos >> p.log2_b));
                const size_t off =
                    (((size_t)page * p.hkv + kvh) * p.b + (size_t)(pos & (p.b - 1))) * D + c * 8;
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
    const int pos0 = (int)e.start + (r0 + min(lr0, valid - 1)) / g;
    const int pos1 = (int)e.start + (r0 + min(lr1, valid - 1)) / g;
    const int wpos_min = (int)e.start + (r0 + min(wr0, valid - 1)) / g;
    const int wpos_max = (int)e.start + (r0 + min(wr0 + 15, valid - 1)) / g;

    float o[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; i++)
        o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
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
        const int kbase = kt * BN;
        if (!warp_active || kbase > wpos_max)
            continue; // every key of this tile is in the future of all 16 rows
        const T *tK = sK + (it % STAGES) * BN * D;
        const T *tV = sV + (it % STAGES) * BN * D;

        // S = Q K^T (raw dot products, fp32)
        float s[BN / 8][4];
#pragma unroll
        for (int i = 0; i < BN / 8; i++)
            s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
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
                mma_op<T>::run(s[2 * j], a, bk[0], bk[1]);
                mma_op<T>::run(s[2 * j + 1], a, bk[2], bk[3]);
            }
        }

        // causal mask, only on tiles that reach past the earliest row's position
        if (kbase + BN - 1 > wpos_min) {
#pragma unroll
            for (int i = 0; i < BN / 8; i++) {
                const int key = kbase + 8 * i + 2 * (lane & 3);
                if (key > pos0) s[i][0] = -INFINITY;
                if (key + 1 > pos0) s[i][1] = -INFINITY;
                if (key > pos1) s[i][2] = -INFINITY;
                if (key + 1 > pos1) s[i][3] = -INFINITY;
            }
        }

        // online softmax (log2 domain); a row's 64 keys live on 4 lanes
        float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
        for (int i = 0; i < BN / 8; i++) {
            mx0 = fmaxf(mx0, fmaxf(s[i][0], s[i][1]));
            mx1 = fmaxf(mx1, fmaxf(s[i][2], s[i][3]));
        }
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
        const float mn0 = fmaxf(m0, mx0 * sl2), mn1 = fmaxf(m1, mx1 * sl2);
        // a row with no visible key yet keeps m = -inf: use 0 as the reference
        // so that exp2(-inf - ref) is 0, never NaN
        const float ref0 = mn0 == -INFINITY ? 0.f : mn0, ref1 = mn1 == -INFINITY ? 0.f : mn1;
        const float c0 = fast_exp2(m0 - ref0), c1 = fast_exp2(m1 - ref1);
        m0 = mn0;
        m1 = mn1;
        float rs0 = 0.f, rs1 = 0.f;
#pragma unroll
        for (int i = 0; i < BN / 8; i++) {
            s[i][0] = fast_exp2(fmaf(s[i][0], sl2, -ref0));
            s[i][1] = fast_exp2(fmaf(s[i][1], sl2, -ref0));
            s[i][2] = fast_exp2(fmaf(s[i][2], sl2, -ref1));
            s[i][3] = fast_exp2(fmaf(s[i][3], sl2, -ref1));
            rs0 += s[i][0] + s[i][1];
            rs1 += s[i][2] + s[i][3];
        }
        l0 = l0 * c0 + rs0; // per-lane partial sums, reduced over the 4 lanes at the end
        l1 = l1 * c1 + rs1;
#pragma unroll
        for (int i = 0; i < D / 8; i++) {
            o[i][0] *= c0;
            o[i][1] *= c0;
            o[i][2] *= c1;
            o[i][3] *= c1;
        }

        // O += P V: the S accumulators of n-tiles 2kk, 2kk+1 are exactly the A
        // fragment of k-step kk
#pragma unroll
        for (int kk = 0; kk < BN / 16; kk++) {
            uint32_t a[4];
            a[0] = mma_op<T>::pack(s[2 * kk][0], s[2 * kk][1]);
            a[1] = mma_op<T>::pack(s[2 * kk][2], s[2 * kk][3]);
            a[2] = mma_op<T>::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);
            a[3] = mma_op<T>::pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
            for (int j = 0; j < D / 16; j++) {
                uint32_t bv[4];
                ldsm_x4_t(bv, smem_u32(tV + swz<D>(16 * kk + vrow, 2 * j + vch)));
                mma_op<T>::run(o[2 * j], a, bv[0], bv[1]);
                mma_op<T>::run(o[2 * j + 1], a, bv[2], bv[3]);
            }
        }
    }
    cp_async_wait<0>(); // no copy may still target shared memory at exit

    if (!warp_active)
        return;
    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2);

    const int dcol = 2 * (lane & 3);
    if (sp.sa == 1) {
        T *out = static_cast<T *>(p.out);
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int lr = h ? lr1 : lr0;
            if (lr >= valid)
                continue;
            const int rr = r0 + lr;
            const float inv = 1.f / (h ? l1 : l0);
            T *dst = out + ((size_t)(e.row + rr / g) * p.hq + (size_t)kvh * g + rr % g) * D;
#pragma unroll
            for (int i = 0; i < D / 8; i++) {
                const uint32_t v = mma_op<T>::pack(o[i][2 * h] * inv, o[i][2 * h + 1] * inv);
                *reinterpret_cast<uint32_t *>(dst + 8 * i + dcol) = v;
            }
        }
    } else {
        const int64_t unit = ((int64_t)slot * p.hkv + kvh) * p.splits + split;
        float *acc = p.ws + unit * BM * D;
        float *ml = p.ws + p.ws_units * BM * D + unit * BM * 2;
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int lr = h ? lr1 : lr0;
            if (lr >= valid)
                continue;
#pragma unroll
            for (int i = 0; i < D / 8; i++)
                *reinterpret_cast<float2 *>(acc + (size_t)lr * D + 8 * i + dcol) =
                    make_float2(o[i][2 * h], o[i][2 * h + 1]);
            if ((lane & 3) == 0)
                *reinterpret_cast<float2 *>(ml + 2 * lr) =
                    make_float2(h ? m1 : m0, h ? l1 : l0);
        }
    }
}

// Log-sum-exp merge of the splits of every split tile: one warp per row,
// lanes over 4 consecutive dimensions; blockIdx.z picks NWARPS of the BM rows
// so that a batch-1 rectification (8 tiles) still spreads over 128 CTAs.
template <typename T, int D>
__global__ void __launch_bounds__(NTHREADS) dense_combine_kernel(const dense_params p)
{
    constexpr int BN = tile_cfg<D>::BN;
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
    {
        const int r = blockIdx.z * NWARPS + warp;
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
        T *dst = out + ((size_t)(e.row + rr / g) * p.hq + (size_t)kvh * g + rr % g) * D;
        for (int c = lane * 4; c < D; c += 128) {
            float4 a = make_float4(0.f, 0.f, 0.f, 0.f);
            for (int s = 0; s < n_used; s++) {
                const float w = exp2f(ml_base[((unit0 + s) * BM + r) * 2] - mmax);
                const float4 x =
                    *reinterpret_cast<const float4 *>(p.ws + ((unit0 + s) * BM + r) * D + c);
                a.x += w * x.x;
                a.y += w * x.y;
                a.z += w * x.z;
                a.w += w * x.w;
            }
            const uint32_t lo = mma_op<T>::pack(a.x * inv, a.y * inv);
            const uint32_t hi = mma_op<T>::pack(a.z * inv, a.w * inv);
            *reinterpret_cast<uint2 *>(dst + c) = make_uint2(lo, hi);
        }
    }
}

template <typename T, int D>
cudaError_t launch(const resa_cuda_layer_args *a)
{
    const resa_cuda_dims &dm = a->dims;
    const int g = dm.group;
    const int num_sms = dm.num_sms > 0 ? dm.num_sms : 132;
    // Tile slots: sum over entries of ceil(n g / BM) <= (n_rows g + n_dense (BM - 1)) / BM.
    const int64_t slots = (a->n_rows * g + (int64_t)a->n_dense * (BM - 1)) / BM;
    if (slots <= 0)
        return cudaGetLastError();
    // Splits: enough work items for one full wave (one CTA per SM) when the
    // step has few tiles (rectification); none when it has many (prefill).
    // Floor, so a wave is never overshot by a few CTAs.
    const int64_t tiles_est = (a->n_rows * g + BM - 1) / BM * dm.hkv;
    int64_t splits = tiles_est > 0 ? (int64_t)tile_cfg<D>::MINB * num_sms / tiles_est : 1;
    splits = splits < 1 ? 1 : splits > MAX_SPLITS ? MAX_SPLITS : splits;
    const int64_t units = partial_units(&dm);
    if (splits > 1 && slots * dm.hkv * splits > units)
        splits = units / (slots * dm.hkv);
    if (splits < 2)
        splits = 1;

    dense_params p;
    p.q = a->q;
    p.out = a->out;
    p.k = a->k;
    p.v = a->v;
    p.page_tables = a->page_tables;
    p.entries = a->entries;
    p.dense_ids = a->dense_ids;
    p.ws = static_cast<float *>(a->ws_dense);
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

    constexpr size_t smem = smem_bytes<D>();
    // every call (cheap, host-side, legal during graph capture, and per device)
    cudaError_t err = cudaFuncSetAttribute(dense_attention_kernel<T, D>,
                                           cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (err != cudaSuccess)
        return err;
    dim3 grid((unsigned)slots, (unsigned)dm.hkv, (unsigned)splits);
    dense_attention_kernel<T, D><<<grid, NTHREADS, smem, a->stream>>>(p);
    if (splits > 1) {
        cudaError_t e = cudaGetLastError();
        if (e != cudaSuccess)
            return e;
        dense_combine_kernel<T, D><<<dim3((unsigned)slots, (unsigned)dm.hkv, BM / NWARPS),
                                     NTHREADS, 0, a->stream>>>(p);
    }
    return cudaGetLastError();
}

template <typename T> cudaError_t launch_d(const resa_cuda_layer_args *a)
{
    switch (a->dims.d) {
    case 64: return launch<T, 64>(a);
    case 128: return launch<T, 128>(a);
    case 256: return launch<T, 256>(a);
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
    if (a->dims.kv_dtype == RESA_DTYPE_F16)
        return launch_d<__half>(a);
    if (a->dims.kv_dtype == RESA_DTYPE_BF16)
        return launch_d<__nv_bfloat16>(a);
    return cudaErrorInvalidValue;
}
