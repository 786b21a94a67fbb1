/* SPDX-License-Identifier: MIT */
/*
 * Dense causal attention of one query tile (prompt chunks and
 * rectification).  CUDA twin: cuda/attention_dense.cu.
 *
 * A tile is up to RESA_CPU_TILE_ROWS rows: consecutive tokens of one entry
 * times the g query heads of one KV head, so every K/V block is read once per
 * tile and serves all of them (the GQA saving).
 */
#include <math.h>

#include "../dtype.h"
#include "cpu.h"

/* Points kt/vt at one block of the pool as fp32: directly for an fp32 pool,
 * else through the worker's conversion buffers (an fp8 cache dequantized,
 * lib/cpu/kv_codec.c). */
void resa_cpu_block_f32(const resa_cpu_job *job, int32_t page, int32_t head, int32_t n,
                        resa_cpu_scratch *sc, const float **kt, const float **vt)
{
    const resa_layout *L = &job->ctx->lo;
    size_t at = resa_kv_offset(L, job->layer, page, head);
    if (L->kv_dtype == RESA_DTYPE_F32) {
        *kt = (const float *)job->st->k + at;
        *vt = (const float *)job->st->v + at;
        return;
    }
    resa_cpu_kv_load(job->ctx, job->st, 0, at, n, sc->kt);
    resa_cpu_kv_load(job->ctx, job->st, 1, at, n, sc->vt);
    *kt = sc->kt;
    *vt = sc->vt;
}

/* Rows (t, j) of tokens t0..t1-1 and group heads j, scaled by the softmax scale. */
void resa_cpu_load_queries(const resa_cpu_job *job, const resa_step_entry *e, int32_t head,
                           int32_t t0, int32_t t1, float *q)
{
    const resa_layout *L = &job->ctx->lo;
    int32_t d = L->d, g = L->group;
    float scale = job->step->scale;
    for (int32_t t = t0; t < t1; t++)
        for (int32_t j = 0; j < g; j++) {
            float *qr = q + ((size_t)(t - t0) * g + j) * d;
            size_t at = ((size_t)(e->row + t) * L->hq + (size_t)head * g + j) * d;
            resa_load_f32(job->q, L->io_dtype, at, d, qr);
            for (int32_t i = 0; i < d; i++)
                qr[i] *= scale;
        }
}

/* out = acc / l for rows (t, j), in the IO dtype, and, when asked, the rows'
 * log-sum-exps m + log l (natural log of sum exp(scale q.k): q is pre-scaled).
 * empty: the rows attended no key in this context (QUERY modes): out 0, lse
 * -inf, the neutral part of a merge (lib/merge.c). */
void resa_cpu_store_output(const resa_cpu_job *job, const resa_step_entry *e, int32_t head,
                           int32_t t0, int32_t t1, int empty, resa_cpu_scratch *sc)
{
    const resa_layout *L = &job->ctx->lo;
    int32_t d = L->d, g = L->group;
    float *lse = job->x ? job->x->lse : NULL;
    for (int32_t r = 0; r < (t1 - t0) * g; r++) {
        float *ar = sc->acc + (size_t)r * d;
        /* l >= 1 for any row with a finite score; 0 only when every score
         * it attended was -inf (0/0: NaN, as on the GPU), NaN when poisoned */
        float inv = 1.0f / sc->l[r];
        for (int32_t i = 0; i < d; i++)
            ar[i] = empty ? 0.0f : ar[i] * inv;
        int32_t t = t0 + r / g, j = r % g;
        size_t row = (size_t)(e->row + t) * L->hq + (size_t)head * g + j;
        resa_store_f32(job->out, L->io_dtype, row * d, d, ar);
        if (lse)
            lse[row] = empty ? -INFINITY : sc->m[r] + logf(sc->l[r]);
    }
}

void resa_cpu_reset_rows(resa_cpu_scratch *sc, int32_t rows, int32_t d)
{
    for (int32_t r = 0; r < rows; r++) {
        sc->m[r] = -INFINITY;
        sc->l[r] = 0.0f;
    }
    for (size_t i = 0; i < (size_t)rows * d; i++)
        sc->acc[i] = 0.0f;
}

void resa_cpu_attention_dense(const resa_cpu_job *job, const resa_cpu_item *it,
                              resa_cpu_scratch *sc)
{
    const resa_layout *L = &job->ctx->lo;
    const resa_step_entry *e = &job->step->entries[it->entry];
    int32_t d = L->d, g = L->group, b = L->b;
    int32_t rows = (it->t1 - it->t0) * g;
    int32_t limit[RESA_CPU_MAX_TILE_ROWS];
    resa_cpu_load_queries(job, e, it->head, it->t0, it->t1, sc->q);
    resa_cpu_reset_rows(sc, rows, d);
    /* QUERY_DENSE rows come after every stored key: all of [0, end) is
     * visible to each of them, no causal mask */
    const int query = e->mode == RESA_MODE_QUERY_DENSE;
    int64_t first_pos = e->start + it->t0;   /* position of the tile's first row */
    int64_t end = query ? e->end : e->start + it->t1; /* keys visible to its last row */
    for (int64_t blk = 0; blk << L->log2_b < end; blk++) {
        int64_t base = blk << L->log2_b;
        int32_t n = (int32_t)(end - base < b ? end - base : b);
        const float *kt, *vt;
        resa_cpu_block_f32(job, e->pages[blk], it->head, n, sc, &kt, &vt);
        const int32_t *lim = NULL;
        if (!query && base + n > first_pos + 1) { /* the causal mask cuts into this block */
            for (int32_t r = 0; r < rows; r++) {
                int64_t vis = first_pos + r / g + 1 - base;
                limit[r] = (int32_t)(vis < 0 ? 0 : vis > n ? n : vis);
            }
            lim = limit;
        }
        resa_cpu_attend_block(sc->q, rows, d, kt, vt, n, lim, sc);
    }
    resa_cpu_store_output(job, e, it->head, it->t0, it->t1, end == 0, sc);
}
