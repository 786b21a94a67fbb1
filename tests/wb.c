/* SPDX-License-Identifier: MIT */
#include "wb.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cpu/cpu.h"
#include "internal.h"
#include "sequence.h"

static const resa_seq *seq_of(const resa_ctx *ctx, int32_t id)
{
    int32_t slot = resa_seq_slot((resa_ctx *)ctx, id, NULL);
    TCHECK(slot >= 0, "white-box: %d is not a live sequence", id);
    return &ctx->seqs[slot];
}

int32_t wb_page(const resa_ctx *ctx, int32_t id, int64_t blk)
{
    const resa_seq *q = seq_of(ctx, id);
    TCHECK(blk >= 0 && blk < q->n_pages, "white-box: block %lld outside the page table (%d)",
           (long long)blk, q->n_pages);
    return q->pages[blk];
}

int32_t wb_refcount(const resa_ctx *ctx, int32_t page)
{
    return ctx->pool.refcount[page];
}

/* Element `at` of the K (is_v 0) or V pool as the value it reads back as:
 * an fp8 cache's byte decoded by the test's own e4m3 table (ref.c) times its
 * token's stored scale, an fp32 product rounded to the IO dtype. */
static double pool_value(const resa_ctx *ctx, int is_v, size_t at)
{
    void *k, *v, *mn, *mx;
    resa_cpu_pool_views(ctx, &k, &v, &mn, &mx);
    const resa_layout *lo = &ctx->lo;
    if (!lo->kv_fp8)
        return ref_load(lo->kv_dtype, is_v ? v : k, at);
    const float *ks, *vs;
    resa_cpu_pool_scales(ctx, &ks, &vs);
    double scale = (is_v ? vs : ks)[at / (size_t)lo->d];
    double e = ref_e4m3_value(((const uint8_t *)(is_v ? v : k))[at]);
    return ref_round(lo->io_dtype, ref_round(RESA_DTYPE_F32, e * scale));
}

double wb_kv(const resa_ctx *ctx, int32_t id, int is_v, int32_t layer, int64_t pos, int32_t h,
             int32_t j)
{
    const resa_layout *lo = &ctx->lo;
    int32_t page = wb_page(ctx, id, pos / lo->b);
    size_t at = resa_kv_offset(lo, layer, page, h) + (size_t)(pos % lo->b) * (size_t)lo->d +
                (size_t)j;
    return pool_value(ctx, is_v, at);
}

double wb_scale(const resa_ctx *ctx, int32_t id, int is_v, int32_t layer, int64_t pos, int32_t h)
{
    const resa_layout *lo = &ctx->lo;
    const float *ks, *vs;
    resa_cpu_pool_scales(ctx, &ks, &vs);
    TCHECK(lo->kv_fp8 && ks && vs, "white-box: scales of a cache that is not fp8");
    int32_t page = wb_page(ctx, id, pos / lo->b);
    return (is_v ? vs : ks)[resa_scale_offset(lo, layer, page, h) + (size_t)(pos % lo->b)];
}

/* The summary element at offset so as a value: the KV dtype, or an fp8 byte
 * times 2^(its block's exponent), decoded by the test's own e4m3 table. */
static void stored_summary(const resa_ctx *ctx, const void *mn, const void *mx, size_t so,
                           double *smin, double *smax)
{
    const resa_layout *lo = &ctx->lo;
    if (!lo->sum_fp8) { /* in the dtype of the values the cache holds */
        *smin = ref_load(lo->val_dtype, mn, so);
        *smax = ref_load(lo->val_dtype, mx, so);
        return;
    }
    int e = resa_cpu_pool_kexp(ctx)[so / (size_t)lo->d];
    *smin = ldexp(ref_e4m3_value(((const uint8_t *)mn)[so]), e);
    *smax = ldexp(ref_e4m3_value(((const uint8_t *)mx)[so]), e);
}

static void check_summaries(th *t, int32_t id, const ref_seq *r)
{
    const resa_ctx *ctx = t->ctx;
    void *k, *v, *mn, *mx;
    resa_cpu_pool_views(ctx, &k, &v, &mn, &mx);
    const resa_layout *lo = &ctx->lo;
    const resa_seq *q = seq_of(ctx, id);
    int64_t nb = (q->length + lo->b - 1) / lo->b;
    TCHECK(q->n_pages == nb, "seq %d: %d pages for %lld tokens", id, q->n_pages,
           (long long)q->length);
    double *rmin = malloc(sizeof(double) * (size_t)lo->d);
    double *rmax = malloc(sizeof(double) * (size_t)lo->d);
    for (int32_t l = 0; l < lo->n_layers; l++)
        for (int64_t blk = 0; blk < nb; blk++)
            for (int32_t h = 0; h < lo->hkv; h++) {
                int32_t page = q->pages[blk];
                int64_t end = (blk + 1) * lo->b < q->length ? (blk + 1) * lo->b : q->length;
                for (int32_t j = 0; j < lo->d; j++) {
                    double a = INFINITY, b = -INFINITY;
                    for (int64_t pos = blk * lo->b; pos < end; pos++) {
                        double x = pool_value(ctx, 0,
                                              resa_kv_offset(lo, l, page, h) +
                                                  (size_t)(pos % lo->b) * (size_t)lo->d +
                                                  (size_t)j);
                        a = x < a ? x : a;
                        b = x > b ? x : b;
                    }
                    size_t so = resa_summary_offset(lo, l, page, h) + (size_t)j;
                    double smin, smax;
                    stored_summary(ctx, mn, mx, so, &smin, &smax);
                    if (lo->sum_fp8) /* outward: the box holds every stored key */
                        TCHECK(smin <= a && smax >= b,
                               "seq %d layer %d block %lld head %d dim %d: fp8 summary "
                               "[%.9g, %.9g] does not hold the stored keys [%.9g, %.9g]",
                               id, l, (long long)blk, h, j, smin, smax, a, b);
                    else
                        TCHECK(smin == a && smax == b,
                           "seq %d layer %d block %lld head %d dim %d: summary [%.9g, %.9g], "
                           "stored keys give [%.9g, %.9g] (length %lld)",
                           id, l, (long long)blk, h, j, smin, smax, a, b, (long long)q->length);
                }
                if (r) {
                    ref_block_summary(&t->p, r, l, h, blk, r->len, rmin, rmax, NULL);
                    size_t so = resa_summary_offset(lo, l, page, h);
                    for (int32_t j = 0; j < lo->d; j++) {
                        double smin, smax;
                        stored_summary(ctx, mn, mx, so + (size_t)j, &smin, &smax);
                        TCHECK(smin == rmin[j] && smax == rmax[j],
                               "seq %d layer %d block %lld head %d dim %d: summary [%.9g, %.9g] "
                               "differs from the reference [%.9g, %.9g]", id, l, (long long)blk,
                               h, j, smin, smax, rmin[j], rmax[j]);
                    }
                }
            }
    free(rmin);
    free(rmax);
}

void wb_check_summaries(th *t, int32_t id)
{
    check_summaries(t, id, NULL);
}

void wb_check_cache(th *t, const th_seq *s)
{
    const resa_ctx *ctx = t->ctx;
    const resa_layout *lo = &ctx->lo;
    const resa_seq *q = seq_of(ctx, s->id);
    TCHECK(q->length == s->r->len, "seq %d: length %lld, reference %lld", s->id,
           (long long)q->length, (long long)s->r->len);
    for (int32_t l = 0; l < lo->n_layers; l++)
        for (int64_t pos = 0; pos < q->length; pos++)
            for (int32_t h = 0; h < lo->hkv; h++)
                for (int32_t j = 0; j < lo->d; j++) {
                    double sk = wb_kv(ctx, s->id, 0, l, pos, h, j);
                    double sv = wb_kv(ctx, s->id, 1, l, pos, h, j);
                    double rk = ref_k(s->r, l, pos, h)[j], rv = ref_v(s->r, l, pos, h)[j];
                    /* == fails on NaN: an fp8 head vector with a non-finite
                     * input reads back as NaN in both */
                    TCHECK((sk == rk || (isnan(sk) && isnan(rk))) &&
                               (sv == rv || (isnan(sv) && isnan(rv))),
                           "seq %d layer %d pos %lld head %d dim %d: stored K/V (%.9g, %.9g), "
                           "reference (%.9g, %.9g)",
                           s->id, l, (long long)pos, h, j, sk, sv, rk, rv);
                }
    if (lo->kv_fp8) /* the scales themselves, bit for bit (values alone could hide a
                       scale twice as large with every code halved) */
        for (int32_t l = 0; l < lo->n_layers; l++)
            for (int64_t pos = 0; pos < q->length; pos++)
                for (int32_t h = 0; h < lo->hkv; h++)
                    for (int is_v = 0; is_v < 2; is_v++) {
                        double got = wb_scale(ctx, s->id, is_v, l, pos, h);
                        double want = *ref_scale_at(s->r, is_v, l, pos, h);
                        TCHECK(got == want || (isnan(got) && isnan(want)),
                               "seq %d layer %d pos %lld head %d: stored %s scale %.9g, "
                               "reference %.9g", s->id, l, (long long)pos, h, is_v ? "V" : "K",
                               got, want);
                    }
    check_summaries(t, s->id, s->r);
}

void wb_snap_take(const resa_ctx *ctx, int32_t id, wb_snap *s)
{
    const resa_layout *lo = &ctx->lo;
    const resa_seq *q = seq_of(ctx, id);
    void *k, *v, *mn, *mx;
    resa_cpu_pool_views(ctx, &k, &v, &mn, &mx);
    memset(s, 0, sizeof *s);
    s->id = id;
    s->n_pages = q->n_pages;
    s->length = q->length;
    s->rect_start = q->rect_start;
    s->pages = malloc(sizeof(int32_t) * (size_t)(q->n_pages + 1));
    memcpy(s->pages, q->pages, sizeof(int32_t) * (size_t)q->n_pages);
    size_t kvb = (size_t)lo->hkv * (size_t)lo->b * (size_t)lo->d * lo->kv_elt;
    size_t smb = (size_t)lo->hkv * (size_t)lo->d * lo->sum_elt;
    size_t exb = lo->sum_fp8 ? (size_t)lo->hkv : 0;
    size_t scb = lo->kv_fp8 ? (size_t)lo->hkv * (size_t)lo->b * sizeof(float) : 0;
    const int8_t *kexp = resa_cpu_pool_kexp(ctx);
    const float *ks, *vs;
    resa_cpu_pool_scales(ctx, &ks, &vs);
    s->page_bytes = (size_t)lo->n_layers * (2 * kvb + 2 * smb + exb + 2 * scb);
    s->bytes = malloc(s->page_bytes * (size_t)(q->n_pages + 1));
    unsigned char *o = s->bytes;
    for (int32_t i = 0; i < q->n_pages; i++)
        for (int32_t l = 0; l < lo->n_layers; l++) {
            size_t ko = resa_kv_offset(lo, l, q->pages[i], 0) * lo->kv_elt;
            size_t so = resa_summary_offset(lo, l, q->pages[i], 0);
            memcpy(o, (char *)k + ko, kvb), o += kvb;
            memcpy(o, (char *)v + ko, kvb), o += kvb;
            memcpy(o, (char *)mn + so * lo->sum_elt, smb), o += smb;
            memcpy(o, (char *)mx + so * lo->sum_elt, smb), o += smb;
            if (exb)
                memcpy(o, kexp + so / (size_t)lo->d, exb), o += exb;
            if (scb) {
                size_t co = resa_scale_offset(lo, l, q->pages[i], 0);
                memcpy(o, ks + co, scb), o += scb;
                memcpy(o, vs + co, scb), o += scb;
            }
        }
}

void wb_snap_check(const resa_ctx *ctx, const wb_snap *s, const char *why)
{
    wb_snap now;
    wb_snap_take(ctx, s->id, &now);
    TCHECK(now.length == s->length && now.rect_start == s->rect_start &&
               now.n_pages == s->n_pages,
           "%s: seq %d changed: length %lld -> %lld, pending start %lld -> %lld, pages %d -> %d",
           why, s->id, (long long)s->length, (long long)now.length, (long long)s->rect_start,
           (long long)now.rect_start, s->n_pages, now.n_pages);
    TCHECK(memcmp(now.pages, s->pages, sizeof(int32_t) * (size_t)s->n_pages) == 0,
           "%s: seq %d page table changed", why, s->id);
    for (int32_t i = 0; i < s->n_pages; i++)
        TCHECK(memcmp(now.bytes + (size_t)i * s->page_bytes, s->bytes + (size_t)i * s->page_bytes,
                      s->page_bytes) == 0,
               "%s: seq %d: bytes of page %d (block %d) changed", why, s->id, s->pages[i], i);
    wb_snap_free(&now);
}

void wb_snap_free(wb_snap *s)
{
    free(s->pages);
    free(s->bytes);
    s->pages = NULL;
    s->bytes = NULL;
}
