// SPDX-License-Identifier: MIT
// The merge of attention states over disjoint key sets through their
// log-sum-exps (resa_ctx_merge_states on a CUDA context).  CPU twin:
// lib/merge.c (resa_merge_rows_host), the same formula in the same order:
//   m = max_i lse_i, w_i = exp(lse_i - m) (0 for lse_i = -inf, whose row is
//   never read), out = sum_i w_i out_i / sum_i w_i, lse = m + log sum_i w_i;
//   every part -inf: out NaN (0/0), lse -inf; a NaN lse: a NaN row.
// One warp per row, lanes over the head dimension (d <= 256: up to 8 values
// a lane in registers); the parts are read once.  Memory-bound and tiny next
// to the attention it joins (R x T x Hq x d elements per layer).
#include <math.h>

#include "common.cuh"

namespace {

using namespace resa;

constexpr int kWarpsPerCta = 4;
constexpr int kPer = 8; // RESA_MAX_HEAD_DIM / 32

__device__ __forceinline__ float load_as_f32(const float *p, size_t i) { return p[i]; }
__device__ __forceinline__ float load_as_f32(const __half *p, size_t i) { return to_f32(p[i]); }
__device__ __forceinline__ float load_as_f32(const __nv_bfloat16 *p, size_t i)
{
    return to_f32(p[i]);
}
__device__ __forceinline__ void store_from_f32(float *p, size_t i, float x) { p[i] = x; }
__device__ __forceinline__ void store_from_f32(__half *p, size_t i, float x)
{
    p[i] = from_f32<__half>(x);
}
__device__ __forceinline__ void store_from_f32(__nv_bfloat16 *p, size_t i, float x)
{
    p[i] = from_f32<__nv_bfloat16>(x);
}

template <typename T>
__global__ void __launch_bounds__(kWarpsPerCta * 32)
merge_rows(int n_parts, int64_t n_rows, int d, const T *parts, const float *plse, T *out,
           float *lse)
{
    const int lane = threadIdx.x & 31;
    const int64_t r = (int64_t)blockIdx.x * kWarpsPerCta + (threadIdx.x >> 5);
    if (r >= n_rows)
        return;
    float m = -INFINITY;
    bool nan = false;
    for (int i = 0; i < n_parts; i++) { // every lane the same: uniform branches below
        const float x = plse[(size_t)i * n_rows + r];
        nan |= x != x;
        m = fmaxf(m, x);
    }
    float acc[kPer];
#pragma unroll
    for (int k = 0; k < kPer; k++)
        acc[k] = 0.0f;
    float sum = 0.0f;
    for (int i = 0; i < n_parts && !nan; i++) {
        const float x = plse[(size_t)i * n_rows + r];
        if (x == -INFINITY)
            continue;
        const float w = expf(x - m);
        sum += w;
        const T *row = parts + ((size_t)i * n_rows + r) * d;
#pragma unroll
        for (int k = 0; k < kPer; k++)
            if (lane + 32 * k < d)
                acc[k] += w * load_as_f32(row, (size_t)(lane + 32 * k));
    }
    const float inv = 1.0f / sum;
    T *dst = out + (size_t)r * d;
#pragma unroll
    for (int k = 0; k < kPer; k++)
        if (lane + 32 * k < d)
            store_from_f32(dst, (size_t)(lane + 32 * k),
                           nan || sum == 0.0f ? __int_as_float(0x7fc00000) : acc[k] * inv);
    if (lse && lane == 0)
        lse[r] = nan ? __int_as_float(0x7fc00000) : m + logf(sum);
}

template <typename T>
cudaError_t launch(int32_t n_parts, int64_t n_rows, int32_t d, const void *parts,
                   const float *plse, void *out, float *lse, cudaStream_t stream)
{
    const int64_t ctas = (n_rows + kWarpsPerCta - 1) / kWarpsPerCta;
    merge_rows<T><<<(unsigned)ctas, kWarpsPerCta * 32, 0, stream>>>(
        n_parts, n_rows, d, (const T *)parts, plse, (T *)out, lse);
    return cudaGetLastError();
}

} // namespace

cudaError_t resa_cuda_merge_states(int32_t dtype, int32_t n_parts, int64_t n_rows, int32_t d,
                                   const void *parts_out, const float *parts_lse, void *out,
                                   float *lse, cudaStream_t stream)
{
    if (n_rows <= 0)
        return cudaSuccess;
    if (d < 1 || d > 32 * kPer || n_rows > (int64_t)kWarpsPerCta * 0x7fffffff)
        return cudaErrorInvalidValue;
    switch (dtype) {
    case RESA_DTYPE_F32:
        return launch<float>(n_parts, n_rows, d, parts_out, parts_lse, out, lse, stream);
    case RESA_DTYPE_F16:
        return launch<__half>(n_parts, n_rows, d, parts_out, parts_lse, out, lse, stream);
    case RESA_DTYPE_BF16:
        return launch<__nv_bfloat16>(n_parts, n_rows, d, parts_out, parts_lse, out, lse, stream);
    default:
        return cudaErrorInvalidValue;
    }
}
