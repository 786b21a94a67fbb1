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
            resa_cpu_kv_load(ctx, st, 0, kbase + (size_t)t * d, 1, row);
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
            /* exact: the values read back are of val_dtype */
            resa_store_f32(st->kmin, L->val_dtype, sbase, d, mn);
            resa_store_f32(st->kmax, L->val_dtype, sbase, d, mx);
        }
    }
}

/* One row of d values of K (is_v 0) or V from the IO layout into the pool. */
static void convert_row(const resa_cpu_job *job, int is_v, size_t si, size_t di)
{
    const resa_layout *L = &job->ctx->lo;
    const void *src = is_v ? job->v : job->k;
    if (L->io_dtype == L->kv_dtype) {
        memcpy(elt(is_v ? job->st->v : job->st->k, di, L->kv_elt),
               (const char *)src + si * L->kv_elt, L->kv_elt * (size_t)L->d);
        return;
    }
    float tmp[RESA_MAX_HEAD_DIM];
    resa_load_f32(src, L->io_dtype, si, L->d, tmp);
    resa_cpu_kv_store(job->ctx, job->st, is_v, di, tmp);
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
        convert_row(job, 0, src, dst);
        convert_row(job, 1, src, dst);
    }
    resa_cpu_refresh_summaries(job->ctx, st, job->layer, head, e->pages, e->start, e->end,
                               e->valid);
}
