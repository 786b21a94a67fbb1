/* SPDX-License-Identifier: MIT */
/*
 * The pool's element codec: rows of K or V to and from fp32.  An F32, F16 or
 * BF16 cache holds the values themselves.  An fp8 cache (lib/kv_fp8.h) holds
 * e4m3 bytes and one scale per token and head; a row reads back as each
 * byte's value times its scale (an fp32 product) rounded to the IO dtype.
 * Every reader of the cache goes through here (attention, summaries), so the
 * summaries are exact over exactly the values the attention uses.
 */
#include "../dtype.h"
#include "../kv_fp8.h"
#include "cpu.h"

void resa_cpu_kv_load(const resa_ctx *ctx, const resa_cpu_state *st, int is_v, size_t at,
                      int32_t rows, float *dst)
{
    const resa_layout *L = &ctx->lo;
    const size_t d = (size_t)L->d;
    if (!L->kv_fp8) {
        resa_load_f32(is_v ? st->v : st->k, L->kv_dtype, at, (int32_t)(rows * L->d), dst);
        return;
    }
    const uint8_t *codes = (const uint8_t *)(is_v ? st->v : st->k) + at;
    const float *scale = (is_v ? st->vscale : st->kscale) + at / d;
    for (int32_t t = 0; t < rows; t++) {
        const float s = scale[t];
        const uint8_t *c = codes + (size_t)t * d;
        float *o = dst + (size_t)t * d;
        if (L->io_dtype == RESA_DTYPE_F32) {
            for (size_t j = 0; j < d; j++)
                o[j] = st->fp8[c[j]] * s;
        } else {
            for (size_t j = 0; j < d; j++)
                o[j] = resa_round_f32(L->io_dtype, st->fp8[c[j]] * s);
        }
    }
}

void resa_cpu_kv_store(const resa_ctx *ctx, const resa_cpu_state *st, int is_v, size_t at,
                       const float *src)
{
    const resa_layout *L = &ctx->lo;
    void *pool = is_v ? st->v : st->k;
    if (!L->kv_fp8) {
        resa_store_f32(pool, L->kv_dtype, at, L->d, src);
        return;
    }
    float amax = 0.0f;
    for (int32_t j = 0; j < L->d; j++)
        amax = resa_fp8_amax(amax, src[j]);
    const float s = resa_fp8_scale(amax);
    uint8_t *c = (uint8_t *)pool + at;
    for (int32_t j = 0; j < L->d; j++)
        c[j] = resa_fp8_quantize(src[j], s);
    (is_v ? st->vscale : st->kscale)[at / (size_t)L->d] = s;
}
