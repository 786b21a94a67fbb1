// SPDX-License-Identifier: MIT
// Small device helpers shared by the CUDA kernels: the 16-bit types and
// their fp32 conversions, chosen at compile time from resa_dtype.
#ifndef RESA_CUDA_COMMON_CUH
#define RESA_CUDA_COMMON_CUH

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <stdint.h>
#include <stdlib.h>

#include <type_traits>
#include <utility>

#include "kernels.h"
#include "resa.h"

namespace resa {

template <typename T> struct dtype_of;
template <> struct dtype_of<__half> { static constexpr int value = RESA_DTYPE_F16; };
template <> struct dtype_of<__nv_bfloat16> { static constexpr int value = RESA_DTYPE_BF16; };

// A row's natural log-sum-exp from the log2-domain (m, l) of an online
// softmax over scores scaled by log2 e: (m + log2 l) ln 2.
__device__ __forceinline__ float lse_from_log2(float m, float l)
{
    return (m + log2f(l)) * 0.6931471805599453f;
}

__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x)
{
    return __float2bfloat16_rn(x);
}

// ---- the fp8 cache (lib/kv_fp8.h) ----
// Value of an e4m3 byte, exact (e4m3 is a subset of f16; 0x7f, 0xff: NaN).
__device__ __forceinline__ float fp8_to_f32(uint8_t v)
{
    const __half_raw h = __nv_cvt_fp8_to_halfraw((__nv_fp8_storage_t)v, __NV_E4M3);
    return __half2float(__half(h));
}
// What a stored byte reads back as: e4m3 * scale, an fp32 product, rounded
// to T, as the CPU does (lib/cpu/kv_codec.c), so both see the same values.
template <typename T> __device__ __forceinline__ T fp8_read(uint8_t v, float scale)
{
    return from_f32<T>(fp8_to_f32(v) * scale);
}
// 8 consecutive bytes of one token's head vector as 8 T values (16 bytes).
template <typename T> __device__ __forceinline__ uint4 fp8x8_read(uint2 raw, float scale)
{
    uint4 out;
    const uint8_t *b = reinterpret_cast<const uint8_t *>(&raw);
    T *o = reinterpret_cast<T *>(&out);
#pragma unroll
    for (int i = 0; i < 8; i++)
        o[i] = fp8_read<T>(b[i], scale);
    return out;
}

// 8 e4m3 bytes -> 8 f16 values (4 words, low half first), exact: one
// cvt.rn.f16x2.e4m3x2 per two values (the Hopper dense kernel's producer;
// the scales are applied in fp32 after the products, attention_dense_sm90.cu)
__device__ __forceinline__ uint4 fp8x8_to_half(uint2 raw)
{
    uint32_t w[4];
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const uint32_t word = i < 2 ? raw.x : raw.y;
        const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(
            (__nv_fp8x2_storage_t)((word >> (16 * (i & 1))) & 0xffffu), __NV_E4M3);
        w[i] = (uint32_t)h.x | (uint32_t)h.y << 16;
    }
    return make_uint4(w[0], w[1], w[2], w[3]);
}

// Entry holding row r: the entries' rows are contiguous and ascending.
__device__ __forceinline__ int entry_of_row(const resa_dev_entry *e, int n_entries, int64_t r)
{
    int lo = 0, hi = n_entries - 1;
    while (lo < hi) {
        int mid = (lo + hi + 1) >> 1;
        if (e[mid].row <= r)
            lo = mid;
        else
            hi = mid - 1;
    }
    return lo;
}

// Programmatic dependent launch (sm_90+; no-ops on older targets).  A kernel
// launched with launch_pdl may start while the previous kernel of the stream
// still runs: it must not read anything that kernel (or one before it, back to
// the last plain launch) writes, and must not write global memory, before
// pdl_wait(), which returns once the previous grid has completed and its
// writes are visible.  Every kernel launched with launch_pdl calls pdl_wait()
// in every CTA, so completion chains: grid N done implies grid N-1 done.
__device__ __forceinline__ void pdl_wait()
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
// Lets the next kernel of the stream launch now (its pdl_wait still waits for
// this grid's completion); without it the next launch begins at our exit.
__device__ __forceinline__ void pdl_trigger()
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// An A/B switch from the environment (RESA_CUDA_NO_PDL, _NO_TMA, ...): on
// when NAME's value begins with '1'; unset or anything else: off.
inline bool env_switch(const char *name)
{
    const char *e = getenv(name);
    return e && e[0] == '1';
}

// Whether the current device takes programmatic dependent launches (compute
// capability >= 9.0), asked once per device; RESA_CUDA_NO_PDL=1 turns them off
// (for A/B timing).
inline bool pdl_supported()
{
    static int cache[64]; // 0 unknown, 1 no, 2 yes (benign race: same value)
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64)
        return false;
    if (cache[dev] == 0) {
        int major = 0;
        const bool ok = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) ==
                            cudaSuccess &&
                        major >= 9 && !env_switch("RESA_CUDA_NO_PDL");
        cache[dev] = ok ? 2 : 1;
    }
    return cache[dev] == 2;
}

// kernel<<<grid, block, smem, stream>>>(args...), as a programmatic dependent
// launch of the previous kernel of the stream where the device supports it.
template <typename... P, typename... A>
cudaError_t launch_pdl(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem,
                       cudaStream_t stream, A &&...args)
{
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.dynamicSmemBytes = smem;
    cfg.stream = stream;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    if (pdl_supported()) {
        cfg.attrs = attr;
        cfg.numAttrs = 1;
    }
    return cudaLaunchKernelEx(&cfg, kernel, std::forward<A>(args)...);
}

// Calls f(c) with c a std::integral_constant<bool, dims.kv_fp8>: the launchers'
// compile-time switch between a T cache and an fp8 one.
template <typename F> auto dispatch_f8(const resa_cuda_dims &D, F &&f)
{
    return D.kv_fp8 ? f(std::integral_constant<bool, true>())
                    : f(std::integral_constant<bool, false>());
}

} // namespace resa

// Calls a typed launcher with T = the 16-bit type of `dtype`.
#define RESA_DISPATCH_DTYPE(dtype, T, ...)                  \
    ((dtype) == RESA_DTYPE_F16 ? [&] { using T = __half; return __VA_ARGS__(); }() \
                               : [&] { using T = __nv_bfloat16; return __VA_ARGS__(); }())

#endif
