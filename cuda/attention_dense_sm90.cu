// SPDX-License-Identifier: MIT
// Dense causal attention on Hopper tensor cores (sm_90a, wgmma): the d = 128
// path of resa_cuda_attention_dense (attention_dense.cu dispatches here on a
// compute capability 9.0 device).  Same parameters, tile slots, key splits,
// causal masking, outputs and fp32 partials as the mma.sync kernel; the pieces
// they share are in attention_dense.cuh.  FlashAttention-3 style:
//
// One CTA per (tile slot, KV head, split) = 3 warpgroups.
//  - Warpgroup 0, the producer (setmaxnreg down to 40 registers), loads the
//    tile's Q (BM = 128 rows x 128) once with cp.async, then streams the
//    split's K/V tiles of BN = 128 keys through a STAGES-deep ring in shared
//    memory.  A full tile is a few TMA copies issued by one warp: the pool of
//    a layer is a 2-D tensor [n_pages * hkv * b rows][128], and one box of
//    min(b, 128) rows x 64 columns covers one page's rows of one half of the
//    head dimension, so 4 boxes a page (K and V, two halves) fill a stage,
//    swizzled by the copy engine exactly as wgmma reads it.  The tile that
//    ends the keys (positions past its end must read as zero: their pages may
//    not exist, and a NaN there would survive P = 0) and the launches TMA
//    cannot serve (b < 8, pools past 2^31 rows, RESA_CUDA_NO_TMA=1) go
//    through cp.async, 16 bytes a copy from all 128 threads, each key's page
//    from the page table (entries loaded one per lane, a tile ahead, reaching
//    the copying threads by shuffles).  Why TMA: the cp.async producer spent
//    ~24 instructions per 16-byte copy, 4096 copies a tile, on the same
//    schedulers as the consumers' softmax; TMA made rectification 1.2-1.3x
//    faster (cuda/harness/NOTES.md).  A stage completes on its "full"
//    mbarrier (128 arrivals: cp.async.mbarrier.arrive.noinc per thread, or
//    one arrive.expect_tx of the tile's bytes plus 127 plain arrivals) and is
//    refilled once its "empty" mbarrier has one arrival from every consumer
//    warp.
//  - Warpgroups 1 and 2, the consumers (setmaxnreg up to 232), own 64 rows
//    each.  S = Q K^T is a chain of wgmma m64n128k16 with both operands in
//    shared memory; the online softmax runs on the accumulator registers
//    (same register layout as mma.sync, so the softmax code is shared); P,
//    packed to 16 bits in registers, is the A operand of O += P V (wgmma with
//    A from registers and V, [key][d] in shared memory, as a transposed B).
//    Iteration j issues S_j, then O += P_{j-1} V_{j-1}, and runs the softmax
//    of S_j while that second product is in flight (FA3's intra-warpgroup
//    overlap); the two consumers are not synchronized with each other, so
//    one's softmax also hides behind the other's products (FA3's ping-pong,
//    named barriers that make them take turns issuing, measured no gain).
// Shared memory tiles use wgmma's 128-byte swizzle: a [rows][128] tile is two
// [rows][64] halves of 128-byte rows, 16-byte chunk c of row r stored at chunk
// c ^ (r & 7), every half 1024-byte aligned.
#include <cuda.h> // CUtensorMap (the type alone: the encoder comes from the runtime)
#include <cudaTypedefs.h>
#include <stdint.h>
#include <string.h>

#include "attention_dense.cuh"

namespace {

constexpr int HD = 128;                      // head dimension of this kernel
constexpr int HBN = 128;                     // keys per K/V tile
constexpr int HSTAGES = 3;                   // K/V ring depth
constexpr int HTHREADS = 384;                // producer + 2 consumer warpgroups
constexpr uint32_t Q_BYTES = BM * HD * 2;    // 32 KB
constexpr uint32_t KV_BYTES = HBN * HD * 2;  // one K or V tile: 32 KB
constexpr size_t HSMEM = 1024 + Q_BYTES + (size_t)HSTAGES * 2 * KV_BYTES; // + alignment slack

// The kernel's code exists in the sm_90a device pass (and the host pass, which
// only parses it); other device passes get a stub.
#if !defined(__CUDA_ARCH__) || defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define RESA_SM90A_CODE 1
#else
#define RESA_SM90A_CODE 0
#endif

#if RESA_SM90A_CODE
constexpr int PRODUCER_REGS = 40, CONSUMER_REGS = 232; // 128 * 40 + 256 * 232 <= 65536

// Byte offset of (row, 16-byte chunk 0..15) in a swizzled [rows][128] tile.
__device__ __forceinline__ uint32_t sw128(int row, int chunk, int rows)
{
    return (uint32_t)((chunk >> 3) * rows * 128 + row * 128 + (((chunk & 7) ^ (row & 7)) << 4));
}

// wgmma shared-memory matrix descriptor, 128-byte swizzle: start address,
// leading and stride byte offsets (16-byte units, 14 bits each).
__device__ __forceinline__ uint64_t gmma_desc(uint32_t saddr, uint32_t lbo, uint32_t sbo)
{
    return (uint64_t)((saddr & 0x3FFFFu) >> 4) | (uint64_t)(lbo >> 4) << 16 |
           (uint64_t)(sbo >> 4) << 32 | 1ull << 62;
}

// ---- mbarriers ----
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count)
{
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar)
{
    asm volatile("{\n.reg .b64 st;\nmbarrier.arrive.shared::cta.b64 st, [%0];\n}\n" ::"r"(bar)
                 : "memory");
}
// Returns once the phase of parity `parity` has completed.
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity)
{
    uint32_t done;
    do {
        asm volatile("{\n.reg .pred p;\n"
                     "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
                     "selp.u32 %0, 1, 0, p;\n}\n"
                     : "=r"(done)
                     : "r"(bar), "r"(parity)
                     : "memory");
    } while (!done);
}
// One arrival that also adds `bytes` to the transactions the phase waits for.
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes)
{
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes)
                 : "memory");
}
// TMA: the box at (column c0, row c1) of `map` to shared memory at `dst`,
// completing its bytes on `bar`.
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const CUtensorMap *map, int c0, int c1,
                                            uint32_t bar)
{
    asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
                 " [%0], [%1, {%2, %3}], [%4];\n" ::"r"(dst),
                 "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(bar)
                 : "memory");
}
// One arrival on `bar` once all of this thread's earlier cp.async have landed.
__device__ __forceinline__ void cp_async_arrive(uint32_t bar)
{
    asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}

// ---- wgmma ----
__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_commit()
{
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int N> __device__ __forceinline__ void wg_wait()
{
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Keeps the compiler from moving accesses of these registers across an
// asynchronous wgmma's issue or wait.
template <int N> __device__ __forceinline__ void reg_fence(float *r)
{
#pragma unroll
    for (int i = 0; i < N; i++)
        asm volatile("" : "+f"(r[i])::"memory");
}
template <int N> __device__ __forceinline__ void reg_fence(uint32_t *r)
{
#pragma unroll
    for (int i = 0; i < N; i++)
        asm volatile("" : "+r"(r[i])::"memory");
}

#define RESA_ACC64                                                                                 \
    "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, "  \
    "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, "   \
    "%38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, "    \
    "%56, %57, %58, %59, %60, %61, %62, %63}"
#define RESA_F8(a, i)                                                                              \
    "+f"(a[i]), "+f"(a[i + 1]), "+f"(a[i + 2]), "+f"(a[i + 3]), "+f"(a[i + 4]), "+f"(a[i + 5]),    \
        "+f"(a[i + 6]), "+f"(a[i + 7])
#define RESA_F64(a)                                                                                \
    RESA_F8(a, 0), RESA_F8(a, 8), RESA_F8(a, 16), RESA_F8(a, 24), RESA_F8(a, 32), RESA_F8(a, 40),  \
        RESA_F8(a, 48), RESA_F8(a, 56)
#define RESA_WGMMA_SS(ty)                                                                          \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                                      \
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32." ty "." ty " " RESA_ACC64           \
                 ", %64, %65, p, 1, 1, 0, 0;\n}\n"                                                 \
                 : RESA_F64(d)                                                                     \
                 : "l"(da), "l"(db), "r"(scale_d))
#define RESA_WGMMA_RS(ty)                                                                          \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"                                      \
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32." ty "." ty " " RESA_ACC64           \
                 ", {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"                                   \
                 : RESA_F64(d)                                                                     \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1))

// d (m64n128, fp32) = A B (scale_d 0) or d + A B (scale_d 1); A m64k16 and B
// k16n128 both K-major in shared memory.
template <typename T>
__device__ __forceinline__ void wgmma_ss(float *d, uint64_t da, uint64_t db, int scale_d)
{
    if constexpr (dtype_of<T>::value == RESA_DTYPE_BF16)
        RESA_WGMMA_SS("bf16");
    else
        RESA_WGMMA_SS("f16");
}
// d += A B; A m64k16 in registers (4 per thread, the m16k16 fragment of each
// warp's 16 rows), B k16n128 N-major (transposed) in shared memory.
template <typename T> __device__ __forceinline__ void wgmma_rs(float *d, const uint32_t *a, uint64_t db)
{
    if constexpr (dtype_of<T>::value == RESA_DTYPE_BF16)
        RESA_WGMMA_RS("bf16");
    else
        RESA_WGMMA_RS("f16");
}

#endif // RESA_SM90A_CODE

// tma_rows: rows of one TMA box (min(b, HBN)), 0 = every tile by cp.async;
// tmk / tmv: the layer's K and V pools as [rows][HD] tensors (unused at 0).
template <typename T>
__global__ void __launch_bounds__(HTHREADS, 1)
dense_wgmma_kernel(const dense_params p, const int tma_rows, const __grid_constant__ CUtensorMap tmk,
                   const __grid_constant__ CUtensorMap tmv)
{
#if RESA_SM90A_CODE
    extern __shared__ unsigned char smem_raw[];
    __shared__ tile_ref tref;
    __shared__ __align__(8) uint64_t bars[2 * HSTAGES + 1]; // full[s], empty[s], Q

    const int slot = blockIdx.x, kvh = blockIdx.y, split = blockIdx.z;
    work_item w;
    if (!begin_work<HBN>(p, &tref, &w))
        return; // uniform over the CTA
    const resa_dev_entry &e = w.e;
    const split_plan &sp = w.sp;
    const int kt_begin = w.kt_begin, kt_end = w.kt_end;
    const int g = p.g;
    const int r0 = w.r0, valid = w.valid;
    const int n_cwg = valid > 64 ? 2 : 1; // consumer warpgroups that own rows
    const uint32_t sQ = (smem_u32(smem_raw) + 1023u) & ~1023u;
    const uint32_t sKV = sQ + Q_BYTES; // stage s: K at sKV + 2 s KV_BYTES, V right after
    const uint32_t bar_full = smem_u32(&bars[0]), bar_empty = smem_u32(&bars[HSTAGES]);
    const uint32_t bar_q = smem_u32(&bars[2 * HSTAGES]);
    if (threadIdx.x == 0) {
        for (int s = 0; s < HSTAGES; s++) {
            mbar_init(bar_full + 8 * s, 128);
            mbar_init(bar_empty + 8 * s, 4 * n_cwg);
        }
        mbar_init(bar_q, 128);
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();

    if (threadIdx.x < 128) {
        // ================= producer =================
        asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(PRODUCER_REGS));
        const int tid = threadIdx.x;
        // Q: row r -> token (r0 + r) / g, head kvh * g + (r0 + r) % g; rows past
        // `valid` are zero
        const T *q = static_cast<const T *>(p.q);
#pragma unroll 4
        for (int i = 0; i < BM * 16 / 128; i++) {
            const int idx = tid + 128 * i, r = idx >> 4, c = idx & 15;
            const int rr = r0 + r;
            const bool ok = r < valid;
            const int t = ok ? rr / g : 0, j = ok ? rr % g : 0;
            const T *src = q + ((size_t)(e.row + t) * p.hq + (size_t)kvh * g + j) * HD + c * 8;
            cp_async16(sQ + sw128(r, c, BM), ok ? (const void *)src : p.q, ok ? 16 : 0);
        }
        cp_async_arrive(bar_q);
        // K/V: thread -> chunk tid % 16 of keys tid / 16 + 8 i; keys past kend
        // are zero-filled (their pages may not exist)
        const int c = tid & 15, key0 = tid >> 4, lane = tid & 31;
        const int32_t *ptab = p.page_tables + (size_t)e.slot * p.max_seq_blocks;
        const T *kpool = static_cast<const T *>(p.k);
        const T *vpool = static_cast<const T *>(p.v);
        const int64_t kend = sp.kend;
        // Page-table entries: one load per lane and tile, for key kl of the
        // tile (a warp's keys are {2 warp, 2 warp + 1} + 8 i: 32 keys, one per
        // lane; key0 + 8 i is lane 2 i + lane / 16's), issued a tile ahead so
        // that its latency hides behind the wait for a free stage; the copies
        // take their page by shuffle.  (A dependent __ldg per key put 16 load
        // latencies a tile on the path from a free stage to a full one.)
        const int kl = 2 * (tid >> 5) + (lane & 1) + 8 * (lane >> 1);
        const int n_ops = tma_rows > 0 ? 4 * (HBN / tma_rows) : 0;
        auto by_tma = [&](int kt) { return n_ops > 0 && (int64_t)(kt + 1) * HBN <= kend; };
        auto lookup = [&](int kt) -> int32_t {
            const int64_t pos = (int64_t)kt * HBN + kl;
            return (kt < kt_end && pos < kend && !by_tma(kt)) ? __ldg(ptab + (pos >> p.log2_b)) : 0;
        };
        // TMA boxes of a tile: lane l < 2 (HBN / tma_rows) copies half l & 1
        // of box l >> 1 (tma_rows keys of one page) of K and of V, its page
        // loaded a tile ahead like the cp.async ones (b = 8: all 32 lanes).
        const bool tma_lane = tid < n_ops / 2;
        auto box_page = [&](int kt) -> int32_t {
            const int64_t pos = (int64_t)kt * HBN + (lane >> 1) * tma_rows;
            return (kt < kt_end && tma_lane && by_tma(kt)) ? __ldg(ptab + (pos >> p.log2_b)) : 0;
        };
        int32_t pg = lookup(kt_begin), bp = box_page(kt_begin);
        int stage = 0;
        uint32_t phase = 0;
        for (int kt = kt_begin; kt < kt_end; kt++) {
            mbar_wait(bar_empty + 8 * stage, phase ^ 1); // the first round passes at once
            const uint32_t dK = sKV + stage * 2 * KV_BYTES, dV = dK + KV_BYTES;
            const int64_t kb = (int64_t)kt * HBN;
            const uint32_t full = bar_full + 8 * stage;
            if (by_tma(kt)) { // a full tile
                if (tid == 0)
                    mbar_arrive_expect_tx(full, 2 * KV_BYTES);
                __syncwarp();
                if (tma_lane) {
                    const int box = lane >> 1, half = lane & 1;
                    const int64_t pos = kb + box * tma_rows;
                    const int row = (int)(((int64_t)bp * p.hkv + kvh) * p.b + (pos & (p.b - 1)));
                    const uint32_t so = half * (HBN * 128) + box * tma_rows * 128;
                    tma_load_2d(dK + so, &tmk, half * 64, row, full);
                    tma_load_2d(dV + so, &tmv, half * 64, row, full);
                }
                if (tid != 0)
                    mbar_arrive(full);
                bp = box_page(kt + 1);
                pg = lookup(kt + 1);
                if (++stage == HSTAGES) {
                    stage = 0;
                    phase ^= 1;
                }
                continue;
            }
#pragma unroll 4
            for (int i = 0; i < HBN / 8; i++) {
                const int key = key0 + 8 * i;
                const int64_t pos = kb + key;
                const bool ok = pos < kend;
                const int32_t page = __shfl_sync(0xffffffffu, pg, 2 * i + (lane >> 4));
                const size_t off =
                    (((size_t)page * p.hkv + kvh) * p.b + (size_t)(pos & (p.b - 1))) * HD + c * 8;
                const uint32_t so = sw128(key, c, HBN);
                cp_async16(dK + so, ok ? kpool + off : kpool, ok ? 16 : 0);
                cp_async16(dV + so, ok ? vpool + off : vpool, ok ? 16 : 0);
            }
            cp_async_arrive(full);
            pg = lookup(kt + 1);
            if (++stage == HSTAGES) {
                stage = 0;
                phase ^= 1;
            }
        }
        asm volatile("cp.async.wait_all;\n" ::: "memory");
        return;
    }

    // ================= consumers =================
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(CONSUMER_REGS));
    const int cw = (threadIdx.x >> 5) - 4; // consumer warp 0..7: rows 16 cw .. 16 cw + 15
    const int cwg = cw >> 2;
    if (cwg >= n_cwg)
        return; // uniform over the warpgroup: all its rows are padding
    const int lane = threadIdx.x & 31;
    // this thread's two rows, as in the mma.sync kernel; padding rows take the
    // last valid row's position (never an empty key set) and are not stored
    const int wr0 = cw * 16;
    const int lr0 = wr0 + (lane >> 2), lr1 = lr0 + 8;
    const int pos0 = (int)e.start + (r0 + min(lr0, valid - 1)) / g;
    const int pos1 = (int)e.start + (r0 + min(lr1, valid - 1)) / g;
    const int wpos_min = (int)e.start + (r0 + min(wr0, valid - 1)) / g;

    float o[HD / 2], s[HBN / 2]; // accumulators: HD/8 and HBN/8 n-tiles of 4
    uint32_t pa[HBN / 4];       // P as A fragments, 4 per 16 keys
#pragma unroll
    for (int i = 0; i < HD / 2; i++)
        o[i] = 0.f;
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f, c0, c1;
    const float sl2 = p.scale_log2;
    const uint32_t sQw = sQ + cwg * 64 * 128; // this warpgroup's 64 rows of Q

    // S = Q K^T: 8 k-steps of 16 dimensions = 32 bytes inside a 128-byte row
    // (the swizzle is applied to the final address), the second 64 in the
    // other half; 8-row groups 1024 bytes apart
    auto qk = [&](int stage) {
        const uint32_t sK = sKV + stage * 2 * KV_BYTES;
#pragma unroll
        for (int kk = 0; kk < HD / 16; kk++) {
            const uint32_t dq = (kk >> 2) * (BM * 128) + (kk & 3) * 32;
            const uint32_t dk = (kk >> 2) * (HBN * 128) + (kk & 3) * 32;
            wgmma_ss<T>(s, gmma_desc(sQw + dq, 16, 1024), gmma_desc(sK + dk, 16, 1024), kk > 0);
        }
    };
    // O += P V: 8 k-steps of 16 keys = 2048 bytes; V is N-major: 64-dimension
    // halves HBN * 128 bytes apart (leading offset), 8-key groups 1024 apart
    auto pv = [&](int stage) {
        const uint32_t sV = sKV + stage * 2 * KV_BYTES + KV_BYTES;
#pragma unroll
        for (int kk = 0; kk < HBN / 16; kk++)
            wgmma_rs<T>(o, pa + 4 * kk, gmma_desc(sV + kk * 2048, HBN * 128, 1024));
    };
    auto softmax = [&](int kt) {
        const int kbase = kt * HBN;
        if (kbase + HBN - 1 > wpos_min) // only tiles reaching past the warp's earliest row
            causal_mask<HBN / 8>(s, kbase, lane, pos0, pos1);
        softmax_step<HBN / 8>(s, sl2, m0, m1, l0, l1, c0, c1);
    };
    auto pack = [&] {
#pragma unroll
        for (int kk = 0; kk < HBN / 16; kk++)
            pack_p<T>(s, kk, pa + 4 * kk);
    };
    // cp.async writes are generic-proxy stores; wgmma reads through the async
    // proxy.  Fenced here, once a tile with no wgmma of this warpgroup in
    // flight (measured free); fencing in the producer after its copies land
    // instead was 10-21% slower (cuda/harness/NOTES.md, v3)
    auto fence_async = [] { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); };

    mbar_wait(bar_q, 0);
    int stage = 0;
    uint32_t phase = 0;
    mbar_wait(bar_full, 0);
    fence_async();
    wg_fence();
    qk(0);
    wg_commit();
    wg_wait<0>();
    reg_fence<HBN / 2>(s);
    softmax(kt_begin); // O is still zero: no rescale
    pack();
    for (int kt = kt_begin + 1; kt < kt_end; kt++) {
        const int prev = stage;
        if (++stage == HSTAGES) {
            stage = 0;
            phase ^= 1;
        }
        mbar_wait(bar_full + 8 * stage, phase);
        fence_async();
        wg_fence();
        qk(stage);
        wg_commit();
        pv(prev);
        wg_commit();
        wg_wait<1>(); // S of this tile is done; P V of the previous one runs on
        reg_fence<HBN / 2>(s);
        softmax(kt);
        wg_wait<0>();
        reg_fence<HD / 2>(o);
        reg_fence<HBN / 2>(s);
        reg_fence<HBN / 4>(pa);
        __syncwarp();
        if (lane == 0)
            mbar_arrive(bar_empty + 8 * prev); // this warp is done with K and V of `prev`
        scale_rows<HD / 8>(o, c0, c1);
        pack();
    }
    wg_fence();
    pv(stage);
    wg_commit();
    wg_wait<0>();
    reg_fence<HD / 2>(o);
    store_rows<T, HD>(p, e, slot, kvh, split, sp.sa, r0, valid, lr0, lane, o, m0, m1, l0, l1);
#else
    // an image without sm_90a features: never launched (resa_cuda_dense_sm90_built
    // and the compute capability check in attention_dense.cu)
    (void)p;
    __trap();
#endif
}

// The driver's tensor-map encoder, looked up once through the runtime (the
// library does not link libcuda); null where the driver lacks it.
PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder()
{
    static PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
        void *f = nullptr;
        cudaDriverEntryPointQueryResult q;
#if CUDART_VERSION >= 12050
        const cudaError_t err = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f,
                                                                 12000, cudaEnableDefault, &q);
#else // deprecated from 12.5 on; the only lookup before
        const cudaError_t err =
            cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &f, cudaEnableDefault, &q);
#endif
        if (err != cudaSuccess)
            cudaGetLastError(); // a failed lookup must not surface as a later launch's error
        if (err != cudaSuccess || q != cudaDriverEntryPointSuccess)
            f = nullptr;
        return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f);
    }();
    return fn;
}

// The K and V pools of this layer as TMA tensors [n_pages * hkv * b][HD] of
// 16-bit elements, boxes of `rows` x 64 with wgmma's 128-byte swizzle.
// Returns the box rows, or 0 where TMA cannot serve the launch: b < 8 (a box
// must fill whole 1024-byte swizzle atoms), row coordinates past int32,
// RESA_CUDA_NO_TMA=1 (read at every launch, for A/B measurements), or no
// encoder.  Host-only work, no allocation: legal during graph capture.
int make_tensor_maps(const resa_cuda_layer_args *a, CUtensorMap *tmk, CUtensorMap *tmv)
{
    const resa_cuda_dims &dm = a->dims;
    const int64_t rows = (int64_t)dm.n_pages * dm.hkv * dm.b;
    const char *off = getenv("RESA_CUDA_NO_TMA");
    PFN_cuTensorMapEncodeTiled_v12000 encode = tensor_map_encoder();
    if (dm.b < 8 || rows <= 0 || rows > INT32_MAX || (off && off[0] == '1') || !encode)
        return 0;
    const int box_rows = dm.b < HBN ? dm.b : HBN;
    const cuuint64_t dims[2] = {(cuuint64_t)HD, (cuuint64_t)rows};
    const cuuint64_t strides[1] = {(cuuint64_t)HD * 2};
    const cuuint32_t box[2] = {64, (cuuint32_t)box_rows};
    const cuuint32_t estr[2] = {1, 1};
    void *pools[2] = {a->k, a->v};
    CUtensorMap *maps[2] = {tmk, tmv};
    for (int i = 0; i < 2; i++)
        if (encode(maps[i], CU_TENSOR_MAP_DATA_TYPE_UINT16, 2, pools[i], dims, strides, box, estr,
                   CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                   CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                   CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) != CUDA_SUCCESS)
            return 0;
    return box_rows;
}

template <typename T> cudaError_t launch_sm90(const resa_cuda_layer_args *a)
{
    int64_t slots;
    const dense_params p = make_params(a, 1, &slots); // one CTA per SM (shared memory)
    if (slots <= 0)
        return cudaGetLastError();
    cudaError_t err = cudaFuncSetAttribute(dense_wgmma_kernel<T>,
                                           cudaFuncAttributeMaxDynamicSharedMemorySize, (int)HSMEM);
    if (err != cudaSuccess)
        return err;
    CUtensorMap tmk, tmv;
    memset(&tmk, 0, sizeof tmk);
    memset(&tmv, 0, sizeof tmv);
    const int tma_rows = make_tensor_maps(a, &tmk, &tmv);
    dim3 grid((unsigned)slots, (unsigned)p.hkv, (unsigned)p.splits);
    dense_wgmma_kernel<T><<<grid, HTHREADS, HSMEM, a->stream>>>(p, tma_rows, tmk, tmv);
    return launch_combine<T, HD, HBN>(p, slots, a);
}

} // namespace

bool resa_cuda_dense_sm90_built()
{
#if defined(RESA_CUDA_SM90A)
    return true;
#else
    return false;
#endif
}

cudaError_t resa_cuda_dense_sm90(const resa_cuda_layer_args *a)
{
    if (a->dims.d != HD)
        return cudaErrorInvalidValue;
    if (a->dims.kv_dtype == RESA_DTYPE_F16)
        return launch_sm90<__half>(a);
    if (a->dims.kv_dtype == RESA_DTYPE_BF16)
        return launch_sm90<__nv_bfloat16>(a);
    return cudaErrorInvalidValue;
}
