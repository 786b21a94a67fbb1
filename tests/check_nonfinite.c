/* SPDX-License-Identifier: MIT */
/*
 * Non-finite inputs are contained (docs/API.md, "Non-finite values").  NaN,
 * +inf, -inf and finite values that overflow when stored to an f16 or bf16
 * cache are put in K, V or Q of one token of a prefill (APPEND), a decode or a
 * rectification, next to a clean sequence in the same step.  With an fp8 cache
 * a NaN or infinity anywhere in a token's K (or V) head vector makes all of
 * it read back as NaN (ref.c models it).  Every output row
 * of every layer is then classified from the float64 reference of the cache
 * as the library stores it (tests/ref.c):
 *  - a row that attends a non-finite V, a key whose score q.k is NaN or +inf,
 *    or only keys of score -inf, or that has a non-finite q, must come out
 *    non-finite;
 *  - every other row must be finite and equal the reference over the keys it
 *    attends, keys of score -inf left out (weight 0): so rows before the
 *    poisoned token in the same query tile, rows of other layers and heads,
 *    the other sequence, and decodes that did not select the poisoned block
 *    are exact.
 * Each layer is attended twice: first into an output pre-filled with NaN
 * bytes (a finite row proves it was written), then into one pre-filled with a
 * finite pattern (a non-finite row proves it was written); both must agree.
 * Decode selections must follow the documented rule (a NaN score ranks as
 * -inf, ties to the lower block index).  Recovery: a poisoned step that is
 * cancelled leaves nothing behind; a poisoned token that is still pending is
 * healed by a clean RECTIFY.
 *
 * check_nonfinite runs the CPU backend; check_nonfinite_cuda (argument
 * "cuda") the CUDA backend, and exits 77 (skipped) without a GPU.
 * RESA_TEST_QUICK=1 (compute-sanitizer runs) keeps every configuration and
 * test with fewer poison kinds and heads (make_cases); RESA_TEST_QUICK=2
 * (racecheck, which took over 900 s a shard of eight at 1 on an H100) runs
 * one of those cases a configuration, a different one for each, so that the
 * eight configurations together still meet every case.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cuda_shim.h"
#include "harness.h"

enum { NF_K = 0, NF_V = 1, NF_Q = 2 };
enum { NF_NAN = 0, NF_PINF = 1, NF_NINF = 2, NF_OVER = 3, NF_NOVER = 4, NF_KINDS = 5 };
static const char *const where_name[] = {"K", "V", "Q"};
static const char *const kind_name[] = {"NaN", "+inf", "-inf", "+overflow", "-overflow"};

/* One poisoned input value pattern. */
typedef struct nf_poison {
    int where, kind;
    int one_dim;      /* 1: only dimension `dim` of the row; 0: every dimension */
    int32_t dim;
    int32_t entry;    /* entry of the step */
    int32_t row;      /* row within the entry */
    int32_t head;     /* KV head (K, V) or query head (Q) */
    int32_t layer;
} nf_poison;

static resa_backend g_backend = RESA_BACKEND_CPU;
static cuda_shim g_cu;

/* ---- configurations ---- */
typedef struct nf_config {
    int32_t d, hq, hkv, b;
    resa_dtype kv, io;
    int fp8;
} nf_config;

static const nf_config cpu_configs[] = {
    {64, 4, 2, 16, RESA_DTYPE_F32, RESA_DTYPE_F32, 0},
    {64, 4, 2, 16, RESA_DTYPE_F16, RESA_DTYPE_F32, 0},   /* overflow on store to f16 */
    {128, 2, 1, 16, RESA_DTYPE_BF16, RESA_DTYPE_F32, 0}, /* overflow on store to bf16 */
    {64, 8, 2, 8, RESA_DTYPE_F16, RESA_DTYPE_F16, 0},
    {128, 4, 1, 16, RESA_DTYPE_BF16, RESA_DTYPE_BF16, 0},
    {40, 3, 1, 4, RESA_DTYPE_F32, RESA_DTYPE_F32, 0},    /* d not a multiple of 16 */
    {64, 4, 2, 16, RESA_DTYPE_F16, RESA_DTYPE_F32, 1},   /* fp8 summaries */
    /* fp8 caches: a non-finite element makes its whole head vector NaN */
    {64, 4, 2, 16, RESA_DTYPE_FP8_E4M3, RESA_DTYPE_F32, 0},
    {128, 4, 1, 16, RESA_DTYPE_FP8_E4M3, RESA_DTYPE_BF16, 1},
};
/* CUDA: KV = IO, f16 or bf16, or an fp8 cache; d 64 is the mma.sync dense
 * kernel, 128 and 256 the wgmma one on Hopper (with an fp8 cache too: its
 * producer converts the raw tiles; check_nonfinite_cuda_mma runs them on
 * mma.sync); groups 1 to 16. */
static const nf_config cuda_configs[] = {
    {64, 4, 2, 16, RESA_DTYPE_F16, RESA_DTYPE_F16, 0},
    {128, 8, 2, 16, RESA_DTYPE_BF16, RESA_DTYPE_BF16, 0},
    {256, 4, 2, 8, RESA_DTYPE_BF16, RESA_DTYPE_BF16, 0},
    {128, 2, 2, 16, RESA_DTYPE_F16, RESA_DTYPE_F16, 1},
    {128, 16, 1, 32, RESA_DTYPE_F16, RESA_DTYPE_F16, 0},
    {128, 8, 2, 16, RESA_DTYPE_FP8_E4M3, RESA_DTYPE_BF16, 0},
    {64, 4, 2, 16, RESA_DTYPE_FP8_E4M3, RESA_DTYPE_F16, 1},
    {256, 4, 2, 8, RESA_DTYPE_FP8_E4M3, RESA_DTYPE_BF16, 0},
    {128, 4, 1, 16, RESA_DTYPE_FP8_E4M3, RESA_DTYPE_F16, 0}, /* f16 queries: three e4m3 parts (KF8) */
};
#define N_CPU ((int)(sizeof cpu_configs / sizeof cpu_configs[0]))
#define N_CUDA ((int)(sizeof cuda_configs / sizeof cuda_configs[0]))

static const nf_config *config(int i)
{
    return g_backend == RESA_BACKEND_CUDA ? &cuda_configs[i % N_CUDA] : &cpu_configs[i % N_CPU];
}

static void nf_init(th *t, const char *name, const nf_config *c)
{
    ref_params p;
    ref_params_default(&p);
    p.n_layers = 2;
    p.d = c->d;
    p.hq = c->hq;
    p.hkv = c->hkv;
    p.b = c->b;
    p.kv_dtype = c->kv;
    p.io_dtype = c->io;
    p.summary_fp8 = c->fp8;
    /* sparse from a few blocks on: the poisoned block can be left out */
    p.min_blocks = 2;
    p.fraction = 0.1;
    p.local_blocks = 1;
    p.sink_blocks = 1;
    th_opts o;
    th_opts_default(&o);
    o.backend = g_backend;
    o.max_tokens = 8192;
    th_init(t, name, &p, &o);
}

/* The value of a poison: overflow kinds are finite, above the largest value
 * of the KV dtype (f16: 65504, rounding to inf from 65520; bf16: 3.3895e38)
 * and below FLT_MAX. */
static double poison_value(const ref_params *p, int kind)
{
    double big = p->kv_dtype == RESA_DTYPE_F16 ? 7.0e4 : 3.4e38;
    switch (kind) {
    case NF_NAN: return NAN;
    case NF_PINF: return INFINITY;
    case NF_NINF: return -INFINITY;
    case NF_OVER: return big;
    default: return -big;
    }
}

/* Whether (where, kind) is a case of this configuration: overflow on store
 * needs a 16-bit cache and applies to K and V (q is never stored).  An fp8
 * cache has no overflow on store: the token's scale covers its largest value. */
static int case_applies(const ref_params *p, int where, int kind)
{
    if (kind == NF_OVER || kind == NF_NOVER)
        return where != NF_Q &&
               (p->kv_dtype == RESA_DTYPE_F16 || p->kv_dtype == RESA_DTYPE_BF16);
    return 1;
}

/* ---- step_attend with host buffers on either backend ---- */
static void *dev_in(const void *host, size_t bytes)
{
    void *d = NULL;
    TCHECK(g_cu.Malloc(&d, bytes) == 0, "cudaMalloc(%zu) failed", bytes);
    TCHECK(g_cu.Memcpy(d, host, bytes, 1) == 0, "cudaMemcpy to the device failed");
    return d;
}

static void attend(th *t, int32_t l, const void *q, const void *k, const void *v, void *out,
                   size_t q_bytes, size_t kv_bytes)
{
    if (g_backend != RESA_BACKEND_CUDA) {
        TOK(t->ctx, resa_ctx_step_attend(t->ctx, l, q, k, v, out, 0));
        return;
    }
    void *dq = dev_in(q, q_bytes), *dk = dev_in(k, kv_bytes), *dv = dev_in(v, kv_bytes),
         *dout = dev_in(out, q_bytes);
    TOK(t->ctx, resa_ctx_step_attend(t->ctx, l, dq, dk, dv, dout, 0));
    TOK(t->ctx, resa_ctx_synchronize(t->ctx));
    TCHECK(g_cu.Memcpy(out, dout, q_bytes, 2) == 0, "cudaMemcpy from the device failed");
    g_cu.Free(dq);
    g_cu.Free(dk);
    g_cu.Free(dv);
    g_cu.Free(dout);
}

/* ---- the reference of one output row ---- */

/* What one query row (q: IO values as doubles) of KV head h must produce when
 * it attends the positions pos[0 .. n): 0 when non-finite, else 1 and the
 * attention over the keys of finite score (a score of -inf weighs 0) in out. */
static int expect_row(const ref_params *p, const ref_seq *s, int32_t layer, int32_t h,
                      const double *q, const int64_t *pos, int64_t n, double *w, double *out)
{
    double scale = ref_scale(p);
    for (int32_t j = 0; j < p->d; j++)
        if (!isfinite(q[j]))
            return 0;
    double mx = -INFINITY;
    for (int64_t i = 0; i < n; i++) {
        const double *k = ref_k(s, layer, pos[i], h), *v = ref_v(s, layer, pos[i], h);
        double dot = 0;
        for (int32_t j = 0; j < p->d; j++) {
            dot += q[j] * k[j];
            if (!isfinite(v[j]))
                return 0; /* an attended non-finite V: even at weight 0, 0 * inf is NaN */
        }
        w[i] = dot * scale;
        if (isnan(w[i]) || w[i] == INFINITY)
            return 0;
        mx = w[i] > mx ? w[i] : mx;
    }
    if (mx == -INFINITY)
        return 0; /* every score -inf: 0 / 0 */
    double sum = 0;
    for (int64_t i = 0; i < n; i++) {
        w[i] = exp(w[i] - mx);
        sum += w[i];
    }
    for (int32_t j = 0; j < p->d; j++)
        out[j] = 0;
    for (int64_t i = 0; i < n; i++) {
        const double *v = ref_v(s, layer, pos[i], h);
        for (int32_t j = 0; j < p->d; j++)
            out[j] += w[i] / sum * v[j];
    }
    return 1;
}

/* Any non-finite key value at positions < valid of (layer, h). */
static int cache_has_inf_key(const ref_params *p, const ref_seq *s, int32_t layer, int32_t h,
                             int64_t valid)
{
    for (int64_t t = 0; t < valid; t++)
        for (int32_t j = 0; j < p->d; j++)
            if (isinf(ref_k(s, layer, t, h)[j]))
                return 1;
    return 0;
}

/* The decode selection of (layer, h): the budget, forced blocks, ascending,
 * and the order rule: a NaN score ranks as -inf, ties (equal infinities
 * included) to the lower index; finite scores within rounding.  Returns the
 * number of blocks, which are in use[]. */
static int64_t check_selection(th *t, const th_seq *s, const ref_seq *r, int32_t layer, int32_t h,
                               const void *q, int64_t qrow, int64_t M, int64_t n_sel,
                               int32_t *use)
{
    const ref_params *p = &t->p;
    int64_t count = -1;
    TOK(t->ctx, resa_seq_selected_blocks(t->ctx, s->id, layer, h, use, M, &count));
    TCHECK(count == n_sel, "seq %d layer %d head %d: %lld blocks selected, budget %lld", s->id,
           layer, h, (long long)count, (long long)n_sel);
    char *in = calloc((size_t)M, 1);
    for (int64_t i = 0; i < count; i++) {
        TCHECK(use[i] >= 0 && use[i] < M && (i == 0 || use[i] > use[i - 1]),
               "selection not ascending in [0, %lld)", (long long)M);
        in[use[i]] = 1;
    }
    for (int64_t i = 0; i < M; i++)
        if (ref_is_forced(i, M, p->local_blocks, p->sink_blocks))
            TCHECK(in[i], "forced block %lld not selected", (long long)i);
    /* fp8 summaries saturate an infinite key to the largest e4m3 value, which
     * the float64 reference (ref_e4m3_outward) does not model: order unchecked */
    int check_order = !(p->summary_fp8 && cache_has_inf_key(p, r, layer, h, r->len + 1));
    double *qp = malloc(sizeof(double) * (size_t)p->d);
    double *sc = malloc(sizeof(double) * (size_t)M), *mag = malloc(sizeof(double) * (size_t)M);
    ref_pooled_query(p, q, qrow, h, qp);
    ref_block_scores(p, r, layer, h, qp, M, r->len + 1, sc, mag);
    for (int64_t i = 0; i < M; i++)
        if (isnan(sc[i]))
            sc[i] = -INFINITY;
    for (int64_t x = 0; check_order && x < M; x++) {
        if (!in[x] || ref_is_forced(x, M, p->local_blocks, p->sink_blocks))
            continue;
        for (int64_t y = 0; y < M; y++) {
            if (in[y])
                continue;
            int ok;
            if (isfinite(sc[x]) && isfinite(sc[y]))
                ok = sc[x] >= sc[y] - (1e-4 * (mag[x] + mag[y]) + 1e-30);
            else if (sc[x] == sc[y])
                ok = x < y; /* a tie of infinities (or of NaN scores): the lower index */
            else
                ok = sc[x] > sc[y];
            TCHECK(ok, "seq %d layer %d head %d: block %lld (score %g) selected over block "
                       "%lld (score %g), M=%lld n=%lld",
                   s->id, layer, h, (long long)x, sc[x], (long long)y, sc[y], (long long)M,
                   (long long)n_sel);
        }
    }
    free(qp);
    free(sc);
    free(mag);
    free(in);
    return count;
}

/* ---- one checked step with poisoned inputs ---- */

typedef struct nf_count {
    int64_t bad, good; /* rows that are (must be) non-finite / finite */
} nf_count;

/* Runs one step of n entries, every layer attended twice (see the top), with
 * the poisons ps[0 .. n_ps) applied to the inputs, and checks every output
 * row.  cancel: abandons the step; K/V a RECTIFY entry rewrote stays (the
 * reference keeps it too), everything else is discarded.  Returns the row
 * counts of each class. */
static nf_count nf_step(th *t, int32_t n, th_entry *e, const nf_poison *ps, int n_ps, int cancel)
{
    const ref_params *p = &t->p;
    resa_ctx *c = t->ctx;
    int32_t g = p->hq / p->hkv, L = p->n_layers, d = p->d;
    int32_t *ids = malloc(sizeof(int32_t) * (size_t)n), *modes = malloc(sizeof(int32_t) * (size_t)n),
            *ntok = malloc(sizeof(int32_t) * (size_t)n);
    th_plan *pl = calloc((size_t)n, sizeof *pl);
    ref_seq **rs = calloc((size_t)n, sizeof *rs); /* the references after this step */
    int64_t T = th_plan_step(t, n, e, ids, modes, ntok, pl);
    for (int32_t i = 0; i < n; i++)
        rs[i] = ref_seq_clone(e[i].s->r);
    size_t es = ref_dtype_size(p->io_dtype);
    size_t qn = (size_t)T * (size_t)p->hq * (size_t)d, kn = (size_t)T * (size_t)p->hkv * (size_t)d;
    void **q = calloc((size_t)L, sizeof(void *)), **out = calloc((size_t)L, sizeof(void *));
    void *k = malloc(kn * es), *v = malloc(kn * es), *out2 = malloc(qn * es);

    TOK(c, resa_ctx_step_begin(c, n, ids, modes, ntok, 0));
    for (int32_t l = L - 1; l >= 0; l--) { /* layers in reverse: any order is allowed */
        q[l] = malloc(qn * es);
        out[l] = malloc(qn * es);
        for (int64_t r = 0; r < T; r++) {
            for (int32_t hh = 0; hh < p->hq; hh++)
                for (int32_t j = 0; j < d; j++)
                    ref_store(p->io_dtype, q[l], ((size_t)r * p->hq + hh) * d + j,
                              1.5 * ref_rng_normal(&t->rng));
            for (int32_t hh = 0; hh < p->hkv; hh++) {
                double f = 0.3 + 1.4 * ref_rng_uniform(&t->rng);
                for (int32_t j = 0; j < d; j++) {
                    size_t at = ((size_t)r * p->hkv + hh) * d + j;
                    ref_store(p->io_dtype, k, at, f * ref_rng_normal(&t->rng));
                    ref_store(p->io_dtype, v, at, ref_rng_normal(&t->rng));
                }
            }
        }
        for (int i = 0; i < n_ps; i++) {
            const nf_poison *x = &ps[i];
            if (x->layer != l)
                continue;
            int64_t r = pl[x->entry].row + x->row;
            int32_t heads = x->where == NF_Q ? p->hq : p->hkv;
            void *buf = x->where == NF_K ? k : x->where == NF_V ? v : q[l];
            for (int32_t j = 0; j < d; j++)
                if (!x->one_dim || j == x->dim)
                    ref_store(p->io_dtype, buf, ((size_t)r * heads + x->head) * d + j,
                              poison_value(p, x->kind));
        }
        th_poison(out[l], qn * es); /* NaN bytes: a finite row was written */
        attend(t, l, q[l], k, v, out[l], qn * es, kn * es);
        memset(out2, 0x3c, qn * es); /* finite bytes: a non-finite row was written */
        attend(t, l, q[l], k, v, out2, qn * es, kn * es);
        /* rows must agree between the two calls, bit for bit where finite */
        for (size_t x = 0; x < qn; x++) {
            double a = ref_load(p->io_dtype, out[l], x), b = ref_load(p->io_dtype, out2, x);
            TCHECK(isfinite(a) == isfinite(b) && (!isfinite(a) || a == b),
                   "layer %d element %zu: %g, then %g attending the same inputs again", l, x, a, b);
        }
        for (int32_t i = 0; i < n; i++)
            ref_write_kv(p, rs[i], l, pl[i].start, pl[i].n, k, v, pl[i].row);
    }
    if (cancel)
        TOK(c, resa_ctx_step_cancel(c));
    else
        TOK(c, resa_ctx_step_end(c, 0));

    nf_count cnt = {0, 0};
    double *qv = malloc(sizeof(double) * (size_t)d), *rv = malloc(sizeof(double) * (size_t)d);
    int64_t maxpos = 1;
    for (int32_t i = 0; i < n; i++)
        maxpos = rs[i]->len + pl[i].n + 1 > maxpos ? rs[i]->len + pl[i].n + 1 : maxpos;
    int64_t *pos = malloc(sizeof(int64_t) * (size_t)maxpos);
    double *w = malloc(sizeof(double) * (size_t)maxpos);
    for (int32_t i = 0; i < n; i++) {
        const th_seq *s = e[i].s;
        int32_t mode = e[i].mode;
        int64_t M = pl[i].M;
        int32_t *use = malloc(sizeof(int32_t) * (size_t)(M > 0 ? M : 1));
        for (int32_t l = 0; l < L; l++) {
            double num = 0, den = 0;
            for (int64_t r = 0; r < pl[i].n; r++) {
                int64_t at_pos = pl[i].start + r;
                for (int32_t hk = 0; hk < p->hkv; hk++) {
                    int64_t np = 0;
                    if (mode == RESA_MODE_DECODE) {
                        int64_t ns = check_selection(t, s, rs[i], l, hk, q[l], pl[i].row, M,
                                                     pl[i].n_sel, use);
                        for (int64_t b = 0; b < ns; b++)
                            for (int64_t x = (int64_t)use[b] * p->b;
                                 x < ((int64_t)use[b] + 1) * p->b && x <= at_pos; x++)
                                pos[np++] = x;
                    } else {
                        for (int64_t x = 0; x <= at_pos; x++)
                            pos[np++] = x;
                    }
                    for (int32_t gi = 0; gi < g; gi++) {
                        int32_t qh = hk * g + gi;
                        size_t at = ((size_t)(pl[i].row + r) * p->hq + qh) * d;
                        for (int32_t j = 0; j < d; j++)
                            qv[j] = ref_load(p->io_dtype, q[l], at + j);
                        int fin = expect_row(p, rs[i], l, hk, qv, pos, np, w, rv);
                        int any_bad = 0;
                        for (int32_t j = 0; j < d; j++) {
                            double o = ref_load(p->io_dtype, out[l], at + j);
                            if (!isfinite(o))
                                any_bad = 1;
                            else if (fin) {
                                num += (o - rv[j]) * (o - rv[j]);
                                den += rv[j] * rv[j];
                            }
                        }
                        TCHECK(any_bad == !fin,
                               "%s step %lld entry %d (seq %d, mode %d, %lld rows from position "
                               "%lld) layer %d row %lld (position %lld) head %d: %s output, "
                               "expected %s; d=%d hq=%d hkv=%d b=%d kv=%d io=%d fp8=%d",
                               g_backend == RESA_BACKEND_CUDA ? "CUDA" : "CPU",
                               (long long)t->steps, i, s->id, mode, (long long)pl[i].n,
                               (long long)pl[i].start, l, (long long)r, (long long)at_pos, qh,
                               any_bad ? "non-finite" : "finite",
                               fin ? "finite" : "non-finite", d, p->hq, p->hkv, p->b,
                               (int)p->kv_dtype, (int)p->io_dtype, p->summary_fp8);
                        if (fin)
                            cnt.good++;
                        else
                            cnt.bad++;
                    }
                }
            }
            double rel = den > 0 ? sqrt(num / den) : 0.0;
            TCHECK(rel <= t->tol,
                   "step %lld entry %d (seq %d, mode %d) layer %d: relative error %.3g of the "
                   "finite rows (tolerance %.1g)",
                   (long long)t->steps, i, s->id, mode, l, rel, t->tol);
        }
        free(use);
    }
    for (int32_t i = 0; i < n; i++) {
        if (!cancel || e[i].mode == RESA_MODE_RECTIFY) {
            ref_seq_free(e[i].s->r);
            e[i].s->r = rs[i];
        } else {
            ref_seq_free(rs[i]);
        }
        if (!cancel)
            ref_commit(e[i].s->r, e[i].mode, pl[i].n, pl[i].n_sel, pl[i].M);
        th_check_state(t, e[i].s);
    }
    t->steps++;
    for (int32_t l = 0; l < L; l++) {
        free(q[l]);
        free(out[l]);
    }
    free(q), free(out), free(k), free(v), free(out2), free(qv), free(rv), free(pos), free(w);
    free(ids), free(modes), free(ntok), free(pl), free(rs);
    return cnt;
}

static nf_count nf_clean(th *t, int32_t n, th_entry *e)
{
    return nf_step(t, n, e, NULL, 0, 0);
}

/* The cases of one configuration: every (where, kind), and for K also the
 * infinities in one dimension only (the score is then +inf or -inf by the
 * sign of that query element: non-finite rows next to exact ones). */
typedef struct nf_case {
    int where, kind, one_dim;
} nf_case;

/* Every kind in K, V and Q where it applies, and an infinity in one dimension
 * of K.  RESA_TEST_QUICK (th_quick, for compute-sanitizer, which checks the
 * kernels' memory accesses rather than the values): NaN and +inf in each of
 * K, V and Q, overflow on store where it applies, one one-dimension case;
 * the same kernels and paths with a third of the steps.  RESA_TEST_QUICK=2:
 * only the quick set's case number `pick` (modulo their count). */
static int make_cases(const ref_params *p, int pick, nf_case *out)
{
    const int quick = th_quick();
    int n = 0;
    for (int w = 0; w < 3; w++)
        for (int kd = 0; kd < NF_KINDS; kd++)
            if (case_applies(p, w, kd) &&
                (!quick || kd == NF_NAN || kd == NF_PINF || (kd == NF_OVER && w == NF_K)))
                out[n++] = (nf_case){w, kd, 0};
    out[n++] = (nf_case){NF_K, NF_PINF, 1};
    if (!quick)
        out[n++] = (nf_case){NF_K, NF_NINF, 1};
    if (quick >= 2) {
        out[0] = out[pick % n];
        n = 1;
    }
    return n;
}

static nf_poison poison_of(th *t, const nf_case *c, int32_t entry, int32_t row)
{
    const ref_params *p = &t->p;
    nf_poison x;
    x.where = c->where;
    x.kind = c->kind;
    x.one_dim = c->one_dim;
    x.dim = (int32_t)ref_rng_range(&t->rng, 0, p->d - 1);
    x.entry = entry;
    x.row = row;
    x.head = (int32_t)ref_rng_range(&t->rng, 0, (c->where == NF_Q ? p->hq : p->hkv) - 1);
    x.layer = (int32_t)ref_rng_range(&t->rng, 0, p->n_layers - 1);
    return x;
}

/* A poison that every row attending it must show: any kind in V or Q, and
 * in every dimension of K (a mixed-sign q makes the score NaN); not an
 * infinity in one dimension of K (a score of -inf is weight 0). */
static int always_seen(const nf_case *c)
{
    return !c->one_dim;
}

/* ---- prefill ---- */

/* A prompt chunk of 150 tokens after 37 clean ones (neither a multiple of the
 * block size), poisoned at a token in the middle of a query tile, batched with
 * a decode of a clean sequence; then decodes of both, which (SELECT_FRACTION 0
 * and SELECT_MIN_BLOCKS 2: the sink and the local block only) do not attend
 * the poisoned block. */
START_TEST(test_prefill)
{
    const nf_config *cf = config(_i);
    char name[64];
    snprintf(name, sizeof name, "nonfinite_prefill_%d", _i);
    th t;
    nf_init(&t, name, cf);
    t.p.fraction = 0.0;
    th_push_method(&t);
    nf_case cases[32];
    int nc = make_cases(&t.p, _i, cases);
    for (int ci = 0; ci < nc; ci++) {
        th_seq a, b, c;
        th_seq_create(&t, &a);
        th_seq_create(&t, &b);
        th_seq_create(&t, &c);
        th_prefill(&t, &a, 37, 37, 0);
        th_prefill(&t, &b, 21, 21, 0);
        int32_t row = 90 + (int32_t)ref_rng_range(&t.rng, 0, 12); /* position 127 .. 139 */
        /* and the first token of a new sequence, which its row 0 attends alone */
        nf_poison x[2] = {poison_of(&t, &cases[ci], 0, row), poison_of(&t, &cases[ci], 2, 0)};
        th_entry e[3] = {{&a, RESA_MODE_APPEND, 150}, {&b, RESA_MODE_DECODE, 1},
                         {&c, RESA_MODE_APPEND, 19}};
        nf_count r = nf_step(&t, 3, e, x, 2, 0);
        TCHECK(r.good >= (int64_t)(90 + 1) * t.p.hq * t.p.n_layers,
               "%s in %s: only %lld finite rows", kind_name[x[0].kind], where_name[x[0].where],
               (long long)r.good);
        if (always_seen(&cases[ci]))
            TCHECK(r.bad > 0, "%s in %s at row %d: no row saw it", kind_name[x[0].kind],
                   where_name[x[0].where], row);
        for (int s = 0; s < 3; s++) {
            th_entry d2[2] = {{&a, RESA_MODE_DECODE, 1}, {&b, RESA_MODE_DECODE, 1}};
            nf_count rd = nf_step(&t, 2, d2, NULL, 0, 0);
            /* the poisoned block is neither sink nor local: never attended */
            TCHECK(rd.bad == 0, "decode after a poisoned prefill: %lld non-finite rows",
                   (long long)rd.bad);
        }
        th_seq_release(&t, &a);
        th_seq_release(&t, &b);
        th_seq_release(&t, &c);
    }
    th_fini(&t);
}
END_TEST

/* ---- decode ---- */

/* A poisoned decode token (pending: earlier decodes were sparse) next to a
 * clean sequence.  It is the last token of its block, so the decodes after it
 * see that block as a candidate scored from its (possibly infinite) summary:
 * budget 4 = sink + local + two by score.  Recovery: the same kind of
 * poisoned decode cancelled first leaves nothing behind, a fork taken before
 * the poison stays clean, and a clean RECTIFY of the pending span rewrites the
 * poisoned token, after which every row is exact again. */
START_TEST(test_decode)
{
    const nf_config *cf = config(_i);
    char name[64];
    snprintf(name, sizeof name, "nonfinite_decode_%d", _i);
    th t;
    nf_init(&t, name, cf);
    t.p.interval = 0; /* rectify when the test says so */
    t.p.min_blocks = 4;
    th_push_method(&t);
    nf_case cases[32];
    int nc = make_cases(&t.p, _i, cases);
    for (int ci = 0; ci < nc; ci++) {
        th_seq a, b;
        th_seq_create(&t, &a);
        th_seq_create(&t, &b);
        /* the poisoned decode lands at 20 b - 1: 3 decodes and 1 more after this */
        th_prefill(&t, &a, 20 * t.p.b - 5, 128, 0);
        th_prefill(&t, &b, 90, 90, 0);
        for (int s = 0; s < 3; s++) {
            th_entry d2[2] = {{&a, RESA_MODE_DECODE, 1}, {&b, RESA_MODE_DECODE, 1}};
            th_step(&t, 2, d2);
        }
        TCHECK(ref_seq_pending(a.r) > 0, "sparse decodes left nothing pending");
        /* cancelled: nothing of it stays */
        nf_poison x = poison_of(&t, &cases[ci], 0, 0);
        th_entry e[2] = {{&a, RESA_MODE_DECODE, 1}, {&b, RESA_MODE_DECODE, 1}};
        nf_step(&t, 2, e, &x, 1, 1);
        nf_count rc = nf_clean(&t, 2, e);
        TCHECK(rc.bad == 0, "after a cancelled poisoned decode: %lld non-finite rows",
               (long long)rc.bad);
        /* committed, after a checkpoint fork */
        th_seq ck;
        th_seq_fork(&t, &a, &ck);
        x = poison_of(&t, &cases[ci], 0, 0);
        nf_count r = nf_step(&t, 2, e, &x, 1, 0);
        if (always_seen(&cases[ci]))
            TCHECK(r.bad > 0, "%s in %s of a decode: no row saw it", kind_name[x.kind],
                   where_name[x.where]);
        TCHECK(r.good > 0, "a poisoned decode left no row finite");
        for (int s = 0; s < 2; s++)
            nf_clean(&t, 2, e);
        /* the checkpoint never saw the poison */
        th_entry ce = {&ck, RESA_MODE_DECODE, 1};
        nf_count rk = nf_clean(&t, 1, &ce);
        TCHECK(rk.bad == 0, "the checkpoint fork: %lld non-finite rows", (long long)rk.bad);
        th_seq_release(&t, &ck);
        /* heal: a clean rectification of the pending span rewrites the token */
        th_entry rect[2] = {{&a, RESA_MODE_RECTIFY, 0}, {&b, RESA_MODE_DECODE, 1}};
        nf_count rr = nf_clean(&t, 2, rect);
        TCHECK(rr.bad == 0, "the healing RECTIFY gave %lld non-finite rows", (long long)rr.bad);
        for (int s = 0; s < 2; s++) {
            nf_count rd = nf_clean(&t, 2, e);
            TCHECK(rd.bad == 0, "decode after healing: %lld non-finite rows", (long long)rd.bad);
        }
        th_seq_release(&t, &a);
        th_seq_release(&t, &b);
    }
    th_fini(&t);
}
END_TEST

/* A NaN query: its own rows are non-finite, the other heads of its group are
 * exact over the blocks the rule picks from NaN scores (every candidate at
 * -inf: the lowest indices). */
START_TEST(test_decode_nan_query_selection)
{
    const nf_config *cf = config(_i);
    char name[64];
    snprintf(name, sizeof name, "nonfinite_nan_query_%d", _i);
    th t;
    nf_init(&t, name, cf);
    t.p.min_blocks = 4;
    t.p.sink_blocks = 0;
    th_push_method(&t);
    th_seq a;
    th_seq_create(&t, &a);
    th_prefill(&t, &a, 517, 256, 1);
    int32_t g = t.p.hq / t.p.hkv;
    /* quick: the heads of the first group and one of the second */
    const int32_t heads = th_quick() && g + 1 < t.p.hq ? g + 1 : t.p.hq;
    for (int32_t h = 0; h < heads; h++) {
        nf_poison x = {NF_Q, NF_NAN, 0, 0, 0, 0, h, (int32_t)(h % t.p.n_layers)};
        th_entry e = {&a, RESA_MODE_DECODE, 1};
        nf_count r = nf_step(&t, 1, &e, &x, 1, 0);
        TCHECK(r.bad == 1, "NaN in query head %d: %lld non-finite rows", h, (long long)r.bad);
        int64_t M = ref_blocks(a.r->len, t.p.b), count = -1;
        int32_t *blocks = malloc(sizeof(int32_t) * (size_t)M);
        TOK(t.ctx, resa_seq_selected_blocks(t.ctx, a.id, x.layer, h / g, blocks, M, &count));
        int64_t n = ref_budget(M, t.p.fraction, t.p.min_blocks, t.p.local_blocks, t.p.sink_blocks);
        TCHECK(count == n, "%lld blocks, budget %lld", (long long)count, (long long)n);
        for (int64_t i = 0; i < n - 1; i++) /* the lowest indices, then the local block */
            TCHECK(blocks[i] == i, "NaN scores: block %d selected at %lld", blocks[i],
                   (long long)i);
        TCHECK(blocks[n - 1] == M - 1, "the local block");
        free(blocks);
    }
    th_seq_release(&t, &a);
    th_fini(&t);
}
END_TEST

/* ---- rectification ---- */

/* 41 pending tokens; a RECTIFY of the oldest 25 poisoned in its 12th row,
 * next to a clean decode, is cancelled: its K/V stays rewritten, the tokens
 * stay pending, and a clean RECTIFY heals them.  Then a poisoned RECTIFY of
 * the whole span is committed, and decodes follow. */
START_TEST(test_rectify)
{
    const nf_config *cf = config(_i);
    char name[64];
    snprintf(name, sizeof name, "nonfinite_rectify_%d", _i);
    th t;
    nf_init(&t, name, cf);
    t.p.interval = 0;
    th_push_method(&t);
    nf_case cases[32];
    int nc = make_cases(&t.p, _i, cases);
    for (int ci = 0; ci < nc; ci++) {
        th_seq a, b;
        th_seq_create(&t, &a);
        th_seq_create(&t, &b);
        th_prefill(&t, &a, 203, 203, 1);
        th_prefill(&t, &b, 30, 30, 0);
        th_entry d2[2] = {{&a, RESA_MODE_DECODE, 1}, {&b, RESA_MODE_DECODE, 1}};
        for (int s = 0; s < 41; s++)
            nf_clean(&t, 2, d2);
        TCHECK(ref_seq_pending(a.r) == 41, "pending %lld", (long long)ref_seq_pending(a.r));
        nf_poison x = poison_of(&t, &cases[ci], 0, 11);
        th_entry e[2] = {{&a, RESA_MODE_RECTIFY, 25}, {&b, RESA_MODE_DECODE, 1}};
        nf_count r = nf_step(&t, 2, e, &x, 1, 1);
        TCHECK(r.good >= 11 * t.p.hq, "poisoned RECTIFY: %lld finite rows", (long long)r.good);
        if (always_seen(&cases[ci]))
            TCHECK(r.bad > 0, "%s in %s of a RECTIFY: no row saw it", kind_name[x.kind],
                   where_name[x.where]);
        th_entry heal[2] = {{&a, RESA_MODE_RECTIFY, 0}, {&b, RESA_MODE_DECODE, 1}};
        nf_count rh = nf_clean(&t, 2, heal);
        TCHECK(rh.bad == 0, "the healing RECTIFY gave %lld non-finite rows", (long long)rh.bad);
        for (int s = 0; s < 33; s++)
            nf_clean(&t, 2, d2);
        x = poison_of(&t, &cases[ci], 0, 20);
        e[0].n = 0; /* every pending token */
        r = nf_step(&t, 2, e, &x, 1, 0);
        TCHECK(r.good >= 20 * t.p.hq, "poisoned RECTIFY: %lld finite rows", (long long)r.good);
        for (int s = 0; s < 2; s++)
            nf_clean(&t, 2, d2);
        th_seq_release(&t, &a);
        th_seq_release(&t, &b);
    }
    th_fini(&t);
}
END_TEST

static Suite *suite(int n_configs)
{
    Suite *s = suite_create("nonfinite");
    TCase *tc = tcase_create("nonfinite");
    tcase_set_timeout(tc, 900);
    if (g_backend == RESA_BACKEND_CUDA)
        tcase_set_tags(tc, "gpu");
    /* RESA_TEST_SHARD=k/n: one n-th of the tests (th_add_loop) */
    th_add_loop(tc, test_prefill, 0, n_configs);
    th_add_loop(tc, test_decode, 0, n_configs);
    th_add_loop(tc, test_decode_nan_query_selection, 0, n_configs);
    th_add_loop(tc, test_rectify, 0, n_configs);
    suite_add_tcase(s, tc);
    return s;
}

int main(int argc, char **argv)
{
    if (argc > 1 && strcmp(argv[1], "cuda") == 0) {
        if (!th_cuda_usable() || cuda_shim_load(&g_cu) != 0) {
            printf("check_nonfinite_cuda: no usable GPU or CUDA module here: skipped\n");
            return 77; /* meson: SKIP */
        }
        g_backend = RESA_BACKEND_CUDA;
        /* CUDA cannot be used in a forked child of a process that touched it */
        return th_run_suite(suite(N_CUDA), 0);
    }
    return th_run_suite(suite(N_CPU), 1);
}
