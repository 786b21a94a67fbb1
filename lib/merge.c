/* SPDX-License-Identifier: MIT */
/*
 * Merging attention states over disjoint key sets through their
 * log-sum-exps: what joins the partial outputs of the contexts of a
 * context-parallel sequence (docs/API.md, "Context parallelism").
 *
 * For one row with parts (o_i, lse_i), lse_i = log sum_{keys of part i}
 * exp(s), the softmax over the union of the keys is
 *   o = sum_i exp(lse_i - m) o_i / sum_i exp(lse_i - m),  m = max_i lse_i,
 *   lse = m + log sum_i exp(lse_i - m),
 * exact in real arithmetic.  Subtracting m keeps every weight in (0, 1].  A
 * part with lse_i = -inf attended no key (or only keys of score -inf) and
 * weighs exactly 0; its o_i is not read, so a NaN there (0/0) stays out.
 * CUDA twin: cuda/merge_states.cu.
 */
#include <math.h>

#include "backend.h"
#include "dtype.h"

void resa_merge_rows_host(resa_dtype dtype, int32_t n_parts, int64_t n_rows, int32_t d,
                          const void *parts_out, const float *parts_lse, void *out, float *lse)
{
    float acc[RESA_MAX_HEAD_DIM], row[RESA_MAX_HEAD_DIM];
    for (int64_t r = 0; r < n_rows; r++) {
        float m = -INFINITY;
        int nan = 0;
        for (int32_t i = 0; i < n_parts; i++) {
            float x = parts_lse[(size_t)i * (size_t)n_rows + (size_t)r];
            nan |= x != x;
            m = x > m ? x : m;
        }
        for (int32_t j = 0; j < d; j++)
            acc[j] = 0.0f;
        float sum = 0.0f;
        for (int32_t i = 0; i < n_parts && !nan; i++) {
            float x = parts_lse[(size_t)i * (size_t)n_rows + (size_t)r];
            if (x == -INFINITY)
                continue; /* weight 0: its row is never read */
            float w = expf(x - m); /* m = +inf: NaN, and the row is NaN */
            sum += w;
            resa_load_f32(parts_out, dtype, ((size_t)i * (size_t)n_rows + (size_t)r) * (size_t)d,
                          d, row);
            for (int32_t j = 0; j < d; j++)
                acc[j] += w * row[j];
        }
        /* sum = 0 (every part -inf): 0/0, NaN, as one context gives a row whose
         * every score is -inf; a NaN lse makes the row NaN */
        float inv = nan ? NAN : 1.0f / sum;
        for (int32_t j = 0; j < d; j++)
            acc[j] = nan || sum == 0.0f ? NAN : acc[j] * inv;
        resa_store_f32(out, dtype, (size_t)r * (size_t)d, d, acc);
        if (lse)
            lse[r] = nan ? NAN : m + logf(sum);
    }
}

resa_status resa_merge_states(resa_dtype dtype, int32_t n_parts, int64_t n_rows,
                              int32_t head_dim, const void *parts_out, const float *parts_lse,
                              void *out, float *lse, uint32_t flags)
{
    if (flags != 0 || (dtype != RESA_DTYPE_F32 && dtype != RESA_DTYPE_F16 &&
                       dtype != RESA_DTYPE_BF16))
        return RESA_ERR_INVALID_ARGUMENT;
    if (n_parts < 1 || n_rows < 0 || head_dim < 1 || head_dim > RESA_MAX_HEAD_DIM)
        return RESA_ERR_INVALID_ARGUMENT;
    if (n_rows > 0 && (!parts_out || !parts_lse || !out))
        return RESA_ERR_INVALID_ARGUMENT;
    resa_merge_rows_host(dtype, n_parts, n_rows, head_dim, parts_out, parts_lse, out, lse);
    return RESA_OK;
}

resa_status resa_ctx_merge_states(resa_ctx *ctx, int32_t n_parts, int64_t n_rows,
                                  const void *parts_out, const float *parts_lse, void *out,
                                  float *lse, uint32_t flags)
{
    if (!ctx)
        return RESA_ERR_INVALID_ARGUMENT;
    resa_clear_error(ctx);
    if (ctx->device_lost)
        return resa_refuse_lost(ctx, "merge_states");
    if (flags != 0)
        return resa_fail(ctx, RESA_ERR_INVALID_ARGUMENT, "merge_states: flags = 0x%x must be 0",
                         flags);
    if (n_parts < 1)
        return resa_fail(ctx, RESA_ERR_INVALID_ARGUMENT,
                         "merge_states: n_parts = %d must be at least 1", n_parts);
    if (n_rows < 0)
        return resa_fail(ctx, RESA_ERR_INVALID_ARGUMENT, "merge_states: n_rows = %lld is negative",
                         (long long)n_rows);
    if (n_rows > 0 && (!parts_out || !parts_lse || !out))
        return resa_fail(ctx, RESA_ERR_INVALID_ARGUMENT, "merge_states: %s is NULL",
                         !parts_out ? "parts_out" : !parts_lse ? "parts_lse" : "out");
    if (n_rows == 0)
        return RESA_OK;
    return ctx->ops->merge_states(ctx, n_parts, n_rows, parts_out, parts_lse, out, lse);
}
