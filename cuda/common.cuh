// SPDX-License-Identifier: MIT
// Small device helpers shared by the CUDA kernels: the 16-bit types and
// their fp32 conversions, chosen at compile time from resa_dtype.
#ifndef RESA_CUDA_COMMON_CUH
#define RESA_CUDA_COMMON_CUH

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "kernels.h"
#include "resa.h"

namespace resa {

template <typename T> struct dtype_of;
template <> struct dtype_of<__half> { static constexpr int value = RESA_DTYPE_F16; };
template <> struct dtype_of<__nv_bfloat16> { static constexpr int value = RESA_DTYPE_BF16; };

__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x)
{
    return __float2bfloat16_rn(x);
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

} // namespace resa

// Calls a typed launcher with T = the 16-bit type of `dtype`.
#define RESA_DISPATCH_DTYPE(dtype, T, ...)                  \
    ((dtype) == RESA_DTYPE_F16 ? [&] { using T = __half; return __VA_ARGS__(); }() \
                               : [&] { using T = __nv_bfloat16; return __VA_ARGS__(); }())

#endif
