/* SPDX-License-Identifier: MIT */
/*
 * K/V write into the paged pool and the block min/max summaries.
 * CUDA twin: cuda/kv_write.cu.
 *
 * Summaries are recomputed over the valid positions of every touched block
 * rather than updated incrementally: for an append that is at most b rows per
 * head, it is exact by construction, and the same code serves rectification
 * (which overwrites) and step cancellation (which shrinks a block).
 */
#include <float.h>
#include <string.h>

#include "../dtype.h"
#include "../summary_fp8.h"
#include "cpu.h"

static inline void *elt(void *base, size_t index, size_t size)
{
    return (char *)base + index * size;
}

void resa_cpu_refresh_summaries(const resa_ctx *ctx, const resa_cpu_state *st, int32_t layer,
                                int32_t head, const int32_t *pages, int64_t lo, int64_t hi,
                                int64_t valid)
{
    const resa_layout *L = &ctx->lo;
    int32_t d = L->d;
    float row[RESA_MAX_HEAD_DIM], mn[RESA_MAX_HEAD_DIM], mx[RESA_MAX_HEAD_DIM];
    for (int64_t blk = lo >> L->log2_b; blk <= (hi - 1) >> L->log2_b; blk++) {
        int32_t page = pages[blk];
        int64_t first = blk << L->log2_b;
        int32_t n = (int32_t)((valid - first) < L->b ? (valid - first) : L->b);
        size_t kbase = resa_kv_offset(L, layer, page, head);
        for (int32_t j = 0; j < d; j++) {
            mn[j] = FLT_MAX;
            mx[j] = -FLT_MAX;
        }
        for (int32_t t = 0; t < n; t++) {
            resa_load_f32(st->k, L->kv_dtype, kbase + (size_t)t * d, d, row);
            /* a NaN element fails both comparisons and takes no part, as in
             * fminf/fmaxf on the GPU (docs/API.md, "Non-finite values") */
            for (int32_t j = 0; j < d; j++) {
                mn[j] = row[j] < mn[j] ? row[j] : mn[j];
                mx[j] = row[j] > mx[j] ? row[j] : mx[j];
            }
        }
        size_t sbase = resa_summary_offset(L, layer, page, head);
        if (L->sum_fp8) {
            resa_fp8_summary_encode(mn, mx, d, (uint8_t *)st->kmin + sbase,
                                    (uint8_t *)st->kmax + sbase, st->kexp + sbase / (size_t)d);
        } else {
            resa_store_f32(st->kmin, L->kv_dtype, sbase, d, mn); /* exact: stored values */
            resa_store_f32(st->kmax, L->kv_dtype, sbase, d, mx);
        }
    }
}

/* One row of d values from the IO layout to the KV layout. */
static void convert_row(const void *src, resa_dtype st, size_t si, void *dst, resa_dtype dt,
                        size_t di, int32_t d, size_t dsize)
{
    if (st == dt) {
        memcpy(elt(dst, di, dsize), (const char *)src + si * dsize, dsize * (size_t)d);
        return;
    }
    float tmp[RESA_MAX_HEAD_DIM];
    resa_load_f32(src, st, si, d, tmp);
    resa_store_f32(dst, dt, di, d, tmp);
}

void resa_cpu_kv_write(const resa_cpu_job *job, const resa_step_entry *e, int32_t head)
{
    const resa_layout *L = &job->ctx->lo;
    const resa_cpu_state *st = job->st;
    int32_t d = L->d;
    for (int32_t t = 0; t < e->n; t++) {
        int64_t pos = e->start + t;
        int32_t page = e->pages[pos >> L->log2_b];
        size_t dst = resa_kv_offset(L, job->layer, page, head) +
                     (size_t)(pos & (L->b - 1)) * (size_t)d;
        size_t src = ((size_t)(e->row + t) * (size_t)L->hkv + (size_t)head) * (size_t)d;
        convert_row(job->k, L->io_dtype, src, st->k, L->kv_dtype, dst, d, L->kv_elt);
        convert_row(job->v, L->io_dtype, src, st->v, L->kv_dtype, dst, d, L->kv_elt);
    }
    resa_cpu_refresh_summaries(job->ctx, st, job->layer, head, e->pages, e->start, e->end,
                               e->valid);
}
