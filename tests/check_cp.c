/* SPDX-License-Identifier: MIT */
/*
 * Multi-context attention (docs/integration.md, "Multi-GPU"), on one
 * machine: R contexts stand in for R ranks.
 *
 *  - Context parallelism: one sequence, its length not a multiple of the
 *    block size, split at block boundaries over R = 2, 3, 4 contexts; prefill
 *    (the owner APPENDs, the others QUERY_DENSE), sparse decode with the
 *    two-phase selection (resa_ctx_step_block_scores, an all-gather of the
 *    lists, resa_ctx_step_thresholds, resa_ctx_step_attend_ex) and
 *    rectification when due (the owner RECTIFYs, the others QUERY_DENSE),
 *    every part merged through its log-sum-exp, next to one context holding
 *    the whole sequence.  Checked: the selected sets (global indices) equal
 *    the single context's exactly, and every context computes the same
 *    thresholds; merged and single outputs equal the float64 reference
 *    (tests/ref.c) within the fp32 rounding bound below; the LSE equals a
 *    float64 LSE; lengths, pending counts and the due signal follow the
 *    single-context rule.  Outputs and LSE are NaN-filled before each call;
 *    inputs are fresh random values each layer and step.  A variant with
 *    periodic keys makes many blocks score exactly equal across contexts, so
 *    that the tie rule decides the selection.
 *  - Tensor parallelism: the heads split over two contexts give one
 *    context's outputs bit for bit.
 *  - resa_merge_states against float64, with -inf parts (NaN behind them).
 *  - Bad arguments give clear errors.
 *
 *  - The LSE of a whole context's prefill and decode rows against float64.
 *  - QUERY entries of a context holding none or part of a sequence: empty
 *    rows (0 and -inf), the listed candidates, every candidate taken.
 *  - HEAD_SHARE is refused wherever a split sequence would need it.
 *
 * Run with the argument "cuda" for the CUDA backend (suite gpu; exit 77
 * without a GPU): the split sequence on CUDA contexts (IO BF16 and F16, an
 * fp8 KV cache, block sizes 8 and 16, head dims 64 and 128; the prefill
 * length is never a multiple of the block size), the LSE of dense and decode
 * rows, the QUERY edge cases, the head split, the merge kernel and the
 * HEAD_SHARE refusals.
 */
#include <check.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cuda_shim.h"
#include "harness.h"
#include "ref.h"
#include "resa.h"

#define MAX_R 4

static int g_cuda;
static cuda_shim g_cu;

/* ---- buffers: host shadows, and their device copies on CUDA ---- */
typedef struct mem {
    void *h, *d;
    size_t bytes;
} mem;

static mem mem_new(size_t bytes)
{
    mem m = {calloc(1, bytes ? bytes : 1), NULL, bytes ? bytes : 1};
    ck_assert_ptr_nonnull(m.h);
    if (g_cuda)
        ck_assert_int_eq(g_cu.Malloc(&m.d, m.bytes), 0);
    return m;
}
static void mem_free(mem *m)
{
    free(m->h);
    if (m->d)
        g_cu.Free(m->d);
    m->h = m->d = NULL;
}
static void *dp(const mem *m)
{
    return g_cuda ? m->d : m->h;
}
static void up(mem *m)
{
    if (g_cuda)
        ck_assert_int_eq(g_cu.Memcpy(m->d, m->h, m->bytes, 1), 0);
}
static void down(mem *m)
{
    if (g_cuda) {
        ck_assert_int_eq(g_cu.DeviceSynchronize(), 0);
        ck_assert_int_eq(g_cu.Memcpy(m->h, m->d, m->bytes, 2), 0);
    }
}
static void poison(mem *m)
{
    th_poison(m->h, m->bytes);
    if (g_cuda)
        ck_assert_int_eq(g_cu.Memset(m->d, 0xff, m->bytes), 0);
}

/* ---- contexts ---- */
static resa_ctx *make_ctx(const ref_params *p, int32_t hq, int32_t hkv)
{
    resa_ctx *c = NULL;
    ck_assert_int_eq(resa_ctx_create(g_cuda ? RESA_BACKEND_CUDA : RESA_BACKEND_CPU, NULL, &c),
                     RESA_OK);
    TOK(c, resa_ctx_set_param(c, RESA_PARAM_NUM_LAYERS, p->n_layers));
    TOK(c, resa_ctx_set_param(c, RESA_PARAM_NUM_Q_HEADS, hq));
    TOK(c, resa_ctx_set_param(c, RESA_PARAM_NUM_KV_HEADS, hkv));
    TOK(c, resa_ctx_set_param(c, RESA_PARAM_HEAD_DIM, p->d));
    TOK(c, resa_ctx_set_param(c, RESA_PARAM_BLOCK_SIZE, p->b));
    TOK(c, resa_ctx_set_param(c, RESA_PARAM_KV_DTYPE, p->kv_dtype));
    TOK(c, resa_ctx_set_param(c, RESA_PARAM_IO_DTYPE, p->io_dtype));
    TOK(c, resa_ctx_set_param(c, RESA_PARAM_MAX_TOKENS, 4096));
    TOK(c, resa_ctx_set_param(c, RESA_PARAM_MAX_SEQUENCES, 4));
    TOK(c, resa_ctx_set_param(c, RESA_PARAM_MAX_STEP_TOKENS, 512));
    TOK(c, resa_ctx_set_param(c, RESA_PARAM_NUM_THREADS, 2));
    TOK(c, resa_ctx_set_param(c, RESA_PARAM_RECORD_SELECTION, 1));
    TOK(c, resa_ctx_set_param_f64(c, RESA_PARAM_SELECT_FRACTION, p->fraction));
    TOK(c, resa_ctx_set_param(c, RESA_PARAM_SELECT_MIN_BLOCKS, p->min_blocks));
    TOK(c, resa_ctx_set_param(c, RESA_PARAM_LOCAL_BLOCKS, p->local_blocks));
    TOK(c, resa_ctx_set_param(c, RESA_PARAM_SINK_BLOCKS, p->sink_blocks));
    TOK(c, resa_ctx_set_param(c, RESA_PARAM_RECTIFY_INTERVAL, p->interval));
    TOK(c, resa_ctx_set_param_f64(c, RESA_PARAM_SCORE_WIDTH, p->score_width));
    return c;
}

static void fill_normal(ref_rng *rng, resa_dtype t, void *buf, size_t n, double scale)
{
    for (size_t i = 0; i < n; i++)
        ref_store(t, buf, i, scale * ref_rng_normal(rng));
}

/* Unit roundoff of a dtype. */
static double unit(resa_dtype t)
{
    return t == RESA_DTYPE_F32 ? ldexp(1.0, -24) : t == RESA_DTYPE_F16 ? ldexp(1.0, -11)
                                                                       : ldexp(1.0, -8);
}

/* ------------------------------------------------------------------------ */
/* Context parallelism                                                       */
/* ------------------------------------------------------------------------ */
typedef struct cp_world {
    ref_params p;
    int32_t R;
    int ties;              /* keys periodic over kPeriod blocks: exact score ties */
    ref_rng rng;
    resa_ctx *one;         /* the whole sequence */
    int32_t one_seq;
    resa_ctx *rk[MAX_R];   /* rank r holds [bound[r], bound[r + 1]) */
    int32_t rk_seq[MAX_R];
    int64_t bound[MAX_R + 1];
    int32_t owner;         /* the rank that stores the step's tokens */
    ref_seq *ref;          /* float64 model of the whole sequence */
    void *ktable;          /* ties: [layers][kPeriod b][hkv][d] keys, IO dtype */
    int64_t steps, sparse_steps, rect_steps, rows_checked;
} cp_world;

enum { kPeriod = 3, kCap = 64 };

/* kv: the KV dtype (io, or FP8_E4M3 for the fp8 cache); b: the block size,
 * 0 for the default choice. */
static void cp_init(cp_world *w, const char *name, int32_t R, int ties, resa_dtype io,
                    resa_dtype kv, int32_t d, int32_t b)
{
    memset(w, 0, sizeof *w);
    w->rng.s = th_test_seed(name);
    ref_params *p = &w->p;
    ref_params_default(p);
    p->n_layers = 2;
    p->hq = 4;
    p->hkv = 2;
    p->d = d;
    p->b = b > 0 ? b : g_cuda ? 8 : 4 << ref_rng_range(&w->rng, 0, 1); /* 4 or 8 (CUDA: 8 to 64) */
    p->io_dtype = io;
    p->kv_dtype = kv;
    p->fraction = 0.25;
    p->min_blocks = 3;
    p->local_blocks = 1 + ref_rng_range(&w->rng, 0, 1);
    p->sink_blocks = ref_rng_range(&w->rng, 0, 1);
    p->interval = 5;
    w->R = R;
    w->ties = ties;
    /* prefill: about 6 blocks a rank, never a whole number of blocks */
    int64_t P = p->b * (6 * R + ref_rng_range(&w->rng, 0, 3)) + ref_rng_range(&w->rng, 1, p->b - 1);
    /* cuts at distinct block multiples, every rank at least one block */
    for (;;) {
        w->bound[0] = 0;
        for (int32_t r = 1; r < R; r++)
            w->bound[r] = p->b * ref_rng_range(&w->rng, 1, P / p->b - 1);
        int ok = 1;
        for (int32_t r = 1; r < R; r++)
            for (int32_t s = 1; s < r; s++)
                if (w->bound[r] < w->bound[s]) {
                    int64_t t = w->bound[r];
                    w->bound[r] = w->bound[s];
                    w->bound[s] = t;
                }
        for (int32_t r = 1; r < R; r++)
            ok &= w->bound[r] > w->bound[r - 1];
        if (ok)
            break;
    }
    w->bound[R] = P; /* grows with the last rank */
    w->one = make_ctx(p, p->hq, p->hkv);
    TOK(w->one, resa_seq_create(w->one, &w->one_seq));
    for (int32_t r = 0; r < R; r++) {
        w->rk[r] = make_ctx(p, p->hq, p->hkv);
        TOK(w->rk[r], resa_seq_create(w->rk[r], &w->rk_seq[r]));
        TOK(w->rk[r], resa_seq_set_span(w->rk[r], w->rk_seq[r], w->bound[r], -1));
    }
    w->ref = ref_seq_new(p, 1024);
    if (ties) {
        size_t n = (size_t)p->n_layers * kPeriod * p->b * p->hkv * p->d;
        w->ktable = malloc(n * ref_dtype_size(io));
        fill_normal(&w->rng, io, w->ktable, n, 1.0);
    }
}

static void cp_fini(cp_world *w)
{
    resa_ctx_destroy(w->one);
    for (int32_t r = 0; r < w->R; r++)
        resa_ctx_destroy(w->rk[r]);
    ref_seq_free(w->ref);
    free(w->ktable);
}

/* Per layer of a step: what the checks after step_end need. */
typedef struct cp_layer {
    mem q, k, v;              /* inputs */
    mem out1, lse1;           /* the single context */
    mem outm, lsem;           /* merged over the ranks */
} cp_layer;

/* The sorted global selection of (ctx, seq, layer, head) into sel; returns its size. */
static int64_t selected(resa_ctx *c, int32_t seq, int32_t layer, int32_t h, int32_t *sel,
                        int64_t cap)
{
    int64_t n = -1;
    TOK(c, resa_seq_selected_blocks(c, seq, layer, h, sel, cap, &n));
    TCHECK(n >= 0 && n <= cap, "selected_blocks: count %lld", (long long)n);
    for (int64_t i = 1; i < n; i++) /* insertion sort: the ranks' lists are joined */
        for (int64_t j = i; j > 0 && sel[j - 1] > sel[j]; j--) {
            int32_t t = sel[j];
            sel[j] = sel[j - 1];
            sel[j - 1] = t;
        }
    return n;
}

static int cmp_i32(const void *a, const void *b)
{
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    return x < y ? -1 : x > y;
}

/*
 * One step of the whole sequence: `mode` for the single context and the
 * owner (APPEND, DECODE or RECTIFY of n tokens), QUERY_DENSE (QUERY_SPARSE
 * for a DECODE) for every other rank.
 */
static void cp_step(cp_world *w, int32_t mode, int32_t n)
{
    const ref_params *p = &w->p;
    const int32_t R = w->R, L = p->n_layers, hq = p->hq, hkv = p->hkv, d = p->d, g = hq / hkv;
    const resa_dtype io = p->io_dtype;
    const size_t ie = ref_dtype_size(io);
    const int sparse = mode == RESA_MODE_DECODE;
    const int64_t G = w->ref->len, pend = ref_seq_pending(w->ref);
    const int64_t start = mode == RESA_MODE_RECTIFY ? G - pend : G;
    const int32_t o = w->owner;
    int32_t M = 0, nsel = 0;
    if (sparse) {
        M = (int32_t)ref_blocks(G + 1, p->b);
        nsel = (int32_t)ref_budget(M, p->fraction, p->min_blocks, p->local_blocks,
                                   p->sink_blocks);
    }
    /* spans: the owner holds the tail; the others answer queries at G */
    for (int32_t r = 0; r < R; r++)
        TOK(w->rk[r], resa_seq_set_span(w->rk[r], w->rk_seq[r], w->bound[r], r < o ? G : -1));
    int32_t m1 = mode, mq = sparse ? RESA_MODE_QUERY_SPARSE : RESA_MODE_QUERY_DENSE;
    TOK(w->one, resa_ctx_step_begin(w->one, 1, &w->one_seq, &m1, &n, 0));
    for (int32_t r = 0; r < R; r++)
        TOK(w->rk[r], resa_ctx_step_begin(w->rk[r], 1, &w->rk_seq[r], r == o ? &m1 : &mq, &n, 0));

    const size_t qn = (size_t)n * hq * d, kn = (size_t)n * hkv * d, rows = (size_t)n * hq;
    cp_layer *ly = calloc((size_t)L, sizeof *ly);
    mem out[MAX_R], lse[MAX_R];
    for (int32_t r = 0; r < R; r++) {
        out[r] = mem_new(qn * ie);
        lse[r] = mem_new(rows * sizeof(float));
    }
    mem parts = mem_new((size_t)R * qn * ie), plse = mem_new((size_t)R * rows * sizeof(float));
    const size_t pairs = (size_t)hkv; /* one entry */
    mem sc[MAX_R], bl[MAX_R], cn[MAX_R];
    mem all_sc = mem_new((size_t)R * pairs * kCap * sizeof(float));
    mem all_bl = mem_new((size_t)R * pairs * kCap * sizeof(int32_t));
    mem all_cn = mem_new((size_t)R * pairs * sizeof(int32_t));
    mem thr_s[MAX_R], thr_b[MAX_R];
    for (int32_t r = 0; r < R; r++) {
        sc[r] = mem_new(pairs * kCap * sizeof(float));
        bl[r] = mem_new(pairs * kCap * sizeof(int32_t));
        cn[r] = mem_new(pairs * sizeof(int32_t));
        thr_s[r] = mem_new(pairs * sizeof(float));
        thr_b[r] = mem_new(pairs * sizeof(int32_t));
    }
    /* layers in a shuffled order */
    int32_t order[8];
    for (int32_t l = 0; l < L; l++)
        order[l] = l;
    for (int32_t l = L - 1; l > 0; l--) {
        int32_t j = (int32_t)ref_rng_range(&w->rng, 0, l), t = order[l];
        order[l] = order[j];
        order[j] = t;
    }
    for (int32_t li = 0; li < L; li++) {
        const int32_t l = order[li];
        cp_layer *c = &ly[l];
        c->q = mem_new(qn * ie);
        c->k = mem_new(kn * ie);
        c->v = mem_new(kn * ie);
        c->out1 = mem_new(qn * ie);
        c->lse1 = mem_new(rows * sizeof(float));
        c->outm = mem_new(qn * ie);
        c->lsem = mem_new(rows * sizeof(float));
        fill_normal(&w->rng, io, c->q.h, qn, 1.5);
        fill_normal(&w->rng, io, c->v.h, kn, 1.0);
        if (w->ties) { /* the key of position x is the table's x mod kPeriod b */
            size_t per = (size_t)hkv * d * ie, period = (size_t)kPeriod * p->b;
            for (int32_t t = 0; t < n; t++)
                memcpy((char *)c->k.h + (size_t)t * per,
                       (char *)w->ktable +
                           ((size_t)l * period + (size_t)(start + t) % period) * per,
                       per);
        } else {
            fill_normal(&w->rng, io, c->k.h, kn, 1.0);
        }
        up(&c->q);
        up(&c->k);
        up(&c->v);
        ref_write_kv(p, w->ref, l, start, n, c->k.h, c->v.h, 0);

        poison(&c->out1);
        poison(&c->lse1);
        TOK(w->one, resa_ctx_step_attend_ex(w->one, l, dp(&c->q), dp(&c->k), dp(&c->v),
                                            dp(&c->out1), dp(&c->lse1), NULL, NULL, 0));
        if (sparse) {
            /* phase 1 on every rank, then the all-gather */
            for (int32_t r = 0; r < R; r++) {
                poison(&sc[r]);
                poison(&bl[r]);
                poison(&cn[r]);
                TOK(w->rk[r], resa_ctx_step_block_scores(w->rk[r], l, dp(&c->q), kCap,
                                                         dp(&sc[r]), dp(&bl[r]), dp(&cn[r]), 0));
                down(&sc[r]);
                down(&bl[r]);
                down(&cn[r]);
                memcpy((char *)all_sc.h + r * sc[r].bytes, sc[r].h, sc[r].bytes);
                memcpy((char *)all_bl.h + r * bl[r].bytes, bl[r].h, bl[r].bytes);
                memcpy((char *)all_cn.h + r * cn[r].bytes, cn[r].h, cn[r].bytes);
                for (size_t x = 0; x < pairs; x++) {
                    int32_t cnt = ((int32_t *)cn[r].h)[x];
                    TCHECK(cnt >= 0 && cnt <= kCap, "rank %d: count %d", r, cnt);
                    for (int32_t j = 0; j < cnt; j++) {
                        int32_t blk = ((int32_t *)bl[r].h)[x * kCap + j];
                        TCHECK(blk >= w->bound[r] / p->b &&
                                   (int64_t)blk * p->b < (r == R - 1 ? G + 1 : w->bound[r + 1]),
                               "rank %d listed block %d outside its span", r, blk);
                    }
                }
            }
            up(&all_sc);
            up(&all_bl);
            up(&all_cn);
            for (int32_t r = 0; r < R; r++) {
                poison(&thr_s[r]);
                poison(&thr_b[r]);
                TOK(w->rk[r], resa_ctx_step_thresholds(w->rk[r], R, kCap, dp(&all_sc),
                                                       dp(&all_bl), dp(&all_cn), dp(&thr_s[r]),
                                                       dp(&thr_b[r]), 0));
                down(&thr_s[r]);
                down(&thr_b[r]);
                TCHECK(memcmp(thr_s[r].h, thr_s[0].h, thr_s[0].bytes) == 0 &&
                           memcmp(thr_b[r].h, thr_b[0].h, thr_b[0].bytes) == 0,
                       "rank %d computed other thresholds than rank 0", r);
            }
        }
        for (int32_t r = 0; r < R; r++) {
            poison(&out[r]);
            poison(&lse[r]);
            /* ranks that only answer queries take no k and v */
            TOK(w->rk[r], resa_ctx_step_attend_ex(
                              w->rk[r], l, dp(&c->q), r == o ? dp(&c->k) : NULL,
                              r == o ? dp(&c->v) : NULL, dp(&out[r]), dp(&lse[r]),
                              sparse ? dp(&thr_s[r]) : NULL, sparse ? dp(&thr_b[r]) : NULL, 0));
            down(&out[r]);
            down(&lse[r]);
            memcpy((char *)parts.h + r * out[r].bytes, out[r].h, out[r].bytes);
            memcpy((char *)plse.h + r * lse[r].bytes, lse[r].h, lse[r].bytes);
        }
        up(&parts);
        up(&plse);
        poison(&c->outm);
        poison(&c->lsem);
        TOK(w->rk[0], resa_ctx_merge_states(w->rk[0], R, (int64_t)rows, dp(&parts), dp(&plse),
                                            dp(&c->outm), dp(&c->lsem), 0));
        down(&c->out1);
        down(&c->lse1);
        down(&c->outm);
        down(&c->lsem);
        /* the context's merge equals the host merge */
        void *hm = malloc(qn * ie);
        float *hl = malloc(rows * sizeof(float));
        ck_assert_int_eq(resa_merge_states(io, R, (int64_t)rows, d, parts.h, plse.h, hm, hl, 0),
                         RESA_OK);
        if (!g_cuda)
            TCHECK(memcmp(hm, c->outm.h, qn * ie) == 0 && memcmp(hl, c->lsem.h, rows * 4) == 0,
                   "resa_ctx_merge_states and resa_merge_states differ");
        free(hm);
        free(hl);
    }
    TOK(w->one, resa_ctx_step_end(w->one, 0));
    for (int32_t r = 0; r < R; r++)
        TOK(w->rk[r], resa_ctx_step_end(w->rk[r], 0));
    ref_commit(w->ref, mode, n, nsel, M);
    w->steps++;
    w->sparse_steps += sparse && nsel < M;
    w->rect_steps += mode == RESA_MODE_RECTIFY;
    if (mode != RESA_MODE_RECTIFY)
        w->bound[R] = w->ref->len > w->bound[R] ? w->ref->len : w->bound[R];

    /* lengths, pending, due: the single-context rule, on the owner */
    int64_t len1, pend1, lenr, pendr;
    int32_t due1, duer;
    TOK(w->one, resa_seq_length(w->one, w->one_seq, &len1));
    TOK(w->one, resa_seq_pending(w->one, w->one_seq, &pend1));
    TOK(w->one, resa_seq_rectify_due(w->one, w->one_seq, &due1));
    TCHECK(len1 == w->ref->len && pend1 == ref_seq_pending(w->ref),
           "single context: length %lld pending %lld, the model %lld %lld", (long long)len1,
           (long long)pend1, (long long)w->ref->len, (long long)ref_seq_pending(w->ref));
    for (int32_t r = 0; r < R; r++) {
        TOK(w->rk[r], resa_seq_length(w->rk[r], w->rk_seq[r], &lenr));
        TOK(w->rk[r], resa_seq_pending(w->rk[r], w->rk_seq[r], &pendr));
        TOK(w->rk[r], resa_seq_rectify_due(w->rk[r], w->rk_seq[r], &duer));
        int64_t want_len = r < o ? w->bound[r + 1] - w->bound[r]
                                 : r == o ? w->ref->len - w->bound[r] : 0;
        TCHECK(lenr == want_len, "rank %d: length %lld, expected %lld", r, (long long)lenr,
               (long long)want_len);
        TCHECK(pendr == (r == o ? pend1 : 0) && duer == (r == o ? due1 : 0),
               "rank %d: pending %lld due %d; the single context %lld %d (owner %d)", r,
               (long long)pendr, duer, (long long)pend1, due1, o);
        /* a context whose span (set at G, before the step) ends before G
         * keeps refusing to store */
        int32_t dm = RESA_MODE_DECODE, one_tok = 1;
        if (r < o && w->bound[r + 1] < G)
            TFAIL(w->rk[r], RESA_ERR_INVALID_ARGUMENT, "tail",
                  resa_ctx_step_begin(w->rk[r], 1, &w->rk_seq[r], &dm, &one_tok, 0));
    }

    /* selections and outputs, every layer */
    int32_t *sel1 = malloc(sizeof(int32_t) * 1024), *selr = malloc(sizeof(int32_t) * 1024);
    double *qd = malloc(sizeof(double) * (size_t)d), *ref = malloc(sizeof(double) * (size_t)d);
    const double u32 = ldexp(1.0, -24), uio = unit(io);
    for (int32_t l = 0; l < L; l++) {
        cp_layer *c = &ly[l];
        for (int32_t h = 0; h < hkv && sparse; h++) {
            int64_t n1 = selected(w->one, w->one_seq, l, h, sel1, 1024), nr = 0;
            for (int32_t r = 0; r < R; r++) {
                int64_t k = selected(w->rk[r], w->rk_seq[r], l, h, selr + nr, 1024 - nr);
                for (int64_t i = 0; i < k; i++)
                    TCHECK(selr[nr + i] >= w->bound[r] / p->b &&
                               (int64_t)selr[nr + i] * p->b < w->bound[r + 1],
                           "rank %d selected block %d outside its span", r, selr[nr + i]);
                nr += k;
            }
            qsort(selr, (size_t)nr, sizeof(int32_t), cmp_i32);
            TCHECK(n1 == nsel, "single context selected %lld blocks, the budget is %d",
                   (long long)n1, nsel);
            int same = nr == n1;
            for (int64_t i = 0; same && i < n1; i++)
                same = sel1[i] == selr[i];
            if (!same) {
                char a[512] = "", b[512] = "";
                for (int64_t i = 0; i < n1 && strlen(a) < 480; i++)
                    snprintf(a + strlen(a), sizeof a - strlen(a), " %d", sel1[i]);
                for (int64_t i = 0; i < nr && strlen(b) < 480; i++)
                    snprintf(b + strlen(b), sizeof b - strlen(b), " %d", selr[i]);
                TCHECK(0, "step %lld layer %d head %d (M %d, n %d, R %d): one context chose"
                          "%s; the ranks together%s", (long long)w->steps, l, h, M, nsel, R, a,
                       b);
            }
        }
        for (int32_t t = 0; t < n; t++) {
            const int64_t pos = start + t;
            for (int32_t hh = 0; hh < hq; hh++) {
                const int32_t h = hh / g;
                const size_t row = (size_t)t * hq + hh;
                for (int32_t j = 0; j < d; j++)
                    qd[j] = ref_load(io, c->q.h, row * d + j);
                int64_t nb = 0;
                if (sparse)
                    nb = selected(w->one, w->one_seq, l, h, sel1, 1024);
                double lse_ref = ref_attend_lse(p, w->ref, l, h, qd, 0, pos + 1,
                                                sparse ? sel1 : NULL, nb, ref);
                /* rounding bound: scores in fp32 over d products (|s| <= smag),
                 * exp and sums over n_keys terms in fp32, outputs rounded to the
                 * IO dtype (the merged ones twice: each part, then the result) */
                double smag = 0, vmax = 0;
                int64_t n_keys = 0;
                for (int64_t x = 0; x <= pos; x++) {
                    if (sparse) {
                        int in = 0;
                        for (int64_t i = 0; i < nb; i++)
                            in |= sel1[i] == x / p->b;
                        if (!in)
                            continue;
                    }
                    n_keys++;
                    double s = 0;
                    for (int32_t j = 0; j < d; j++) {
                        s += fabs(qd[j] * ref_k(w->ref, l, x, h)[j]);
                        vmax = fmax(vmax, fabs(ref_v(w->ref, l, x, h)[j]));
                    }
                    smag = fmax(smag, s * ref_scale(p));
                }
                double tol = (2.0 * (d + 2) * u32 * smag + 4.0 * (n_keys + 2 * R + 8) * u32) *
                                 vmax +
                             (g_cuda ? 8.0 : 3.0) * uio * vmax;
                double tol_lse = 4.0 * (d + 2) * u32 * smag +
                                 4.0 * (n_keys + R + 4) * u32 * (1.0 + fabs(lse_ref)) +
                                 (g_cuda ? 8.0 * uio : 0.0);
                double e1 = 0, em = 0, e1m = 0;
                for (int32_t j = 0; j < d; j++) {
                    double a = ref_load(io, c->out1.h, row * d + j);
                    double m = ref_load(io, c->outm.h, row * d + j);
                    e1 = fmax(e1, isfinite(a) ? fabs(a - ref[j]) : INFINITY);
                    em = fmax(em, isfinite(m) ? fabs(m - ref[j]) : INFINITY);
                    e1m = fmax(e1m, isfinite(a) && isfinite(m) ? fabs(a - m) : INFINITY);
                }
                double l1 = ((float *)c->lse1.h)[row], lm = ((float *)c->lsem.h)[row];
                TCHECK(e1 <= tol && em <= tol && e1m <= 2 * tol,
                       "step %lld (mode %d, R %d) layer %d row %d head %d: |one - ref| %.3g, "
                       "|merged - ref| %.3g, |one - merged| %.3g, bound %.3g",
                       (long long)w->steps, mode, R, l, t, hh, e1, em, e1m, tol);
                TCHECK(fabs(l1 - lse_ref) <= tol_lse && fabs(lm - lse_ref) <= tol_lse,
                       "step %lld (mode %d) layer %d row %d head %d: lse one %.9g merged %.9g, "
                       "float64 %.9g, bound %.3g",
                       (long long)w->steps, mode, l, t, hh, l1, lm, lse_ref, tol_lse);
                w->rows_checked++;
            }
        }
    }
    free(sel1);
    free(selr);
    free(qd);
    free(ref);
    for (int32_t l = 0; l < L; l++) {
        cp_layer *c = &ly[l];
        mem *ms[] = {&c->q, &c->k, &c->v, &c->out1, &c->lse1, &c->outm, &c->lsem};
        for (size_t i = 0; i < sizeof ms / sizeof *ms; i++)
            mem_free(ms[i]);
    }
    free(ly);
    for (int32_t r = 0; r < R; r++) {
        mem_free(&out[r]);
        mem_free(&lse[r]);
        mem_free(&sc[r]);
        mem_free(&bl[r]);
        mem_free(&cn[r]);
        mem_free(&thr_s[r]);
        mem_free(&thr_b[r]);
    }
    mem_free(&parts);
    mem_free(&plse);
    mem_free(&all_sc);
    mem_free(&all_bl);
    mem_free(&all_cn);
}

static void cp_run_kv(const char *name, int32_t R, int ties, resa_dtype io, resa_dtype kv,
                      int32_t d, int32_t b, int32_t decodes)
{
    cp_world w;
    cp_init(&w, name, R, ties, io, kv, d, b);
    /* prefill, rank by rank, in chunks that never cross a rank boundary */
    for (int32_t r = 0; r < R; r++) {
        w.owner = r;
        while (w.ref->len < w.bound[r + 1]) {
            int64_t left = w.bound[r + 1] - w.ref->len;
            int32_t n = (int32_t)ref_rng_range(&w.rng, 1, 3 * w.p.b);
            cp_step(&w, RESA_MODE_APPEND, n < left ? n : (int32_t)left);
        }
    }
    /* decode, rectifying when due (sometimes only the oldest part) */
    for (int32_t s = 0; s < decodes; s++) {
        int64_t pend = ref_seq_pending(w.ref);
        if (w.p.interval > 0 && pend >= w.p.interval) {
            int32_t n = ref_rng_range(&w.rng, 0, 3) == 0 ? (int32_t)(pend + 1) / 2 : (int32_t)pend;
            cp_step(&w, RESA_MODE_RECTIFY, n);
        } else {
            cp_step(&w, RESA_MODE_DECODE, 1);
        }
    }
    TCHECK(w.sparse_steps >= decodes / 2 && w.rect_steps >= 2,
           "the run did not exercise sparse decoding (%lld) or rectification (%lld)",
           (long long)w.sparse_steps, (long long)w.rect_steps);
    fprintf(stderr, "%s: R %d, b %d, spans", name, R, w.p.b);
    for (int32_t r = 0; r <= R; r++)
        fprintf(stderr, " %lld", (long long)w.bound[r]);
    fprintf(stderr, ": %lld steps, %lld sparse, %lld rectifications, %lld rows checked\n",
            (long long)w.steps, (long long)w.sparse_steps, (long long)w.rect_steps,
            (long long)w.rows_checked);
    cp_fini(&w);
}

static void cp_run(const char *name, int32_t R, int ties, resa_dtype io, int32_t d,
                   int32_t decodes)
{
    cp_run_kv(name, R, ties, io, io, d, 0, decodes);
}

START_TEST(test_cp_r2) { cp_run("cp_r2", 2, 0, RESA_DTYPE_F32, 32, 40); }
END_TEST
START_TEST(test_cp_r3) { cp_run("cp_r3", 3, 0, RESA_DTYPE_F32, 48, 40); }
END_TEST
START_TEST(test_cp_r4) { cp_run("cp_r4", 4, 0, RESA_DTYPE_F32, 32, 40); }
END_TEST
START_TEST(test_cp_ties) { cp_run("cp_ties", 3 + _i, 1, RESA_DTYPE_F32, 32, 40); }
END_TEST
START_TEST(test_cp_bf16) { cp_run("cp_bf16", 3, 0, RESA_DTYPE_BF16, 64, 30); }
END_TEST
/* CUDA (also run on the CPU): the IO dtypes it takes.  The prefill length
 * is never a multiple of the block size (cp_init). */
START_TEST(test_cp_cuda) { cp_run("cp_cuda", 2 + _i, _i == 1, RESA_DTYPE_BF16, 64, 30); }
END_TEST
/* F16, d 128 (the owner's and the single context's prefill and
 * rectification take Hopper's wgmma kernel where it is built, the QUERY_DENSE
 * ranks the mma.sync one), b 16 */
START_TEST(test_cp_f16_b16)
{
    cp_run_kv("cp_f16_b16", 3, 0, RESA_DTYPE_F16, RESA_DTYPE_F16, 128, 16, 30);
}
END_TEST
/* the fp8 KV cache (its dequantized values are the float64 model's too);
 * _i 2: d 128, whose prefill and rectification take Hopper's wgmma kernel
 * (its producer converting the raw tiles), the QUERY_DENSE ranks the
 * mma.sync one */
START_TEST(test_cp_fp8)
{
    cp_run_kv(_i == 2 ? "cp_fp8_d128" : "cp_fp8", _i == 2 ? 3 : 2 + _i, _i == 1,
              RESA_DTYPE_BF16, RESA_DTYPE_FP8_E4M3, _i == 2 ? 128 : 64, 0, 30);
}
END_TEST

/* ------------------------------------------------------------------------ */
/* The LSE of one whole context's rows against float64: the prefill's dense   */
/* rows (CUDA: the dense kernels, split over the keys or not) and the decode  */
/* rows (CUDA: the split-KV combine)                                          */
/* ------------------------------------------------------------------------ */
START_TEST(test_lse_decode)
{
    ref_rng rng = {th_test_seed("lse_decode")};
    ref_params p;
    ref_params_default(&p);
    p.hq = 4;
    p.hkv = 2;
    p.d = 64;
    p.b = 8;
    p.kv_dtype = p.io_dtype = g_cuda ? RESA_DTYPE_BF16 : RESA_DTYPE_F32;
    p.fraction = 0.2;
    p.min_blocks = 3;
    p.interval = 0;
    const int32_t hq = p.hq, hkv = p.hkv, d = p.d, g = hq / hkv;
    const size_t ie = ref_dtype_size(p.io_dtype);
    resa_ctx *c = make_ctx(&p, hq, hkv);
    int32_t seq;
    TOK(c, resa_seq_create(c, &seq));
    ref_seq *rs = ref_seq_new(&p, 1200);
    /* prefill in chunks of at most MAX_STEP_TOKENS: the last one's rows see
     * over 1024 keys, so that the CUDA dense kernel splits them over the keys
     * and its combine writes their LSE */
    const int32_t P = 500, chunks[3] = {500, 500, 103};
    mem q = mem_new((size_t)P * hq * d * ie), k = mem_new((size_t)P * hkv * d * ie),
        v = mem_new((size_t)P * hkv * d * ie), out = mem_new((size_t)P * hq * d * ie),
        lse = mem_new((size_t)P * hq * sizeof(float));
    double *qd = malloc(sizeof(double) * d), *ref = malloc(sizeof(double) * d);
    int32_t sel[256];
    for (int32_t step = 0; step < 28; step++) {
        int32_t mode = step < 3 ? RESA_MODE_APPEND : RESA_MODE_DECODE,
                n = step < 3 ? chunks[step] : 1;
        int64_t start = rs->len;
        TOK(c, resa_ctx_step_begin(c, 1, &seq, &mode, &n, 0));
        fill_normal(&rng, p.io_dtype, q.h, (size_t)n * hq * d, 1.5);
        fill_normal(&rng, p.io_dtype, k.h, (size_t)n * hkv * d, 1.0);
        fill_normal(&rng, p.io_dtype, v.h, (size_t)n * hkv * d, 1.0);
        up(&q);
        up(&k);
        up(&v);
        ref_write_kv(&p, rs, 0, start, n, k.h, v.h, 0);
        poison(&out);
        poison(&lse);
        TOK(c, resa_ctx_step_attend_ex(c, 0, dp(&q), dp(&k), dp(&v), dp(&out), dp(&lse), NULL,
                                       NULL, 0));
        TOK(c, resa_ctx_step_end(c, 0));
        int64_t M = ref_blocks(start + 1, p.b);
        int64_t nsel = ref_budget(M, p.fraction, p.min_blocks, p.local_blocks, p.sink_blocks);
        ref_commit(rs, mode, n, nsel, M);
        down(&out);
        down(&lse);
        /* the prefill: every row (dense causal, keys [0, pos]); a decode: its row */
        for (int32_t t = 0; t < n; t++) {
            const int64_t pos = start + t;
            for (int32_t hh = 0; hh < hq; hh++) {
                const size_t row = (size_t)t * hq + hh;
                int64_t nb = 0;
                if (mode == RESA_MODE_DECODE)
                    nb = selected(c, seq, 0, hh / g, sel, 256);
                for (int32_t j = 0; j < d; j++)
                    qd[j] = ref_load(p.io_dtype, q.h, row * d + j);
                double want = ref_attend_lse(&p, rs, 0, hh / g, qd, 0, pos + 1,
                                             mode == RESA_MODE_DECODE ? sel : NULL, nb, ref);
                double smag = 0;
                for (int64_t x = 0; x <= pos; x++) {
                    double sm = 0;
                    for (int32_t j = 0; j < d; j++)
                        sm += fabs(qd[j] * ref_k(rs, 0, x, hh / g)[j]);
                    smag = fmax(smag, sm * ref_scale(&p));
                }
                /* fp32 scores over d products and sums over the keys; CUDA rounds P to
                 * bf16 for P V only, the denominator stays fp32 */
                double tol = 4.0 * (d + 2) * ldexp(1.0, -24) * smag +
                             4.0 * (pos + 8) * ldexp(1.0, -24) * (1 + fabs(want)) +
                             (g_cuda ? 1e-3 * (1 + fabs(want)) : 0.0);
                double got = ((float *)lse.h)[row];
                TCHECK(fabs(got - want) <= tol, "mode %d at %lld head %d: lse %.9g, float64 "
                                                 "%.9g (bound %.3g)", mode, (long long)pos, hh,
                       got, want, tol);
                double e = 0, vmax = 1e-30;
                for (int32_t j = 0; j < d; j++)
                    e = fmax(e, fabs(ref_load(p.io_dtype, out.h, row * d + j) - ref[j]));
                for (int64_t x = 0; x <= pos; x++)
                    for (int32_t j = 0; j < d; j++)
                        vmax = fmax(vmax, fabs(ref_v(rs, 0, x, hh / g)[j]));
                TCHECK(e <= (g_cuda ? 16.0 : 4.0) * unit(p.io_dtype) * vmax +
                                4.0 * (pos + 2 * d) * ldexp(1.0, -24) * vmax,
                       "mode %d at %lld head %d: output off by %.3g", mode, (long long)pos, hh,
                       e);
            }
        }
    }
    free(qd);
    free(ref);
    mem *ms[] = {&q, &k, &v, &out, &lse};
    for (size_t i = 0; i < sizeof ms / sizeof *ms; i++)
        mem_free(ms[i]);
    ref_seq_free(rs);
    resa_ctx_destroy(c);
}
END_TEST

/* What is still refused, on every backend: GROUP_SCORE HEAD_SHARE wherever a
 * split sequence (or a QUERY_SPARSE row) would need it (docs/API.md,
 * "GROUP_SCORE"), with a clear text. */
START_TEST(test_head_share_refusals)
{
    th_test_seed("head_share_refusals");
    ref_params p;
    ref_params_default(&p);
    p.d = 64;
    p.b = 8;
    p.kv_dtype = p.io_dtype = g_cuda ? RESA_DTYPE_BF16 : RESA_DTYPE_F32;
    resa_ctx *c = make_ctx(&p, 2, 1);
    TOK(c, resa_ctx_set_param(c, RESA_PARAM_GROUP_SCORE, RESA_GROUP_SCORE_HEAD_SHARE));
    int32_t a, w;
    TOK(c, resa_seq_create(c, &a));
    TOK(c, resa_seq_create(c, &w));
    TOK(c, resa_seq_set_span(c, a, 64, -1));
    /* 40 tokens (K/V only) in each */
    const size_t ie = ref_dtype_size(p.io_dtype);
    mem kv = mem_new((size_t)40 * p.d * ie), q = mem_new((size_t)2 * p.d * ie),
        o = mem_new((size_t)2 * p.d * ie);
    up(&kv); /* zeros: only the statuses matter, but the device reads them */
    up(&q);
    int32_t m = RESA_MODE_APPEND_KV, n = 40;
    for (int i = 0; i < 2; i++) {
        int32_t s = i ? w : a;
        TOK(c, resa_ctx_step_begin(c, 1, &s, &m, &n, 0));
        TOK(c, resa_ctx_step_attend(c, 0, NULL, dp(&kv), dp(&kv), NULL, 0));
        TOK(c, resa_ctx_step_end(c, 0));
    }
    /* a split sequence's DECODE, and any QUERY_SPARSE */
    m = RESA_MODE_DECODE;
    n = 1;
    TFAIL(c, RESA_ERR_NOT_SUPPORTED, "RESA_GROUP_SCORE_HEAD_SHARE",
          resa_ctx_step_begin(c, 1, &a, &m, &n, 0));
    m = RESA_MODE_QUERY_SPARSE;
    TFAIL(c, RESA_ERR_NOT_SUPPORTED, "RESA_GROUP_SCORE_HEAD_SHARE",
          resa_ctx_step_begin(c, 1, &w, &m, &n, 0));
    /* a whole sequence's DECODE runs, but not the two-phase calls */
    m = RESA_MODE_DECODE;
    TOK(c, resa_ctx_step_begin(c, 1, &w, &m, &n, 0));
    mem sc = mem_new(16 * sizeof(float)), bl = mem_new(16 * sizeof(int32_t)),
        cn = mem_new(sizeof(int32_t)), ts = mem_new(sizeof(float)), tb = mem_new(sizeof(int32_t));
    TFAIL(c, RESA_ERR_NOT_SUPPORTED, "RESA_GROUP_SCORE_POOLED",
          resa_ctx_step_block_scores(c, 0, dp(&q), 16, dp(&sc), dp(&bl), dp(&cn), 0));
    TFAIL(c, RESA_ERR_NOT_SUPPORTED, "RESA_GROUP_SCORE_POOLED",
          resa_ctx_step_thresholds(c, 1, 16, dp(&sc), dp(&bl), dp(&cn), dp(&ts), dp(&tb), 0));
    TFAIL(c, RESA_ERR_NOT_SUPPORTED, "RESA_GROUP_SCORE_POOLED",
          resa_ctx_step_attend_ex(c, 0, dp(&q), dp(&kv), dp(&kv), dp(&o), NULL, dp(&ts),
                                  dp(&tb), 0));
    TOK(c, resa_ctx_step_attend_ex(c, 0, dp(&q), dp(&kv), dp(&kv), dp(&o), NULL, NULL, NULL, 0));
    TOK(c, resa_ctx_step_end(c, 0));
    mem *ms[] = {&kv, &q, &o, &sc, &bl, &cn, &ts, &tb};
    for (size_t i = 0; i < sizeof ms / sizeof *ms; i++)
        mem_free(ms[i]);
    resa_ctx_destroy(c);
}
END_TEST

/* QUERY entries at the edges, in one batch: a QUERY_SPARSE row on a context
 * holding blocks 8-10 of a 26-block sequence (phase 1 lists exactly them, one
 * rank's thresholds take them all: the budget's 14 candidates are more than
 * the 3 here), and QUERY_DENSE and QUERY_SPARSE rows of a context that holds
 * none of their sequence (0 output rows, lse -inf: the neutral part of a
 * merge).  Then the QUERY_DENSE rows of the first sequence against float64. */
/* One row of a query step over the 20 keys [64, 84) of test_query_edges's
 * first sequence (sel: its chosen blocks, NULL for all) against float64: the
 * lse and the output, bounds from the dtype units (ref: scratch of d). */
static void check_query_row(const char *what, int32_t t, int32_t hh, const ref_params *p,
                            ref_seq *rs, const double *qd, const int32_t *sel, int32_t n_sel,
                            resa_dtype io, const void *out, size_t row, double l, int32_t L,
                            double *ref)
{
    const int32_t d = p->d;
    const double u32 = ldexp(1.0, -24), uio = unit(io);
    double want = ref_attend_lse(p, rs, 0, 0, qd, 64, 84, sel, n_sel, ref);
    double smag = 0, vmax = 1e-30, e = 0;
    for (int64_t x = 64; x < 84; x++) {
        double sm = 0;
        for (int32_t j = 0; j < d; j++) {
            sm += fabs(qd[j] * ref_k(rs, 0, x, 0)[j]);
            vmax = fmax(vmax, fabs(ref_v(rs, 0, x, 0)[j]));
        }
        smag = fmax(smag, sm * ref_scale(p));
    }
    for (int32_t j = 0; j < d; j++)
        e = fmax(e, fabs(ref_load(io, out, row * d + j) - ref[j]));
    double tol_lse = 4.0 * (d + 2) * u32 * smag + 4.0 * (L + 8) * u32 * (1 + fabs(want)) +
                     (g_cuda ? 1e-3 * (1 + fabs(want)) : 0.0);
    TCHECK(fabs(l - want) <= tol_lse, "%s row %d head %d: lse %.9g, float64 %.9g", what, t, hh,
           l, want);
    TCHECK(e <= (g_cuda ? 16.0 : 4.0) * uio * vmax + 4.0 * (L + 2 * d) * u32 * vmax,
           "%s row %d head %d: output off by %.3g", what, t, hh, e);
}

START_TEST(test_query_edges)
{
    ref_rng rng = {th_test_seed("query_edges")};
    ref_params p;
    ref_params_default(&p);
    p.hq = 2;
    p.hkv = 1;
    p.d = 64;
    p.b = 8;
    p.kv_dtype = p.io_dtype = g_cuda ? RESA_DTYPE_BF16 : RESA_DTYPE_F32;
    const int32_t hq = p.hq, d = p.d;
    const resa_dtype io = p.io_dtype;
    const size_t ie = ref_dtype_size(io);
    resa_ctx *c = make_ctx(&p, hq, p.hkv);
    int32_t a, e1, e2;
    TOK(c, resa_seq_create(c, &a));
    TOK(c, resa_seq_create(c, &e1));
    TOK(c, resa_seq_create(c, &e2));
    TOK(c, resa_seq_set_span(c, a, 64, -1));
    /* 20 tokens at positions 64..83 (blocks 8, 9, 10) */
    ref_seq *rs = ref_seq_new(&p, 256);
    const int32_t L = 20;
    mem k = mem_new((size_t)L * d * ie), v = mem_new((size_t)L * d * ie);
    fill_normal(&rng, io, k.h, (size_t)L * d, 1.0);
    fill_normal(&rng, io, v.h, (size_t)L * d, 1.0);
    up(&k);
    up(&v);
    ref_write_kv(&p, rs, 0, 64, L, k.h, v.h, 0);
    int32_t m = RESA_MODE_APPEND_KV, n = L;
    TOK(c, resa_ctx_step_begin(c, 1, &a, &m, &n, 0));
    TOK(c, resa_ctx_step_attend(c, 0, NULL, dp(&k), dp(&v), NULL, 0));
    TOK(c, resa_ctx_step_end(c, 0));
    TOK(c, resa_seq_set_span(c, a, 64, 200)); /* M = ceil(201 / 8) = 26, n 16, 14 by score */

    /* one batch: a QUERY_SPARSE, e1 QUERY_DENSE x 3, e2 QUERY_SPARSE */
    int32_t seqs[3] = {a, e1, e2};
    int32_t modes[3] = {RESA_MODE_QUERY_SPARSE, RESA_MODE_QUERY_DENSE, RESA_MODE_QUERY_SPARSE};
    int32_t ns[3] = {1, 3, 1};
    const int32_t T = 5;
    mem q = mem_new((size_t)T * hq * d * ie), out = mem_new((size_t)T * hq * d * ie),
        lse = mem_new((size_t)T * hq * sizeof(float));
    fill_normal(&rng, io, q.h, (size_t)T * hq * d, 1.5);
    up(&q);
    enum { kC = 16 };
    mem sc = mem_new(3 * kC * sizeof(float)), bl = mem_new(3 * kC * sizeof(int32_t)),
        cn = mem_new(3 * sizeof(int32_t)), ts = mem_new(3 * sizeof(float)),
        tb = mem_new(3 * sizeof(int32_t));
    TOK(c, resa_ctx_step_begin(c, 3, seqs, modes, ns, 0));
    poison(&sc); /* only the listed entries are written: the rest reads back poisoned */
    poison(&bl);
    poison(&cn);
    TOK(c, resa_ctx_step_block_scores(c, 0, dp(&q), kC, dp(&sc), dp(&bl), dp(&cn), 0));
    down(&sc);
    down(&bl);
    down(&cn);
    const int32_t *cnt = cn.h;
    TCHECK(cnt[0] == 3 && cnt[1] == 0 && cnt[2] == 0,
           "phase 1 counts %d %d %d; expected 3 (blocks 8-10), 0, 0", cnt[0], cnt[1], cnt[2]);
    int32_t listed[3] = {0, 0, 0};
    for (int32_t j = 0; j < cnt[0] && j < 3; j++) {
        int32_t blk = ((int32_t *)bl.h)[j];
        float s = ((float *)sc.h)[j];
        TCHECK(blk >= 8 && blk <= 10 && !isnan(s), "phase 1 listed block %d score %g", blk, s);
        if (blk >= 8 && blk <= 10)
            listed[blk - 8]++;
    }
    TCHECK(listed[0] == 1 && listed[1] == 1 && listed[2] == 1, "blocks 8-10 listed %d %d %d",
           listed[0], listed[1], listed[2]);
    poison(&ts);
    poison(&tb);
    TOK(c, resa_ctx_step_thresholds(c, 1, kC, dp(&sc), dp(&bl), dp(&cn), dp(&ts), dp(&tb), 0));
    down(&ts);
    down(&tb);
    const float *tsh = ts.h;
    const int32_t *tbh = tb.h;
    /* one rank with 3 of 14: its worst pair; the others take nothing */
    TCHECK(tbh[0] >= 8 && tbh[0] <= 10, "threshold block %d", tbh[0]);
    TCHECK(tsh[1] == INFINITY && tbh[1] == -1 && tsh[2] == INFINITY && tbh[2] == -1,
           "entries without candidates: thresholds (%g, %d) (%g, %d), expected (inf, -1)",
           tsh[1], tbh[1], tsh[2], tbh[2]);
    poison(&out);
    poison(&lse);
    TOK(c, resa_ctx_step_attend_ex(c, 0, dp(&q), NULL, NULL, dp(&out), dp(&lse), dp(&ts),
                                   dp(&tb), 0));
    TOK(c, resa_ctx_step_end(c, 0));
    down(&out);
    down(&lse);
    int32_t got[32];
    int64_t gn = -1;
    TOK(c, resa_seq_selected_blocks(c, a, 0, 0, got, 32, &gn));
    TCHECK(gn == 3 && got[0] == 8 && got[1] == 9 && got[2] == 10,
           "QUERY_SPARSE with every candidate taken: %lld blocks from %d", (long long)gn,
           got[0]);
    TOK(c, resa_seq_selected_blocks(c, e2, 0, 0, got, 32, &gn));
    TCHECK(gn == 0, "QUERY_SPARSE on an empty context selected %lld blocks", (long long)gn);
    double *qd = malloc(sizeof(double) * d), *ref = malloc(sizeof(double) * d);
    const int32_t sel[3] = {8, 9, 10};
    for (int32_t t = 0; t < T; t++)
        for (int32_t hh = 0; hh < hq; hh++) {
            const size_t row = (size_t)t * hq + hh;
            const float l = ((float *)lse.h)[row];
            if (t > 0) { /* e1, e2: nothing here */
                int zero = 1;
                for (int32_t j = 0; j < d; j++)
                    zero &= ref_load(io, out.h, row * d + j) == 0.0;
                TCHECK(zero && l == -INFINITY, "row %d head %d of an empty context: lse %g%s",
                       t, hh, l, zero ? "" : ", output not 0");
                continue;
            }
            for (int32_t j = 0; j < d; j++)
                qd[j] = ref_load(io, q.h, row * d + j);
            check_query_row("QUERY_SPARSE", t, hh, &p, rs, qd, sel, 3, io, out.h, row, l, L, ref);
        }

    /* QUERY_DENSE x 4 rows on the first sequence: every row sees all 20 keys */
    int32_t md = RESA_MODE_QUERY_DENSE, nd = 4;
    TOK(c, resa_ctx_step_begin(c, 1, &a, &md, &nd, 0));
    fill_normal(&rng, io, q.h, (size_t)nd * hq * d, 1.5);
    up(&q);
    poison(&out);
    poison(&lse);
    TOK(c, resa_ctx_step_attend_ex(c, 0, dp(&q), NULL, NULL, dp(&out), dp(&lse), NULL, NULL, 0));
    TOK(c, resa_ctx_step_end(c, 0));
    down(&out);
    down(&lse);
    for (int32_t t = 0; t < nd; t++)
        for (int32_t hh = 0; hh < hq; hh++) {
            const size_t row = (size_t)t * hq + hh;
            for (int32_t j = 0; j < d; j++)
                qd[j] = ref_load(io, q.h, row * d + j);
            check_query_row("QUERY_DENSE", t, hh, &p, rs, qd, NULL, 0, io, out.h, row,
                            ((float *)lse.h)[row], L, ref);
        }
    free(qd);
    free(ref);
    mem *ms[] = {&k, &v, &q, &out, &lse, &sc, &bl, &cn, &ts, &tb};
    for (size_t i = 0; i < sizeof ms / sizeof *ms; i++)
        mem_free(ms[i]);
    ref_seq_free(rs);
    resa_ctx_destroy(c);
}
END_TEST

/* ------------------------------------------------------------------------ */
/* Tensor parallelism: heads split over two contexts                          */
/* ------------------------------------------------------------------------ */
START_TEST(test_tp_heads)
{
    ref_rng rng = {th_test_seed("tp_heads")};
    ref_params p;
    ref_params_default(&p);
    p.n_layers = 2;
    p.hq = 8;
    p.hkv = 4;
    p.d = g_cuda ? 64 : 32;
    p.b = 8;
    p.kv_dtype = p.io_dtype = g_cuda ? RESA_DTYPE_BF16 : RESA_DTYPE_F32;
    p.fraction = 0.2;
    p.min_blocks = 3;
    p.interval = 6;
    const int32_t T = 2, hq = p.hq, hkv = p.hkv, d = p.d; /* T: tensor-parallel ranks */
    const size_t ie = ref_dtype_size(p.io_dtype);
    resa_ctx *one = make_ctx(&p, hq, hkv), *tp[2];
    int32_t s1, st[2];
    TOK(one, resa_seq_create(one, &s1));
    for (int32_t r = 0; r < T; r++) {
        tp[r] = make_ctx(&p, hq / T, hkv / T);
        TOK(tp[r], resa_seq_create(tp[r], &st[r]));
    }
    int64_t decoded = 0, rectified = 0;
    for (int32_t step = 0; step < 40; step++) {
        int64_t pend = 0;
        int32_t due = 0;
        TOK(one, resa_seq_pending(one, s1, &pend));
        TOK(one, resa_seq_rectify_due(one, s1, &due));
        int32_t mode = step < 3 ? RESA_MODE_APPEND : due ? RESA_MODE_RECTIFY : RESA_MODE_DECODE;
        int32_t n = mode == RESA_MODE_APPEND ? 61 : mode == RESA_MODE_RECTIFY ? (int32_t)pend : 1;
        decoded += mode == RESA_MODE_DECODE;
        rectified += mode == RESA_MODE_RECTIFY;
        TOK(one, resa_ctx_step_begin(one, 1, &s1, &mode, &n, 0));
        for (int32_t r = 0; r < T; r++)
            TOK(tp[r], resa_ctx_step_begin(tp[r], 1, &st[r], &mode, &n, 0));
        const size_t qn = (size_t)n * hq * d, kn = (size_t)n * hkv * d;
        mem q = mem_new(qn * ie), k = mem_new(kn * ie), v = mem_new(kn * ie),
            o1 = mem_new(qn * ie);
        mem qs[2], ks[2], vs[2], os[2];
        for (int32_t r = 0; r < T; r++) {
            qs[r] = mem_new(qn / T * ie);
            ks[r] = mem_new(kn / T * ie);
            vs[r] = mem_new(kn / T * ie);
            os[r] = mem_new(qn / T * ie);
        }
        for (int32_t l = 0; l < p.n_layers; l++) {
            fill_normal(&rng, p.io_dtype, q.h, qn, 1.5);
            fill_normal(&rng, p.io_dtype, k.h, kn, 1.0);
            fill_normal(&rng, p.io_dtype, v.h, kn, 1.0);
            /* rank r takes query heads [r hq/T, (r+1) hq/T) and their KV heads */
            for (int32_t t = 0; t < n; t++)
                for (int32_t r = 0; r < T; r++) {
                    memcpy((char *)qs[r].h + ((size_t)t * hq / T) * d * ie,
                           (char *)q.h + ((size_t)t * hq + (size_t)r * hq / T) * d * ie,
                           (size_t)hq / T * d * ie);
                    memcpy((char *)ks[r].h + ((size_t)t * hkv / T) * d * ie,
                           (char *)k.h + ((size_t)t * hkv + (size_t)r * hkv / T) * d * ie,
                           (size_t)hkv / T * d * ie);
                    memcpy((char *)vs[r].h + ((size_t)t * hkv / T) * d * ie,
                           (char *)v.h + ((size_t)t * hkv + (size_t)r * hkv / T) * d * ie,
                           (size_t)hkv / T * d * ie);
                }
            mem *ins[] = {&q, &k, &v, &qs[0], &ks[0], &vs[0], &qs[1], &ks[1], &vs[1]};
            for (size_t i = 0; i < sizeof ins / sizeof *ins; i++)
                up(ins[i]);
            poison(&o1);
            TOK(one, resa_ctx_step_attend(one, l, dp(&q), dp(&k), dp(&v), dp(&o1), 0));
            down(&o1);
            for (int32_t r = 0; r < T; r++) {
                poison(&os[r]);
                TOK(tp[r], resa_ctx_step_attend(tp[r], l, dp(&qs[r]), dp(&ks[r]), dp(&vs[r]),
                                                dp(&os[r]), 0));
                down(&os[r]);
                /* CPU: bit for bit (a head's work does not depend on the others);
                 * CUDA: the split-KV decode picks its split count from the number
                 * of (entry, head) pairs, so sums may be ordered differently */
                for (int32_t t = 0; t < n; t++) {
                    const char *a = (char *)os[r].h + ((size_t)t * hq / T) * d * ie;
                    const char *b = (char *)o1.h + ((size_t)t * hq + (size_t)r * hq / T) * d * ie;
                    double e = 0;
                    for (int32_t x = 0; x < hq / T * d && g_cuda; x++)
                        e = fmax(e, fabs(ref_load(p.io_dtype, a, (size_t)x) -
                                         ref_load(p.io_dtype, b, (size_t)x)));
                    TCHECK(g_cuda ? e <= 16 * unit(p.io_dtype)
                                  : memcmp(a, b, (size_t)hq / T * d * ie) == 0,
                           "step %d (mode %d) layer %d row %d: tensor rank %d differs from the "
                           "single context (%.3g)", step, mode, l, t, r, e);
                }
            }
        }
        TOK(one, resa_ctx_step_end(one, 0));
        for (int32_t r = 0; r < T; r++) {
            TOK(tp[r], resa_ctx_step_end(tp[r], 0));
            int64_t a, b;
            TOK(tp[r], resa_seq_pending(tp[r], st[r], &a));
            TOK(one, resa_seq_pending(one, s1, &b));
            TCHECK(a == b, "tensor rank %d: pending %lld, single %lld", r, (long long)a,
                   (long long)b);
        }
        mem *all[] = {&q, &k, &v, &o1, &qs[0], &ks[0], &vs[0], &os[0], &qs[1], &ks[1], &vs[1],
                      &os[1]};
        for (size_t i = 0; i < sizeof all / sizeof *all; i++)
            mem_free(all[i]);
    }
    TCHECK(decoded > 10 && rectified > 0, "decoded %lld rectified %lld", (long long)decoded,
           (long long)rectified);
    resa_ctx_destroy(one);
    for (int32_t r = 0; r < T; r++)
        resa_ctx_destroy(tp[r]);
}
END_TEST

/* ------------------------------------------------------------------------ */
/* resa_merge_states against float64                                          */
/* ------------------------------------------------------------------------ */
START_TEST(test_merge)
{
    ref_rng rng = {th_test_seed("merge")};
    static const resa_dtype dts[] = {RESA_DTYPE_F32, RESA_DTYPE_F16, RESA_DTYPE_BF16};
    for (int di = 0; di < 3; di++) {
        const resa_dtype t = dts[di];
        const size_t ie = ref_dtype_size(t);
        const int32_t P = 1 + (int32_t)ref_rng_range(&rng, 0, 4), d = 1 + (int32_t)ref_rng_range(&rng, 0, 255);
        const int64_t rows = 1 + ref_rng_range(&rng, 0, 40);
        mem parts = mem_new((size_t)P * rows * d * ie), plse = mem_new((size_t)P * rows * 4);
        mem out = mem_new((size_t)rows * d * ie), lse = mem_new((size_t)rows * 4);
        float *pl = plse.h;
        for (int64_t r = 0; r < rows; r++) {
            int kind = (int)ref_rng_range(&rng, 0, 5); /* 0: every part -inf */
            for (int32_t i = 0; i < P; i++) {
                size_t at = ((size_t)i * rows + r) * d;
                int dead = kind == 0 || (kind == 1 && ref_rng_range(&rng, 0, 1));
                pl[(size_t)i * rows + r] =
                    dead ? -INFINITY : (float)(ref_rng_uniform(&rng) * 160.0 - 80.0);
                for (int32_t j = 0; j < d; j++) /* NaN behind a -inf part: never read */
                    ref_store(t, parts.h, at + j, dead && j % 2 ? NAN : ref_rng_normal(&rng));
            }
        }
        up(&parts);
        up(&plse);
        poison(&out);
        poison(&lse);
        ck_assert_int_eq(resa_merge_states(t, P, rows, d, parts.h, plse.h, out.h, lse.h, 0),
                         RESA_OK);
        /* the float64 answer and its bound, per element, for the host merge
         * here and the context's (CUDA: the kernel's) below; NaN: every part
         * -inf (output NaN, lse -inf) */
        double *want_o = malloc((size_t)rows * d * sizeof *want_o);
        double *tol_o = malloc((size_t)rows * d * sizeof *tol_o);
        double *want_l = malloc((size_t)rows * sizeof *want_l);
        double *tol_l = malloc((size_t)rows * sizeof *tol_l);
        ck_assert(want_o && tol_o && want_l && tol_l);
        for (int64_t r = 0; r < rows; r++) {
            double m = -INFINITY, sum = 0;
            for (int32_t i = 0; i < P; i++)
                m = fmax(m, pl[(size_t)i * rows + r]);
            for (int32_t i = 0; i < P; i++)
                if (pl[(size_t)i * rows + r] != -INFINITY)
                    sum += exp((double)pl[(size_t)i * rows + r] - m);
            double got_lse = ((float *)lse.h)[r];
            want_l[r] = m == -INFINITY ? NAN : m + log(sum);
            tol_l[r] = 4.0 * (P + 2) * ldexp(1.0, -24) * (1 + fabs(want_l[r]));
            for (int32_t j = 0; j < d; j++)
                want_o[r * d + j] = NAN;
            if (m == -INFINITY) {
                TCHECK(got_lse == -INFINITY, "row %lld: every part -inf, lse %g", (long long)r,
                       got_lse);
                for (int32_t j = 0; j < d; j++)
                    TCHECK(isnan(ref_load(t, out.h, (size_t)r * d + j)),
                           "row %lld: every part -inf, out not NaN", (long long)r);
                continue;
            }
            TCHECK(fabs(got_lse - want_l[r]) <= tol_l[r],
                   "dtype %d row %lld: lse %.9g, float64 %.9g", t, (long long)r, got_lse,
                   want_l[r]);
            for (int32_t j = 0; j < d; j++) {
                double want = 0, amax = 0;
                for (int32_t i = 0; i < P; i++) {
                    double x = pl[(size_t)i * rows + r];
                    if (x == -INFINITY)
                        continue;
                    double o = ref_load(t, parts.h, ((size_t)i * rows + r) * d + j);
                    want += exp(x - m) / sum * o;
                    amax = fmax(amax, fabs(o));
                }
                double got = ref_load(t, out.h, (size_t)r * d + j);
                /* fp32 weights and sums over P terms, then one rounding to t */
                double tol = 4.0 * (P + 4) * ldexp(1.0, -24) * amax + unit(t) * fabs(want);
                want_o[r * d + j] = want;
                tol_o[r * d + j] = tol;
                TCHECK(fabs(got - want) <= tol, "dtype %d row %lld col %d: %.9g, float64 %.9g",
                       t, (long long)r, j, got, want);
            }
        }
        /* the context's merge (CUDA: the kernel) against the same float64
         * answer and bound: not against the host merge's bits, since a sum
         * with cancellation has no bound relative to its own result */
        {
            ref_params p;
            ref_params_default(&p);
            p.d = d;
            p.kv_dtype = p.io_dtype = t;
            {
                resa_ctx *c = make_ctx(&p, 1, 1);
                mem out2 = mem_new(out.bytes), lse2 = mem_new(lse.bytes);
                poison(&out2);
                poison(&lse2);
                TOK(c, resa_ctx_merge_states(c, P, rows, dp(&parts), dp(&plse), dp(&out2),
                                             dp(&lse2), 0));
                down(&out2);
                down(&lse2);
                for (int64_t x = 0; x < rows * d; x++) {
                    double b = ref_load(t, out2.h, (size_t)x);
                    TCHECK(isnan(want_o[x]) ? isnan(b) : fabs(b - want_o[x]) <= tol_o[x],
                           "ctx merge element %lld: %.9g, float64 %.9g", (long long)x, b,
                           want_o[x]);
                }
                for (int64_t r = 0; r < rows; r++) {
                    double b = ((float *)lse2.h)[r];
                    TCHECK(isnan(want_l[r]) ? b == -INFINITY : fabs(b - want_l[r]) <= tol_l[r],
                           "ctx merge row %lld: lse %.9g, float64 %.9g", (long long)r, b,
                           want_l[r]);
                }
                mem_free(&out2);
                mem_free(&lse2);
                resa_ctx_destroy(c);
            }
        }
        free(want_o);
        free(tol_o);
        free(want_l);
        free(tol_l);
        mem_free(&parts);
        mem_free(&plse);
        mem_free(&out);
        mem_free(&lse);
    }
}
END_TEST

/* ------------------------------------------------------------------------ */
/* Bad arguments                                                              */
/* ------------------------------------------------------------------------ */
START_TEST(test_errors)
{
    th_test_seed("cp_errors");
    ref_params p;
    ref_params_default(&p);
    p.d = 32;
    p.b = 8;
    p.hq = 2;
    p.hkv = 1;
    resa_ctx *c = make_ctx(&p, p.hq, p.hkv);
    int32_t a, b2;
    TOK(c, resa_seq_create(c, &a));
    TOK(c, resa_seq_create(c, &b2));
    TFAIL(c, RESA_ERR_INVALID_ARGUMENT, "first_token", resa_seq_set_span(c, a, 12, -1));
    TFAIL(c, RESA_ERR_INVALID_ARGUMENT, "first_token", resa_seq_set_span(c, a, -8, -1));
    TFAIL(c, RESA_ERR_INVALID_ARGUMENT, "global_length", resa_seq_set_span(c, a, 16, 8));
    TFAIL(c, RESA_ERR_INVALID_ARGUMENT, "global_length", resa_seq_set_span(c, a, 16, -2));
    TFAIL(c, RESA_ERR_INVALID_ARGUMENT, "seq", resa_seq_set_span(c, 12345, 0, -1));
    ck_assert_int_eq(resa_seq_set_span(NULL, a, 0, -1), RESA_ERR_INVALID_ARGUMENT);
    TOK(c, resa_seq_set_span(c, a, 64, -1));
    /* fill a with 20 tokens (K/V only) */
    int32_t m = RESA_MODE_APPEND_KV, n = 20;
    float *buf = calloc(32768, sizeof(float));
    TOK(c, resa_ctx_step_begin(c, 1, &a, &m, &n, 0));
    TOK(c, resa_ctx_step_attend(c, 0, NULL, buf, buf, NULL, 0));
    TOK(c, resa_ctx_step_end(c, 0));
    TFAIL(c, RESA_ERR_INVALID_ARGUMENT, "first_token", resa_seq_set_span(c, a, 128, -1));
    /* not the tail any more: stores are refused, queries work */
    TOK(c, resa_seq_set_span(c, a, 64, 200));
    m = RESA_MODE_DECODE;
    n = 1;
    TFAIL(c, RESA_ERR_INVALID_ARGUMENT, "tail", resa_ctx_step_begin(c, 1, &a, &m, &n, 0));
    m = RESA_MODE_QUERY_SPARSE;
    n = 2;
    TFAIL(c, RESA_ERR_INVALID_ARGUMENT, "n_tokens", resa_ctx_step_begin(c, 1, &a, &m, &n, 0));
    m = RESA_MODE_QUERY_DENSE;
    n = 0;
    TFAIL(c, RESA_ERR_INVALID_ARGUMENT, "n_tokens", resa_ctx_step_begin(c, 1, &a, &m, &n, 0));
    m = 6;
    n = 1;
    TFAIL(c, RESA_ERR_INVALID_ARGUMENT, "modes", resa_ctx_step_begin(c, 1, &a, &m, &n, 0));
    /* step-less calls */
    int32_t cnt[4];
    float fs[64];
    int32_t is[64];
    TFAIL(c, RESA_ERR_BAD_STATE, "step",
          resa_ctx_step_block_scores(c, 0, buf, 16, fs, is, cnt, 0));
    TFAIL(c, RESA_ERR_BAD_STATE, "step",
          resa_ctx_step_thresholds(c, 1, 16, fs, is, cnt, fs, is, 0));
    /* a QUERY_SPARSE step: M = ceil(201 / 8) = 26 blocks, n = 16, 14 by score */
    m = RESA_MODE_QUERY_SPARSE;
    n = 1;
    TOK(c, resa_ctx_step_begin(c, 1, &a, &m, &n, 0));
    TFAIL(c, RESA_ERR_INVALID_ARGUMENT, "capacity",
          resa_ctx_step_block_scores(c, 0, buf, 13, fs, is, cnt, 0));
    TFAIL(c, RESA_ERR_INVALID_ARGUMENT, "capacity",
          resa_ctx_step_block_scores(c, 0, buf, -1, fs, is, cnt, 0));
    TFAIL(c, RESA_ERR_INVALID_ARGUMENT, "counts",
          resa_ctx_step_block_scores(c, 0, buf, 16, fs, is, NULL, 0));
    TFAIL(c, RESA_ERR_INVALID_ARGUMENT, "scores",
          resa_ctx_step_block_scores(c, 0, buf, 16, NULL, is, cnt, 0));
    TFAIL(c, RESA_ERR_INVALID_ARGUMENT, "q",
          resa_ctx_step_block_scores(c, 0, NULL, 16, fs, is, cnt, 0));
    TFAIL(c, RESA_ERR_INVALID_ARGUMENT, "layer",
          resa_ctx_step_block_scores(c, 1, buf, 16, fs, is, cnt, 0));
    TFAIL(c, RESA_ERR_INVALID_ARGUMENT, "flags",
          resa_ctx_step_block_scores(c, 0, buf, 16, fs, is, cnt, 2));
    TOK(c, resa_ctx_step_block_scores(c, 0, buf, 16, fs, is, cnt, 0));
    TCHECK(cnt[0] == 3, "20 tokens from block 8: blocks 8, 9, 10 are candidates, %d listed",
           cnt[0]);
    TFAIL(c, RESA_ERR_INVALID_ARGUMENT, "n_ranks",
          resa_ctx_step_thresholds(c, 0, 16, fs, is, cnt, fs, is, 0));
    TFAIL(c, RESA_ERR_INVALID_ARGUMENT, "threshold_blocks",
          resa_ctx_step_thresholds(c, 1, 16, fs, is, cnt, fs, NULL, 0));
    TFAIL(c, RESA_ERR_INVALID_ARGUMENT, "capacity",
          resa_ctx_step_thresholds(c, 1, 8, fs, is, cnt, fs, is, 0));
    float ts[1];
    int32_t tb[1];
    TOK(c, resa_ctx_step_thresholds(c, 1, 16, fs, is, cnt, ts, tb, 0));
    TCHECK(tb[0] >= 8 && tb[0] <= 10, "one rank with 3 candidates of 15: the threshold is its "
                                       "worst, block %d", tb[0]);
    TFAIL(c, RESA_ERR_INVALID_ARGUMENT, "threshold_blocks",
          resa_ctx_step_attend_ex(c, 0, buf, NULL, NULL, buf, NULL, ts, NULL, 0));
    TFAIL(c, RESA_ERR_INVALID_ARGUMENT, "out",
          resa_ctx_step_attend_ex(c, 0, buf, NULL, NULL, NULL, NULL, NULL, NULL, 0));
    TFAIL(c, RESA_ERR_INVALID_ARGUMENT, "flags",
          resa_ctx_step_attend_ex(c, 0, buf, NULL, NULL, buf, NULL, NULL, NULL, 1));
    float lse[2];
    TOK(c, resa_ctx_step_attend_ex(c, 0, buf, NULL, NULL, buf, lse, ts, tb, 0));
    TOK(c, resa_ctx_step_end(c, 0));
    int64_t len;
    TOK(c, resa_seq_length(c, a, &len));
    TCHECK(len == 20, "a QUERY entry changed the length to %lld", (long long)len);
    int32_t got[32];
    int64_t gn;
    TOK(c, resa_seq_selected_blocks(c, a, 0, 0, got, 32, &gn));
    TCHECK(gn == 3 && got[0] == 8 && got[2] == 10,
           "QUERY_SPARSE with every candidate taken: %lld blocks from %d", (long long)gn,
           got[0]);
    /* HEAD_SHARE cannot rank a split sequence */
    TOK(c, resa_ctx_set_param(c, RESA_PARAM_GROUP_SCORE, RESA_GROUP_SCORE_HEAD_SHARE));
    TFAIL(c, RESA_ERR_NOT_SUPPORTED, "RESA_GROUP_SCORE_HEAD_SHARE", resa_ctx_step_begin(c, 1, &a, &m, &n, 0));
    TOK(c, resa_ctx_set_param(c, RESA_PARAM_GROUP_SCORE, RESA_GROUP_SCORE_POOLED));
    /* pending tokens: a context that answers queries must have none */
    TOK(c, resa_seq_set_span(c, b2, 0, -1));
    m = RESA_MODE_APPEND_KV;
    n = 300;
    TOK(c, resa_ctx_step_begin(c, 1, &b2, &m, &n, 0));
    TOK(c, resa_ctx_step_attend(c, 0, NULL, buf, buf, NULL, 0));
    TOK(c, resa_ctx_step_end(c, 0));
    m = RESA_MODE_DECODE;
    n = 1;
    TOK(c, resa_ctx_step_begin(c, 1, &b2, &m, &n, 0));
    TOK(c, resa_ctx_step_attend(c, 0, buf, buf, buf, buf, 0));
    TOK(c, resa_ctx_step_end(c, 0));
    int64_t pend;
    TOK(c, resa_seq_pending(c, b2, &pend));
    TCHECK(pend == 1, "pending %lld after a sparse decode", (long long)pend);
    m = RESA_MODE_QUERY_DENSE;
    TFAIL(c, RESA_ERR_BAD_STATE, "pending", resa_ctx_step_begin(c, 1, &b2, &m, &n, 0));
    /* merges */
    TFAIL(c, RESA_ERR_INVALID_ARGUMENT, "n_parts",
          resa_ctx_merge_states(c, 0, 1, buf, buf, buf, NULL, 0));
    TFAIL(c, RESA_ERR_INVALID_ARGUMENT, "parts_lse",
          resa_ctx_merge_states(c, 1, 1, buf, NULL, buf, NULL, 0));
    TFAIL(c, RESA_ERR_INVALID_ARGUMENT, "n_rows",
          resa_ctx_merge_states(c, 1, -1, buf, buf, buf, NULL, 0));
    TFAIL(c, RESA_ERR_INVALID_ARGUMENT, "flags",
          resa_ctx_merge_states(c, 1, 1, buf, buf, buf, NULL, 4));
    ck_assert_int_eq(resa_merge_states(RESA_DTYPE_F32, 1, 1, 0, buf, buf, buf, NULL, 0),
                     RESA_ERR_INVALID_ARGUMENT);
    ck_assert_int_eq(resa_merge_states(RESA_DTYPE_F32, 1, 1, 257, buf, buf, buf, NULL, 0),
                     RESA_ERR_INVALID_ARGUMENT);
    ck_assert_int_eq(resa_merge_states((resa_dtype)7, 1, 1, 8, buf, buf, buf, NULL, 0),
                     RESA_ERR_INVALID_ARGUMENT);
    ck_assert_int_eq(resa_merge_states(RESA_DTYPE_F32, 1, 1, 8, NULL, buf, buf, NULL, 0),
                     RESA_ERR_INVALID_ARGUMENT);
    ck_assert_int_eq(resa_merge_states(RESA_DTYPE_F32, 1, 0, 8, NULL, NULL, NULL, NULL, 0),
                     RESA_OK);
    free(buf);
    resa_ctx_destroy(c);
}
END_TEST

/* Found by the API fuzzer (tests/fuzz, 2026-12-06): resa_ctx_step_block_scores
 * with capacity 0 and NULL scores and blocks, which API.md allows ("scores or
 * blocks is NULL with capacity > 0" is the error), formed scores + item *
 * capacity = NULL + 0 for every (entry, head) in lib/cpu/block_scores.c:
 * undefined behaviour (C11 6.5.6), reported by clang's
 * -fsanitize=undefined ("applying zero offset to null pointer").  A step
 * without sparse entries needs capacity 0. */
START_TEST(test_block_scores_no_lists)
{
    ref_params p;
    ref_params_default(&p);
    p.d = 8;
    p.b = 4;
    p.hq = 2;
    p.hkv = 1;
    p.n_layers = 1;
    resa_ctx *c = make_ctx(&p, p.hq, p.hkv);
    int32_t a, m = RESA_MODE_APPEND, n = 3, counts[1] = {-1};
    float *buf = calloc(64, sizeof(float));
    TOK(c, resa_seq_create(c, &a));
    TOK(c, resa_ctx_step_begin(c, 1, &a, &m, &n, 0));
    TOK(c, resa_ctx_step_block_scores(c, 0, buf, 0, NULL, NULL, counts, 0));
    TCHECK(counts[0] == 0, "an APPEND entry lists %d candidates", counts[0]);
    TOK(c, resa_ctx_step_cancel(c));
    free(buf);
    resa_ctx_destroy(c);
}
END_TEST

int main(int argc, char **argv)
{
    g_cuda = argc > 1 && strcmp(argv[1], "cuda") == 0;
    if (g_cuda && (!th_cuda_usable() || cuda_shim_load(&g_cu) != 0)) {
        fprintf(stderr, "check_cp: no usable GPU or CUDA module; skipped\n");
        return 77;
    }
    Suite *s = suite_create(g_cuda ? "cp_cuda" : "cp");
    TCase *tc = tcase_create("cp");
    tcase_set_timeout(tc, 600);
    /* RESA_TEST_SHARD=k/n: one n-th of the tests (th_add_loop), so that a
     * sanitizer run of the CUDA set splits over processes */
    th_add_loop(tc, test_lse_decode, 0, 1);
    if (!g_cuda) { /* IO F32 (the CUDA backend takes F16 and BF16) */
        th_add_loop(tc, test_cp_r2, 0, 1);
        th_add_loop(tc, test_cp_r3, 0, 1);
        th_add_loop(tc, test_cp_r4, 0, 1);
        th_add_loop(tc, test_cp_ties, 0, 2);
        th_add_loop(tc, test_errors, 0, 1);
        th_add_loop(tc, test_block_scores_no_lists, 0, 1);
    }
    th_add_loop(tc, test_cp_bf16, 0, 1);
    th_add_loop(tc, test_cp_cuda, 0, 2);
    th_add_loop(tc, test_cp_f16_b16, 0, 1);
    th_add_loop(tc, test_cp_fp8, 0, 3);
    th_add_loop(tc, test_query_edges, 0, 1);
    th_add_loop(tc, test_head_share_refusals, 0, 1);
    th_add_loop(tc, test_tp_heads, 0, 1);
    th_add_loop(tc, test_merge, 0, 1);
    suite_add_tcase(s, tc);
    /* no fork on the GPU: th_cuda_usable initialized CUDA in this process, and
     * a forked child cannot use it (cudaErrorInitializationError; the H100 run
     * of 2026-12-06 failed all four tests so) */
    return th_run_suite(s, g_cuda ? 0 : 1);
}
