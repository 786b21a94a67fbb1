/* SPDX-License-Identifier: MIT */
/*
 * The shadow model of a CPU resa_ctx, from include/resa.h and docs/API.md
 * (see shadow.h).  Where the documents list several errors of one call
 * without an order, the model checks them in the order the function's
 * status table gives (and, for resa_ctx_step_begin, entry by entry in batch
 * order, as API.md says); the context-parallel calls' checks come in the
 * order of lib/step.c, lib/step_cp.c and lib/sequence.c (shadow.h).
 */
#include "shadow.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The numeric helpers (the reference attention, encodings) are left out of
 * libFuzzer's coverage: their loop counts are no new behaviour of the API,
 * and counting them slowed every input down. */
#if defined(__clang__)
#  define SH_NO_COVERAGE __attribute__((no_sanitize("coverage")))
#else
#  define SH_NO_COVERAGE
#endif

#define P40 1099511627776.0 /* 2^40 */
#define P30 1073741824.0    /* 2^30 */

const sh_param sh_params[SH_NPARAMS] = {
    {RESA_PARAM_NUM_LAYERS, "RESA_PARAM_NUM_LAYERS", 0, 1, 1, 1, 4096},
    {RESA_PARAM_NUM_Q_HEADS, "RESA_PARAM_NUM_Q_HEADS", 0, 1, 1, 1, 1024},
    {RESA_PARAM_NUM_KV_HEADS, "RESA_PARAM_NUM_KV_HEADS", 0, 1, 1, 1, 1024},
    {RESA_PARAM_HEAD_DIM, "RESA_PARAM_HEAD_DIM", 0, 1, 128, 1, 256},
    {RESA_PARAM_KV_DTYPE, "RESA_PARAM_KV_DTYPE", 0, 1, 0, 0, 3},
    {RESA_PARAM_IO_DTYPE, "RESA_PARAM_IO_DTYPE", 0, 1, 0, 0, 2},
    {RESA_PARAM_MAX_TOKENS, "RESA_PARAM_MAX_TOKENS", 0, 1, 65536, 1, P40},
    {RESA_PARAM_MAX_SEQUENCES, "RESA_PARAM_MAX_SEQUENCES", 0, 1, 64, 1, 65535},
    {RESA_PARAM_MAX_SEQ_TOKENS, "RESA_PARAM_MAX_SEQ_TOKENS", 0, 1, 0, 0, P40},
    {RESA_PARAM_MAX_STEP_TOKENS, "RESA_PARAM_MAX_STEP_TOKENS", 0, 1, 8192, 1, P30},
    {RESA_PARAM_SUMMARY_FORMAT, "RESA_PARAM_SUMMARY_FORMAT", 0, 1, 1, 0, 1},
    {RESA_PARAM_BLOCK_SIZE, "RESA_PARAM_BLOCK_SIZE", 0, 1, 16, 1, 256},
    {RESA_PARAM_SELECT_FRACTION, "RESA_PARAM_SELECT_FRACTION", 1, 0, 0.15, 0, 1},
    {RESA_PARAM_SELECT_MIN_BLOCKS, "RESA_PARAM_SELECT_MIN_BLOCKS", 0, 0, 16, 0, P30},
    {RESA_PARAM_LOCAL_BLOCKS, "RESA_PARAM_LOCAL_BLOCKS", 0, 0, 1, 1, P30},
    {RESA_PARAM_SINK_BLOCKS, "RESA_PARAM_SINK_BLOCKS", 0, 0, 1, 0, P30},
    {RESA_PARAM_RECTIFY_INTERVAL, "RESA_PARAM_RECTIFY_INTERVAL", 0, 0, 128, 0, P30},
    {RESA_PARAM_SOFTMAX_SCALE, "RESA_PARAM_SOFTMAX_SCALE", 1, 0, 0, 0, 1e6},
    {RESA_PARAM_SCORE_WIDTH, "RESA_PARAM_SCORE_WIDTH", 1, 0, 0.5, 0, 1},
    {RESA_PARAM_GROUP_SCORE, "RESA_PARAM_GROUP_SCORE", 0, 0, 0, 0, 1},
    {RESA_PARAM_NUM_THREADS, "RESA_PARAM_NUM_THREADS", 0, 1, 0, 0, 1024},
    {RESA_PARAM_RECORD_SELECTION, "RESA_PARAM_RECORD_SELECTION", 0, 1, 0, 0, 1},
};

int sh_param_index(int32_t id)
{
    for (int i = 0; i < SH_NPARAMS; i++)
        if (sh_params[i].id == id)
            return i;
    return -1;
}

/* ---- dtypes ---- */

size_t sh_dtype_size(int32_t dtype)
{
    return dtype == RESA_DTYPE_F32 ? 4 : dtype == RESA_DTYPE_FP8_E4M3 ? 1 : 2;
}

SH_NO_COVERAGE
static uint16_t grid_f16(int8_t g) /* g/8 as IEEE binary16, exactly */
{
    if (g == 0)
        return 0;
    uint16_t sign = g < 0 ? 0x8000u : 0;
    int a = g < 0 ? -g : g, e = 0;
    while ((1 << (e + 1)) <= a)
        e++;                                     /* a = 2^e * (1 + f) */
    int mant = (a - (1 << e)) * (1024 >> e);    /* f * 1024 */
    return (uint16_t)(sign | (uint16_t)((e - 3 + 15) << 10) | (uint16_t)mant);
}

SH_NO_COVERAGE
void sh_encode(int32_t dtype, const int8_t *grid, size_t n, void *dst)
{
    for (size_t i = 0; i < n; i++) {
        float f = (float)grid[i] / (float)SH_GRID;
        if (SH_IS_POISON(grid[i])) {
            f = grid[i] == SH_NAN ? NAN : grid[i] == SH_PINF ? INFINITY : -INFINITY;
            if (dtype == RESA_DTYPE_F16) {
                uint16_t h = grid[i] == SH_NAN ? 0x7e00u : grid[i] == SH_PINF ? 0x7c00u : 0xfc00u;
                memcpy((char *)dst + 2 * i, &h, 2);
                continue;
            }
        }
        if (dtype == RESA_DTYPE_F32) {
            memcpy((char *)dst + 4 * i, &f, 4);
        } else if (dtype == RESA_DTYPE_F16) {
            uint16_t h = grid_f16(grid[i]);
            memcpy((char *)dst + 2 * i, &h, 2);
        } else {
            uint32_t u;
            memcpy(&u, &f, 4);
            uint16_t h = (uint16_t)(u >> 16);
            memcpy((char *)dst + 2 * i, &h, 2);
        }
    }
}

SH_NO_COVERAGE
double sh_decode(int32_t dtype, const void *src, size_t i)
{
    if (dtype == RESA_DTYPE_F32) {
        float f;
        memcpy(&f, (const char *)src + 4 * i, 4);
        return f;
    }
    uint16_t h;
    memcpy(&h, (const char *)src + 2 * i, 2);
    if (dtype == RESA_DTYPE_BF16) {
        uint32_t u = (uint32_t)h << 16;
        float f;
        memcpy(&f, &u, 4);
        return f;
    }
    int e = (h >> 10) & 0x1f, mant = h & 0x3ff;
    double s = (h & 0x8000u) ? -1.0 : 1.0;
    if (e == 0)
        return s * ldexp(mant, -24);
    if (e == 31)
        return mant ? NAN : s * INFINITY;
    return s * ldexp(1024 + mant, e - 25);
}

/* ---- configuration ---- */

static void defaults(shadow *m)
{
    for (int i = 0; i < SH_NPARAMS; i++) {
        m->iv[i] = (int64_t)sh_params[i].def;
        m->fv[i] = sh_params[i].def;
    }
    m->shape_set = 0;
}

void sh_init(shadow *m)
{
    memset(m, 0, sizeof *m);
    defaults(m);
}

int64_t sh_get_int(const shadow *m, int p)
{
    if (p == P_MAX_SEQ_TOKENS && m->iv[p] == 0)
        return m->iv[P_MAX_TOKENS];
    return m->iv[p];
}

double sh_get_real(const shadow *m, int p)
{
    if (p == P_SCALE && m->fv[p] == 0.0)
        return 1.0 / sqrt((double)m->iv[P_HEAD_DIM]);
    return m->fv[p];
}

static resa_status settable(const shadow *m, int i)
{
    if (m->step_open)
        return RESA_ERR_BAD_STATE;
    if (sh_params[i].locks && m->locked)
        return RESA_ERR_BAD_STATE;
    return RESA_OK;
}

resa_status sh_set_param(shadow *m, int32_t id, int64_t v, int apply)
{
    int i = sh_param_index(id);
    if (i < 0 || sh_params[i].real)
        return RESA_ERR_INVALID_ARGUMENT;
    resa_status s = settable(m, i);
    if (s != RESA_OK)
        return s;
    if (v < (int64_t)sh_params[i].lo || v > (int64_t)sh_params[i].hi)
        return RESA_ERR_INVALID_ARGUMENT;
    if (i == P_BLOCK && (v & (v - 1)) != 0)
        return RESA_ERR_INVALID_ARGUMENT;
    if (apply) {
        m->iv[i] = v;
        if (i <= P_HEAD_DIM)
            m->shape_set |= 1u << i;
    }
    return RESA_OK;
}

resa_status sh_set_param_f64(shadow *m, int32_t id, double v, int apply)
{
    int i = sh_param_index(id);
    if (i < 0 || !sh_params[i].real)
        return RESA_ERR_INVALID_ARGUMENT;
    resa_status s = settable(m, i);
    if (s != RESA_OK)
        return s;
    if (!(v >= sh_params[i].lo && v <= sh_params[i].hi))
        return RESA_ERR_INVALID_ARGUMENT;
    if (apply)
        m->fv[i] = v;
    return RESA_OK;
}

resa_status sh_get_param(const shadow *m, int32_t id, int real, int null_out)
{
    (void)m;
    int i = sh_param_index(id);
    if (i < 0 || sh_params[i].real != real || null_out)
        return RESA_ERR_INVALID_ARGUMENT;
    return RESA_OK;
}

resa_status sh_set_preset(shadow *m, int32_t preset, int apply)
{
    if (m->step_open)
        return RESA_ERR_BAD_STATE;
    if (preset != RESA_PRESET_DEFAULT && preset != RESA_PRESET_PAPER)
        return RESA_ERR_INVALID_ARGUMENT;
    if (apply) {
        int paper = preset == RESA_PRESET_PAPER;
        m->fv[P_FRACTION] = paper ? 0.1 : 0.15; /* the defaults since 0.3.0 */
        m->iv[P_MIN_BLOCKS] = 16;
        m->iv[P_LOCAL] = 1;
        m->iv[P_SINK] = paper ? 0 : 1;
        m->iv[P_INTERVAL] = paper ? 32 : 128;
        m->fv[P_WIDTH] = paper ? 1.0 : 0.5;
        m->iv[P_GROUP] = RESA_GROUP_SCORE_POOLED;
    }
    return RESA_OK;
}

/* ---- the lock, pages and sequences ---- */

static void free_seq(shadow *m, sh_seq *q)
{
    free(q->pages);
    free(q->k);
    free(q->v);
    if (q->rec) {
        for (int64_t l = 0; l < m->iv[P_LAYERS]; l++) {
            free(q->rec[l].blocks);
            free(q->rec[l].known);
            free(q->rec[l].cnt_lo);
            free(q->rec[l].cnt_hi);
            free(q->rec[l].n_blocks);
        }
        free(q->rec);
    }
    memset(q, 0, sizeof *q);
}

static void unlock(shadow *m)
{
    if (!m->locked)
        return;
    for (int64_t i = 0; i < m->iv[P_MAX_SEQS]; i++)
        free_seq(m, &m->seqs[i]);
    free(m->seqs);
    free(m->free_list);
    free(m->refcount);
    free(m->entries);
    free(m->layer_done);
    m->seqs = NULL;
    m->free_list = m->refcount = NULL;
    m->entries = NULL;
    m->layer_done = NULL;
    m->locked = 0;
    m->step_open = 0;
    m->n_stale = 0;
}

void sh_free(shadow *m)
{
    unlock(m);
}

static void *xcalloc(size_t n, size_t size)
{
    void *p = calloc(n ? n : 1, size ? size : 1);
    if (!p) {
        fprintf(stderr, "resa fuzz: the model is out of memory\n");
        abort();
    }
    return p;
}

static void lock(shadow *m)
{
    int64_t b = m->iv[P_BLOCK];
    m->n_pages = (int32_t)((m->iv[P_MAX_TOKENS] + b - 1) / b);
    m->max_seq_blocks = (int32_t)((sh_get_int(m, P_MAX_SEQ_TOKENS) + b - 1) / b);
    m->n_free = m->n_pages;
    m->free_list = xcalloc((size_t)m->n_pages, sizeof(int32_t));
    m->refcount = xcalloc((size_t)m->n_pages, sizeof(int32_t));
    for (int32_t i = 0; i < m->n_pages; i++)
        m->free_list[i] = i;
    m->seqs = xcalloc((size_t)m->iv[P_MAX_SEQS], sizeof(sh_seq));
    m->entries = xcalloc((size_t)m->iv[P_MAX_SEQS], sizeof(sh_entry));
    m->layer_done = xcalloc((size_t)m->iv[P_LAYERS], 1);
    m->locked = 1;
    m->n_stale = 0;
}

static int32_t take_page(shadow *m)
{
    if (m->n_free == 0) {
        fprintf(stderr, "resa fuzz: model bug: no free page\n");
        abort();
    }
    int32_t p = m->free_list[--m->n_free];
    m->refcount[p] = 1;
    return p;
}

static void unref_page(shadow *m, int32_t p)
{
    if (--m->refcount[p] == 0)
        m->free_list[m->n_free++] = p;
}

int32_t sh_slot(const shadow *m, int32_t id)
{
    if (!m->locked)
        return -1;
    for (int64_t i = 0; i < m->iv[P_MAX_SEQS]; i++)
        if (m->seqs[i].live && m->seqs[i].id == id)
            return (int32_t)i;
    return -1;
}

int sh_is_stale(const shadow *m, int32_t id)
{
    for (int32_t i = 0; i < m->n_stale; i++)
        if (m->stale[i] == id)
            return 1;
    return 0;
}

static int32_t lowest_free_slot(const shadow *m)
{
    for (int64_t i = 0; i < m->iv[P_MAX_SEQS]; i++)
        if (!m->seqs[i].live)
            return (int32_t)i;
    return -1;
}

resa_status sh_reset(shadow *m, uint32_t what, int apply)
{
    if (what == 0 || (what & ~(RESA_RESET_SESSION | RESA_RESET_PARAMS)))
        return RESA_ERR_INVALID_ARGUMENT;
    if ((what & RESA_RESET_PARAMS) && !(what & RESA_RESET_SESSION) && m->locked)
        return RESA_ERR_BAD_STATE;
    if (apply) {
        if (what & RESA_RESET_SESSION)
            unlock(m);
        if (what & RESA_RESET_PARAMS)
            defaults(m);
    }
    return RESA_OK;
}

resa_status sh_seq_create(shadow *m, int null_out, int *first_unset, int32_t *slot)
{
    *first_unset = -1;
    *slot = -1;
    if (m->step_open)
        return RESA_ERR_BAD_STATE;
    if (null_out)
        return RESA_ERR_INVALID_ARGUMENT;
    if (!m->locked) {
        for (int i = 0; i <= P_HEAD_DIM; i++)
            if (!(m->shape_set & (1u << i))) {
                *first_unset = i;
                return RESA_ERR_BAD_STATE;
            }
        if (m->iv[P_QHEADS] % m->iv[P_KVHEADS] != 0)
            return RESA_ERR_INVALID_ARGUMENT;
        if (sh_get_int(m, P_MAX_SEQ_TOKENS) > m->iv[P_MAX_TOKENS])
            return RESA_ERR_INVALID_ARGUMENT;
        int64_t pages = (m->iv[P_MAX_TOKENS] + m->iv[P_BLOCK] - 1) / m->iv[P_BLOCK];
        if (pages > (int64_t)(P30 - 1))
            return RESA_ERR_INVALID_ARGUMENT;
        *slot = 0; /* every slot of a new lock is free */
        return RESA_OK;
    }
    *slot = lowest_free_slot(m);
    return *slot < 0 ? RESA_ERR_CAPACITY : RESA_OK;
}

static void seq_start(shadow *m, sh_seq *q, int32_t id)
{
    int64_t layers = m->iv[P_LAYERS], hkv = m->iv[P_KVHEADS];
    memset(q, 0, sizeof *q);
    q->live = 1;
    q->id = id;
    q->pages = xcalloc((size_t)m->max_seq_blocks, sizeof(int32_t));
    q->glen = -1;
    q->rec = xcalloc((size_t)layers, sizeof(sh_record));
    for (int64_t l = 0; l < layers; l++) {
        q->rec[l].blocks = xcalloc((size_t)(hkv * m->max_seq_blocks), sizeof(int32_t));
        q->rec[l].known = xcalloc((size_t)hkv, sizeof(int32_t));
        q->rec[l].cnt_lo = xcalloc((size_t)hkv, sizeof(int32_t));
        q->rec[l].cnt_hi = xcalloc((size_t)hkv, sizeof(int32_t));
        q->rec[l].n_blocks = xcalloc((size_t)hkv, sizeof(int32_t));
    }
}

void sh_seq_created(shadow *m, int32_t slot, int32_t id)
{
    if (!m->locked)
        lock(m);
    seq_start(m, &m->seqs[slot], id);
}

static void remember_stale(shadow *m, int32_t id)
{
    if (m->n_stale < SH_STALE) {
        m->stale[m->n_stale++] = id;
    } else {
        memmove(m->stale, m->stale + 1, sizeof(int32_t) * (SH_STALE - 1));
        m->stale[SH_STALE - 1] = id;
    }
}

resa_status sh_seq_release(shadow *m, int32_t id, int apply)
{
    if (m->step_open)
        return RESA_ERR_BAD_STATE;
    int32_t slot = sh_slot(m, id);
    if (slot < 0)
        return RESA_ERR_INVALID_ARGUMENT;
    if (apply) {
        sh_seq *q = &m->seqs[slot];
        for (int32_t i = 0; i < q->n_pages; i++)
            unref_page(m, q->pages[i]);
        free_seq(m, q);
        remember_stale(m, id);
    }
    return RESA_OK;
}

resa_status sh_seq_fork(shadow *m, int32_t parent, int null_out, int32_t *slot)
{
    *slot = -1;
    if (m->step_open)
        return RESA_ERR_BAD_STATE;
    int32_t ps = sh_slot(m, parent);
    if (ps < 0 || null_out)
        return RESA_ERR_INVALID_ARGUMENT;
    *slot = lowest_free_slot(m);
    if (*slot < 0)
        return RESA_ERR_CAPACITY;
    if (m->seqs[ps].len % m->iv[P_BLOCK] != 0 && m->n_free == 0)
        return RESA_ERR_CAPACITY;
    return RESA_OK;
}

static size_t pos_stride(const shadow *m) /* grid values of one position */
{
    return (size_t)(m->iv[P_LAYERS] * m->iv[P_KVHEADS] * m->iv[P_HEAD_DIM]);
}

static void ensure_cap(shadow *m, sh_seq *q, int64_t need)
{
    if (need <= q->cap)
        return;
    int64_t cap = q->cap * 2 > need ? q->cap * 2 : need;
    if (cap < 16)
        cap = 16;
    size_t stride = pos_stride(m);
    int8_t *k = xcalloc((size_t)cap * stride, 1), *v = xcalloc((size_t)cap * stride, 1);
    if (q->cap) {
        memcpy(k, q->k, (size_t)q->cap * stride);
        memcpy(v, q->v, (size_t)q->cap * stride);
    }
    free(q->k);
    free(q->v);
    q->k = k;
    q->v = v;
    q->cap = cap;
}

void sh_seq_forked(shadow *m, int32_t parent, int32_t slot, int32_t id)
{
    sh_seq *p = &m->seqs[sh_slot(m, parent)], *c = &m->seqs[slot];
    seq_start(m, c, id);
    c->len = p->len;
    c->pending = p->pending;
    c->first = p->first; /* a fork copies the span */
    c->glen = p->glen;
    c->n_pages = p->n_pages;
    int partial = p->len % m->iv[P_BLOCK] != 0;
    for (int32_t i = 0; i < p->n_pages; i++) {
        if (partial && i == p->n_pages - 1) {
            c->pages[i] = take_page(m);
        } else {
            c->pages[i] = p->pages[i];
            m->refcount[p->pages[i]]++;
        }
    }
    ensure_cap(m, c, p->len);
    if (p->len) {
        memcpy(c->k, p->k, (size_t)p->len * pos_stride(m));
        memcpy(c->v, p->v, (size_t)p->len * pos_stride(m));
    }
}

resa_status sh_query(const shadow *m, int32_t id, int null_out)
{
    if (sh_slot(m, id) < 0 || null_out)
        return RESA_ERR_INVALID_ARGUMENT;
    return RESA_OK;
}

/* resa_seq_set_span, in the order lib/sequence.c checks.  The upper bound of
 * global_length is (2^30 - 1) * BLOCK_SIZE, exclusive (API.md), so that
 * M = ceil((global_length + 1) / b) stays below 2^30. */
resa_status sh_set_span(shadow *m, int32_t id, int64_t first, int64_t glen, int apply)
{
    if (m->step_open)
        return RESA_ERR_BAD_STATE;
    int32_t slot = sh_slot(m, id);
    if (slot < 0)
        return RESA_ERR_INVALID_ARGUMENT;
    sh_seq *q = &m->seqs[slot];
    int64_t b = m->iv[P_BLOCK], limit = ((int64_t)1 << 30) * b;
    if (first < 0 || first % b != 0 || first >= limit)
        return RESA_ERR_INVALID_ARGUMENT;
    if (q->len > 0 && first != q->first)
        return RESA_ERR_INVALID_ARGUMENT;
    if (glen != -1 && (glen < first + q->len || glen >= limit - b))
        return RESA_ERR_INVALID_ARGUMENT;
    if (apply) {
        q->first = first;
        q->glen = glen;
    }
    return RESA_OK;
}

int64_t sh_free_tokens(const shadow *m)
{
    int64_t b = m->iv[P_BLOCK];
    if (!m->locked)
        return (m->iv[P_MAX_TOKENS] + b - 1) / b * b;
    return (int64_t)m->n_free * b;
}

/* ---- the budget rule (docs/API.md, "Block selection") ---- */

int32_t sh_budget(int64_t mb, double r, int64_t n_min, int64_t local, int64_t sink)
{
    int64_t r_ppm = llround(r * 1e6);
    int64_t n = (r_ppm * mb + 999999) / 1000000;
    int64_t floor_n = n_min < mb ? n_min : mb;
    if (n < floor_n)
        n = floor_n;
    int64_t forced = local + sink < mb ? local + sink : mb;
    if (n < forced)
        n = forced;
    if (n > mb)
        n = mb;
    return (int32_t)n;
}

/* ---- the step ---- */

static int64_t blocks_for(int64_t tokens, int64_t b)
{
    return (tokens + b - 1) / b;
}

resa_status sh_step_begin(shadow *m, int32_t n, const int32_t *ids, const int32_t *modes,
                          const int32_t *n_tokens, uint32_t flags, int apply)
{
    if (flags & ~RESA_STEP_REPLAY)
        return RESA_ERR_INVALID_ARGUMENT;
    if (m->step_open || !m->locked)
        return RESA_ERR_BAD_STATE;
    if (n < 1 || n > m->iv[P_MAX_SEQS] || !ids || !modes || !n_tokens)
        return RESA_ERR_INVALID_ARGUMENT;
    int64_t b = m->iv[P_BLOCK], max_len = sh_get_int(m, P_MAX_SEQ_TOKENS);
    int64_t rows = 0, need = 0;
    for (int32_t i = 0; i < n; i++) {
        int32_t slot = sh_slot(m, ids[i]);
        if (slot < 0)
            return RESA_ERR_INVALID_ARGUMENT;
        for (int32_t j = 0; j < i; j++)
            if (ids[j] == ids[i])
                return RESA_ERR_INVALID_ARGUMENT; /* twice in the batch */
        const sh_seq *q = &m->seqs[slot];
        int32_t nt = n_tokens[i];
        /* HEAD_SHARE ranks over every block of the sequence: not for a split one */
        if (m->iv[P_GROUP] == RESA_GROUP_SCORE_HEAD_SHARE && SH_SPARSE(modes[i]) &&
            (q->first != 0 || modes[i] == RESA_MODE_QUERY_SPARSE))
            return RESA_ERR_NOT_SUPPORTED;
        /* a context that does not hold the tail only answers queries */
        if (SH_STORES(modes[i]) && q->glen >= 0 && q->glen != q->first + q->len)
            return RESA_ERR_INVALID_ARGUMENT;
        switch (modes[i]) {
        case RESA_MODE_QUERY_DENSE:
        case RESA_MODE_QUERY_SPARSE:
            if (nt < 1 || (modes[i] == RESA_MODE_QUERY_SPARSE && nt != 1))
                return RESA_ERR_INVALID_ARGUMENT;
            if (q->pending != 0)
                return RESA_ERR_BAD_STATE;
            break;
        case RESA_MODE_APPEND:
        case RESA_MODE_APPEND_KV:
        case RESA_MODE_DECODE:
            if (nt < 1 || (modes[i] == RESA_MODE_DECODE && nt != 1))
                return RESA_ERR_INVALID_ARGUMENT;
            if (q->len + nt > max_len)
                return RESA_ERR_CAPACITY;
            need += blocks_for(q->len + nt, b) - q->n_pages;
            break;
        case RESA_MODE_RECTIFY:
            if (q->pending == 0)
                return RESA_ERR_BAD_STATE;
            if (nt < 1 || nt > q->pending)
                return RESA_ERR_INVALID_ARGUMENT;
            break;
        default:
            return RESA_ERR_INVALID_ARGUMENT;
        }
        rows += nt;
    }
    if (flags & RESA_STEP_REPLAY)
        return RESA_ERR_INVALID_ARGUMENT; /* the CPU backend never captures */
    if (rows > m->iv[P_MAX_STEP])
        return RESA_ERR_CAPACITY;
    /* copy-on-write copies: a shared page (r holders) rectified by k entries
     * of the step is copied min(k, r - 1) times (API.md, "Capacity") */
    {
        int32_t *k = xcalloc((size_t)m->n_pages, sizeof(int32_t));
        for (int32_t i = 0; i < n; i++) {
            if (modes[i] != RESA_MODE_RECTIFY)
                continue;
            const sh_seq *q = &m->seqs[sh_slot(m, ids[i])];
            int64_t rs = q->len - q->pending;
            for (int64_t p = rs / b; p <= (rs + n_tokens[i] - 1) / b; p++)
                k[q->pages[p]]++;
        }
        for (int32_t p = 0; p < m->n_pages; p++)
            if (k[p] && m->refcount[p] > 1)
                need += k[p] < m->refcount[p] - 1 ? k[p] : m->refcount[p] - 1;
        free(k);
    }
    if (need > m->n_free)
        return RESA_ERR_CAPACITY;
    if (!apply)
        return RESA_OK;

    int64_t row = 0;
    m->has_output = 0;
    m->has_kv = 0;
    m->n_sparse = 0;
    for (int32_t i = 0; i < n; i++) {
        int32_t slot = sh_slot(m, ids[i]);
        sh_seq *q = &m->seqs[slot];
        sh_entry *e = &m->entries[i];
        memset(e, 0, sizeof *e);
        e->slot = slot;
        e->mode = modes[i];
        e->n = n_tokens[i];
        e->row = row;
        e->old_len = q->len;
        e->fb = q->first / b;
        if (!SH_STORES(e->mode)) {
            e->start = q->len; /* QUERY rows: after every stored token */
        } else if (e->mode == RESA_MODE_RECTIFY) {
            e->start = q->len - q->pending;
            for (int64_t p = e->start / b; p <= (e->start + e->n - 1) / b; p++)
                if (m->refcount[q->pages[p]] > 1) {
                    int32_t fresh = take_page(m);
                    m->n_cow_copies++;
                    unref_page(m, q->pages[p]);
                    q->pages[p] = fresh;
                }
        } else {
            e->start = q->len;
            while (q->n_pages < blocks_for(q->len + e->n, b)) {
                q->pages[q->n_pages++] = take_page(m);
                e->new_pages++;
            }
            ensure_cap(m, q, q->len + e->n);
        }
        if (SH_SPARSE(e->mode)) {
            /* the whole sequence's budget and forced blocks (resa_seq_set_span):
             * the query sits at global_length, or after this context's tokens */
            int64_t gpos = e->mode == RESA_MODE_QUERY_SPARSE && q->glen >= 0 ? q->glen
                                                                              : q->first + q->len;
            e->m = (int32_t)blocks_for(gpos + 1, b);
            e->nsel = sh_budget(e->m, m->fv[P_FRACTION], m->iv[P_MIN_BLOCKS], m->iv[P_LOCAL],
                                m->iv[P_SINK]);
            int64_t forced = m->iv[P_LOCAL] + m->iv[P_SINK] < e->m ? m->iv[P_LOCAL] + m->iv[P_SINK]
                                                                   : e->m;
            e->kpick = e->nsel < e->m ? e->nsel - (int32_t)forced : 0;
            e->ml = (int32_t)blocks_for(e->mode == RESA_MODE_DECODE ? q->len + 1 : q->len, b);
            m->n_sparse++;
        }
        if (e->mode != RESA_MODE_APPEND_KV)
            m->has_output = 1;
        if (SH_STORES(e->mode))
            m->has_kv = 1;
        m->n_split_entries += q->first > 0 || (q->glen >= 0 && q->glen != q->first + q->len);
        m->n_entries_by_mode[e->mode == RESA_MODE_DECODE && e->nsel < e->m ? 4
                             : e->mode >= RESA_MODE_QUERY_DENSE ? e->mode + 1 : e->mode]++;
        row += e->n;
    }
    m->n_entries = n;
    m->rows = row;
    m->step_open = 1;
    memset(m->layer_done, 0, (size_t)m->iv[P_LAYERS]);
    m->st_local = (int32_t)m->iv[P_LOCAL];
    m->st_sink = (int32_t)m->iv[P_SINK];
    m->st_scale = sh_get_real(m, P_SCALE);
    m->st_width = m->fv[P_WIDTH];
    m->st_group = (int32_t)m->iv[P_GROUP];
    return RESA_OK;
}

resa_status sh_step_attend(const shadow *m, int32_t layer, int q_null, int k_null, int v_null,
                           int out_null, int ts_null, int tb_null, uint32_t flags)
{
    if (flags != 0)
        return RESA_ERR_INVALID_ARGUMENT;
    if (!m->step_open)
        return RESA_ERR_BAD_STATE;
    if (layer < 0 || layer >= m->iv[P_LAYERS] || (m->has_kv && (k_null || v_null)))
        return RESA_ERR_INVALID_ARGUMENT;
    if (m->has_output && (q_null || out_null))
        return RESA_ERR_INVALID_ARGUMENT;
    if (ts_null != tb_null)
        return RESA_ERR_INVALID_ARGUMENT;
    if (!ts_null && m->n_sparse > 0 && m->st_group == RESA_GROUP_SCORE_HEAD_SHARE)
        return RESA_ERR_NOT_SUPPORTED;
    return RESA_OK;
}

/* The checks common to the two-phase calls (lib/step_cp.c's order). */
static resa_status cp_preamble(const shadow *m, uint32_t flags)
{
    if (flags != 0)
        return RESA_ERR_INVALID_ARGUMENT;
    if (!m->step_open)
        return RESA_ERR_BAD_STATE;
    if (m->n_sparse > 0 && m->st_group == RESA_GROUP_SCORE_HEAD_SHARE)
        return RESA_ERR_NOT_SUPPORTED;
    return RESA_OK;
}

int32_t sh_max_kpick(const shadow *m)
{
    int32_t k = 0;
    for (int32_t i = 0; m->step_open && i < m->n_entries; i++)
        if (SH_SPARSE(m->entries[i].mode) && m->entries[i].kpick > k)
            k = m->entries[i].kpick;
    return k;
}

/* scores and blocks given when capacity > 0; capacity holds every K_i */
static resa_status check_lists(const shadow *m, int64_t capacity, int scores_null,
                               int blocks_null)
{
    if (capacity > 0 && (scores_null || blocks_null))
        return RESA_ERR_INVALID_ARGUMENT;
    if (capacity < 0 || sh_max_kpick(m) > capacity)
        return RESA_ERR_INVALID_ARGUMENT;
    return RESA_OK;
}

resa_status sh_block_scores(const shadow *m, int32_t layer, int q_null, int64_t capacity,
                            int scores_null, int blocks_null, int counts_null, uint32_t flags)
{
    resa_status s = cp_preamble(m, flags);
    if (s != RESA_OK)
        return s;
    if (layer < 0 || layer >= m->iv[P_LAYERS])
        return RESA_ERR_INVALID_ARGUMENT;
    if (counts_null || (m->n_sparse > 0 && q_null))
        return RESA_ERR_INVALID_ARGUMENT;
    return check_lists(m, capacity, scores_null, blocks_null);
}

resa_status sh_thresholds(const shadow *m, int32_t n_ranks, int64_t capacity, int scores_null,
                          int blocks_null, int counts_null, int ts_null, int tb_null,
                          uint32_t flags)
{
    resa_status s = cp_preamble(m, flags);
    if (s != RESA_OK)
        return s;
    if (n_ranks < 1 || counts_null || ts_null || tb_null)
        return RESA_ERR_INVALID_ARGUMENT;
    return check_lists(m, capacity, scores_null, blocks_null);
}

resa_status sh_merge(const shadow *m, int ctx_version, int32_t dtype, int32_t n_parts,
                     int64_t n_rows, int32_t head_dim, int parts_null, int lse_null,
                     int out_null, uint32_t flags)
{
    if (ctx_version) {
        dtype = (int32_t)m->iv[P_IO_DTYPE];
        head_dim = (int32_t)m->iv[P_HEAD_DIM];
    }
    if (flags != 0 || (dtype != RESA_DTYPE_F32 && dtype != RESA_DTYPE_F16 &&
                       dtype != RESA_DTYPE_BF16))
        return RESA_ERR_INVALID_ARGUMENT;
    if (n_parts < 1 || n_rows < 0 || head_dim < 1 || head_dim > 256)
        return RESA_ERR_INVALID_ARGUMENT;
    if (n_rows > 0 && (parts_null || lse_null || out_null))
        return RESA_ERR_INVALID_ARGUMENT;
    return RESA_OK;
}

resa_status sh_step_end(shadow *m, uint32_t flags, int apply)
{
    if (flags != 0)
        return RESA_ERR_INVALID_ARGUMENT;
    if (!m->step_open)
        return RESA_ERR_BAD_STATE;
    for (int64_t l = 0; l < m->iv[P_LAYERS]; l++)
        if (!m->layer_done[l])
            return RESA_ERR_BAD_STATE;
    if (!apply)
        return RESA_OK;
    /* docs/API.md, "Rectification bookkeeping" */
    for (int32_t i = 0; i < m->n_entries; i++) {
        const sh_entry *e = &m->entries[i];
        sh_seq *q = &m->seqs[e->slot];
        if (!SH_STORES(e->mode))
            continue; /* QUERY entries store nothing */
        if (e->mode == RESA_MODE_RECTIFY) {
            q->pending -= e->n;
            continue;
        }
        if (q->glen >= 0) /* the tail: global_length follows the growth */
            q->glen = q->first + q->len + e->n;
        int approximate = e->mode == RESA_MODE_DECODE && e->nsel < e->m;
        if (q->pending > 0 || approximate)
            q->pending += e->n;
        q->len += e->n;
    }
    m->step_open = 0;
    return RESA_OK;
}

resa_status sh_step_cancel(shadow *m, int apply)
{
    if (!m->step_open)
        return RESA_ERR_BAD_STATE;
    if (!apply)
        return RESA_OK;
    for (int32_t i = 0; i < m->n_entries; i++) {
        sh_entry *e = &m->entries[i];
        sh_seq *q = &m->seqs[e->slot];
        for (int32_t k = 0; k < e->new_pages; k++)
            unref_page(m, q->pages[--q->n_pages]);
        e->new_pages = 0;
    }
    m->step_open = 0;
    return RESA_OK;
}

resa_status sh_selected(const shadow *m, int32_t id, int32_t layer, int32_t head,
                        int blocks_null, int64_t capacity, int count_null)
{
    if (sh_slot(m, id) < 0 || count_null)
        return RESA_ERR_INVALID_ARGUMENT;
    if (!m->iv[P_RECORD])
        return RESA_ERR_BAD_STATE;
    if (layer < 0 || layer >= m->iv[P_LAYERS] || head < 0 || head >= m->iv[P_KVHEADS])
        return RESA_ERR_INVALID_ARGUMENT;
    if (capacity < 0 || (capacity > 0 && blocks_null))
        return RESA_ERR_INVALID_ARGUMENT;
    if (m->step_open)
        return RESA_ERR_BAD_STATE;
    return RESA_OK;
}

/* ---- the reference: selection and attention ---- */

SH_NO_COVERAGE
static int8_t kval(const shadow *m, const sh_seq *q, int64_t pos, int32_t layer, int32_t h,
                   int32_t j)
{
    size_t at = (((size_t)pos * (size_t)m->iv[P_LAYERS] + (size_t)layer) *
                     (size_t)m->iv[P_KVHEADS] + (size_t)h) * (size_t)m->iv[P_HEAD_DIM] + (size_t)j;
    return q->k[at];
}
SH_NO_COVERAGE
static int8_t vval(const shadow *m, const sh_seq *q, int64_t pos, int32_t layer, int32_t h,
                   int32_t j)
{
    size_t at = (((size_t)pos * (size_t)m->iv[P_LAYERS] + (size_t)layer) *
                     (size_t)m->iv[P_KVHEADS] + (size_t)h) * (size_t)m->iv[P_HEAD_DIM] + (size_t)j;
    return q->v[at];
}

/* Whether a sparse entry's selection can be computed exactly: the pooled
 * group score (HEAD_SHARE goes through exp), summaries in the KV dtype (exact
 * for grid keys), a power-of-two group (an exact mean) and a width that is a
 * multiple of 1/4; then every score is exact in fp32 and ties break the same
 * way.  The same holds for the scores resa_ctx_step_block_scores lists. */
static int selection_exact(const shadow *m)
{
    int64_t g = m->iv[P_QHEADS] / m->iv[P_KVHEADS];
    double w4 = m->st_width * 4;
    return m->st_group == RESA_GROUP_SCORE_POOLED &&
           m->iv[P_SUMMARY] == RESA_SUMMARY_KV_DTYPE && (g & (g - 1)) == 0 && w4 == floor(w4) &&
           m->iv[P_KV_DTYPE] != RESA_DTYPE_FP8_E4M3; /* fp8: the grid is not exact */
}

/* A sparse entry's candidates in this context: local blocks [*c0, *c1), those
 * that are neither sink ([0, SINK)) nor local ([M - LOCAL, M)) blocks of the
 * whole sequence (global block = fb + local block).  Returns how many of them
 * compete for the K = nsel - forced places (0 when nsel >= M or K = 0). */
static int32_t cand_range(const shadow *m, const sh_entry *e, int32_t *c0, int32_t *c1)
{
    int64_t M = e->m;
    int64_t sink = m->st_sink < M ? m->st_sink : M;
    int64_t from = M - (m->st_local < M ? m->st_local : M);
    int64_t lo = sink - e->fb, hi = from - e->fb;
    lo = lo < 0 ? 0 : lo > e->ml ? e->ml : lo;
    hi = hi < lo ? lo : hi > e->ml ? e->ml : hi;
    *c0 = (int32_t)lo;
    *c1 = (int32_t)hi;
    return e->nsel < e->m && e->kpick > 0 ? *c1 - *c0 : 0;
}

/* Scores (double; exact when selection_exact) of the candidates [c0, c1) of
 * entry e for (layer, kv head hk) from the entry's query row of qg:
 * API.md's score over the block's min/max box of its stored keys. */
SH_NO_COVERAGE
static void cand_scores(const shadow *m, const sh_entry *e, int32_t layer, int32_t hk,
                        const int8_t *qg, int32_t c0, int32_t c1, double *score)
{
    const sh_seq *q = &m->seqs[e->slot];
    int32_t b = (int32_t)m->iv[P_BLOCK], d = (int32_t)m->iv[P_HEAD_DIM];
    int32_t hq = (int32_t)m->iv[P_QHEADS], g = hq / (int32_t)m->iv[P_KVHEADS];
    const int8_t *qrow = qg + (size_t)e->row * (size_t)hq * (size_t)d;
    double *qp = xcalloc((size_t)d, sizeof(double));
    for (int32_t j = 0; j < d; j++) {
        for (int32_t gi = 0; gi < g; gi++) {
            int8_t x = qrow[((size_t)hk * g + gi) * d + j];
            qp[j] += x == SH_NAN ? NAN : x / SH_GRID; /* a NaN query element: NaN scores */
        }
        qp[j] /= g;
    }
    int64_t valid = e->start; /* stored keys: a candidate is never the DECODE's own block */
    for (int32_t i = c0; i < c1; i++) {
        int64_t lo = (int64_t)i * b, hi = lo + b < valid ? lo + b : valid;
        double s = 0;
        for (int32_t j = 0; j < d; j++) {
            int mn = 127, mx = -128;
            for (int64_t p = lo; p < hi; p++) {
                int x = kval(m, q, p, layer, hk, j);
                mn = x < mn ? x : mn;
                mx = x > mx ? x : mx;
            }
            double a = mn / SH_GRID, c = mx / SH_GRID;
            s += 0.5 * (qp[j] * (c + a) + m->st_width * fabs(qp[j]) * (c - a));
        }
        score[i] = isnan(s) ? -INFINITY : s; /* a NaN score ranks as -inf (API.md) */
    }
    free(qp);
}

/* The selection's strict order: higher score first, then the lower index. */
static int better(const double *score, int32_t a, int32_t b)
{
    return score[a] > score[b] || (score[a] == score[b] && a < b);
}

/* Marks the best k of candidates [c0, c1) not yet marked in flag (order:
 * better), one at a time: the selection's and block_scores' top-K rule. */
static void mark_best(const double *score, int32_t c0, int32_t c1, int32_t k, uint8_t *flag)
{
    for (int32_t t = 0; t < k; t++) {
        int32_t best = -1;
        for (int32_t i = c0; i < c1; i++)
            if (!flag[i] && (best < 0 || better(score, i, best)))
                best = i;
        flag[best] = 1;
    }
}

/* What the model knows of one (sparse entry, layer, kv head)'s selection. */
typedef struct sh_choice {
    int32_t known;   /* sel[] is the whole selection */
    int32_t n;       /* entries of sel[]: the selection, or only the forced blocks */
    int32_t lo, hi;  /* bounds of the number of blocks attended here */
} sh_choice;

/* The blocks entry x (index ei) attends here for (layer, kv head hk), as
 * local indices ascending into sel[0 .. e->ml): every block when nsel >= M;
 * else the forced blocks here plus the candidates chosen by score, the best
 * min(K, candidates) of them, or with thresholds (ts, tb) those ranking at or
 * above the threshold of (ei, hk).  When the scores cannot be computed
 * exactly only the forced blocks are listed. */
SH_NO_COVERAGE
static void choose(const shadow *m, int32_t ei, int32_t layer, int32_t hk, const int8_t *qg,
                   int exact, const float *ts, const int32_t *tb, int32_t *sel, sh_choice *c)
{
    const sh_entry *e = &m->entries[ei];
    int32_t c0, c1, k = 0;
    memset(c, 0, sizeof *c);
    if (e->nsel >= e->m) {
        for (int32_t i = 0; i < e->ml; i++)
            sel[k++] = i;
        c->known = 1;
        c->n = c->lo = c->hi = k;
        return;
    }
    int32_t n_cand = cand_range(m, e, &c0, &c1);
    int32_t top = e->kpick < n_cand ? e->kpick : n_cand;
    uint8_t *chosen = xcalloc((size_t)e->ml, 1);
    int32_t forced = 0;
    for (int32_t i = 0; i < e->ml; i++)
        if (i < c0 || i >= c1) {
            chosen[i] = 1;
            forced++;
        }
    int by_top = !ts || m->thr_self; /* the count is forced + top */
    c->known = n_cand == 0 || (exact || (by_top && top == 0));
    c->lo = forced + (by_top ? top : 0);
    c->hi = forced + (by_top ? top : n_cand);
    if (n_cand > 0 && exact) {
        double *score = xcalloc((size_t)e->ml, sizeof(double));
        cand_scores(m, e, layer, hk, qg, c0, c1, score);
        if (ts) {
            size_t x = (size_t)ei * (size_t)m->iv[P_KVHEADS] + (size_t)hk;
            double t = isnan(ts[x]) ? -INFINITY : (double)ts[x];
            int64_t tl = (int64_t)tb[x] - e->fb;
            for (int32_t i = c0; i < c1; i++)
                chosen[i] = score[i] > t || (score[i] == t && i <= tl);
        } else {
            mark_best(score, c0, c1, top, chosen);
        }
        free(score);
    }
    for (int32_t i = 0; i < e->ml; i++)
        if (chosen[i])
            sel[k++] = i;
    free(chosen);
    c->n = k;
    if (c->known)
        c->lo = c->hi = k;
}

/* Whether position pos's V of KV head h (layer) holds a non-finite value. */
SH_NO_COVERAGE
static int v_poisoned(const shadow *m, const sh_seq *q, int64_t pos, int32_t layer, int32_t h)
{
    for (int32_t j = 0; j < (int32_t)m->iv[P_HEAD_DIM]; j++)
        if (SH_IS_POISON(vval(m, q, pos, layer, h, j)))
            return 1;
    return 0;
}

/* The first position below hi whose V of head h holds a non-finite value, or hi. */
SH_NO_COVERAGE
static int64_t first_poison(const shadow *m, const sh_seq *q, int32_t layer, int32_t h, int64_t hi)
{
    for (int64_t p = 0; p < hi; p++)
        if (v_poisoned(m, q, p, layer, h))
            return p;
    return hi;
}

/* Whether a row that attends the listed blocks up to pos reads a non-finite V. */
SH_NO_COVERAGE
static int blocks_poisoned(const shadow *m, const sh_seq *q, int32_t layer, int32_t h,
                           const int32_t *blocks, int32_t n_blocks, int64_t pos)
{
    int64_t b = m->iv[P_BLOCK];
    for (int32_t bi = 0; bi < n_blocks; bi++)
        for (int64_t p = (int64_t)blocks[bi] * b; p < (int64_t)blocks[bi] * b + b && p <= pos; p++)
            if (v_poisoned(m, q, p, layer, h))
                return 1;
    return 0;
}

/* x rounded to nearest even on a grid of 2^(e - mant) for its binade e, with
 * e at least min_e (the subnormals' spacing below): an f16 (10, -14) or
 * e4m3 (3, -6) value of x, before any saturation. */
SH_NO_COVERAGE
static double round_bits(double x, int mant, int min_e)
{
    if (x == 0.0)
        return x;
    int e;
    frexp(fabs(x), &e); /* |x| in [2^(e-1), 2^e) */
    double step = ldexp(1.0, (e - 1 < min_e ? min_e : e - 1) - mant);
    return nearbyint(x / step) * step;
}

/* An fp32 value rounded to the IO dtype (nearest even). */
SH_NO_COVERAGE
static double round_io(int32_t io, float x)
{
    if (io == RESA_DTYPE_F32)
        return x;
    return round_bits(x, io == RESA_DTYPE_F16 ? 10 : 7, io == RESA_DTYPE_F16 ? -14 : -126);
}

/* The K (is_v 0) or V head vector of a position as the cache reads it back:
 * the grid values, or with an fp8 cache the codec of docs/API.md ("fp8 KV
 * cache"): scale = amax / 448 in fp32, each byte e4m3 of x / scale (nearest
 * even, saturating at 448), read back as the fp32 product rounded to IO. */
SH_NO_COVERAGE
static void read_back(const shadow *m, const sh_seq *q, int64_t pos, int32_t layer, int32_t h,
                      int is_v, double *out)
{
    int32_t d = (int32_t)m->iv[P_HEAD_DIM];
    float amax = 0.0f;
    for (int32_t j = 0; j < d; j++) {
        int8_t g = is_v ? vval(m, q, pos, layer, h, j) : kval(m, q, pos, layer, h, j);
        out[j] = g / SH_GRID;
        amax = fabsf((float)out[j]) > amax ? fabsf((float)out[j]) : amax;
    }
    if (m->iv[P_KV_DTYPE] != RESA_DTYPE_FP8_E4M3 || amax == 0.0f)
        return; /* grid values are exact in every other KV dtype; all zero: zero bytes */
    float scale = amax / 448.0f;
    for (int32_t j = 0; j < d; j++) {
        double b = round_bits((float)out[j] / scale, 3, -6);
        b = b > 448.0 ? 448.0 : b < -448.0 ? -448.0 : b;
        out[j] = round_io((int32_t)m->iv[P_IO_DTYPE], (float)b * scale);
    }
}

/* Dense or block-sparse attention of one query row, head h, in double:
 * keys [0, pos] (or those of the listed blocks up to pos).  *lse is the
 * log-sum-exp of the scaled scores; no key: out NaN, lse -inf. */
SH_NO_COVERAGE
static void reference_row(const shadow *m, const sh_seq *q, int32_t layer, const int8_t *qv,
                          int32_t h, int64_t pos, const int32_t *blocks, int32_t n_blocks,
                          double *out, double *lse)
{
    int32_t d = (int32_t)m->iv[P_HEAD_DIM], b = (int32_t)m->iv[P_BLOCK];
    int32_t hk = h / (int32_t)(m->iv[P_QHEADS] / m->iv[P_KVHEADS]);
    double mx = -INFINITY, sum = 0, kb[256], vb[256]; /* HEAD_DIM <= 256 here */
    double *sc = xcalloc((size_t)pos + 1, sizeof(double)); /* the scores, in visiting order */
    for (int32_t j = 0; j < d; j++)
        out[j] = 0;
    /* two passes: the scores and their maximum, then the weights */
    for (int pass = 0; pass < 2; pass++) {
        int32_t nb = blocks ? n_blocks : 1;
        int64_t n = 0;
        for (int32_t bi = 0; bi < nb; bi++) {
            int64_t lo = blocks ? (int64_t)blocks[bi] * b : 0;
            int64_t hi = blocks ? lo + b : pos + 1;
            if (hi > pos + 1)
                hi = pos + 1;
            for (int64_t p = lo; p < hi; p++, n++) {
                if (pass == 0) {
                    double s = 0;
                    read_back(m, q, p, layer, hk, 0, kb);
                    for (int32_t j = 0; j < d; j++)
                        s += (qv[j] / SH_GRID) * kb[j];
                    sc[n] = s * m->st_scale;
                    mx = sc[n] > mx ? sc[n] : mx;
                } else {
                    double w = exp(sc[n] - mx);
                    sum += w;
                    read_back(m, q, p, layer, hk, 1, vb);
                    for (int32_t j = 0; j < d; j++)
                        out[j] += w * vb[j];
                }
            }
        }
    }
    free(sc);
    for (int32_t j = 0; j < d; j++)
        out[j] /= sum;
    *lse = mx + log(sum);
}

/* Records what a sparse entry attended for (layer, hk): global indices. */
static void record(shadow *m, const sh_entry *e, int32_t layer, int32_t hk, const int32_t *sel,
                   const sh_choice *c)
{
    sh_record *r = &m->seqs[e->slot].rec[layer];
    r->has = 1;
    r->m = e->m;
    r->n = e->nsel;
    r->sink = m->st_sink;
    r->local = m->st_local;
    r->fb = e->fb;
    r->ml = e->ml;
    r->known[hk] = c->known;
    r->cnt_lo[hk] = c->lo;
    r->cnt_hi[hk] = c->hi;
    r->n_blocks[hk] = c->n;
    int32_t *dst = r->blocks + (size_t)hk * (size_t)m->max_seq_blocks;
    for (int32_t i = 0; i < c->n; i++)
        dst[i] = (int32_t)(e->fb + sel[i]);
}

static const uint32_t LSE_FILL = 0xffffffffu; /* the 0xff bytes lse is filled with */

static int untouched_f32(const float *p)
{
    uint32_t u;
    memcpy(&u, p, 4);
    return u == LSE_FILL;
}

const char *sh_attended(shadow *m, int32_t layer, const int8_t *qg, const int8_t *kg,
                        const int8_t *vg, const void *out, const float *lse, const float *ts,
                        const int32_t *tb, char *msg, size_t msg_cap)
{
    int32_t d = (int32_t)m->iv[P_HEAD_DIM], hq = (int32_t)m->iv[P_QHEADS];
    int32_t hkv = (int32_t)m->iv[P_KVHEADS];
    int32_t io = (int32_t)m->iv[P_IO_DTYPE];
    size_t io_elt = sh_dtype_size(io);
    double tol = io == RESA_DTYPE_F32 ? 2e-4 : io == RESA_DTYPE_F16 ? 2e-3 : 1e-2;
    /* 1. the writes of every entry that stores (positions as resa.h gives them) */
    for (int32_t i = 0; i < m->n_entries; i++) {
        const sh_entry *e = &m->entries[i];
        sh_seq *q = &m->seqs[e->slot];
        if (!SH_STORES(e->mode))
            continue;
        for (int32_t t = 0; t < e->n; t++)
            for (int32_t h = 0; h < hkv; h++) {
                size_t src = ((size_t)(e->row + t) * (size_t)hkv + (size_t)h) * (size_t)d;
                size_t dst = (((size_t)(e->start + t) * (size_t)m->iv[P_LAYERS] + (size_t)layer) *
                                  (size_t)hkv + (size_t)h) * (size_t)d;
                memcpy(q->k + dst, kg + src, (size_t)d);
                memcpy(q->v + dst, vg + src, (size_t)d);
            }
    }
    m->layer_done[layer] = 1;
    /* 2. the selection record, the outputs and the log-sum-exps */
    int exact_sel = selection_exact(m);
    /* An fp8 cache does not hold the grid values exactly (3 mantissa bits): the
     * reference reads them back through the codec (read_back), and a sparse
     * selection is checked for its bounds only (selection_exact) */
    int check_values = m->st_scale <= 4.0;
    int64_t work = 0; /* multiply-adds of the reference, to sample rows of long steps */
    for (int32_t i = 0; i < m->n_entries; i++)
        if (m->entries[i].mode != RESA_MODE_APPEND_KV)
            work += (int64_t)m->entries[i].n * (m->entries[i].start + m->entries[i].n);
    work *= (int64_t)hq * d;
    int64_t stride = work / 4000000 + 1;
    int32_t *sel = NULL;
    sh_choice *ch = xcalloc((size_t)hkv, sizeof(sh_choice));
    double *ref = xcalloc((size_t)d, sizeof(double));
    int64_t *fpois = xcalloc((size_t)hkv, sizeof(int64_t)); /* per head: first_poison */
    const char *bad = NULL;
    m->last_nonfinite_rows = 0;
    for (int32_t i = 0; i < m->n_entries && !bad; i++) {
        const sh_entry *e = &m->entries[i];
        sh_seq *q = &m->seqs[e->slot];
        size_t row_bytes = (size_t)hq * (size_t)d * io_elt;
        if (e->mode == RESA_MODE_APPEND_KV) {
            if (!out)
                continue;
            const unsigned char *o = (const unsigned char *)out + (size_t)e->row * row_bytes;
            for (size_t x = 0; x < (size_t)e->n * row_bytes; x++)
                if (o[x] != 0xff) {
                    snprintf(msg, msg_cap, "step_attend: layer %d wrote out row %lld of an "
                             "APPEND_KV entry (batch entry %d)", layer,
                             (long long)(e->row + (int64_t)(x / row_bytes)), i);
                    bad = msg;
                    break;
                }
            for (size_t x = 0; lse && !bad && x < (size_t)e->n * (size_t)hq; x++)
                if (!untouched_f32(lse + (size_t)e->row * (size_t)hq + x)) {
                    snprintf(msg, msg_cap, "step_attend_ex: layer %d wrote lse of an APPEND_KV "
                             "row (batch entry %d)", layer, i);
                    bad = msg;
                }
            continue;
        }
        int sparse = SH_SPARSE(e->mode), query = !SH_STORES(e->mode);
        /* the positions this entry's rows can see: [0, start + n) ([0, start) for QUERY) */
        for (int32_t hk = 0; hk < hkv; hk++)
            fpois[hk] = first_poison(m, q, layer, hk, query ? e->start : e->start + e->n);
        if (sparse) {
            free(sel);
            sel = xcalloc((size_t)hkv * (size_t)(e->ml > 0 ? e->ml : 1), sizeof(int32_t));
            for (int32_t hk = 0; hk < hkv; hk++) {
                choose(m, i, layer, hk, qg, exact_sel, ts, tb, sel + (size_t)hk * e->ml, &ch[hk]);
                record(m, e, layer, hk, sel + (size_t)hk * e->ml, &ch[hk]);
                m->n_thr_selections += ts && ch[hk].known && e->nsel < e->m;
            }
        }
        for (int32_t t = 0; t < e->n && !bad; t++) {
            int64_t row = e->row + t;
            /* the last key the row may see: QUERY rows see [0, len) */
            int64_t pos = query ? e->start - 1 : e->start + t;
            int sampled = check_values && (t % stride == 0 || t == e->n - 1);
            int any_value = 0;
            for (int32_t h = 0; h < hq && !bad; h++) {
                size_t base = ((size_t)row * (size_t)hq + (size_t)h) * (size_t)d;
                int32_t hk = h / (hq / hkv);
                /* empty: attends no key here (out 0, lse -inf); maybe: the
                 * model does not know whether it attends one */
                int empty = pos < 0 || (sparse && ch[hk].hi == 0);
                int maybe = sparse && !empty && ch[hk].lo == 0;
                /* a non-finite V where the row reads (API.md "Non-finite values"):
                 * poisoned, the row must be non-finite; may_poison, the model does
                 * not know the blocks it reads (or whether it reads any), so either */
                int reach = !empty && fpois[hk] <= pos;
                /* a NaN in the row's own q: non-finite wherever it attends a key */
                int q_nan = 0;
                for (int32_t j = 0; j < d; j++)
                    q_nan |= qg[base + (size_t)j] == SH_NAN;
                int known_blocks = sparse && ch[hk].known && !maybe;
                int poisoned = (reach && (!sparse || (known_blocks &&
                                blocks_poisoned(m, q, layer, hk, sel + (size_t)hk * e->ml,
                                                ch[hk].n, pos)))) ||
                               (q_nan && !empty && !maybe);
                int may_poison = !poisoned && ((reach && sparse && !known_blocks) ||
                                               (q_nan && (empty || maybe)));
                m->last_nonfinite_rows += poisoned || may_poison;
                int value_row = sampled && !empty && !maybe && (!sparse || ch[hk].known) &&
                                !poisoned && !may_poison;
                double ref_lse = 0;
                if (value_row) {
                    any_value = 1;
                    if (sparse)
                        reference_row(m, q, layer, qg + base, h, pos, sel + (size_t)hk * e->ml,
                                      ch[hk].n, ref, &ref_lse);
                    else
                        reference_row(m, q, layer, qg + base, h, pos, NULL, 0, ref, &ref_lse);
                }
                int zero = 1;
                for (int32_t j = 0; j < d; j++)
                    zero &= sh_decode(io, out, base + (size_t)j) == 0.0;
                float l = lse ? lse[(size_t)row * (size_t)hq + (size_t)h] : 0.0f;
                if (lse && untouched_f32(&lse[(size_t)row * (size_t)hq + (size_t)h])) {
                    snprintf(msg, msg_cap, "step_attend_ex: layer %d, batch entry %d (mode %d): "
                             "lse of row %lld head %d not written", layer, i, e->mode,
                             (long long)row, h);
                    bad = msg;
                    break;
                }
                if (poisoned || may_poison) {
                    int finite = 1;
                    for (int32_t j = 0; j < d; j++)
                        finite &= isfinite(sh_decode(io, out, base + (size_t)j)) != 0;
                    if (poisoned && finite) {
                        snprintf(msg, msg_cap, "step_attend: layer %d, batch entry %d (mode %d, "
                                 "position %lld), query head %d %s and came out finite", layer, i,
                                 e->mode, (long long)pos, h,
                                 q_nan ? "has a NaN in q" : "attends a non-finite V");
                        bad = msg;
                        break;
                    }
                    m->n_poison_rows += poisoned;
                    m->n_qnan_rows += poisoned && q_nan;
                    if (!finite)
                        continue;
                    /* a finite row that may have read the poison: the bound below
                     * still holds (any convex combination of grid V), not the lse */
                }
                if (empty || (maybe && zero && lse && l == -INFINITY)) {
                    /* an empty row with a NaN q: 0 as an empty row, lse either */
                    if (!zero || (lse && l != -INFINITY && !may_poison)) {
                        snprintf(msg, msg_cap, "step_attend: layer %d, batch entry %d (mode %d), "
                                 "query head %d attends no key here: out %s, lse %.9g (want 0 "
                                 "and -inf)", layer, i, e->mode, h, zero ? "0" : "not 0",
                                 (double)l);
                        bad = msg;
                    }
                    continue;
                }
                if (lse && !may_poison) {
                    double tl = 1e-4 * (1 + fabs(ref_lse));
                    if (!isfinite(l) || (value_row && fabs(l - ref_lse) > tl)) {
                        snprintf(msg, msg_cap, "step_attend_ex: layer %d, batch entry %d (mode %d, "
                                 "position %lld), query head %d: lse = %.9g, %s %.9g", layer, i,
                                 e->mode, (long long)pos, h, (double)l,
                                 value_row ? "reference" : "want finite", ref_lse);
                        bad = msg;
                        break;
                    }
                    m->n_lse_checked += value_row;
                }
                for (int32_t j = 0; j < d; j++) {
                    double x = sh_decode(io, out, base + (size_t)j);
                    if (!isfinite(x) || fabs(x) > 1 + tol ||
                        (value_row && fabs(x - ref[j]) > tol)) {
                        snprintf(msg, msg_cap,
                                 "step_attend: layer %d, batch entry %d (mode %d, position %lld), "
                                 "query head %d, element %d: out = %.9g, %s %.9g",
                                 layer, i, e->mode, (long long)pos, h, j, x,
                                 value_row ? "reference" : "bound", value_row ? ref[j] : 1.0);
                        bad = msg;
                        break;
                    }
                }
            }
            if (any_value) {
                m->n_rows_checked++;
                m->n_fp8_rows += m->iv[P_KV_DTYPE] == RESA_DTYPE_FP8_E4M3;
                m->n_sparse_checked += sparse && e->nsel < e->m;
            }
        }
    }
    free(sel);
    free(ch);
    free(ref);
    free(fpois);
    return bad;
}

const char *sh_check_block_scores(shadow *m, int32_t layer, const int8_t *qg, int64_t capacity,
                                  const float *scores, const int32_t *blocks,
                                  const int32_t *counts, char *msg, size_t msg_cap)
{
    int32_t hkv = (int32_t)m->iv[P_KVHEADS];
    int exact = selection_exact(m);
    for (int32_t i = 0; i < m->n_entries; i++) {
        const sh_entry *e = &m->entries[i];
        int32_t c0 = 0, c1 = 0, n_cand = SH_SPARSE(e->mode) ? cand_range(m, e, &c0, &c1) : 0;
        int32_t want = e->kpick < n_cand ? e->kpick : n_cand;
        double *score = NULL;
        uint8_t *rank = NULL; /* rank[i]: 1 when candidate i is among the best `want` */
        if (want > 0 && exact) {
            score = xcalloc((size_t)e->ml, sizeof(double));
            rank = xcalloc((size_t)e->ml, 1);
        }
        for (int32_t hk = 0; hk < hkv; hk++) {
            size_t x = (size_t)i * (size_t)hkv + (size_t)hk;
            const char *why = NULL;
            if (counts[x] != want) {
                snprintf(msg, msg_cap, "step_block_scores: layer %d, entry %d (mode %d), head %d: "
                         "count %d, the model says %d (K %d, %d candidates here)", layer, i,
                         e->mode, hk, counts[x], want, e->kpick, n_cand);
                free(score);
                free(rank);
                return msg;
            }
            for (int64_t j = want; j < capacity && !why; j++)
                if (!untouched_f32(scores + x * (size_t)capacity + (size_t)j) ||
                    blocks[x * (size_t)capacity + (size_t)j] != -1)
                    why = "wrote past its count";
            if (score) {
                memset(rank, 0, (size_t)e->ml);
                cand_scores(m, e, layer, hk, qg, c0, c1, score);
                mark_best(score, c0, c1, want, rank);
            }
            for (int32_t j = 0; j < want && !why; j++) {
                float s = scores[x * (size_t)capacity + (size_t)j];
                int64_t bl = (int64_t)blocks[x * (size_t)capacity + (size_t)j] - e->fb;
                if (bl < c0 || bl >= c1)
                    why = "lists a block that is no candidate here";
                else if (isnan(s))
                    why = "lists a NaN score";
                for (int32_t j2 = 0; j2 < j && !why; j2++)
                    if (blocks[x * (size_t)capacity + (size_t)j2] == blocks[x * (size_t)capacity + (size_t)j])
                        why = "lists a block twice";
                if (!why && score && (!rank[bl] || (double)s != score[bl]))
                    why = rank[bl] ? "lists a score that differs from the model's"
                                   : "lists a block that is not among the best";
            }
            if (why) {
                snprintf(msg, msg_cap, "step_block_scores: layer %d, entry %d (mode %d, M %d, "
                         "budget %d, first block %lld), head %d: %s", layer, i, e->mode, e->m,
                         e->nsel, (long long)e->fb, hk, why);
                free(score);
                free(rank);
                return msg;
            }
        }
        m->n_lists_checked += score != NULL;
        free(score);
        free(rank);
    }
    return NULL;
}

/* The gathered pairs' order (API.md): score descending (NaN as -inf, -0 as
 * +0), then the lower block index. */
typedef struct sh_pair {
    double s;
    int32_t b;
} sh_pair;

static int pair_desc(const void *pa, const void *pb)
{
    const sh_pair *a = pa, *b = pb;
    if (a->s != b->s)
        return a->s > b->s ? -1 : 1;
    return a->b < b->b ? -1 : a->b > b->b;
}

const char *sh_check_thresholds(shadow *m, int32_t n_ranks, int64_t capacity,
                                const float *scores, const int32_t *blocks,
                                const int32_t *counts, const float *ts, const int32_t *tb,
                                char *msg, size_t msg_cap)
{
    int32_t hkv = (int32_t)m->iv[P_KVHEADS];
    int64_t pairs_per_rank = (int64_t)m->n_entries * hkv;
    sh_pair *all = xcalloc((size_t)n_ranks * (size_t)(capacity > 0 ? capacity : 1),
                           sizeof(sh_pair));
    for (int64_t x = 0; x < pairs_per_rank; x++) {
        const sh_entry *e = &m->entries[x / hkv];
        int64_t n = 0;
        for (int32_t r = 0; r < n_ranks; r++) {
            int64_t c = counts[r * pairs_per_rank + x];
            c = c < 0 ? 0 : c > capacity ? capacity : c;
            for (int64_t j = 0; j < c; j++) {
                size_t at = ((size_t)r * (size_t)pairs_per_rank + (size_t)x) * (size_t)capacity +
                            (size_t)j;
                double s = scores[at];
                all[n].s = isnan(s) ? -INFINITY : s == 0 ? 0.0 : s;
                all[n++].b = blocks[at];
            }
        }
        int64_t k = SH_SPARSE(e->mode) ? e->kpick : 0;
        k = k < n ? k : n;
        double want_s = INFINITY;
        int32_t want_b = -1;
        if (k > 0) {
            qsort(all, (size_t)n, sizeof(sh_pair), pair_desc);
            want_s = all[k - 1].s;
            want_b = all[k - 1].b;
        }
        if ((double)ts[x] != want_s || tb[x] != want_b) {
            snprintf(msg, msg_cap, "step_thresholds: entry %lld head %lld: (%.9g, %d), the "
                     "model says the %lld-th of %lld pairs, (%.9g, %d)", (long long)(x / hkv),
                     (long long)(x % hkv), (double)ts[x], tb[x], (long long)k, (long long)n,
                     want_s, want_b);
            free(all);
            return msg;
        }
        m->n_thresholds_checked++;
    }
    free(all);
    return NULL;
}

const char *sh_check_selected(const shadow *m, int32_t id, int32_t layer, int32_t head,
                              const int32_t *blocks, int64_t capacity, int64_t count, char *msg,
                              size_t msg_cap)
{
    const sh_seq *q = &m->seqs[sh_slot(m, id)];
    const sh_record *r = &q->rec[layer];
    int64_t lo = r->has ? r->cnt_lo[head] : 0, hi = r->has ? r->cnt_hi[head] : 0;
    if (count < lo || count > hi) {
        snprintf(msg, msg_cap, "selected_blocks: seq %d layer %d head %d: count %lld, the model "
                 "says %lld to %lld", id, layer, head, (long long)count, (long long)lo,
                 (long long)hi);
        return msg;
    }
    int64_t shown = count < capacity ? count : capacity;
    const int32_t *mine = r->blocks + (size_t)head * (size_t)m->max_seq_blocks;
    for (int64_t i = 0; i < shown; i++) {
        int32_t x = blocks[i];
        const char *why = NULL;
        if (x < r->fb || x >= r->fb + r->ml)
            why = "outside this context's blocks";
        else if (i > 0 && x <= blocks[i - 1])
            why = "not ascending";
        else if (r->known[head] && x != mine[i])
            why = "not the model's selection";
        else if (r->n >= r->m && x != r->fb + i)
            why = "not every block of a dense decode";
        if (why) {
            snprintf(msg, msg_cap, "selected_blocks: seq %d layer %d head %d: blocks[%lld] = %d "
                     "is %s (M %d, n %d, first block %lld)", id, layer, head, (long long)i, x,
                     why, r->m, r->n, (long long)r->fb);
            return msg;
        }
    }
    if (shown == count && !r->known[head]) { /* the whole list: the forced blocks are in it */
        for (int32_t k = 0; k < r->n_blocks[head]; k++) {
            int found = 0;
            for (int64_t i = 0; i < shown; i++)
                found |= blocks[i] == mine[k];
            if (!found) {
                snprintf(msg, msg_cap, "selected_blocks: seq %d layer %d head %d: forced block "
                         "%d is missing (M %d, sink %d, local %d)", id, layer, head, mine[k],
                         r->m, r->sink, r->local);
                return msg;
            }
        }
    }
    return NULL;
}

double sh_lock_bytes(const shadow *m)
{
    double b = (double)m->iv[P_BLOCK], pages = ceil((double)m->iv[P_MAX_TOKENS] / b);
    double layers = (double)m->iv[P_LAYERS], hkv = (double)m->iv[P_KVHEADS];
    double d = (double)m->iv[P_HEAD_DIM], kv = (double)sh_dtype_size((int32_t)m->iv[P_KV_DTYPE]);
    int fp8 = m->iv[P_KV_DTYPE] == RESA_DTYPE_FP8_E4M3;
    /* summaries: of the KV dtype, or for an fp8 cache of the IO dtype */
    double sum = fp8 ? (double)sh_dtype_size((int32_t)m->iv[P_IO_DTYPE]) : kv;
    double seqs = (double)m->iv[P_MAX_SEQS];
    double blocks = ceil((double)sh_get_int(m, P_MAX_SEQ_TOKENS) / b);
    double bytes = 2 * layers * pages * hkv * b * d * kv;      /* K and V */
    bytes += 2 * layers * pages * hkv * d * sum;               /* summaries */
    if (fp8)
        bytes += 2 * layers * pages * hkv * b * 4;             /* per-token scales */
    bytes += seqs * (blocks * 4 + 128) + pages * 12;           /* tables */
    bytes += hkv * ((double)m->iv[P_MAX_STEP] + seqs + 1) * 16; /* the work list */
    bytes += 4 * (1024 * d * 3 + 1024 * (b + 16) + blocks * 3); /* scratch */
    if (m->iv[P_RECORD])
        bytes += seqs * layers * hkv * ceil(blocks / 32) * 4;
    /* the model: K and V of every sequence as grid bytes */
    bytes += 2 * seqs * (double)sh_get_int(m, P_MAX_SEQ_TOKENS) * layers * hkv * d;
    return bytes;
}
