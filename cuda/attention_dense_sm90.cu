// SPDX-License-Identifier: MIT
// Dense causal attention on Hopper tensor cores (sm_90a, wgmma): the d = 128
// and d = 256 path of resa_cuda_attention_dense (attention_dense.cu
// dispatches here on a compute capability 9.0 device).  Same parameters, tile
// slots, key splits, causal masking, outputs and fp32 partials (and lse) as
// the mma.sync kernel; the pieces they share are in attention_dense.cuh.
// Causal modes only: a step with a QUERY_DENSE entry takes the mma.sync
// kernel (attention_dense.cu, launch).  A T cache or the fp8 one (F8: e4m3
// bytes and per-token scales; the producer converts the bytes to f16 in
// shared memory, produce_fp8, and the consumers run f16 MMAs and apply the
// scales in fp32).
// FlashAttention-3 style:
//
// One CTA per (tile slot, KV head, split) = 3 warpgroups.
//  - Warpgroup 0, the producer (setmaxnreg down to 40 registers; F8: 56,
//    the consumers 224), loads the tile's Q (BM = 128 rows x d) once with
//    cp.async, then streams the
//    split's K and V tiles of BN keys (d 128: 128 keys; d 256: 64; wg_cfg)
//    through two rings in shared memory, one for K and one for V, in the
//    order K_{j+1}, V_j: a consumer is done with K_j once S_j is, but with
//    V_j only after P_j V_j in the next iteration, so K slots are freed and
//    refilled a tile earlier than V slots.  A full tile is a few TMA copies
//    issued by one warp: the pool of a layer is a 2-D tensor [n_pages * hkv
//    * b rows][d], and one box of min(b, BN) rows x 64 columns covers one
//    page's rows of one 64-column block of the head dimension, so d / 64
//    boxes a page fill a K (or V) slot, swizzled by the copy engine exactly
//    as wgmma reads it.  Through cp.async instead, 16 bytes a copy from all
//    128 threads, each key's page from the page table (entries loaded one
//    per lane, two tiles ahead, reaching the copying threads by shuffles):
//    the tile that ends the keys (positions past its end must read as zero:
//    their pages may not exist, and a NaN there would survive P = 0), and
//    every tile where TMA does not serve (b < 8, pools past 2^31 rows,
//    RESA_CUDA_NO_TMA=1).  Why TMA: the cp.async producer spent ~24
//    instructions per 16-byte copy on the same schedulers as the consumers'
//    softmax; TMA made rectification at d 128 1.2-1.3x faster
//    (bench/harness/NOTES.md).  A slot completes on its "full" mbarrier (128
//    arrivals: cp.async.mbarrier.arrive.noinc per thread, or one
//    arrive.expect_tx of the slot's bytes plus 127 plain arrivals) and is
//    refilled once its "empty" mbarrier has one arrival from every consumer
//    warp.
//  - Warpgroups 1 and 2, the consumers (setmaxnreg up to 232), own 64 rows
//    each.  S = Q K^T is a chain of wgmma m64nBNk16 with both operands in
//    shared memory; the online softmax runs on the accumulator registers
//    (same register layout as mma.sync, so the softmax code is shared); P,
//    packed to 16 bits in registers, is the A operand of O += P V (wgmma with
//    A from registers and V, [key][d] in shared memory, as a transposed B).
//    Iteration j issues S_j, then O += P_{j-1} V_{j-1}, and runs the softmax
//    of S_j while that second product is in flight (FA3's intra-warpgroup
//    overlap); the two consumers are not synchronized with each other, so
//    one's softmax also hides behind the other's products (FA3's ping-pong,
//    named barriers that make them take turns issuing, measured no gain).
//    O is m64n128 (d 128) or m64n256 (d 256: 128 fp32 registers a thread,
//    which is why its key tiles are 64 wide).
// Shared memory tiles use wgmma's 128-byte swizzle: a [rows][d] tile is d / 64
// [rows][64] column blocks of 128-byte rows, 16-byte chunk c of row r stored
// at chunk c ^ (r & 7), every block 1024-byte aligned.
#include <cuda.h> // CUtensorMap (the type alone: the encoder comes from the runtime)
#include <cudaTypedefs.h>
#include <limits.h>
#include <stdint.h>
#include <string.h>

#include "attention_dense.cuh"

namespace {

constexpr int HTHREADS = 384; // producer + 2 consumer warpgroups

// Per head dimension: keys per K/V tile and the depth of the K and V rings
// (full tiles go through TMA at both).  A K or V slot is BN keys x
// HD (32 KB either way); d 128: Q 32 KB + 3 + 3 slots; d 256: Q 64 KB + 3 +
// 2 slots (224 KB), and 64-key tiles keep O (128 registers) + S + P under
// the consumers' 232.  K slots free up as soon as S is done, so a K ring of
// three gives the loads a tile of slack at d 256 too (one shared 2-stage
// ring made every 64-key tile wait one load latency: 3.2 -> 2.0 ms for the
// 16/2 x 256 rectification, bench/harness/NOTES.md v6).
// F8 (the fp8 cache): slots of the same size (f16), fed by the producer's
// conversion (produce_fp8), two K and two V (split rings at both d: K_{j+1}
// is converted before V_j), RAW units of raw bytes before them, each one
// tensor's tile: BN x HD e4m3 bytes + BN fp32 scales, and each slot's BN
// scales (with the 1 KB of alignment slack, d 128: 1 + Q 32 + 4 x 32 + 3 x
// 16.5 + 2 = 212.5 KB; d 256: 1 + 64 + 4 x 32 + 2 x 16.25 + 1 = 226.5 KB).
template <int HD, bool F8 = false> struct wg_cfg;
template <> struct wg_cfg<128, false> {
    static constexpr int BN = 128, KSTAGES = 3, VSTAGES = 3, RAW = 0;
    static constexpr bool SPLIT = false;
};
template <> struct wg_cfg<256, false> {
    static constexpr int BN = 64, KSTAGES = 3, VSTAGES = 2, RAW = 0;
    static constexpr bool SPLIT = true;
};
template <> struct wg_cfg<128, true> {
    static constexpr int BN = 128, KSTAGES = 2, VSTAGES = 2, RAW = 3;
    static constexpr bool SPLIT = true;
};
template <> struct wg_cfg<256, true> {
    static constexpr int BN = 64, KSTAGES = 2, VSTAGES = 2, RAW = 2;
    static constexpr bool SPLIT = true;
};
template <int HD> __host__ __device__ constexpr uint32_t q_bytes() { return BM * HD * 2; }
template <int HD> __host__ __device__ constexpr uint32_t kv_bytes() { return wg_cfg<HD>::BN * HD * 2; }
// F8: one raw unit, [BN][HD] bytes then [BN] scales (a multiple of 128 bytes)
template <int HD> __host__ __device__ constexpr uint32_t raw_bytes()
{
    return wg_cfg<HD>::BN * (HD + 4);
}
// F8: each K and V slot's fp32 scales, [BN] after the raw units
template <int HD, bool F8> constexpr size_t scale_bytes()
{
    return F8 ? (size_t)(wg_cfg<HD, F8>::KSTAGES + wg_cfg<HD, F8>::VSTAGES) * wg_cfg<HD>::BN * 4 : 0;
}
template <int HD, bool F8 = false> constexpr size_t smem_bytes() // + alignment slack
{
    return 1024 + q_bytes<HD>() +
           (size_t)(wg_cfg<HD, F8>::KSTAGES + wg_cfg<HD, F8>::VSTAGES) * kv_bytes<HD>() +
           (size_t)wg_cfg<HD, F8>::RAW * raw_bytes<HD>() + scale_bytes<HD, F8>();
}
// KF8 (F8 at d 128, QK^T on fp8 MMAs): Q as NP e4m3 parts under one power of
// two a row (2 for bf16 queries, whose 8 significant bits two 4-bit parts hold;
// 3 for f16's 11), [BM][128] bytes each in the 128-byte swizzle, where the
// 16-bit Q lands first (32 KB: NP x 16 KB >= it); K slots of e4m3 bytes as the
// cache holds them ([BN][128], the swizzle from TMA); V as F8.
template <typename T> __host__ __device__ constexpr int kf8_parts()
{
    return std::is_same<T, __half>::value ? 3 : 2;
}
template <typename T> constexpr size_t smem_bytes_kf8()
{
    using cfg = wg_cfg<128, true>;
    return 1024 + (size_t)kf8_parts<T>() * BM * 128 +
           (size_t)cfg::KSTAGES * cfg::BN * 128 + (size_t)cfg::VSTAGES * kv_bytes<128>() +
           (size_t)cfg::RAW * raw_bytes<128>() + scale_bytes<128, true>();
}
static_assert(smem_bytes<128>() <= 227 * 1024 && smem_bytes<256>() <= 227 * 1024, "smem");
static_assert(smem_bytes_kf8<__half>() <= 227 * 1024 - 384 &&
                  kf8_parts<__nv_bfloat16>() * BM * 128 >= q_bytes<128>(),
              "smem (KF8)");
// F8: with 384 bytes left for the static shared variables (bars: 12 x 8
// bytes, tref, first_bad_v, q_exp: 128 bytes); d 256 is 226.5 KB
static_assert(smem_bytes<128, true>() <= 227 * 1024 - 384 &&
                  smem_bytes<256, true>() <= 227 * 1024 - 384,
              "smem");
static_assert(wg_cfg<128, true>::BN == wg_cfg<128>::BN && wg_cfg<256, true>::BN == wg_cfg<256>::BN,
              "F8 tiles are the T tiles: one split plan and combine per d");
static_assert(wg_cfg<128, true>::SPLIT && wg_cfg<256, true>::SPLIT,
              "produce_fp8 fills split rings");
static_assert(raw_bytes<128>() % 128 == 0 && raw_bytes<256>() % 128 == 0, "raw unit alignment");
static_assert((wg_cfg<128>::SPLIT || wg_cfg<128>::KSTAGES == wg_cfg<128>::VSTAGES) &&
                  (wg_cfg<256>::SPLIT || wg_cfg<256>::KSTAGES == wg_cfg<256>::VSTAGES),
              "a shared ring has one depth");

// The kernel's code exists in the sm_90a device pass (and the host pass, which
// only parses it); other device passes get a stub.
#if !defined(__CUDA_ARCH__) || defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define RESA_SM90A_CODE 1
#else
#define RESA_SM90A_CODE 0
#endif

#if RESA_SM90A_CODE
constexpr int PRODUCER_REGS = 40, CONSUMER_REGS = 232; // 128 * 40 + 256 * 232 <= 65536
// F8: the producer also converts; 128 * 56 + 256 * 224 = 384 * 168
constexpr int PRODUCER_REGS_F8 = 56, CONSUMER_REGS_F8 = 224;
// KF8: its producer also issues K's copies (56: 36 bytes spilled; 64 / 216: 8,
// 4 of them in the consumers; 64 / 224 does not fit);
// 128 * 64 + 256 * 216 <= 384 * 168
constexpr int PRODUCER_REGS_KF8 = 64, CONSUMER_REGS_KF8 = 216;

// Byte offset of (row, 16-byte chunk 0..HD/8-1) in a swizzled [rows][HD] tile
// (HD / 64 column blocks of [rows][64], 128-byte rows).
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
// TMA, one dimension: `bytes` (a multiple of 16, both addresses 16-byte
// aligned) from `src` to shared memory at `dst`, completing on `bar`.
__device__ __forceinline__ void bulk_load(uint32_t dst, const void *src, uint32_t bytes, uint32_t bar)
{
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes"
                 " [%0], [%1], %2, [%3];\n" ::"r"(dst),
                 "l"(src), "r"(bytes), "r"(bar)
                 : "memory");
}
// 4-byte async copy (the fp8 cache's scales); src_bytes 0 zero-fills.
__device__ __forceinline__ void cp_async4(uint32_t dst, const void *src, int src_bytes)
{
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src),
                 "r"(src_bytes)
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

// Accumulator operand lists of wgmma m64nN (N / 2 fp32 registers a thread):
// "{%0, ..., %(N/2 - 1)}" and the matching "+f" constraints.
#define RESA_ACC32 "{" \
    "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, " \
    "%18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31" "}"
#define RESA_ACC64 "{" \
    "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, " \
    "%18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, " \
    "%34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, " \
    "%50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63" "}"
#define RESA_ACC128 "{" \
    "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, " \
    "%18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, " \
    "%34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, " \
    "%50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, " \
    "%66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, " \
    "%82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, " \
    "%98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, " \
    "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, " \
    "%126, %127" "}"
#define RESA_F8(a, i)                                                                              \
    "+f"((a)[i]), "+f"((a)[i + 1]), "+f"((a)[i + 2]), "+f"((a)[i + 3]), "+f"((a)[i + 4]),          \
        "+f"((a)[i + 5]), "+f"((a)[i + 6]), "+f"((a)[i + 7])
#define RESA_F32(a) RESA_F8(a, 0), RESA_F8(a, 8), RESA_F8(a, 16), RESA_F8(a, 24)
#define RESA_F64(a) RESA_F32(a), RESA_F32(a + 32)
#define RESA_F128(a) RESA_F64(a), RESA_F64(a + 64)
#define RESA_STR2(x) #x
#define RESA_STR(x) RESA_STR2(x)
// SS: d (m64nN) = A B or d + A B, A and B K-major in shared memory; the
// operands after the NACC accumulators are %NACC (A), %NACC+1 (B), %NACC+2 (scale-d).
#define RESA_WGMMA_SS(n, ty, ACC, F, NACC, A1, A2)                                                 \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" RESA_STR(A2) ", 0;\n"                          \
                 "wgmma.mma_async.sync.aligned.m64n" #n "k16.f32." ty "." ty " " ACC               \
                 ", %" RESA_STR(NACC) ", %" RESA_STR(A1) ", p, 1, 1, 0, 0;\n}\n"                    \
                 : F(d)                                                                            \
                 : "l"(da), "l"(db), "r"(scale_d))
// RS: d += A B, A (4 registers) from registers, B N-major (transposed) in
// shared memory; operands %NACC..%NACC+3 (A), %NACC+4 (B), %NACC+5 (scale-d).
#define RESA_WGMMA_RS(n, ty, ACC, F, A0, A1, A2, A3, A4, A5)                                      \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" RESA_STR(A5) ", 0;\n"                          \
                 "wgmma.mma_async.sync.aligned.m64n" #n "k16.f32." ty "." ty " " ACC               \
                 ", {%" RESA_STR(A0) ", %" RESA_STR(A1) ", %" RESA_STR(A2) ", %" RESA_STR(A3)          \
                 "}, %" RESA_STR(A4) ", p, 1, 1, 1;\n}\n"                                           \
                 : F(d)                                                                            \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1))

// d (m64nN, fp32) = A B (scale_d 0) or d + A B (scale_d 1); A m64k16 and B
// k16nN both K-major in shared memory.  N = 128 (d 128: S of 128 keys) or 64
// (d 256: S of 64 keys).
template <typename T, int N>
__device__ __forceinline__ void wgmma_ss(float *d, uint64_t da, uint64_t db, int scale_d)
{
    constexpr bool bf = dtype_of<T>::value == RESA_DTYPE_BF16;
    static_assert(N == 64 || N == 128, "wgmma_ss: N");
    if constexpr (N == 128) {
        if constexpr (bf)
            RESA_WGMMA_SS(128, "bf16", RESA_ACC64, RESA_F64, 64, 65, 66);
        else
            RESA_WGMMA_SS(128, "f16", RESA_ACC64, RESA_F64, 64, 65, 66);
    } else {
        if constexpr (bf)
            RESA_WGMMA_SS(64, "bf16", RESA_ACC32, RESA_F32, 32, 33, 34);
        else
            RESA_WGMMA_SS(64, "f16", RESA_ACC32, RESA_F32, 32, 33, 34);
    }
}
// d += A B; A m64k16 in registers (4 per thread, the m16k16 fragment of each
// warp's 16 rows), B k16nN N-major (transposed) in shared memory.  N = 128
// (d 128: O of 128 dimensions) or 256 (d 256).
template <typename T, int N>
__device__ __forceinline__ void wgmma_rs(float *d, const uint32_t *a, uint64_t db)
{
    constexpr bool bf = dtype_of<T>::value == RESA_DTYPE_BF16;
    static_assert(N == 128 || N == 256, "wgmma_rs: N");
    if constexpr (N == 128) {
        if constexpr (bf)
            RESA_WGMMA_RS(128, "bf16", RESA_ACC64, RESA_F64, 64, 65, 66, 67, 68, 69);
        else
            RESA_WGMMA_RS(128, "f16", RESA_ACC64, RESA_F64, 64, 65, 66, 67, 68, 69);
    } else {
        if constexpr (bf)
            RESA_WGMMA_RS(256, "bf16", RESA_ACC128, RESA_F128, 128, 129, 130, 131, 132, 133);
        else
            RESA_WGMMA_RS(256, "f16", RESA_ACC128, RESA_F128, 128, 129, 130, 131, 132, 133);
    }
}

// KF8: d (m64n128, fp32) = A B or d + A B, A m64k32 and B k32n128 e4m3, both
// K-major in shared memory (fp8 wgmma has no transposed form).
__device__ __forceinline__ void wgmma_ss_e4m3(float *d, uint64_t da, uint64_t db, int scale_d)
{
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 " RESA_ACC64
                 ", %64, %65, p, 1, 1;\n}\n"
                 : RESA_F64(d)
                 : "l"(da), "l"(db), "r"(scale_d));
}

// a word of two T values, low half first, to fp32
template <typename T> __device__ __forceinline__ float2 unpack2(uint32_t w)
{
    if constexpr (std::is_same<T, __half>::value)
        return __half22float2(*reinterpret_cast<const __half2 *>(&w));
    else
        return make_float2(__uint_as_float(w << 16), __uint_as_float(w & 0xffff0000u));
}

// amax and the two T values of word w, the largest magnitude (fmaxf drops a
// NaN: a NaN row keeps its exponent from its other values)
template <typename T> __device__ __forceinline__ float amax_word(float amax, uint32_t w)
{
    const float2 f = unpack2<T>(w);
    return fmaxf(amax, fmaxf(fabsf(f.x), fabsf(f.y)));
}
// F8: the power of two 2^-e that puts a Q row's largest |q| in [2^top,
// 2^(top+1)); the row's halves are held by lanes l and l ^ 1, amax each;
// e = 0 for a zero or non-finite row
__device__ __forceinline__ int q_row_exp(float amax, int top)
{
    amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 1));
    return amax > 0.f && amax <= FLT_MAX ? max(-100, ilogbf(amax) - top) : 0;
}

// two consecutive fp32 values of shared memory at addr (8-byte aligned)
__device__ __forceinline__ float2 lds_f32x2(uint32_t addr)
{
    float2 v;
    asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];\n" : "=f"(v.x), "=f"(v.y) : "r"(addr));
    return v;
}

// ---- the fp8 cache (F8): the producer converts, the consumers scale ----
// The producer warpgroup fills f16 slots from raw units: it copies one
// tensor's tile of e4m3 bytes and its tokens' scales into a raw unit (TMA:
// one box of min(b, BN) rows x HD bytes and one 1-D copy of as many scales
// per page, issued by one lane a page; the tile that ends the keys, and every
// tile where TMA does not serve, by cp.async with zero fill past kend: byte 0
// and scale 0 read as 0, never NaN), then converts the bytes in shared memory
// into the tile's f16 slot, each value exactly the e4m3 byte's (one
// cvt.rn.f16x2.e4m3x2 per two values), and copies the scales into the slot's
// fp32 array.  The consumers' MMAs take f16 operands (Q converted once, row
// by row under a power of two, convert_q) and apply the scales in fp32: K's
// on S, column by column (scale_cols), V's on P (pack_f8: P v_scale / cv in
// f16, cv a power of two per tile).  The values are then those of the cache
// to fp32 rounding (e4m3 x scale), not T(e4m3 x scale) as the mma.sync
// kernel and the CPU read them: closer to the stored values, not the same
// bits.  (Until 2026-12-07 the producer converted to T(e4m3 x scale): ~7
// instructions per two values on the schedulers the consumers' softmax
// needs, and fp8 rectification took 1.94x bf16's time on an H100.)
// The units run in the order the slots are needed, K_b, K_{b+1}, V_b,
// K_{b+2}, V_{b+1}, ..., V_{e-1} (the split rings' order), RAW units ahead of
// the conversion: while the consumers run S_j and P_{j-1} V_{j-1} (wgmma,
// asynchronous), the producer converts K_{j+1} and V_j and the copies of the
// next units are in flight.  Two slots a ring are enough for that: K_{j+1}
// goes where K_{j-1} was (free once S_{j-1} is done and its scales are
// applied), V_j where V_{j-2} was (free once P V of iteration j - 1 is done).
// Each thread's conversion stores are generic-proxy writes that wgmma reads
// through the async proxy: every thread fences them (fence.proxy.async)
// before its arrival on the slot's "full" barrier (128 arrivals, as for
// cp.async), so the consumers' wait orders them before their wgmma (and
// their plain loads of the scales).  A raw unit is refilled only after a
// named barrier (id 2, the producer's 128 threads) says every thread has
// read it.
// Conversion mapping: a warp converts 4 rows x 8 16-byte chunks of raw bytes
// (16 values each, two 16-byte f16 chunks): lane l takes chunk l & 7 of row
// ((l >> 2) ^ (l >> 3)) & 1 | (l >> 4) << 1, so that each quarter-warp's 8
// raw loads hit 8 bank groups (chunks 0-3 of one row, 4-7 of the other) and
// so do its 8 f16 stores (the rows' parities differ, which puts their chunks
// 2c and 2c + 1 of the 128-byte swizzle on complementary bank groups).
template <typename T, int HD, bool KF8>
__device__ __forceinline__ void produce_fp8(const dense_params &p, const work_item &w, int kvh,
                                            int tma_rows, const CUtensorMap *tmk,
                                            const CUtensorMap *tmv, uint32_t sK0, uint32_t sV0,
                                            uint32_t sR0, uint32_t sKS0, uint32_t sVS0,
                                            uint32_t kfull, uint32_t vfull, uint32_t rfull)
{
    using cfg = wg_cfg<HD, true>;
    constexpr int HBN = cfg::BN, KS = cfg::KSTAGES, VS = cfg::VSTAGES, RU = cfg::RAW;
    constexpr uint32_t KV_BYTES = kv_bytes<HD>(), RAW_BYTES = raw_bytes<HD>();
    constexpr int CPR = HD / 16;    // 16-byte chunks of a raw row
    constexpr int KPP = 128 / CPR;  // keys per pass of the cp.async loop
    constexpr int KW = 32 / CPR;    // keys per warp and pass
    const uint32_t kempty = kfull + 8 * KS, vempty = vfull + 8 * VS;
    const int tid = (int)threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int kt_begin = w.kt_begin, kt_end = w.kt_end;
    const int64_t kend = w.sp.kend;
    const int32_t *ptab = p.page_tables + (size_t)w.e.slot * p.max_seq_blocks;
    // cp.async tiles: this lane's page-table entry is key kl's, as in the T
    // producer (the copies take theirs by shuffle; the scale copy of key kl
    // is this thread's)
    const int kl = KW * warp + lane % KW + KPP * (lane / KW);
    const bool kl_ok = HBN / KPP >= 32 / KW || lane / KW < HBN / KPP; // d 256: lanes < 16
    // TMA tiles: lane l < BN / tma_rows copies box l (tma_rows keys of one
    // page, all HD bytes) and its scales
    const int n_boxes = tma_rows > 0 ? HBN / tma_rows : 0;
    const bool tma_lane = tid < n_boxes;
    auto by_tma = [&](int kt) { return n_boxes > 0 && (int64_t)(kt + 1) * HBN <= kend; };
    auto page_of = [&](int kt) -> int32_t {
        if (by_tma(kt)) {
            const int64_t pos = (int64_t)kt * HBN + lane * tma_rows;
            return tma_lane ? __ldg(ptab + (pos >> p.log2_b)) : 0;
        }
        const int64_t pos = (int64_t)kt * HBN + kl;
        return (kl_ok && pos < kend) ? __ldg(ptab + (pos >> p.log2_b)) : 0;
    };
    const int n_units = 2 * (kt_end - kt_begin);
    auto is_v_of = [&](int u) { return u == n_units - 1 || (u > 0 && !(u & 1)); };
    auto tile_of = [&](int u) {
        return u == n_units - 1 ? kt_end - 1
               : (u & 1)        ? kt_begin + (u + 1) / 2
                                : kt_begin + u / 2 - (u > 0);
    };
    // K's or V's tile kt: its bytes to dst, [HBN][HD] (swizzled: in wgmma's
    // 128-byte swizzle, KF8's K slots, whose TMA map swizzles; else plain
    // rows, a raw unit), its scales to dsc, completing on `full`
    auto copy_tile = [&](int kt, bool is_v, uint32_t dst, uint32_t dsc, uint32_t full, int32_t pg,
                         auto swizzled) { // std::bool_constant
        const unsigned char *pool = static_cast<const unsigned char *>(is_v ? p.v : p.k);
        const float *scl = is_v ? p.vscale : p.kscale;
        const int64_t kb = (int64_t)kt * HBN;
        if (by_tma(kt)) { // a full tile
            if (tid == 0)
                mbar_arrive_expect_tx(full, RAW_BYTES); // bytes and scales
            __syncwarp();
            if (tma_lane) {
                const int64_t pos = kb + lane * tma_rows;
                const int row = (int)(((int64_t)pg * p.hkv + kvh) * p.b + (pos & (p.b - 1)));
                tma_load_2d(dst + lane * tma_rows * HD, is_v ? tmv : tmk, 0, row, full);
                bulk_load(dsc + lane * tma_rows * 4, scl + row, tma_rows * 4, full);
            }
            if (tid != 0)
                mbar_arrive(full);
        } else { // the last tile, or no TMA
            const int c = tid % CPR, key0 = tid / CPR;
#pragma unroll 4
            for (int i = 0; i < HBN / KPP; i++) {
                const int key = key0 + KPP * i;
                const int64_t pos = kb + key;
                const bool ok = pos < kend;
                const int32_t page = __shfl_sync(0xffffffffu, pg, KW * i + lane / CPR);
                const size_t off = pool_row(p, page, kvh, pos) * HD + c * 16;
                cp_async16(dst + (decltype(swizzled)::value ? sw128(key, c, HBN) : key * HD + c * 16),
                           ok ? pool + off : pool, ok ? 16 : 0);
            }
            if (kl_ok) {
                const int64_t pos = kb + kl;
                const bool ok = pos < kend;
                const size_t off = ((size_t)pg * p.hkv + kvh) * p.b + (size_t)(pos & (p.b - 1));
                cp_async4(dsc + kl * 4, ok ? scl + off : scl, ok ? 4 : 0);
            }
            cp_async_arrive(full);
        }
    };
    // tile kt of K or V into raw unit `slot`, completing on its barrier
    auto issue = [&](int kt, bool is_v, int slot, int32_t pg) {
        const uint32_t dst = sR0 + slot * RAW_BYTES;
        copy_tile(kt, is_v, dst, dst + HBN * HD, rfull + 8 * slot, pg, std::false_type{});
    };
    // raw unit at src -> f16 slot at dst (swizzled as wgmma reads it), each
    // value the e4m3 byte's own (cvt.rn.f16x2.e4m3x2: exact, one instruction
    // per two values; the scales stay fp32 and are applied by the consumers,
    // K's on S, V's on P), and the slot's scales at dsc: a key's scale, or 0
    // where it is not finite, whose row is written as NaN instead (a
    // non-finite token reads back as NaN, kv_fp8.h; NaN in the slot is what
    // the consumers' non-finite handling sees, scrub_v).  Pass i of a
    // thread: row 16 (i / HALVES) + rb, raw chunk 8 (i % HALVES) + cj, i.e.
    // f16 chunks 2 ch and 2 ch + 1; rb & 7 is the same in every pass, so the
    // swizzled offsets are this thread's (w0, w1) plus a pass's step
    constexpr int HALVES = CPR / 8; // a warp's pass covers 8 chunks of 4 rows
    constexpr int PASSES = HBN * CPR / 128;
    constexpr int CONV_PASSES = 4; // passes whose loads are issued together
    const int cj = lane & 7;
    const int rb = 4 * warp + ((((lane >> 2) ^ (lane >> 3)) & 1) | ((lane >> 4) << 1));
    const uint32_t r_off = rb * HD + cj * 16, s_off = HBN * HD + rb * 4;
    const uint32_t w0 = sw128(rb, 2 * cj, HBN), w1 = sw128(rb, 2 * cj + 1, HBN);
    auto convert = [&](uint32_t src, uint32_t dst, uint32_t dsc) {
        // CONV_PASSES passes an iteration, all their loads first: ptxas does
        // not move a shared load above a shared store it cannot tell apart,
        // and a lone producer warp per scheduler has nothing else to hide the
        // latency.  4 (was 2): the ablation of 2026-12-07 put 4 of fp8
        // rectification's 14.4 ms at 8 x 256K in this conversion
        // (docs/performance.md); eight passes a group spill under the
        // producer's 56 registers
        static_assert(PASSES % CONV_PASSES == 0, "passes in groups");
#pragma unroll 1
        for (int i = 0; i < PASSES; i += CONV_PASSES) {
            uint4 r[CONV_PASSES];
            float sc[CONV_PASSES];
#pragma unroll
            for (int h = 0; h < CONV_PASSES; h++) {
                const int ii = i + h;
                asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
                             : "=r"(r[h].x), "=r"(r[h].y), "=r"(r[h].z), "=r"(r[h].w)
                             : "r"(src + r_off + (ii / HALVES) * 16 * HD + (ii % HALVES) * 128)
                             : "memory");
                asm volatile("ld.shared.f32 %0, [%1];\n"
                             : "=f"(sc[h])
                             : "r"(src + s_off + (ii / HALVES) * 64)
                             : "memory");
            }
            // a whole token's row is NaN where its scale is not finite (rare):
            // checked once for the group by the warp, so that the usual pass
            // has no per-value select (8 predicated moves a pass in v17's SASS)
            bool finite[CONV_PASSES], all_finite = true;
#pragma unroll
            for (int h = 0; h < CONV_PASSES; h++) {
                finite[h] = fabsf(sc[h]) <= FLT_MAX;
                all_finite = all_finite && finite[h];
            }
            auto passes = [&](auto checked) {
#pragma unroll
                for (int h = 0; h < CONV_PASSES; h++) {
                    const int ii = i + h;
                    uint4 lo = fp8x8_to_half(make_uint2(r[h].x, r[h].y));
                    uint4 hi = fp8x8_to_half(make_uint2(r[h].z, r[h].w));
                    if constexpr (decltype(checked)::value) {
                        if (!finite[h])
                            lo = hi = make_uint4(0x7e007e00u, 0x7e007e00u, 0x7e007e00u, 0x7e007e00u);
                    }
                    const uint32_t at = dst + (ii / HALVES) * 16 * 128 + (ii % HALVES) * 2 * HBN * 128;
                    asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"r"(at + w0),
                                 "r"(lo.x), "r"(lo.y), "r"(lo.z), "r"(lo.w)
                                 : "memory");
                    asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"r"(at + w1),
                                 "r"(hi.x), "r"(hi.y), "r"(hi.z), "r"(hi.w)
                                 : "memory");
                    if (cj == 0 && ii % HALVES == 0)
                        asm volatile("st.shared.f32 [%0], %1;\n" ::"r"(dsc + (rb + 16 * (ii / HALVES)) * 4),
                                     "f"(finite[h] ? sc[h] : 0.f)
                                     : "memory");
                }
            };
            if (__all_sync(0xffffffffu, all_finite))
                passes(std::false_type{});
            else
                passes(std::true_type{});
        }
    };

    if constexpr (KF8) {
        // K tiles go from the cache straight into the K slots, as the bytes
        // are (the consumers' QK^T runs on fp8 MMAs); V tiles through the raw
        // units and the conversion, as above.  Order K_b, then K_{t+1}, V_t:
        // a K slot frees a tile before a V slot does.
        static_assert(HD == 128 && KS == 2 && VS == 2, "KF8: d 128, slot = tile & 1");
        constexpr uint32_t K8_BYTES = HBN * HD; // one K slot, [HBN][128] e4m3 bytes
        // K tile kt into K slot `slot` (128-byte swizzle, as wgmma reads it:
        // TMA boxes of tma_rows keys through the swizzled map, or cp.async
        // with zero fill past kend) with its scales, completing on kfull[slot]
        auto issue_k = [&](int kt, int slot, int32_t pg) {
            copy_tile(kt, false, sK0 + slot * K8_BYTES, sKS0 + slot * HBN * 4, kfull + 8 * slot, pg,
                      std::true_type{});
        };
        const int nt = kt_end - kt_begin;
        issue_k(kt_begin, 0, page_of(kt_begin)); // first: S_b waits for it; slot 0 is free
        for (int i = 0; i < RU && i < nt; i++)
            issue(kt_begin + i, true, i, page_of(kt_begin + i));
        int32_t pgk = nt > 1 ? page_of(kt_begin + 1) : 0;
        for (int t = 0; t < nt; t++) {
            if (t + 1 < nt) { // K_{t+1} where K_{t-1} was (free once S_{t-1} is done)
                const int ks = (t + 1) & 1;
                mbar_wait(kempty + 8 * ks, (((t + 1) >> 1) & 1) ^ 1);
                issue_k(kt_begin + t + 1, ks, pgk);
                pgk = t + 2 < nt ? page_of(kt_begin + t + 2) : 0;
            }
            const int nu = t + RU;
            const int32_t pgn = nu < nt ? page_of(kt_begin + nu) : 0;
            const int slot = t & 1;
            mbar_wait(vempty + 8 * slot, ((t >> 1) & 1) ^ 1);
            const int rs = t % RU;
            mbar_wait(rfull + 8 * rs, (t / RU) & 1);
            convert(sR0 + rs * RAW_BYTES, sV0 + slot * KV_BYTES, sVS0 + slot * HBN * 4);
            asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
            mbar_arrive(vfull + 8 * slot);
            if (nu < nt) {
                asm volatile("bar.sync 2, 128;\n" ::: "memory"); // all 128 have read raw unit rs
                issue(kt_begin + nu, true, rs, pgn);
            }
        }
        asm volatile("cp.async.wait_all;\n" ::: "memory");
    } else {
        for (int u = 0; u < RU && u < n_units; u++)
            issue(tile_of(u), is_v_of(u), u, page_of(tile_of(u)));
        // slots and phases from the unit (fewer live registers than counters):
        // tile t of the split is the (t - kt_begin)-th of its ring
        static_assert(KS == 2 && VS == 2, "slot = tile & 1");
        for (int u = 0; u < n_units; u++) {
            // the entry for the refill of this raw unit, looked up before the
            // conversion hides its latency
            const int nu = u + RU;
            const int32_t pgn = nu < n_units ? page_of(tile_of(nu)) : 0;
            const int t = tile_of(u) - kt_begin, slot = t & 1;
            const uint32_t ph = (t >> 1) & 1;
            const bool is_v = is_v_of(u);
            const uint32_t empty = (is_v ? vempty : kempty) + 8 * slot;
            const uint32_t full = (is_v ? vfull : kfull) + 8 * slot;
            const uint32_t dst = (is_v ? sV0 : sK0) + slot * KV_BYTES;
            mbar_wait(empty, ph ^ 1); // the first round passes at once
            const int rs = u % RU;
            mbar_wait(rfull + 8 * rs, (u / RU) & 1);
            convert(sR0 + rs * RAW_BYTES, dst, (is_v ? sVS0 : sKS0) + slot * HBN * 4);
            // our generic-proxy stores, before wgmma (the async proxy) reads the slot
            asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
            mbar_arrive(full);
            if (nu < n_units) {
                asm volatile("bar.sync 2, 128;\n" ::: "memory"); // all 128 have read raw unit rs
                issue(tile_of(nu), is_v_of(nu), rs, pgn);
            }
        }
        asm volatile("cp.async.wait_all;\n" ::: "memory");
    }
}

#endif // RESA_SM90A_CODE

// tma_rows: rows of one TMA box (min(b, HBN)), 0 = every tile by cp.async;
// tmk / tmv: the layer's K and V pools as [rows][HD] tensors (unused at 0).
// F8: the fp8 cache, K and V e4m3 bytes (p.k, p.v, the tensors) with the
// scales p.kscale, p.vscale; the producer converts them (produce_fp8).
// KF8 (F8 at d 128 only): QK^T on fp8 MMAs, K unconverted (produce_fp8,
// convert_q8).
template <typename T, int HD, bool F8, bool KF8 = false>
__global__ void __launch_bounds__(HTHREADS, 1)
dense_wgmma_kernel(const dense_params p, const int tma_rows, const __grid_constant__ CUtensorMap tmk,
                   const __grid_constant__ CUtensorMap tmv)
{
#if RESA_SM90A_CODE
    constexpr int HBN = wg_cfg<HD, F8>::BN, KS = wg_cfg<HD, F8>::KSTAGES, VS = wg_cfg<HD, F8>::VSTAGES;
    constexpr int RU = wg_cfg<HD, F8>::RAW; // F8: raw units; 0 otherwise
    constexpr bool SPLIT = wg_cfg<HD, F8>::SPLIT;
    constexpr uint32_t Q_BYTES = q_bytes<HD>(), KV_BYTES = kv_bytes<HD>();
    static_assert(!KF8 || (F8 && HD == 128), "KF8: the fp8 cache at d 128");
    // KF8: Q's e4m3 parts (the 16-bit Q lands there first), K slots of bytes
    constexpr uint32_t QS_BYTES = KF8 ? kf8_parts<T>() * BM * 128 : Q_BYTES;
    constexpr uint32_t KSLOT_BYTES = KF8 ? HBN * HD : KV_BYTES;
    extern __shared__ unsigned char smem_raw[];
    __shared__ tile_ref tref;
    // K ring: full[KS], empty[KS]; V ring: full[VS], empty[VS]; Q; F8: raw full[RU]
    __shared__ __align__(8) uint64_t bars[2 * (KS + VS) + 1 + RU];
    __shared__ int first_bad_v[4]; // scrub_v: per diagonal tile (kt % 4), the first key with non-finite V
    // F8 with bf16 queries: row r of Q is stored in f16 times 2^-q_exp[r]
    __shared__ signed char q_exp[F8 ? BM : 1];

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
    const uint32_t sK0 = sQ + QS_BYTES;         // K slot s at sK0 + s KSLOT_BYTES
    const uint32_t sV0 = sK0 + KS * KSLOT_BYTES; // V slot s at sV0 + s KV_BYTES
    // F8: raw units, then the K slots' scales ([HBN] fp32 each), the V slots'
    const uint32_t sR0 = sV0 + VS * KV_BYTES;
    const uint32_t sKS0 = sR0 + RU * raw_bytes<HD>(), sVS0 = sKS0 + KS * HBN * 4;
    // Shared ring (!SPLIT): V slot s is filled, completes and is freed with
    // K slot s, on K's barriers.
    const uint32_t kfull = smem_u32(&bars[0]), kempty = kfull + 8 * KS;
    const uint32_t vfull = SPLIT ? kempty + 8 * KS : kfull;
    const uint32_t vempty = SPLIT ? vfull + 8 * VS : kempty;
    const uint32_t bar_q = kempty + 8 * KS + 16 * VS;
    if (threadIdx.x == 0) {
        for (int s = 0; s < KS; s++) {
            mbar_init(kfull + 8 * s, 128);
            mbar_init(kempty + 8 * s, (KF8 ? 128 : 4) * n_cwg); // KF8: per thread, as F8's V
        }
        for (int s = 0; SPLIT && s < VS; s++) {
            mbar_init(vfull + 8 * s, 128);
            // F8: every consumer thread releases a V slot (its scales, below)
            mbar_init(vempty + 8 * s, (F8 ? 128 : 4) * n_cwg);
        }
        mbar_init(bar_q, 128);
        for (int s = 0; s < RU; s++)
            mbar_init(bar_q + 8 + 8 * s, 128);
        for (int i = 0; i < 4; i++)
            first_bad_v[i] = INT_MAX;
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();

    if (threadIdx.x < 128) {
        // ================= producer =================
        asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(KF8 ? PRODUCER_REGS_KF8 : F8 ? PRODUCER_REGS_F8 : PRODUCER_REGS));
        const int tid = (int)threadIdx.x; // < 128 here
        constexpr int CPK = HD / 8;  // 16-byte chunks per row
        constexpr int KPP = 128 / CPK; // keys per pass of the cp.async loop
        constexpr int KW = 32 / CPK;   // keys per warp and pass
        constexpr int QB = HD / 64;    // 64-column blocks per row (TMA boxes per page)
        // Q: row r -> token (r0 + r) / g, head kvh * g + (r0 + r) % g; rows past
        // `valid` are zero
        const T *q = static_cast<const T *>(p.q);
#pragma unroll 4
        for (int i = 0; i < BM * CPK / 128; i++) {
            const unsigned idx = tid + 128 * i; // unsigned: / and % by CPK are shifts
            const int r = (int)(idx / CPK), c = (int)(idx % CPK);
            const int rr = r0 + r;
            const bool ok = r < valid;
            const int t = ok ? rr / g : 0, j = ok ? rr % g : 0;
            const T *src = q + ((size_t)(e.row + t) * p.hq + (size_t)kvh * g + j) * HD + c * 8;
            cp_async16(sQ + sw128(r, c, BM), ok ? (const void *)src : p.q, ok ? 16 : 0);
        }
        cp_async_arrive(bar_q);
        if constexpr (F8) { // raw tiles, converted into the slots
            produce_fp8<T, HD, KF8>(p, w, kvh, tma_rows, &tmk, &tmv, sK0, sV0, sR0, sKS0, sVS0, kfull,
                               vfull, bar_q + 8);
            return;
        }
        // K/V: thread -> chunk tid % CPK of keys tid / CPK + KPP i; keys past
        // kend are zero-filled (their pages may not exist)
        const int c = (int)(threadIdx.x % CPK), key0 = (int)(threadIdx.x / CPK), lane = tid & 31;
        const int32_t *ptab = p.page_tables + (size_t)e.slot * p.max_seq_blocks;
        const T *kpool = static_cast<const T *>(p.k);
        const T *vpool = static_cast<const T *>(p.v);
        const int64_t kend = sp.kend;
        // Page-table entries, one load per lane and tile (page_of), issued
        // ahead so that their latency hides; cp.async tiles: for key kl of
        // the tile (a warp's keys are KW warp + {0 .. KW-1} + KPP i; lane l
        // holds pass l / KW's, and key0 + KPP i is lane KW i + lane / CPK's),
        // which the copies take by shuffle.  (A dependent __ldg per key put
        // 16 load latencies a tile on the path from a free stage to a full
        // one.)
        const int kl = KW * (tid >> 5) + lane % KW + KPP * (lane / KW);
        const bool kl_ok = HBN / KPP >= 32 / KW || lane / KW < HBN / KPP; // d 256: lanes < 16
        const int n_boxes = tma_rows > 0 ? QB * (HBN / tma_rows) : 0;
        auto by_tma = [&](int kt) { return n_boxes > 0 && (int64_t)(kt + 1) * HBN <= kend; };
        // TMA tiles: lane l < QB (HBN / tma_rows) copies column block l % QB
        // of box l / QB (tma_rows keys of one page) and holds that box's page
        // (d 128, b 8: all 32 lanes; d 256, b 16: 16).
        const bool tma_lane = tid < n_boxes;
        auto page_of = [&](int kt) -> int32_t {
            if (kt >= kt_end)
                return 0;
            if (by_tma(kt)) {
                const int64_t pos = (int64_t)kt * HBN + (lane / QB) * tma_rows;
                return tma_lane ? __ldg(ptab + (pos >> p.log2_b)) : 0;
            }
            const int64_t pos = (int64_t)kt * HBN + kl;
            return (kl_ok && pos < kend) ? __ldg(ptab + (pos >> p.log2_b)) : 0;
        };
        // K and/or V of tile kt into the slots at dK / dV, completing on
        // `full`; pg: this lane's page-table entry of the tile (page_of).
        // Split rings copy one tensor a call, a shared ring both in one pass
        // (the cp.async loop then shares each key's address and page).
        auto load = [&](int kt, bool do_k, bool do_v, uint32_t dK, uint32_t dV, uint32_t full,
                        int32_t pg) {
            const int64_t kb = (int64_t)kt * HBN;
            if (by_tma(kt)) { // a full tile
                if (tid == 0)
                    mbar_arrive_expect_tx(full, (do_k + do_v) * KV_BYTES);
                __syncwarp();
                if (tma_lane) {
                    const int box = lane / QB, cb = lane % QB;
                    const int64_t pos = kb + box * tma_rows;
                    const int row = (int)(((int64_t)pg * p.hkv + kvh) * p.b + (pos & (p.b - 1)));
                    const uint32_t so = cb * (HBN * 128) + box * tma_rows * 128;
                    if (do_k)
                        tma_load_2d(dK + so, &tmk, cb * 64, row, full);
                    if (do_v)
                        tma_load_2d(dV + so, &tmv, cb * 64, row, full);
                }
                if (tid != 0)
                    mbar_arrive(full);
            } else { // the last tile, or no TMA: cp.async with zero fill past kend
#pragma unroll 4
                for (int i = 0; i < HBN / KPP; i++) {
                    const int key = key0 + KPP * i;
                    const int64_t pos = kb + key;
                    const bool ok = pos < kend;
                    const int32_t page = __shfl_sync(0xffffffffu, pg, KW * i + lane / CPK);
                    const size_t off = pool_row(p, page, kvh, pos) * HD + c * 8;
                    const uint32_t so = sw128(key, c, HBN);
                    if (do_k)
                        cp_async16(dK + so, ok ? kpool + off : kpool, ok ? 16 : 0);
                    if (do_v)
                        cp_async16(dV + so, ok ? vpool + off : vpool, ok ? 16 : 0);
                }
                cp_async_arrive(full);
            }
        };
        // Page-table entries run two tiles ahead of their K copy: with K
        // slots freed early its "empty" wait rarely blocks, so an entry looked
        // up just before its copy would put a load latency on every tile.
        int32_t pg = page_of(kt_begin);      // tile j: V_j
        int32_t pg1 = page_of(kt_begin + 1); // tile j + 1: K_{j+1}
        int32_t pg2 = page_of(kt_begin + 2); // tile j + 2
        int ks = 0, vs = 0;
        uint32_t kph = 0, vph = 0;
        // Split rings: order K_{j+1}, V_j (a K slot is free once S of its
        // tile is done, a V slot only once P V of its tile is, so K runs a
        // tile ahead).  Shared ring: K_j and V_j into one stage.
        auto load_k = [&](int kt, int32_t tpg) {
            mbar_wait(kempty + 8 * ks, kph ^ 1); // the first round passes at once
            load(kt, true, !SPLIT, sK0 + ks * KV_BYTES, sV0 + ks * KV_BYTES, kfull + 8 * ks, tpg);
            if (++ks == KS) {
                ks = 0;
                kph ^= 1;
            }
        };
        if constexpr (SPLIT)
            load_k(kt_begin, pg);
        for (int kt = kt_begin; kt < kt_end; kt++) {
            if constexpr (SPLIT) {
                if (kt + 1 < kt_end)
                    load_k(kt + 1, pg1);
                mbar_wait(vempty + 8 * vs, vph ^ 1);
                load(kt, false, true, 0, sV0 + vs * KV_BYTES, vfull + 8 * vs, pg);
                if (++vs == VS) {
                    vs = 0;
                    vph ^= 1;
                }
            } else {
                load_k(kt, pg); // K and V of tile kt
            }
            pg = pg1;
            pg1 = pg2;
            pg2 = page_of(kt + 3);
        }
        asm volatile("cp.async.wait_all;\n" ::: "memory");
        return;
    }

    // ================= consumers =================
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(KF8 ? CONSUMER_REGS_KF8 : F8 ? CONSUMER_REGS_F8 : CONSUMER_REGS));
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

    // F8: the MMAs take f16 operands (the slots hold the e4m3 values exactly,
    // Q is converted below), the scales are applied in fp32
    using MT = std::conditional_t<F8, __half, T>;
    float o[HD / 2], s[HBN / 2]; // accumulators: HD/8 and HBN/8 n-tiles of 4
    uint32_t pa[HBN / 4];       // P as A fragments, 4 per 16 keys
#pragma unroll
    for (int i = 0; i < HD / 2; i++)
        o[i] = 0.f;
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f, c0, c1;
    const float sl2 = p.scale_log2;
    float sl2_0 = sl2, sl2_1 = sl2; // F8: times each row's 2^q_exp
    const uint32_t sQw = sQ + cwg * 64 * 128; // this warpgroup's 64 rows of Q

    // S = Q K^T: HD / 16 k-steps of 16 dimensions = 32 bytes inside a
    // 128-byte row (the swizzle is applied to the final address), each 64
    // dimensions in the next column block; 8-row groups 1024 bytes apart
    auto qk = [&](int slot) {
        const uint32_t sK = sK0 + slot * KSLOT_BYTES;
        if constexpr (KF8) { // each e4m3 part of Q, 4 k-steps of 32 bytes of a 128-byte row
#pragma unroll
            for (int pt = 0; pt < kf8_parts<T>(); pt++)
#pragma unroll
                for (int kk = 0; kk < 4; kk++)
                    wgmma_ss_e4m3(s, gmma_desc(sQw + pt * (BM * 128) + kk * 32, 16, 1024),
                                  gmma_desc(sK + kk * 32, 16, 1024), pt > 0 || kk > 0);
        } else {
#pragma unroll
            for (int kk = 0; kk < HD / 16; kk++) {
                const uint32_t dq = (kk >> 2) * (BM * 128) + (kk & 3) * 32;
                const uint32_t dk = (kk >> 2) * (HBN * 128) + (kk & 3) * 32;
                wgmma_ss<MT, HBN>(s, gmma_desc(sQw + dq, 16, 1024), gmma_desc(sK + dk, 16, 1024),
                                 kk > 0);
            }
        }
    };
    // O += P V: HBN / 16 k-steps of 16 keys = 2048 bytes; V is N-major:
    // 64-dimension column blocks HBN * 128 bytes apart (leading offset), 8-key
    // groups 1024 apart
    auto pv = [&](int slot) {
        const uint32_t sV = sV0 + slot * KV_BYTES;
#pragma unroll
        for (int kk = 0; kk < HBN / 16; kk++)
            wgmma_rs<MT, HD>(o, pa + 4 * kk, gmma_desc(sV + kk * 2048, HBN * 128, 1024));
    };
    // Non-finite V on the causal diagonal (attention_dense.cuh): wgmma would
    // add 0 * NaN for a key a row masks, and the V slot is shared by rows of
    // different positions (and by both consumer warpgroups).  So on a tile
    // that holds keys past the CTA's first row (CTA-uniform, at most 3 tiles
    // of a CTA, the last ones of its last split), before its P V is issued,
    // the consumers of both warpgroups read the V rows of exactly those keys
    // in shared memory, zero every non-finite value in place, and agree on
    // the first key that had one, with one named barrier (id 1; the only
    // point where the two warpgroups meet).  A row attends a prefix of the
    // keys, so it is poisoned (l = NaN) iff its position reaches that key.
    // Keys every row attends are left alone: NaN and inf propagate through
    // wgmma as usual.  Cost when clean: a few KB of shared memory reads per
    // diagonal tile and the barrier, with no wgmma in flight (scrubbing while
    // S was in flight made ptxas serialize every wgmma, C7520); no global
    // memory pass, no access to the accumulators; resource report unchanged
    // (0 spills, same HGMMA / warpgroup arrive counts in the SASS).
    // The CTA's bounds, computed here again from memory rather than kept from
    // the prologue: a value live across the producer / consumer split must fit
    // the producer's 40 registers too, and these made ptxas spill the loop
    // bounds there.
    int diag_from, kend, n_ct;
    {
        const volatile tile_ref *tr = &tref;
        const resa_dev_entry &ee = p.entries[tr->entry];
        const int e_start = (int)*(volatile const int64_t *)&ee.start;
        const int rows = *(volatile const int32_t *)&ee.n * p.g, t0 = tr->tile * BM;
        diag_from = e_start + t0 / p.g + 1; // keys from here on are masked for some row
        kend = e_start + (min(rows, t0 + BM) - 1) / p.g + 1;
        n_ct = rows - t0 > 64 ? 256 : 128;
    }
    auto on_diagonal = [&](int kt) { return (kt + 1) * HBN > diag_from; };
    auto scrub_v = [&](int slot, int kt) {
        constexpr int WPR = HD / 2; // 32-bit words per V row
        const int kbase = kt * HBN;
        const int k_lo = max(kbase, diag_from), k_hi = min(kbase + HBN, kend);
        const uint32_t sV = sV0 + slot * KV_BYTES;
        int first = INT_MAX;
#pragma unroll 1
        for (int i = (int)threadIdx.x - 128; i < (k_hi - k_lo) * WPR; i += n_ct) {
            const int key = k_lo - kbase + i / WPR, wd = i % WPR;
            // word wd of the row: 16-byte chunk wd / 4, word wd % 4 in it
            const uint32_t at = sV + sw128(key, wd >> 2, HBN) + 4 * (wd & 3);
            uint32_t x;
            asm volatile("ld.shared.u32 %0, [%1];\n" : "=r"(x) : "r"(at) : "memory");
            const uint32_t m = nonfinite_halves<MT>(x);
            if (m) {
                asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(at), "r"(x & ~m) : "memory");
                first = min(first, kbase + key);
            }
        }
        if (first != INT_MAX)
            atomicMin(&first_bad_v[kt & 3], first);
        // our stores, before wgmma (the async proxy) reads the slot
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
        asm volatile("bar.sync 1, %0;\n" ::"r"(n_ct) : "memory");
        const int fb = *(volatile int *)&first_bad_v[kt & 3];
        if (pos0 >= fb)
            l0 = __int_as_float(0x7fffffff);
        if (pos1 >= fb)
            l1 = __int_as_float(0x7fffffff);
    };
    auto softmax = [&](int kt) {
        const int kbase = kt * HBN;
        if (kbase + HBN - 1 > wpos_min) // only tiles reaching past the warp's earliest row
            causal_mask<HBN / 8>(s, kbase, lane, pos0, pos1);
        softmax_step_rows<HBN / 8>(s, sl2_0, sl2_1, m0, m1, l0, l1, c0, c1);
    };
    auto pack = [&] {
#pragma unroll
        for (int kk = 0; kk < HBN / 16; kk++)
            pack_p<T>(s, kk, pa + 4 * kk);
    };
    // ---- F8: the scales, in fp32 ----
    // Q (bf16 queries): this warpgroup's 64 rows in place to f16, row r times
    // 2^-q_exp[r] so that its largest |q| lies in [2^14, 2^15) (bf16 -> f16
    // is then exact down to 2^-29 of it); 0 for a zero or non-finite row
    // (NaN and inf stay what they are).  Two threads a row, once a CTA.
    auto convert_q = [&] {
        constexpr int CPK = HD / 8, HALF = CPK / 2; // 16-byte chunks a row, a thread
        const int t = (int)threadIdx.x - 128 - 128 * cwg;
        const int r = 64 * cwg + (t >> 1), c0q = (t & 1) * HALF;
        float amax = 0.f;
#pragma unroll 4
        for (int c = c0q; c < c0q + HALF; c++) {
            uint4 x;
            asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
                         : "=r"(x.x), "=r"(x.y), "=r"(x.z), "=r"(x.w)
                         : "r"(sQ + sw128(r, c, BM))
                         : "memory");
            amax = amax_word<T>(amax_word<T>(amax, x.x), x.y);
            amax = amax_word<T>(amax_word<T>(amax, x.z), x.w);
        }
        const int e = q_row_exp(amax, 14);
        const float f = __int_as_float((127 - e) << 23); // 2^-e
#pragma unroll 4
        for (int c = c0q; c < c0q + HALF; c++) {
            uint4 x;
            const uint32_t at = sQ + sw128(r, c, BM);
            asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
                         : "=r"(x.x), "=r"(x.y), "=r"(x.z), "=r"(x.w)
                         : "r"(at)
                         : "memory");
            uint32_t wv[4] = {x.x, x.y, x.z, x.w};
#pragma unroll
            for (int j = 0; j < 4; j++) {
                const float2 v = unpack2<T>(wv[j]);
                wv[j] = pack2<__half>(v.x * f, v.y * f);
            }
            asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"r"(at), "r"(wv[0]),
                         "r"(wv[1]), "r"(wv[2]), "r"(wv[3])
                         : "memory");
        }
        if ((t & 1) == 0)
            q_exp[r] = (signed char)e;
        // our stores, before wgmma (the async proxy) reads Q; the warpgroup
        // reads the exponents of its rows
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
        if (cwg == 0) // named barriers 3 and 4 (immediates: a register id reserves all 16)
            asm volatile("bar.sync 3, 128;\n" ::: "memory");
        else
            asm volatile("bar.sync 4, 128;\n" ::: "memory");
        sl2_0 = sl2 * __int_as_float((127 + q_exp[lr0]) << 23);
        sl2_1 = sl2 * __int_as_float((127 + q_exp[lr1]) << 23);
    };
    // KF8: this warpgroup's 64 rows of Q (16-bit, as the producer loaded
    // them) into kf8_parts<T>() e4m3 parts under one power of two a row,
    // 2^-q_exp[r], so that its largest |q| lies in [2^7, 2^8) (e4m3's largest
    // is 448): part 0 the e4m3 rounding of q 2^-q_exp, each next part that of
    // what the parts before leave (exact in fp32).  Two parts hold a bf16
    // value's 8 significant bits, three an f16's 11, except below e4m3's
    // smallest subnormal (2^-9, i.e. 2^-16 of the row's largest), where the
    // rest is dropped.  A non-finite q is NaN in every part (satfinite would
    // make an infinity 448).  Part pt is [BM][128] bytes at sQ + pt BM 128,
    // swizzled: parts 0 and 1 overwrite the 16-bit Q's column blocks, row r of
    // each only in the 256 bytes that the row's two threads have read (the
    // __syncwarp between).  bench/quality/fp8_qsplit_numerics.py gives the
    // error this costs against float64: the MMA's accumulation, not the split.
    auto convert_q8 = [&] {
        constexpr int NP = kf8_parts<T>();
        const int t = (int)threadIdx.x - 128 - 128 * cwg;
        const int r = 64 * cwg + (t >> 1), hh = t & 1; // row, half: dimensions 64 hh ..
        uint32_t wv[32];
#pragma unroll
        for (int c = 0; c < 8; c++)
            asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
                         : "=r"(wv[4 * c]), "=r"(wv[4 * c + 1]), "=r"(wv[4 * c + 2]),
                           "=r"(wv[4 * c + 3])
                         : "r"(sQ + sw128(r, 8 * hh + c, BM))
                         : "memory");
        float amax = 0.f;
#pragma unroll
        for (int j = 0; j < 32; j++)
            amax = amax_word<T>(amax, wv[j]);
        const int e = q_row_exp(amax, 7);
        const float f = __int_as_float((127 - e) << 23); // 2^-e
        __syncwarp(); // the row's partner has read what this thread overwrites
#pragma unroll
        for (int c = 0; c < 4; c++) { // 16 values: chunk 4 hh + c of each part's row
            uint32_t out[NP][4];
#pragma unroll
            for (int k = 0; k < 4; k++) {
                const float2 a = unpack2<T>(wv[8 * c + 2 * k]), b = unpack2<T>(wv[8 * c + 2 * k + 1]);
                float x[4] = {a.x * f, a.y * f, b.x * f, b.y * f};
#pragma unroll
                for (int i = 0; i < 4; i++)
                    if (!(fabsf(x[i]) <= FLT_MAX))
                        x[i] = __int_as_float(0x7fffffff);
#pragma unroll
                for (int pt = 0; pt < NP; pt++) {
                    const __nv_fp8x2_storage_t lo =
                        __nv_cvt_float2_to_fp8x2(make_float2(x[0], x[1]), __NV_SATFINITE, __NV_E4M3);
                    const __nv_fp8x2_storage_t hi =
                        __nv_cvt_float2_to_fp8x2(make_float2(x[2], x[3]), __NV_SATFINITE, __NV_E4M3);
                    out[pt][k] = (uint32_t)lo | (uint32_t)hi << 16;
                    if (pt + 1 < NP) { // the remainders, exact
                        const float2 l2 = __half22float2(__half2(__nv_cvt_fp8x2_to_halfraw2(lo, __NV_E4M3)));
                        const float2 h2 = __half22float2(__half2(__nv_cvt_fp8x2_to_halfraw2(hi, __NV_E4M3)));
                        x[0] -= l2.x;
                        x[1] -= l2.y;
                        x[2] -= h2.x;
                        x[3] -= h2.y;
                    }
                }
            }
#pragma unroll
            for (int pt = 0; pt < NP; pt++)
                asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"r"(
                                 sQ + pt * (BM * 128) + sw128(r, 4 * hh + c, BM)),
                             "r"(out[pt][0]), "r"(out[pt][1]), "r"(out[pt][2]), "r"(out[pt][3])
                             : "memory");
        }
        if (hh == 0)
            q_exp[r] = (signed char)e;
        // our stores, before wgmma (the async proxy) reads the parts; the
        // warpgroup reads the exponents of its rows
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
        if (cwg == 0)
            asm volatile("bar.sync 3, 128;\n" ::: "memory");
        else
            asm volatile("bar.sync 4, 128;\n" ::: "memory");
        sl2_0 = sl2 * __int_as_float((127 + q_exp[lr0]) << 23);
        sl2_1 = sl2 * __int_as_float((127 + q_exp[lr1]) << 23);
    };
    // S (this thread's keys 8 i + 2 (lane & 3) + 0..1) times K's scales, in
    // K slot `slot`'s array, before the causal mask
    auto scale_cols = [&](int slot) {
        const uint32_t sc = sKS0 + slot * HBN * 4 + 8 * (lane & 3);
#pragma unroll
        for (int i = 0; i < HBN / 8; i++) {
            const float2 k = lds_f32x2(sc + 32 * i);
            s[4 * i + 0] *= k.x;
            s[4 * i + 1] *= k.y;
            s[4 * i + 2] *= k.x;
            s[4 * i + 3] *= k.y;
        }
    };
    // P (s) of the tile in V slot `slot` into A fragments as P v_scale / cv,
    // cv = 2^ec, ec = the exponent of the tile's largest V scale - 14 (so that
    // P v_scale / cv < 2^15, within f16), kept within 2^64 below the largest
    // so far (ec_hi; O stays far from fp32's range) and >= -126.  O holds the
    // sum in units of the last tile's cv (ec_prev): it is rescaled by the
    // ratio with the softmax factors c0, c1 of this tile.  The store
    // multiplies O by 2^ec_prev once.
    int ec_prev = INT_MIN, ec_hi = -126;
    auto pack_f8 = [&](int slot) {
        const uint32_t sc = sVS0 + slot * HBN * 4 + 8 * (lane & 3);
        float mx = 0.f; // the quad's lanes hold every key of the tile
#pragma unroll
        for (int i = 0; i < HBN / 8; i++) {
            const float2 v = lds_f32x2(sc + 32 * i);
            mx = fmaxf(mx, fmaxf(v.x, v.y));
        }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        int ec = mx > 0.f ? ilogbf(mx) - 14 : -126; // scales are finite (produce_fp8)
        ec = max(ec, max(ec_hi - 64, -126));
        ec_hi = max(ec_hi, ec);
        const float r = ec_prev == INT_MIN ? 1.f : ldexpf(1.f, ec_prev - ec);
        ec_prev = ec;
        scale_rows<HD / 8>(o, c0 * r, c1 * r);
        const float inv = __int_as_float((127 - ec) << 23); // 2^-ec, ec in [-126, 113]
#pragma unroll
        for (int i = 0; i < HBN / 8; i++) {
            const float2 v = lds_f32x2(sc + 32 * i);
            const float a = v.x * inv, b = v.y * inv;
            s[4 * i + 0] *= a;
            s[4 * i + 1] *= b;
            s[4 * i + 2] *= a;
            s[4 * i + 3] *= b;
        }
#pragma unroll
        for (int kk = 0; kk < HBN / 16; kk++)
            pack_p<__half>(s, kk, pa + 4 * kk);
    };
    // cp.async writes are generic-proxy stores; wgmma reads through the async
    // proxy.  Fenced here, once a tile with no wgmma of this warpgroup in
    // flight (measured free); fencing in the producer after its copies land
    // instead was 10-21% slower (bench/harness/NOTES.md, v3)
    auto fence_async = [] { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); };

    // Each warp releases a K slot as soon as S of its tile is done and a V
    // slot once P V is (one arrival per warp on the slot's "empty" barrier;
    // a shared ring's stage is released with its V).
    auto release = [&](uint32_t empty) {
        __syncwarp();
        if (lane == 0)
            mbar_arrive(empty);
    };
    mbar_wait(bar_q, 0);
    if constexpr (KF8)
        convert_q8();
    else if constexpr (F8 && !std::is_same<T, __half>::value)
        convert_q();
    int ks = 0, vs = 0; // K slot of tile kt, V slot of tile kt - 1
    uint32_t kph = 0, vph = 0;
    mbar_wait(kfull, 0);
    fence_async();
    wg_fence();
    qk(0);
    wg_commit();
    wg_wait<0>();
    reg_fence<HBN / 2>(s);
    if constexpr (F8)
        scale_cols(0);
    if constexpr (SPLIT)
        KF8 ? mbar_arrive(kempty) : release(kempty);
    softmax(kt_begin); // O is still zero: no rescale
    // F8: P is packed once its tile's V scales are in (pack_f8 after the V
    // wait, next iteration), T: now
    if constexpr (!F8)
        pack();
    for (int kt = kt_begin + 1; kt < kt_end; kt++) {
        if (++ks == KS) {
            ks = 0;
            kph ^= 1;
        }
        mbar_wait(kfull + 8 * ks, kph);
        if constexpr (SPLIT)
            mbar_wait(vfull + 8 * vs, vph); // V of tile kt - 1 (shared ring: waited with K)
        // F8: the fence first.  The slots' scales (producer stores, our
        // loads) are ordered by the full barrier alone, generic proxy on both
        // sides.  compute-sanitizer's racecheck (2025.3.1, H100, 2026-12-07)
        // reported pack_f8's loads of V's scales here as hazards with the
        // producer's stores, with no proxy fence between the wait and the
        // loads (the SASS has them after the wait), and nothing for the same
        // loads after the loop, behind a fence, or K's scales, loaded after
        // this fence (docs/reliability.md).  The fence moved here for that
        // and the reports stayed (same tool and card, later that day): not
        // the reader's proxy, so open, the slot's release (WAR) suspected.
        // Here or after pack_f8 it is the same one fence a tile (F8 needs it
        // nowhere else: the producer fenced its converted slots, scrub_v
        // fences its own stores).
        if constexpr (F8) {
            fence_async();
            pack_f8(vs); // O rescaled, P of tile kt - 1 packed
        }
        if (on_diagonal(kt - 1))
            scrub_v(vs, kt - 1); // no wgmma in flight here (fences its own stores)
        if constexpr (!F8)
            fence_async();
        wg_fence();
        qk(ks);
        wg_commit();
        pv(vs);
        wg_commit();
        wg_wait<1>(); // S of this tile is done; P V of the previous one runs on
        reg_fence<HBN / 2>(s);
        if constexpr (F8)
            scale_cols(ks); // before the slot (and its scales) is released
        if constexpr (SPLIT)
            KF8 ? mbar_arrive(kempty + 8 * ks) : release(kempty + 8 * ks);
        softmax(kt);
        wg_wait<0>();
        reg_fence<HD / 2>(o);
        reg_fence<HBN / 2>(s);
        reg_fence<HBN / 4>(pa);
        // F8: every thread arrives on the V slot's empty barrier itself, not
        // lane 0 after __syncwarp as for K: each thread's own loads of the
        // slot's scales (pack_f8) then precede its own release.  With the
        // per-warp release compute-sanitizer's racecheck (2025.3.1, H100)
        // reported those loads as WAR hazards against the refill's stores of
        // the scales (119,232 in one check_cuda shard with
        // --racecheck-report all), and none with this; fp8 rectification
        // time unchanged (8 x 256K: 14.77 -> 14.67 ms, docs/performance.md)
        if constexpr (F8)
            mbar_arrive(vempty + 8 * vs);
        else
            release(vempty + 8 * vs);
        if (++vs == VS) {
            vs = 0;
            vph ^= 1;
        }
        if constexpr (!F8) {
            scale_rows<HD / 8>(o, c0, c1);
            pack();
        }
    }
    if constexpr (SPLIT) {
        mbar_wait(vfull + 8 * vs, vph);
        fence_async();
    }
    if constexpr (F8)
        pack_f8(vs);
    if (on_diagonal(kt_end - 1))
        scrub_v(vs, kt_end - 1);
    wg_fence();
    pv(vs);
    wg_commit();
    wg_wait<0>();
    reg_fence<HD / 2>(o);
    if constexpr (F8) { // O was in units of 2^ec_prev
        const float cv = __int_as_float((127 + ec_prev) << 23);
        scale_rows<HD / 8>(o, cv, cv);
    }
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
// 16-bit elements, boxes of `rows` x 64 with wgmma's 128-byte swizzle; F8:
// of e4m3 bytes, boxes of `rows` x HD bytes without swizzle (produce_fp8
// converts them; the scales take 1-D copies, which need 16-byte aligned
// pools: a box's first scale is 32-byte aligned within them since b is).
// Returns the box rows, or 0 where TMA does not serve the launch: b < 8 (a
// box must fill whole 1024-byte swizzle atoms), row coordinates past int32,
// RESA_CUDA_NO_TMA=1 (read at every launch, for A/B measurements), or no
// encoder.  Host-only work, no
// allocation: legal during graph capture.
template <int HD, bool F8, bool KF8> int make_tensor_maps(const resa_cuda_layer_args *a, CUtensorMap *tmk, CUtensorMap *tmv)
{
    constexpr int HBN = wg_cfg<HD, F8>::BN;
    const resa_cuda_dims &dm = a->dims;
    const int64_t rows = (int64_t)dm.n_pages * dm.hkv * dm.b;
    const bool wanted = !env_switch("RESA_CUDA_NO_TMA");
    if (dm.b < 8 || rows <= 0 || rows > INT32_MAX || !wanted)
        return 0;
    if (F8 && (((uintptr_t)a->k | (uintptr_t)a->v | (uintptr_t)a->kscale |
                (uintptr_t)a->vscale) & 15) != 0)
        return 0;
    PFN_cuTensorMapEncodeTiled_v12000 encode = tensor_map_encoder();
    if (!encode)
        return 0;
    const int box_rows = dm.b < HBN ? dm.b : HBN;
    const cuuint64_t dims[2] = {(cuuint64_t)HD, (cuuint64_t)rows};
    const cuuint64_t strides[1] = {(cuuint64_t)HD * (F8 ? 1 : 2)};
    const cuuint32_t box[2] = {F8 ? (cuuint32_t)HD : 64, (cuuint32_t)box_rows};
    const cuuint32_t estr[2] = {1, 1};
    void *pools[2] = {a->k, a->v};
    CUtensorMap *maps[2] = {tmk, tmv};
    for (int i = 0; i < 2; i++)
        if (encode(maps[i], F8 ? CU_TENSOR_MAP_DATA_TYPE_UINT8 : CU_TENSOR_MAP_DATA_TYPE_UINT16, 2,
                   pools[i], dims, strides, box, estr, CU_TENSOR_MAP_INTERLEAVE_NONE,
                   F8 && !(KF8 && i == 0) ? CU_TENSOR_MAP_SWIZZLE_NONE : CU_TENSOR_MAP_SWIZZLE_128B,
                   CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                   CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) != CUDA_SUCCESS)
            return 0;
    return box_rows;
}

template <typename T, int HD, bool F8, bool KF8 = false>
cudaError_t launch_sm90(const resa_cuda_layer_args *a)
{
    constexpr size_t smem = KF8 ? smem_bytes_kf8<T>() : smem_bytes<HD, F8>();
    int64_t slots;
    const dense_params p = make_params(a, 1, &slots); // one CTA per SM (shared memory)
    if (slots <= 0)
        return cudaGetLastError();
    cudaError_t err = cudaFuncSetAttribute(dense_wgmma_kernel<T, HD, F8, KF8>,
                                           cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (err != cudaSuccess)
        return err;
    CUtensorMap tmk, tmv;
    memset(&tmk, 0, sizeof tmk);
    memset(&tmv, 0, sizeof tmv);
    const int tma_rows = make_tensor_maps<HD, F8, KF8>(a, &tmk, &tmv);
    dim3 grid((unsigned)slots, (unsigned)p.hkv, (unsigned)p.splits);
    dense_wgmma_kernel<T, HD, F8, KF8><<<grid, HTHREADS, smem, a->stream>>>(p, tma_rows, tmk, tmv);
    return launch_combine<T, HD, wg_cfg<HD>::BN>(p, slots, a);
}

template <typename T, bool F8> cudaError_t launch_sm90_d(const resa_cuda_layer_args *a)
{
    switch (a->dims.d) {
    case 128: // the fp8 cache: QK^T on fp8 MMAs unless RESA_CUDA_NO_KF8=1 (A/B)
        return F8 && !env_switch("RESA_CUDA_NO_KF8") ? launch_sm90<T, 128, true, true>(a)
                                                     : launch_sm90<T, 128, F8>(a);
    case 256: return launch_sm90<T, 256, F8>(a);
    default: return cudaErrorInvalidValue;
    }
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

// T is the IO dtype; the cache holds T (kv_dtype == io_dtype) or e4m3 bytes (kv_fp8).
cudaError_t resa_cuda_dense_sm90(const resa_cuda_layer_args *a)
{
    const int32_t t = a->dims.kv_fp8 ? a->dims.io_dtype : a->dims.kv_dtype;
    if (t == RESA_DTYPE_F16)
        return a->dims.kv_fp8 ? launch_sm90_d<__half, true>(a) : launch_sm90_d<__half, false>(a);
    if (t == RESA_DTYPE_BF16)
        return a->dims.kv_fp8 ? launch_sm90_d<__nv_bfloat16, true>(a)
                              : launch_sm90_d<__nv_bfloat16, false>(a);
    return cudaErrorInvalidValue;
}
