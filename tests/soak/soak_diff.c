/* SPDX-License-Identifier: MIT */
/*
 * Differential soak: the CUDA backend (B) against the CPU backend (A), in
 * lockstep, on random continuous-batching step sequences with identical
 * inputs.  Sequences arrive with prompts of random lengths, decode, append
 * K/V only, fork, get rectified when due, have steps cancelled part-way and
 * leave; the method parameters (r, n_min, local, sink, f, SCORE_WIDTH,
 * GROUP_SCORE) change at random between steps.  After every step:
 *   - every output row (token x query head) of A and B: both finite, relative
 *     L2 difference within a tolerance set by the IO dtype's rounding;
 *   - the selected blocks of every DECODE entry, layer and KV head: equal, or
 *     different only where both selections are valid against the float64
 *     reference scores within their rounding bound (tests/ref.h
 *     ref_group_scores): a near-tie, and then each backend's rows are checked
 *     against the float64 attention over its own selection;
 *   - call statuses, lengths, pending and due counts (also against the
 *     float64 model of each sequence) and free pool tokens.
 * Prints one summary block; exits 1 on any hard mismatch, 77 (skipped) when
 * no usable CUDA backend is here.
 *
 * Usage: soak_diff [seconds] [seed]        (or RESA_SOAK_SECONDS, RESA_SOAK_SEED)
 * RESA_SOAK_STEPS=n      stop after n steps (a run is reproducible from its seed
 *                        step by step; the duration only decides where it stops)
 * RESA_SOAK_BACKEND_B=cpu  B is a CPU context with other NUM_THREADS (checks the
 *                        soak itself without a GPU)
 * RESA_SOAK_FAULT=1      perturbs one output element of B (must be reported)
 * RESA_SOAK_FAULT=2      swaps one selected block of B for the worst unselected one
 * RESA_SOAK_FAULT=3      trades one block of B's selection for an unselected one whose
 *                        reference score is within the rounding bound, wherever there is
 *                        one: a synthetic near-tie, which must be counted as one (B's rows
 *                        are still checked against the reference over the blocks B used)
 * RESA_SOAK_TOL_SCALE=x  multiplies the output tolerances
 */
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cuda_shim.h"
#include "ref.h"
#include "resa.h"

#define MAX_LIVE 10
#define MAX_SEQ_LEN 3000
#define MAX_STEP_TOKENS 2048
#define POOL_TOKENS 20480

typedef struct counts {
    long long steps, entries[4], rows, rows_near_tie, selections, sel_equal, near_ties,
        hard, forks, cancels, rectifications, arrivals, releases, capacity_retries,
        state_checks, epochs, epochs_fp8_kv, epochs_fp8_summary;
} counts;

static counts C;
static uint64_t g_seed;
static int g_fault;
static int g_fault_done;
static cuda_shim g_cu;

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

#if defined(__GNUC__)
__attribute__((format(printf, 1, 2)))
#endif
static void hard(const char *fmt, ...)
{
    C.hard++;
    if (C.hard <= 20) {
        va_list ap;
        va_start(ap, fmt);
        printf("MISMATCH (step %lld, seed %llu): ", C.steps, (unsigned long long)g_seed);
        vprintf(fmt, ap);
        printf("\n");
        fflush(stdout);
        va_end(ap);
    }
}

/* ---- one backend ---- */
typedef struct be {
    resa_ctx *ctx;
    int cuda;
    void *dq, *dk, *dv, *dout; /* device staging buffers (CUDA) */
} be;

typedef struct shape {
    int32_t hq, hkv, d, layers;
} shape;

static const shape shapes[] = {{32, 8, 128, 2}, {9, 3, 64, 3}, {16, 2, 256, 1}, {8, 8, 64, 2}};
#define N_SHAPES ((int)(sizeof shapes / sizeof shapes[0]))

static int be_setup(be *b, int cuda, const ref_params *p, int64_t threads)
{
    memset(b, 0, sizeof *b);
    b->cuda = cuda;
    resa_status s = resa_ctx_create(cuda ? RESA_BACKEND_CUDA : RESA_BACKEND_CPU, NULL, &b->ctx);
    if (s != RESA_OK)
        return (int)s;
    resa_ctx *c = b->ctx;
    struct {
        resa_param k;
        int64_t v;
    } set[] = {{RESA_PARAM_NUM_LAYERS, p->n_layers}, {RESA_PARAM_NUM_Q_HEADS, p->hq},
               {RESA_PARAM_NUM_KV_HEADS, p->hkv},    {RESA_PARAM_HEAD_DIM, p->d},
               {RESA_PARAM_KV_DTYPE, p->kv_dtype},   {RESA_PARAM_IO_DTYPE, p->io_dtype},
               {RESA_PARAM_BLOCK_SIZE, p->b},        {RESA_PARAM_MAX_TOKENS, POOL_TOKENS},
               {RESA_PARAM_MAX_SEQUENCES, 16},       {RESA_PARAM_MAX_STEP_TOKENS, MAX_STEP_TOKENS},
               {RESA_PARAM_NUM_THREADS, threads},    {RESA_PARAM_RECORD_SELECTION, 1},
               {RESA_PARAM_SUMMARY_FORMAT,
                p->summary_fp8 ? RESA_SUMMARY_FP8_E4M3 : RESA_SUMMARY_KV_DTYPE}};
    for (size_t i = 0; i < sizeof set / sizeof set[0]; i++)
        if ((s = resa_ctx_set_param(c, set[i].k, set[i].v)) != RESA_OK) {
            fprintf(stderr, "set_param %d: %s (%s)\n", (int)set[i].k, resa_status_name(s),
                    resa_ctx_last_error(c));
            return (int)s;
        }
    if (cuda) {
        size_t es = ref_dtype_size(p->io_dtype);
        size_t qb = (size_t)MAX_STEP_TOKENS * (size_t)p->hq * (size_t)p->d * es;
        size_t kb = (size_t)MAX_STEP_TOKENS * (size_t)p->hkv * (size_t)p->d * es;
        if (g_cu.Malloc(&b->dq, qb) || g_cu.Malloc(&b->dout, qb) || g_cu.Malloc(&b->dk, kb) ||
            g_cu.Malloc(&b->dv, kb))
            return (int)RESA_ERR_DEVICE_OUT_OF_MEMORY;
    }
    return 0;
}

static void be_fini(be *b)
{
    resa_ctx_destroy(b->ctx);
    if (b->cuda) {
        g_cu.Free(b->dq);
        g_cu.Free(b->dk);
        g_cu.Free(b->dv);
        g_cu.Free(b->dout);
    }
    memset(b, 0, sizeof *b);
}

static resa_status be_attend(be *b, int32_t l, const void *q, const void *k, const void *v,
                             void *out, size_t qbytes, size_t kbytes)
{
    if (!b->cuda)
        return resa_ctx_step_attend(b->ctx, l, q, k, v, out, 0);
    if (g_cu.Memcpy(b->dq, q, qbytes, 1) || g_cu.Memcpy(b->dk, k, kbytes, 1) ||
        g_cu.Memcpy(b->dv, v, kbytes, 1) || g_cu.Memcpy(b->dout, out, qbytes, 1))
        return RESA_ERR_BACKEND;
    resa_status s = resa_ctx_step_attend(b->ctx, l, b->dq, b->dk, b->dv, b->dout, 0);
    if (s == RESA_OK)
        s = resa_ctx_synchronize(b->ctx);
    if (s == RESA_OK && g_cu.Memcpy(out, b->dout, qbytes, 2))
        s = RESA_ERR_BACKEND;
    return s;
}

static int push_method(be *b, const ref_params *p)
{
    resa_ctx *c = b->ctx;
    resa_status s = RESA_OK;
    if (!s) s = resa_ctx_set_param_f64(c, RESA_PARAM_SELECT_FRACTION, p->fraction);
    if (!s) s = resa_ctx_set_param(c, RESA_PARAM_SELECT_MIN_BLOCKS, p->min_blocks);
    if (!s) s = resa_ctx_set_param(c, RESA_PARAM_LOCAL_BLOCKS, p->local_blocks);
    if (!s) s = resa_ctx_set_param(c, RESA_PARAM_SINK_BLOCKS, p->sink_blocks);
    if (!s) s = resa_ctx_set_param(c, RESA_PARAM_RECTIFY_INTERVAL, p->interval);
    if (!s) s = resa_ctx_set_param_f64(c, RESA_PARAM_SCORE_WIDTH, p->score_width);
    if (!s) s = resa_ctx_set_param(c, RESA_PARAM_GROUP_SCORE, p->group_score);
    return (int)s;
}

/* ---- sequences ---- */
typedef struct sq {
    int32_t ia, ib;
    ref_seq *r;
} sq;

static sq live[MAX_LIVE];
static int n_live;

static void check_status(const char *what, resa_status a, resa_status b)
{
    if (a != b)
        hard("%s: A %s, B %s", what, resa_status_name(a), resa_status_name(b));
}

static void check_seq_state(be *A, be *B, const ref_params *p, const sq *s)
{
    int64_t la = -1, lb = -2, pa = -1, pb = -2;
    int32_t da = -1, db = -2;
    resa_seq_length(A->ctx, s->ia, &la);
    resa_seq_length(B->ctx, s->ib, &lb);
    resa_seq_pending(A->ctx, s->ia, &pa);
    resa_seq_pending(B->ctx, s->ib, &pb);
    resa_seq_rectify_due(A->ctx, s->ia, &da);
    resa_seq_rectify_due(B->ctx, s->ib, &db);
    int64_t rp = ref_seq_pending(s->r);
    int32_t rd = p->interval > 0 && rp >= p->interval;
    C.state_checks++;
    if (la != lb || la != s->r->len)
        hard("seq %d: length A %lld, B %lld, model %lld", s->ia, (long long)la, (long long)lb,
             (long long)s->r->len);
    if (pa != pb || pa != rp)
        hard("seq %d: pending A %lld, B %lld, model %lld", s->ia, (long long)pa, (long long)pb,
             (long long)rp);
    if (da != db || da != rd)
        hard("seq %d: due A %d, B %d, model %d", s->ia, da, db, rd);
}

static void check_free(be *A, be *B)
{
    int64_t fa = -1, fb = -2;
    resa_ctx_free_tokens(A->ctx, &fa);
    resa_ctx_free_tokens(B->ctx, &fb);
    if (fa != fb)
        hard("free tokens A %lld, B %lld", (long long)fa, (long long)fb);
}

static void release(be *A, be *B, int i)
{
    check_status("release", resa_seq_release(A->ctx, live[i].ia),
                 resa_seq_release(B->ctx, live[i].ib));
    ref_seq_free(live[i].r);
    live[i] = live[--n_live];
    C.releases++;
}

/* ---- selection comparison ---- */
/* 1 when sel (n entries) is a valid selection for the reference scores within
 * their rounding bound: the budget, every forced block, and no unselected
 * block above a selected non-forced one by more than the bound. */
static int sel_valid(const ref_params *p, const double *sc, const double *mag, int64_t M,
                     const int32_t *sel, int64_t n, int64_t budget, char *in)
{
    if (n != budget)
        return 0;
    memset(in, 0, (size_t)M);
    for (int64_t i = 0; i < n; i++) {
        if (sel[i] < 0 || sel[i] >= M || (i > 0 && sel[i] <= sel[i - 1]))
            return 0;
        in[sel[i]] = 1;
    }
    for (int64_t x = 0; x < M; x++) {
        int forced = ref_is_forced(x, M, p->local_blocks, p->sink_blocks);
        if (forced && !in[x])
            return 0;
        if (!in[x] || forced)
            continue;
        for (int64_t y = 0; y < M; y++) {
            if (in[y])
                continue;
            /* as tests/harness.c: fp32 block scores, and for HEAD_SHARE the
             * fp32 normalisers (sums of M exponentials) */
            double tol = 1e-4 * (mag[x] + mag[y]) + 1e-30 +
                         (p->group_score == RESA_GROUP_SCORE_HEAD_SHARE ? 2.4e-7 * (double)M : 0);
            if (sc[x] < sc[y] - tol)
                return 0;
        }
    }
    return 1;
}

static double row_rel(resa_dtype t, const void *a, const void *b, size_t at, int32_t d,
                      int *bad)
{
    double num = 0, den = 0;
    for (int32_t j = 0; j < d; j++) {
        double x = ref_load(t, a, at + (size_t)j), y = ref_load(t, b, at + (size_t)j);
        if (!isfinite(x) || !isfinite(y))
            *bad = 1;
        num += (x - y) * (x - y);
        den += fmax(x * x, y * y);
    }
    return sqrt(num / (den > 1e-30 ? den : 1e-30));
}

static double row_rel_ref(resa_dtype t, const void *a, size_t at, const double *ref, int32_t d,
                          int *bad)
{
    double num = 0, den = 0;
    for (int32_t j = 0; j < d; j++) {
        double x = ref_load(t, a, at + (size_t)j);
        if (!isfinite(x))
            *bad = 1;
        num += (x - ref[j]) * (x - ref[j]);
        den += ref[j] * ref[j];
    }
    return sqrt(num / (den > 1e-30 ? den : 1e-30));
}

/* ---- one epoch: a shape, a dtype, fresh contexts, a number of steps ---- */
typedef struct entry {
    int li; /* index into live */
    int32_t mode, n;
    int64_t row, start, old_len, M, n_sel;
} entry;

static int run_epoch(ref_rng *rng, int cuda_b, int64_t epoch_steps, double deadline,
                     int64_t step_limit, double tol_scale)
{
    ref_params p;
    ref_params_default(&p);
    const shape *sh = &shapes[ref_rng_range(rng, 0, N_SHAPES - 1)];
    p.n_layers = sh->layers;
    p.hq = sh->hq;
    p.hkv = sh->hkv;
    p.d = sh->d;
    p.b = 16;
    p.io_dtype = p.kv_dtype = ref_rng_uniform(rng) < 0.5 ? RESA_DTYPE_BF16 : RESA_DTYPE_F16;
    /* an fp8 cache in a third of the epochs; the summaries in fp8 (the
     * default) or the KV dtype, set on both contexts and in the model, whose
     * scores judge near-ties (ref_group_scores reads the summaries as stored) */
    if (ref_rng_uniform(rng) < 1.0 / 3.0)
        p.kv_dtype = RESA_DTYPE_FP8_E4M3;
    p.summary_fp8 = ref_rng_uniform(rng) < 0.5;
    ref_params defaults = p;
    /* output rows are rounded to the IO dtype on both sides (u/2 each, u the
     * unit roundoff), CUDA also rounds the softmax weights to it before P.V
     * and both accumulate in fp32 in different orders: a few u; 8 u allowed.
     * An fp8 cache adds one rounding of each K and V value on the CPU (e4m3 x
     * scale to the IO dtype, u/2; CUDA's sparse decode attends the exact
     * product): scores move by about u/2 of their magnitude, still a few u */
    double u = p.io_dtype == RESA_DTYPE_BF16 ? 0x1p-8 : 0x1p-11;
    /* the float64 reference of B's near-tie rows reads what B attends (ref.h) */
    const int b_exact = cuda_b && p.kv_dtype == RESA_DTYPE_FP8_E4M3;
    double tol = 8 * u * tol_scale, tol_ref = fmax(tol, 1e-2 * tol_scale);
    /* CPU against CPU: 1 thread against 2 to 4; against CUDA the CPU uses every core */
    int64_t threads_a = cuda_b ? 0 : 1, threads_b = cuda_b ? 0 : ref_rng_range(rng, 2, 4);
    be A, B;
    int rc = be_setup(&A, 0, &p, threads_a);
    if (rc == 0)
        rc = be_setup(&B, cuda_b, &p, threads_b);
    if (rc != 0) {
        fprintf(stderr, "soak_diff: context setup failed: %s\n", resa_status_name((resa_status)rc));
        return rc == RESA_ERR_NO_DEVICE ? 77 : 2;
    }
    C.epochs++;
    C.epochs_fp8_kv += p.kv_dtype == RESA_DTYPE_FP8_E4M3;
    C.epochs_fp8_summary += p.summary_fp8 != 0;
    printf("epoch %lld: %d/%d x %d, %d layers, %s%s, %s summaries, B %s (threads A %lld, B %lld), "
           "from step %lld\n",
           C.epochs, p.hq, p.hkv, p.d, p.n_layers, p.io_dtype == RESA_DTYPE_BF16 ? "bf16" : "f16",
           p.kv_dtype == RESA_DTYPE_FP8_E4M3 ? " IO, fp8 cache" : "", p.summary_fp8 ? "fp8" : "exact",
           cuda_b ? "CUDA" : "CPU", (long long)threads_a, (long long)threads_b, C.steps);
    fflush(stdout);
    size_t es = ref_dtype_size(p.io_dtype);
    size_t row_q = (size_t)p.hq * (size_t)p.d, row_k = (size_t)p.hkv * (size_t)p.d;
    void *q = malloc(MAX_STEP_TOKENS * row_q * es), *k = malloc(MAX_STEP_TOKENS * row_k * es),
         *v = malloc(MAX_STEP_TOKENS * row_k * es);
    void **qs = calloc((size_t)p.n_layers, sizeof(void *));
    void **oa = calloc((size_t)p.n_layers, sizeof(void *));
    void **ob = calloc((size_t)p.n_layers, sizeof(void *));
    for (int32_t l = 0; l < p.n_layers; l++) {
        qs[l] = malloc(MAX_STEP_TOKENS * row_q * es);
        oa[l] = malloc(MAX_STEP_TOKENS * row_q * es);
        ob[l] = malloc(MAX_STEP_TOKENS * row_q * es);
    }
    int32_t *sa = malloc(sizeof(int32_t) * 1024), *sb = malloc(sizeof(int32_t) * 1024);
    int32_t *sb_real = malloc(sizeof(int32_t) * 1024); /* B's blocks as the library chose them */
    double *sc = malloc(sizeof(double) * 1024), *mag = malloc(sizeof(double) * 1024);
    char *in = malloc(1024);
    double *qv = malloc(sizeof(double) * (size_t)p.d), *rv = malloc(sizeof(double) * (size_t)p.d);
    int32_t g = p.hq / p.hkv;
    int result = 0;

    for (int64_t es_i = 0; es_i < epoch_steps; es_i++) {
        if (now_s() >= deadline || (step_limit > 0 && C.steps >= step_limit)) {
            result = 1;
            break;
        }
        /* method parameters for this step: the defaults, or random ones */
        if (ref_rng_uniform(rng) < 0.25) {
            p.fraction = defaults.fraction;
            p.min_blocks = defaults.min_blocks;
            p.local_blocks = defaults.local_blocks;
            p.sink_blocks = defaults.sink_blocks;
            p.interval = defaults.interval;
            p.score_width = defaults.score_width;
            p.group_score = defaults.group_score;
        } else {
            static const double fr[] = {0.05, 0.1, 0.2, 0.3, 0.5, 1.0};
            static const int64_t nm[] = {0, 2, 4, 8, 16};
            static const int64_t fi[] = {0, 4, 8, 16, 32, 64};
            p.fraction = ref_rng_uniform(rng) < 0.2 ? ref_rng_uniform(rng)
                                                    : fr[ref_rng_range(rng, 0, 5)];
            p.min_blocks = nm[ref_rng_range(rng, 0, 4)];
            p.local_blocks = ref_rng_range(rng, 1, 3);
            p.sink_blocks = ref_rng_range(rng, 0, 2);
            p.interval = fi[ref_rng_range(rng, 0, 5)];
            p.score_width = ref_rng_uniform(rng) < 0.3 ? (double)ref_rng_range(rng, 0, 1)
                                                       : ref_rng_uniform(rng);
            p.group_score = (int32_t)ref_rng_range(rng, 0, 1);
        }
        if (push_method(&A, &p) || push_method(&B, &p)) {
            fprintf(stderr, "soak_diff: setting the method failed\n");
            result = 2;
            break;
        }
        /* leave, arrive, fork */
        if (n_live > 0 && ref_rng_uniform(rng) < 0.05)
            release(&A, &B, (int)ref_rng_range(rng, 0, n_live - 1));
        for (int i = 0; i < n_live; i++)
            if (live[i].r->len > MAX_SEQ_LEN)
                release(&A, &B, i--);
        if (n_live < MAX_LIVE && (n_live < 2 || ref_rng_uniform(rng) < 0.15)) {
            sq *s = &live[n_live];
            s->ia = s->ib = -1;
            resa_status a = resa_seq_create(A.ctx, &s->ia), b = resa_seq_create(B.ctx, &s->ib);
            check_status("seq_create", a, b);
            if (a == RESA_OK && b == RESA_OK) {
                s->r = ref_seq_new(&p, 64);
                n_live++;
                C.arrivals++;
            }
        }
        if (n_live > 0 && n_live < MAX_LIVE && ref_rng_uniform(rng) < 0.06) {
            int pi = (int)ref_rng_range(rng, 0, n_live - 1);
            sq *s = &live[n_live];
            s->ia = s->ib = -1;
            resa_status a = resa_seq_fork(A.ctx, live[pi].ia, &s->ia),
                        b = resa_seq_fork(B.ctx, live[pi].ib, &s->ib);
            check_status("seq_fork", a, b);
            if (a == RESA_OK && b == RESA_OK) {
                s->r = ref_seq_clone(live[pi].r);
                n_live++;
                C.forks++;
                check_seq_state(&A, &B, &p, s);
            } else if (a == RESA_OK || b == RESA_OK) {
                break;
            }
        }
        /* the batch */
        entry e[MAX_LIVE];
        int32_t ida[MAX_LIVE], idb[MAX_LIVE], modes[MAX_LIVE], ntok[MAX_LIVE];
        int n = 0;
        int64_t T = 0;
        for (int i = 0; i < n_live; i++) {
            if (ref_rng_uniform(rng) < 0.2)
                continue;
            ref_seq *r = live[i].r;
            int64_t pend = ref_seq_pending(r);
            int due = p.interval > 0 && pend >= p.interval;
            int32_t mode, cnt;
            double x = ref_rng_uniform(rng);
            if (r->len == 0) {
                mode = x < 0.7 ? RESA_MODE_APPEND : RESA_MODE_APPEND_KV;
                cnt = (int32_t)ref_rng_range(rng, 1, mode == RESA_MODE_APPEND ? 300 : 900);
            } else if (due && x < 0.85) {
                mode = RESA_MODE_RECTIFY;
                cnt = ref_rng_uniform(rng) < 0.7 ? (int32_t)pend
                                                 : (int32_t)ref_rng_range(rng, 1, pend);
            } else if (x < 0.80) {
                mode = RESA_MODE_DECODE;
                cnt = 1;
            } else if (x < 0.87) {
                mode = RESA_MODE_APPEND;
                cnt = (int32_t)ref_rng_range(rng, 1, 64);
            } else if (x < 0.95) {
                mode = RESA_MODE_APPEND_KV;
                cnt = (int32_t)ref_rng_range(rng, 1, 400);
            } else if (pend > 0) {
                mode = RESA_MODE_RECTIFY;
                cnt = (int32_t)ref_rng_range(rng, 1, pend);
            } else {
                mode = RESA_MODE_DECODE;
                cnt = 1;
            }
            if (mode != RESA_MODE_DECODE && mode != RESA_MODE_RECTIFY && cnt > 1 &&
                cnt % p.b == 0)
                cnt--; /* prompts and chunks off the block grid */
            if (T + cnt > MAX_STEP_TOKENS)
                continue;
            e[n].li = i;
            e[n].mode = mode;
            e[n].n = cnt;
            e[n].row = T;
            e[n].old_len = r->len;
            e[n].start = mode == RESA_MODE_RECTIFY ? r->rect_start : r->len;
            e[n].M = e[n].n_sel = 0;
            if (mode == RESA_MODE_DECODE) {
                e[n].M = ref_blocks(r->len + 1, p.b);
                e[n].n_sel = ref_budget(e[n].M, p.fraction, p.min_blocks, p.local_blocks,
                                        p.sink_blocks);
            }
            ida[n] = live[i].ia;
            idb[n] = live[i].ib;
            modes[n] = mode;
            ntok[n] = cnt;
            T += cnt;
            n++;
        }
        if (n == 0)
            continue;
        resa_status a = resa_ctx_step_begin(A.ctx, n, ida, modes, ntok, 0);
        resa_status b = resa_ctx_step_begin(B.ctx, n, idb, modes, ntok, 0);
        check_status("step_begin", a, b);
        if (a != b) {
            result = 2;
            break;
        }
        if (a == RESA_ERR_CAPACITY) {
            C.capacity_retries++;
            release(&A, &B, (int)ref_rng_range(rng, 0, n_live - 1));
            continue;
        }
        if (a != RESA_OK) {
            fprintf(stderr, "soak_diff: step_begin: %s (%s)\n", resa_status_name(a),
                    resa_ctx_last_error(A.ctx));
            result = 2;
            break;
        }
        /* the layers, in a random order; a cancelled step attends a prefix */
        int cancel = ref_rng_uniform(rng) < 0.05;
        int32_t order[8], attended = p.n_layers;
        for (int32_t l = 0; l < p.n_layers; l++)
            order[l] = l;
        for (int32_t l = p.n_layers - 1; l > 0; l--) {
            int32_t j = (int32_t)ref_rng_range(rng, 0, l), t = order[l];
            order[l] = order[j];
            order[j] = t;
        }
        if (cancel)
            attended = (int32_t)ref_rng_range(rng, 0, p.n_layers - 1);
        size_t qbytes = (size_t)T * row_q * es, kbytes = (size_t)T * row_k * es;
        for (int32_t oi = 0; oi < attended; oi++) {
            int32_t l = order[oi];
            for (size_t i = 0; i < (size_t)T * row_q; i++)
                ref_store(p.io_dtype, qs[l], i, 1.5 * ref_rng_normal(rng));
            for (int64_t r = 0; r < T; r++)
                for (int32_t h = 0; h < p.hkv; h++) {
                    double f = 0.3 + 1.4 * ref_rng_uniform(rng); /* blocks of different ranges */
                    for (int32_t j = 0; j < p.d; j++) {
                        size_t at = ((size_t)r * row_k) + (size_t)h * (size_t)p.d + (size_t)j;
                        ref_store(p.io_dtype, k, at, f * ref_rng_normal(rng));
                        ref_store(p.io_dtype, v, at, ref_rng_normal(rng));
                    }
                }
            memset(oa[l], 0xff, qbytes);
            memset(ob[l], 0xff, qbytes);
            a = resa_ctx_step_attend(A.ctx, l, qs[l], k, v, oa[l], 0);
            b = be_attend(&B, l, qs[l], k, v, ob[l], qbytes, kbytes);
            check_status("step_attend", a, b);
            if (a != RESA_OK || b != RESA_OK) {
                result = 2;
                goto out;
            }
            for (int i = 0; i < n; i++)
                ref_write_kv(&p, live[e[i].li].r, l, e[i].start, e[i].n, k, v, e[i].row);
        }
        if (cancel) {
            check_status("step_cancel", resa_ctx_step_cancel(A.ctx), resa_ctx_step_cancel(B.ctx));
            C.cancels++;
        } else {
            check_status("step_end", resa_ctx_step_end(A.ctx, 0), resa_ctx_step_end(B.ctx, 0));
        }
        /* compare the attended layers' outputs and selections */
        for (int i = 0; i < n; i++) {
            sq *s = &live[e[i].li];
            for (int32_t oi = 0; oi < attended; oi++) {
                int32_t l = order[oi];
                if (e[i].mode == RESA_MODE_APPEND_KV) {
                    const unsigned char *x = (const unsigned char *)oa[l] + (size_t)e[i].row * row_q * es,
                                        *y = (const unsigned char *)ob[l] + (size_t)e[i].row * row_q * es;
                    for (size_t bi = 0; bi < (size_t)e[i].n * row_q * es; bi++)
                        if (x[bi] != 0xff || y[bi] != 0xff) {
                            hard("APPEND_KV entry %d (seq %d) layer %d wrote output", i, s->ia, l);
                            break;
                        }
                    continue;
                }
                if (g_fault == 1 && !g_fault_done && C.steps >= 20) {
                    size_t at = (size_t)e[i].row * row_q + (size_t)ref_rng_range(rng, 0, (int64_t)row_q - 1);
                    double x = ref_load(p.io_dtype, ob[l], at);
                    ref_store(p.io_dtype, ob[l], at, x + 0.25 * fabs(x) + 0.5);
                    g_fault_done = 1;
                    printf("fault: perturbed B's output of step %lld, entry %d, layer %d\n", C.steps, i, l);
                }
                /* per KV head: a near-tie selection marks its g rows */
                char tied[256] = {0};
                if (e[i].mode == RESA_MODE_DECODE) {
                    int64_t M = e[i].M;
                    for (int32_t h = 0; h < p.hkv; h++) {
                        int64_t ca = -1, cb = -1;
                        a = resa_seq_selected_blocks(A.ctx, s->ia, l, h, sa, 1024, &ca);
                        b = resa_seq_selected_blocks(B.ctx, s->ib, l, h, sb, 1024, &cb);
                        check_status("selected_blocks", a, b);
                        if (g_fault == 2 && !g_fault_done && C.steps >= 20 && cb < M && cb > 0) {
                            /* swap a non-forced selected block of B for the worst unselected one */
                            ref_group_scores(&p, s->r, l, h, qs[l], e[i].row, M, e[i].old_len + 1, sc, mag);
                            memset(in, 0, (size_t)M);
                            for (int64_t x = 0; x < cb; x++)
                                in[sb[x]] = 1;
                            int64_t worst = -1, victim = -1;
                            for (int64_t y = 0; y < M; y++)
                                if (!in[y] && (worst < 0 || sc[y] < sc[worst]))
                                    worst = y;
                            for (int64_t x = 0; x < cb; x++)
                                if (!ref_is_forced(sb[x], M, p.local_blocks, p.sink_blocks))
                                    victim = x;
                            if (victim >= 0 && worst >= 0) {
                                sb[victim] = (int32_t)worst;
                                for (int64_t x = 1; x < cb; x++) /* keep it ascending */
                                    for (int64_t z = x; z > 0 && sb[z] < sb[z - 1]; z--) {
                                        int32_t t = sb[z];
                                        sb[z] = sb[z - 1];
                                        sb[z - 1] = t;
                                    }
                                g_fault_done = 1;
                                printf("fault: changed B's selection of step %lld, entry %d, layer %d, head %d\n",
                                       C.steps, i, l, h);
                            }
                        }
                        memcpy(sb_real, sb, sizeof(int32_t) * (size_t)(cb > 0 && cb <= 1024 ? cb : 0));
                        if (g_fault == 3 && cb > 0 && cb < M && cb <= 1024) {
                            /* a synthetic near-tie: B's lowest-scoring selected non-forced
                             * block traded for the best unselected one, when the reference
                             * scores them within the rounding bound */
                            ref_group_scores(&p, s->r, l, h, qs[l], e[i].row, M, e[i].old_len + 1, sc, mag);
                            memset(in, 0, (size_t)M);
                            for (int64_t x = 0; x < cb; x++)
                                in[sb[x]] = 1;
                            int64_t lo = -1, hi = -1;
                            for (int64_t x = 0; x < cb; x++)
                                if (!ref_is_forced(sb[x], M, p.local_blocks, p.sink_blocks) &&
                                    (lo < 0 || sc[sb[x]] < sc[sb[lo]]))
                                    lo = x;
                            for (int64_t y = 0; y < M; y++)
                                if (!in[y] && (hi < 0 || sc[y] > sc[hi]))
                                    hi = y;
                            if (lo >= 0 && hi >= 0 &&
                                sc[sb[lo]] - sc[hi] <= 1e-4 * (mag[sb[lo]] + mag[hi]) +
                                    (p.group_score == RESA_GROUP_SCORE_HEAD_SHARE ? 2.4e-7 * (double)M : 0)) {
                                sb[lo] = (int32_t)hi;
                                for (int64_t x = 1; x < cb; x++)
                                    for (int64_t z = x; z > 0 && sb[z] < sb[z - 1]; z--) {
                                        int32_t t = sb[z];
                                        sb[z] = sb[z - 1];
                                        sb[z - 1] = t;
                                    }
                                g_fault_done++;
                            }
                        }
                        C.selections++;
                        if (ca == cb && ca >= 0 && ca <= 1024 &&
                            memcmp(sa, sb, sizeof(int32_t) * (size_t)ca) == 0) {
                            C.sel_equal++;
                            if (ca != e[i].n_sel)
                                hard("seq %d layer %d: %lld blocks selected, budget %lld", s->ia, l,
                                     (long long)ca, (long long)e[i].n_sel);
                            continue;
                        }
                        ref_group_scores(&p, s->r, l, h, qs[l], e[i].row, M, e[i].old_len + 1, sc, mag);
                        if (ca <= 1024 && cb <= 1024 &&
                            sel_valid(&p, sc, mag, M, sa, ca, e[i].n_sel, in) &&
                            sel_valid(&p, sc, mag, M, sb, cb, e[i].n_sel, in)) {
                            C.near_ties++;
                            tied[h] = 1;
                            /* each backend's rows against the float64 attention over its own blocks */
                            for (int32_t gi = 0; gi < g; gi++) {
                                size_t at = ((size_t)e[i].row * row_q) + (size_t)(h * g + gi) * (size_t)p.d;
                                for (int32_t j = 0; j < p.d; j++)
                                    qv[j] = ref_load(p.io_dtype, qs[l], at + (size_t)j);
                                for (int side = 0; side < 2; side++) {
                                    ref_params pr = p;
                                    pr.fp8_exact = side && b_exact;
                                    ref_attend(&pr, s->r, l, h, qv, e[i].old_len + 1,
                                               side ? sb_real : sa, side ? cb : ca, rv);
                                    int bad = 0;
                                    double rel = row_rel_ref(p.io_dtype, side ? ob[l] : oa[l], at, rv, p.d, &bad);
                                    C.rows_near_tie++;
                                    if (bad || rel > tol_ref)
                                        hard("near-tie row: seq %d layer %d head %d side %d: "
                                             "relative error %.3g vs reference (tolerance %.3g)",
                                             s->ia, l, h * g + gi, side, rel, tol_ref);
                                }
                            }
                        } else {
                            hard("seq %d layer %d kv head %d: selections differ beyond "
                                 "rounding (%lld blocks in B)", s->ia, l, h, (long long)cb);
                        }
                    }
                }
                for (int64_t r = 0; r < e[i].n; r++)
                    for (int32_t qh = 0; qh < p.hq; qh++) {
                        if (e[i].mode == RESA_MODE_DECODE && tied[qh / g])
                            continue;
                        size_t at = (size_t)(e[i].row + r) * row_q + (size_t)qh * (size_t)p.d;
                        int bad = 0;
                        double rel = row_rel(p.io_dtype, oa[l], ob[l], at, p.d, &bad);
                        C.rows++;
                        if (bad || rel > tol)
                            hard("output: seq %d mode %d layer %d row %lld: relative "
                                 "difference %.3g (tolerance %.3g)",
                                 s->ia, e[i].mode, l, (long long)(r * p.hq + qh), bad ? INFINITY : rel, tol);
                    }
            }
        }
        if (!cancel) {
            for (int i = 0; i < n; i++) {
                ref_commit(live[e[i].li].r, e[i].mode, e[i].n, e[i].n_sel, e[i].M);
                C.entries[e[i].mode]++;
                if (e[i].mode == RESA_MODE_RECTIFY)
                    C.rectifications++;
            }
        }
        for (int i = 0; i < n_live; i++)
            check_seq_state(&A, &B, &p, &live[i]);
        check_free(&A, &B);
        C.steps++;
    }
out:
    while (n_live > 0)
        release(&A, &B, n_live - 1);
    check_free(&A, &B);
    be_fini(&A);
    be_fini(&B);
    for (int32_t l = 0; l < p.n_layers; l++) {
        free(qs[l]);
        free(oa[l]);
        free(ob[l]);
    }
    free(qs);
    free(oa);
    free(ob);
    free(q);
    free(k);
    free(v);
    free(sa);
    free(sb);
    free(sb_real);
    free(sc);
    free(mag);
    free(in);
    free(qv);
    free(rv);
    return result;
}

int main(int argc, char **argv)
{
    const char *env;
    double seconds = 20;
    if (argc > 1)
        seconds = atof(argv[1]);
    else if ((env = getenv("RESA_SOAK_SECONDS")) && *env)
        seconds = atof(env);
    if (argc > 2)
        g_seed = strtoull(argv[2], NULL, 0);
    else if ((env = getenv("RESA_SOAK_SEED")) && *env)
        g_seed = strtoull(env, NULL, 0);
    else
        g_seed = (uint64_t)time(NULL) ^ ((uint64_t)clock() << 20);
    int64_t step_limit = (env = getenv("RESA_SOAK_STEPS")) ? atoll(env) : 0;
    g_fault = (env = getenv("RESA_SOAK_FAULT")) ? atoi(env) : 0;
    double tol_scale = (env = getenv("RESA_SOAK_TOL_SCALE")) && atof(env) > 0 ? atof(env) : 1.0;
    int cuda_b = !((env = getenv("RESA_SOAK_BACKEND_B")) && strcmp(env, "cpu") == 0);

    printf("soak_diff: seed %llu, %.0f s, A CPU, B %s (reproduce: RESA_SOAK_SEED=%llu)\n",
           (unsigned long long)g_seed, seconds, cuda_b ? "CUDA" : "CPU",
           (unsigned long long)g_seed);
    if (cuda_b && !(resa_backend_available(RESA_BACKEND_CUDA) && cuda_shim_load(&g_cu) == 0)) {
        printf("soak_diff: skipped: no usable CUDA backend (module or GPU)\n");
        return 77;
    }
    fflush(stdout);
    ref_rng rng = {g_seed * 0x9e3779b97f4a7c15ull + 1};
    double t0 = now_s(), deadline = t0 + seconds;
    int rc = 0;
    while (rc == 0 && now_s() < deadline && !(step_limit > 0 && C.steps >= step_limit)) {
        rc = run_epoch(&rng, cuda_b, ref_rng_range(&rng, 30, 120), deadline, step_limit,
                       tol_scale);
        if (rc == 1)
            rc = 0;
    }
    if (rc == 77) {
        printf("soak_diff: skipped: the CUDA context could not start\n");
        return 77;
    }
    printf("\n== soak_diff summary ==\n");
    printf("seed                 %llu\n", (unsigned long long)g_seed);
    printf("backends             A CPU, B %s\n", cuda_b ? "CUDA" : "CPU (other NUM_THREADS)");
    printf("seconds              %.1f\n", now_s() - t0);
    printf("epochs (shapes)      %lld\n", C.epochs);
    printf("epochs fp8 cache     %lld\n", C.epochs_fp8_kv);
    printf("epochs fp8 summaries %lld\n", C.epochs_fp8_summary);
    printf("steps                %lld\n", C.steps);
    printf("entries APPEND       %lld\n", C.entries[RESA_MODE_APPEND]);
    printf("entries DECODE       %lld\n", C.entries[RESA_MODE_DECODE]);
    printf("entries RECTIFY      %lld\n", C.entries[RESA_MODE_RECTIFY]);
    printf("entries APPEND_KV    %lld\n", C.entries[RESA_MODE_APPEND_KV]);
    printf("arrivals             %lld\n", C.arrivals);
    printf("releases             %lld\n", C.releases);
    printf("forks                %lld\n", C.forks);
    printf("cancels              %lld\n", C.cancels);
    printf("rectifications       %lld\n", C.rectifications);
    printf("capacity retries     %lld\n", C.capacity_retries);
    printf("rows compared        %lld\n", C.rows);
    printf("near-tie rows (ref)  %lld\n", C.rows_near_tie);
    printf("selections compared  %lld\n", C.selections);
    printf("selections equal     %lld\n", C.sel_equal);
    printf("near-tie differences %lld\n", C.near_ties);
    printf("state checks         %lld\n", C.state_checks);
    printf("hard mismatches      %lld\n", C.hard);
    printf("result               %s\n", C.hard || rc ? "FAIL" : "PASS");
    return C.hard || rc ? 1 : 0;
}
