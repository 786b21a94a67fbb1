/* SPDX-License-Identifier: MIT */
/*
 * The CPU backend: the pool in host memory, a per-context thread pool, and
 * the dispatch of one layer of a step as two parallel phases (K/V writes,
 * then attention), with a barrier between them because prompt and
 * rectification rows attend to the keys written in the same step.
 */
#include <string.h>
#include <unistd.h>

#include "../backend.h"
#include "../kv_fp8.h"
#include "../summary_fp8.h"
#include "cpu.h"

static int32_t cpu_available(void)
{
    return 1;
}

static resa_status cpu_ctx_init(resa_ctx *ctx)
{
    resa_cpu_state *st = resa_alloc(ctx, sizeof *st);
    if (!st)
        return RESA_ERR_OUT_OF_MEMORY;
    ctx->impl = st;
    return RESA_OK;
}

static void cpu_ctx_fini(resa_ctx *ctx)
{
    resa_free(ctx, ctx->impl);
    ctx->impl = NULL;
}

static resa_status cpu_check_config(resa_ctx *ctx, const resa_layout *lo)
{
    (void)ctx;
    (void)lo;
    return RESA_OK; /* every dtype and head dim in bounds */
}

static void cpu_pool_destroy(resa_ctx *ctx)
{
    resa_cpu_state *st = ctx->impl;
    if (st->tp)
        resa_threadpool_destroy(ctx, st->tp);
    if (st->scratch)
        for (int32_t w = 0; w < st->n_scratch; w++)
            resa_free(ctx, st->scratch[w].base);
    resa_free(ctx, st->scratch);
    resa_free(ctx, st->k);
    resa_free(ctx, st->v);
    resa_free(ctx, st->kmin);
    resa_free(ctx, st->kmax);
    resa_free(ctx, st->kexp);
    resa_free(ctx, st->kscale);
    resa_free(ctx, st->vscale);
    resa_free(ctx, st->selection);
    resa_free(ctx, st->items);
    memset(st, 0, sizeof *st);
}

/* a * b * ... with overflow detection; 0 on overflow. */
static size_t mul_size(size_t a, size_t b)
{
    return (b != 0 && a > SIZE_MAX / b) ? 0 : a * b;
}

static resa_status scratch_create(resa_ctx *ctx, resa_cpu_state *st, resa_cpu_scratch *sc)
{
    const resa_layout *L = &ctx->lo;
    size_t rows = (size_t)st->tile_rows, d = (size_t)L->d, b = (size_t)L->b;
    size_t blocks = (size_t)L->max_seq_blocks;
    size_t b16 = (b + 15) / 16 * 16;
    size_t g = (size_t)L->group;
    /* ... + the group's queries (block selection) and HEAD_SHARE's per-head block
     * scores and normalisers */
    size_t floats = rows * d * 2 + rows * 2 + rows * b16 + b * d * 2 + d * b16 + d * 3 + blocks +
                    g * d + g * blocks + g;
    size_t bytes = floats * sizeof(float) + blocks * sizeof(int32_t) +
                   (size_t)L->sel_words * sizeof(uint32_t) + 64;
    char *p = resa_alloc(ctx, bytes);
    if (!p)
        return RESA_ERR_OUT_OF_MEMORY;
    sc->base = p;
    float *f = (float *)(void *)p;
    sc->q = f, f += rows * d;
    sc->acc = f, f += rows * d;
    sc->m = f, f += rows;
    sc->l = f, f += rows;
    sc->s = f, f += rows * b16;
    sc->kt = f, f += b * d;
    sc->vt = f, f += b * d;
    sc->ktr = f, f += d * b16;
    sc->qp = f, f += d;
    sc->kmin = f, f += d;
    sc->kmax = f, f += d;
    sc->score = f, f += blocks;
    sc->qg = f, f += g * d;
    sc->hscore = f, f += g * blocks;
    sc->hlse = f, f += g;
    sc->order = (int32_t *)(void *)f;
    sc->sel = (uint32_t *)(void *)(sc->order + blocks);
    return RESA_OK;
}

static resa_status cpu_pool_create(resa_ctx *ctx)
{
    resa_cpu_state *st = ctx->impl;
    const resa_layout *L = &ctx->lo;
    size_t per_layer_page = mul_size(mul_size((size_t)L->hkv, (size_t)L->b), (size_t)L->d);
    size_t kv_elems = mul_size(mul_size((size_t)L->n_layers, (size_t)L->n_pages), per_layer_page);
    size_t sum_elems = mul_size(mul_size(mul_size((size_t)L->n_layers, (size_t)L->n_pages),
                                         (size_t)L->hkv), (size_t)L->d);
    size_t kv_bytes = mul_size(kv_elems, L->kv_elt);
    if (!kv_bytes || !sum_elems)
        return resa_fail(ctx, RESA_ERR_OUT_OF_MEMORY, "lock: the KV pool size overflows size_t");
    st->k = resa_alloc(ctx, kv_bytes);
    st->v = resa_alloc(ctx, kv_bytes);
    st->kmin = resa_alloc(ctx, sum_elems * L->sum_elt);
    st->kmax = resa_alloc(ctx, sum_elems * L->sum_elt);
    if (L->sum_fp8) {
        st->kexp = resa_alloc(ctx, sum_elems / (size_t)L->d);
        for (int i = 0; i < 256; i++)
            st->e4m3[i] = resa_e4m3_to_f32((uint8_t)i);
    }
    if (L->kv_fp8) { /* one fp32 scale per token, head and layer, for K and for V */
        st->kscale = resa_alloc(ctx, kv_elems / (size_t)L->d * sizeof(float));
        st->vscale = resa_alloc(ctx, kv_elems / (size_t)L->d * sizeof(float));
        for (int i = 0; i < 256; i++)
            st->fp8[i] = resa_fp8_decode((uint8_t)i);
    }
    if (!st->k || !st->v || !st->kmin || !st->kmax || (L->sum_fp8 && !st->kexp) ||
        (L->kv_fp8 && (!st->kscale || !st->vscale)))
        return resa_fail(ctx, RESA_ERR_OUT_OF_MEMORY,
                         "lock: cannot allocate the KV pool (%zu bytes for K and for V)", kv_bytes);
    if (ctx->cfg.record_selection) {
        size_t words = (size_t)L->max_seqs * (size_t)L->n_layers * (size_t)L->hkv *
                       (size_t)L->sel_words;
        st->selection = resa_alloc(ctx, words * sizeof(uint32_t));
        if (!st->selection)
            return resa_fail(ctx, RESA_ERR_OUT_OF_MEMORY,
                             "lock: cannot allocate the selection record (%zu bytes)",
                             words * sizeof(uint32_t));
    }
    int32_t threads = (int32_t)ctx->cfg.num_threads;
    if (threads == 0) {
        long online = sysconf(_SC_NPROCESSORS_ONLN);
        threads = online > 0 ? (int32_t)(online < 1024 ? online : 1024) : 1;
    }
    st->tile_tokens = L->group >= RESA_CPU_TILE_ROWS ? 1 : RESA_CPU_TILE_ROWS / L->group;
    st->tile_rows = st->tile_tokens * L->group;
    st->items_cap = (int64_t)L->hkv * (L->max_step_tokens / st->tile_tokens + L->max_seqs + 1);
    st->items = resa_alloc(ctx, sizeof(resa_cpu_item) * (size_t)st->items_cap);
    if (!st->items)
        return resa_fail(ctx, RESA_ERR_OUT_OF_MEMORY, "lock: cannot allocate the work list");
    resa_status s = resa_threadpool_create(ctx, threads, &st->tp);
    if (s != RESA_OK)
        return resa_fail(ctx, s, "lock: cannot create %d worker threads", threads);
    st->n_scratch = resa_threadpool_size(st->tp);
    st->scratch = resa_alloc(ctx, sizeof(resa_cpu_scratch) * (size_t)st->n_scratch);
    if (!st->scratch)
        return resa_fail(ctx, RESA_ERR_OUT_OF_MEMORY, "lock: cannot allocate worker scratch");
    for (int32_t w = 0; w < st->n_scratch; w++)
        if (scratch_create(ctx, st, &st->scratch[w]) != RESA_OK)
            return resa_fail(ctx, RESA_ERR_OUT_OF_MEMORY, "lock: cannot allocate worker scratch");
    return RESA_OK;
}

static resa_status cpu_set_stream(resa_ctx *ctx, void *stream)
{
    if (stream != NULL)
        return resa_fail(ctx, RESA_ERR_NOT_SUPPORTED,
                         "set_stream: the CPU backend is synchronous; stream must be NULL");
    return RESA_OK;
}

static resa_status cpu_synchronize(resa_ctx *ctx)
{
    (void)ctx;
    return RESA_OK;
}

static resa_status cpu_copy_pages(resa_ctx *ctx, int32_t n, const int32_t *dst,
                                  const int32_t *src)
{
    resa_cpu_state *st = ctx->impl;
    const resa_layout *L = &ctx->lo;
    size_t kv = (size_t)L->hkv * L->b * L->d * L->kv_elt;
    size_t sum = (size_t)L->hkv * L->d * L->sum_elt;
    for (int32_t i = 0; i < n; i++)
        for (int32_t l = 0; l < L->n_layers; l++) {
            size_t to = resa_kv_offset(L, l, dst[i], 0) * L->kv_elt;
            size_t from = resa_kv_offset(L, l, src[i], 0) * L->kv_elt;
            memcpy((char *)st->k + to, (char *)st->k + from, kv);
            memcpy((char *)st->v + to, (char *)st->v + from, kv);
            if (st->kscale) { /* an fp8 cache's scales travel with their page */
                size_t sto = resa_scale_offset(L, l, dst[i], 0);
                size_t sfrom = resa_scale_offset(L, l, src[i], 0);
                size_t sb = sizeof(float) * (size_t)L->hkv * (size_t)L->b;
                memcpy(st->kscale + sto, st->kscale + sfrom, sb);
                memcpy(st->vscale + sto, st->vscale + sfrom, sb);
            }
            to = resa_summary_offset(L, l, dst[i], 0);
            from = resa_summary_offset(L, l, src[i], 0);
            memcpy((char *)st->kmin + to * L->sum_elt, (char *)st->kmin + from * L->sum_elt, sum);
            memcpy((char *)st->kmax + to * L->sum_elt, (char *)st->kmax + from * L->sum_elt, sum);
            if (st->kexp)
                memcpy(st->kexp + to / (size_t)L->d, st->kexp + from / (size_t)L->d,
                       (size_t)L->hkv);
        }
    return RESA_OK;
}

static resa_status cpu_refresh_summaries(resa_ctx *ctx, const int32_t *pages, int64_t lo,
                                         int64_t hi, int64_t valid)
{
    for (int32_t l = 0; l < ctx->lo.n_layers; l++)
        for (int32_t h = 0; h < ctx->lo.hkv; h++)
            resa_cpu_refresh_summaries(ctx, ctx->impl, l, h, pages, lo, hi, valid);
    return RESA_OK;
}

static resa_status cpu_clear_selection(resa_ctx *ctx, int32_t slot)
{
    resa_cpu_state *st = ctx->impl;
    const resa_layout *L = &ctx->lo;
    if (st->selection)
        memset(st->selection + resa_selection_offset(L, slot, 0, 0), 0,
               sizeof(uint32_t) * (size_t)L->n_layers * L->hkv * L->sel_words);
    return RESA_OK;
}

static resa_status cpu_read_selection(resa_ctx *ctx, int32_t slot, int32_t layer, int32_t head,
                                      uint32_t *bits)
{
    resa_cpu_state *st = ctx->impl;
    memcpy(bits, st->selection + resa_selection_offset(&ctx->lo, slot, layer, head),
           sizeof(uint32_t) * (size_t)ctx->lo.sel_words);
    return RESA_OK;
}

/* Builds the attention work list: dense tiles last-first (later tiles see
 * more keys, so the heavy items start early), then one item per decode head. */
static resa_status cpu_step_prepare(resa_ctx *ctx, const resa_step *step)
{
    resa_cpu_state *st = ctx->impl;
    int64_t n = 0;
    for (int32_t i = 0; i < step->n_entries; i++) {
        const resa_step_entry *e = &step->entries[i];
        if (!resa_mode_dense(e->mode))
            continue;
        int32_t tiles = (e->n + st->tile_tokens - 1) / st->tile_tokens;
        for (int32_t t = tiles - 1; t >= 0; t--)
            for (int32_t h = 0; h < ctx->lo.hkv; h++) {
                int32_t t0 = t * st->tile_tokens;
                int32_t t1 = t0 + st->tile_tokens < e->n ? t0 + st->tile_tokens : e->n;
                st->items[n++] = (resa_cpu_item){i, h, t0, t1};
            }
    }
    for (int32_t i = 0; i < step->n_entries; i++)
        if (resa_mode_sparse(step->entries[i].mode))
            for (int32_t h = 0; h < ctx->lo.hkv; h++)
                st->items[n++] = (resa_cpu_item){i, h, 0, 1};
    if (n > st->items_cap)
        return resa_fail(ctx, RESA_ERR_INTERNAL, "step_begin: CPU work list overflow");
    st->n_items = n;
    return RESA_OK;
}

static void write_item(void *arg, int64_t item, int32_t worker)
{
    (void)worker;
    const resa_cpu_job *job = arg;
    int32_t hkv = job->ctx->lo.hkv;
    const resa_step_entry *e = &job->step->entries[item / hkv];
    if (resa_mode_stores(e->mode)) /* QUERY entries store nothing */
        resa_cpu_kv_write(job, e, (int32_t)(item % hkv));
}

static void attend_item(void *arg, int64_t item, int32_t worker)
{
    const resa_cpu_job *job = arg;
    const resa_cpu_item *it = &job->st->items[item];
    resa_cpu_scratch *sc = &job->st->scratch[worker];
    if (resa_mode_sparse(job->step->entries[it->entry].mode))
        resa_cpu_attention_sparse(job, it, sc);
    else
        resa_cpu_attention_dense(job, it, sc);
}

static resa_status cpu_step_attend(resa_ctx *ctx, const resa_step *step, int32_t layer,
                                   const void *q, const void *k, const void *v, void *out,
                                   const resa_attend_extra *x)
{
    resa_cpu_state *st = ctx->impl;
    resa_cpu_job job = {ctx, st, step, layer, q, k, v, out, x};
    resa_threadpool_run(st->tp, (int64_t)step->n_entries * ctx->lo.hkv, write_item, &job);
    resa_threadpool_run(st->tp, st->n_items, attend_item, &job);
    return RESA_OK;
}

void resa_cpu_pool_views(const resa_ctx *ctx, void **k, void **v, void **kmin, void **kmax)
{
    const resa_cpu_state *st = ctx->impl;
    *k = st->k;
    *v = st->v;
    *kmin = st->kmin;
    *kmax = st->kmax;
}

const int8_t *resa_cpu_pool_kexp(const resa_ctx *ctx)
{
    return ((const resa_cpu_state *)ctx->impl)->kexp;
}

static resa_status cpu_merge_states(resa_ctx *ctx, int32_t n_parts, int64_t n_rows,
                                    const void *parts_out, const float *parts_lse, void *out,
                                    float *lse)
{
    resa_merge_rows_host((resa_dtype)ctx->cfg.io_dtype, n_parts, n_rows,
                         (int32_t)ctx->cfg.head_dim, parts_out, parts_lse, out, lse);
    return RESA_OK;
}

void resa_cpu_pool_scales(const resa_ctx *ctx, const float **kscale, const float **vscale)
{
    const resa_cpu_state *st = ctx->impl;
    *kscale = st->kscale;
    *vscale = st->vscale;
}

static const resa_backend_ops cpu_ops = {
    .api_version = RESA_BACKEND_API_VERSION,
    .name = "cpu",
    .available = cpu_available,
    .ctx_init = cpu_ctx_init,
    .ctx_fini = cpu_ctx_fini,
    .check_config = cpu_check_config,
    .pool_create = cpu_pool_create,
    .pool_destroy = cpu_pool_destroy,
    .set_stream = cpu_set_stream,
    .synchronize = cpu_synchronize,
    .copy_pages = cpu_copy_pages,
    .refresh_summaries = cpu_refresh_summaries,
    .clear_selection = cpu_clear_selection,
    .step_prepare = cpu_step_prepare,
    .step_attend = cpu_step_attend,
    .read_selection = cpu_read_selection,
    .block_scores = resa_cpu_block_scores,
    .thresholds = resa_cpu_thresholds,
    .merge_states = cpu_merge_states,
};

const resa_backend_ops *resa_cpu_backend(void)
{
    return &cpu_ops;
}
