/* SPDX-License-Identifier: MIT */
/*
 * Sparse decode against the float64 reference: contexts of 0 to 5000
 * tokens, head dims 64/128/256, group sizes 1/2/4/7/8, dtypes f32/f16/bf16
 * and the fp8 cache,
 * block sizes 1 to 256, exact and fp8 summaries; selection, budget and forced
 * blocks; SELECT_FRACTION 1
 * equals dense attention; softmax scale; thread counts.
 */
#include <math.h>
#include <stdlib.h>

#include "harness.h"

typedef struct dcase {
    int64_t len;
    int32_t d, hq, hkv, layers, b;
    resa_dtype kv, io;
} dcase;

static const dcase cases[] = {
    {0, 64, 2, 1, 1, 16, RESA_DTYPE_F32, RESA_DTYPE_F32},
    {1, 64, 1, 1, 1, 16, RESA_DTYPE_F32, RESA_DTYPE_F32},
    {15, 128, 2, 1, 1, 16, RESA_DTYPE_F16, RESA_DTYPE_F16},
    {16, 256, 4, 1, 1, 16, RESA_DTYPE_BF16, RESA_DTYPE_BF16},
    {17, 64, 7, 1, 2, 16, RESA_DTYPE_F32, RESA_DTYPE_F16},
    {255, 128, 8, 1, 1, 16, RESA_DTYPE_F16, RESA_DTYPE_F32},
    {256, 64, 4, 2, 1, 16, RESA_DTYPE_BF16, RESA_DTYPE_F32},
    {257, 128, 2, 2, 2, 16, RESA_DTYPE_F32, RESA_DTYPE_F32},
    {1000, 128, 8, 2, 1, 16, RESA_DTYPE_F16, RESA_DTYPE_BF16},
    {5000, 256, 7, 1, 1, 16, RESA_DTYPE_BF16, RESA_DTYPE_F16},
    {5000, 64, 8, 1, 1, 16, RESA_DTYPE_F32, RESA_DTYPE_F32},
    {300, 64, 2, 1, 1, 4, RESA_DTYPE_F32, RESA_DTYPE_F32},
    {513, 64, 1, 1, 1, 1, RESA_DTYPE_F32, RESA_DTYPE_F32},
    {700, 64, 4, 2, 1, 64, RESA_DTYPE_F16, RESA_DTYPE_F16},
    {1100, 64, 2, 1, 1, 256, RESA_DTYPE_F32, RESA_DTYPE_BF16},
};
#define N_CASES ((int)(sizeof cases / sizeof cases[0]))

/* Prefill: small contexts by dense APPEND in random chunks (outputs checked),
 * long ones by APPEND_KV then a checked APPEND of the last 64 tokens. */
static void prefill(th *t, th_seq *s, int64_t len)
{
    int64_t dense = len <= 300 ? len : (len < 64 ? len : 64);
    int64_t kv = len - dense;
    if (kv > 0)
        th_prefill(t, s, kv, 4096, 1);
    while (dense > 0) {
        int32_t c = (int32_t)ref_rng_range(&t->rng, 1, 128);
        if (c > dense)
            c = (int32_t)dense;
        th_one(t, s, RESA_MODE_APPEND, c);
        dense -= c;
    }
}

/* Loop index i < N_CASES: exact summaries; N_CASES <= i < 2 N_CASES: the same
 * case with fp8 summaries (RESA_SUMMARY_FP8_E4M3), whose selection the
 * reference derives from its own e4m3 table; i >= 2 N_CASES: the same case
 * with an fp8 cache (KV_DTYPE FP8_E4M3, the case's IO dtype), fp8 summaries
 * on odd i, the reference attending its own dequantized values (ref.c). */
START_TEST(test_decode_case)
{
    const dcase *c = &cases[_i % N_CASES];
    char name[64];
    snprintf(name, sizeof name, "decode_case_%d", _i);
    ref_params p;
    ref_params_default(&p);
    p.summary_fp8 = _i >= 2 * N_CASES ? _i % 2 : _i >= N_CASES;
    p.n_layers = c->layers;
    p.hq = c->hq;
    p.hkv = c->hkv;
    p.d = c->d;
    p.b = c->b;
    p.kv_dtype = _i >= 2 * N_CASES ? RESA_DTYPE_FP8_E4M3 : c->kv;
    p.io_dtype = c->io;
    th t;
    th_init(&t, name, &p, NULL);
    t.planted = _i % 2;
    th_seq s;
    th_seq_create(&t, &s);
    prefill(&t, &s, c->len);
    /* defaults: r = 0.1, n_min = 16, one local block */
    for (int i = 0; i < 3; i++)
        th_one(&t, &s, RESA_MODE_DECODE, 1);
    /* r = 1: dense attention over every block */
    t.p.fraction = 1.0;
    th_push_method(&t);
    th_one(&t, &s, RESA_MODE_DECODE, 1);
    /* a small budget so that short contexts are sparse too, with sinks */
    t.p.fraction = 0.1;
    t.p.min_blocks = 2;
    t.p.sink_blocks = 1;
    t.p.local_blocks = 2;
    th_push_method(&t);
    for (int i = 0; i < 3; i++)
        th_one(&t, &s, RESA_MODE_DECODE, 1);
    /* the block score between the box centre (w = 0) and the paper's bound */
    for (int i = 0; i < 3; i++) {
        t.p.score_width = i == 0 ? 0.0 : i == 1 ? 0.5 : ref_rng_uniform(&t.rng);
        th_push_method(&t);
        th_one(&t, &s, RESA_MODE_DECODE, 1);
    }
    /* each query head's estimated attention share (GROUP_SCORE HEAD_SHARE) */
    t.p.group_score = RESA_GROUP_SCORE_HEAD_SHARE;
    for (int i = 0; i < 3; i++) {
        t.p.score_width = i == 0 ? 1.0 : i == 1 ? 0.5 : ref_rng_uniform(&t.rng);
        th_push_method(&t);
        th_one(&t, &s, RESA_MODE_DECODE, 1);
    }
    ref_seq_free(s.r);
    th_fini(&t);
}
END_TEST

/* Every budget rule combination on a cache of many blocks (b = 1 and 2). */
START_TEST(test_budget_random)
{
    static const double fr[] = {0.0, 0.1, 0.25, 0.3, 0.5, 0.123457, 0.999999, 1.0, 0.05};
    static const int64_t mins[] = {0, 1, 2, 5, 16, 1000};
    static const int64_t locs[] = {1, 2, 3, 7, 1000};
    static const int64_t sinks[] = {0, 0, 1, 3, 1000};
    static const double widths[] = {1.0, 0.0, 0.5, 0.25, 0.9};
    ref_params p;
    ref_params_default(&p);
    p.d = 64;
    p.hq = 4;
    p.hkv = 2;
    p.b = _i == 0 ? 1 : 2;
    th t;
    th_init(&t, _i == 0 ? "budget_random_b1" : "budget_random_b2", &p, NULL);
    th_seq s;
    th_seq_create(&t, &s);
    th_prefill(&t, &s, 30, 30, 1);
    for (int step = 0; step < 60; step++) {
        t.p.fraction = fr[ref_rng_range(&t.rng, 0, 8)];
        t.p.min_blocks = mins[ref_rng_range(&t.rng, 0, 5)];
        t.p.local_blocks = locs[ref_rng_range(&t.rng, 0, 4)];
        t.p.sink_blocks = sinks[ref_rng_range(&t.rng, 0, 4)];
        t.p.score_width = widths[ref_rng_range(&t.rng, 0, 4)];
        t.p.group_score = (int32_t)ref_rng_range(&t.rng, 0, 1);
        th_push_method(&t);
        th_one(&t, &s, RESA_MODE_DECODE, 1);
        if (step % 10 == 9)
            th_one(&t, &s, RESA_MODE_APPEND_KV, (int32_t)ref_rng_range(&t.rng, 1, 20));
    }
    ref_seq_free(s.r);
    th_fini(&t);
}
END_TEST

/* The budget arithmetic is exact: r * M in double rounds above the integer
 * for r = 0.07, M = 100 (7.000000000000001) and r = 0.55, M = 100, where a
 * floating ceil() would select one block too many. */
START_TEST(test_budget_exact_decimal)
{
    static const double rs[] = {0.07, 0.55, 0.1};
    static const int64_t want[] = {7, 55, 10};
    ref_params p;
    ref_params_default(&p);
    p.d = 64;
    p.b = 1;
    p.min_blocks = 0;
    th t;
    th_init(&t, "budget_exact_decimal", &p, NULL);
    th_seq s;
    th_seq_create(&t, &s);
    th_prefill(&t, &s, 99, 99, 1);
    for (int i = 0; i < 3; i++) {
        t.p.fraction = rs[i];
        th_push_method(&t);
        th_one(&t, &s, RESA_MODE_DECODE, 1); /* M = 100 */
        int64_t count = -1;
        int32_t blocks[128];
        TOK(t.ctx, resa_seq_selected_blocks(t.ctx, s.id, 0, 0, blocks, 128, &count));
        TCHECK(count == want[i] && count == ref_budget(100, rs[i], 0, 1, 0),
               "r = %g, M = 100: %lld blocks selected, expected %lld", rs[i], (long long)count,
               (long long)want[i]);
        /* again at M = 100: a fresh sequence of 99 tokens */
        th_seq_release(&t, &s);
        th_seq_create(&t, &s);
        th_prefill(&t, &s, 99, 99, 1);
    }
    ref_seq_free(s.r);
    th_fini(&t);
}
END_TEST

/* SELECT_FRACTION 1: every block is attended and nothing becomes pending. */
START_TEST(test_fraction_one_is_dense)
{
    ref_params p;
    ref_params_default(&p);
    p.d = 128;
    p.hq = 4;
    p.hkv = 1;
    p.fraction = 1.0;
    p.min_blocks = 0;
    p.interval = 1;
    th t;
    th_init(&t, "fraction_one_is_dense", &p, NULL);
    th_seq s;
    th_seq_create(&t, &s);
    th_prefill(&t, &s, 777, 777, 1);
    for (int i = 0; i < 4; i++) {
        th_one(&t, &s, RESA_MODE_DECODE, 1);
        int64_t count = -1;
        TOK(t.ctx, resa_seq_selected_blocks(t.ctx, s.id, 0, 0, NULL, 0, &count));
        TCHECK(count == ref_blocks(s.r->len, p.b), "r = 1: %lld of %lld blocks", (long long)count,
               (long long)ref_blocks(s.r->len, p.b));
        int64_t pend = -1;
        TOK(t.ctx, resa_seq_pending(t.ctx, s.id, &pend));
        TCHECK(pend == 0, "r = 1 made %lld tokens pending", (long long)pend);
    }
    ref_seq_free(s.r);
    th_fini(&t);
}
END_TEST

/* ref_explain_block, which the harness's failure messages use: a row computed
 * without one block, or with one block twice, is put down to that block
 * (alpha 1, or near -1) with all of its error; the exact row has none to
 * explain.  Random K/V, 1000 tokens (not a multiple of b), a random block. */
START_TEST(test_explain_block)
{
    ref_params p;
    ref_params_default(&p);
    p.d = 64;
    p.hq = 2;
    p.hkv = 1;
    p.kv_dtype = p.io_dtype = RESA_DTYPE_F32;
    ref_rng r = {th_test_seed("explain_block")};
    const int64_t len = 1000, nb = ref_blocks(len, p.b);
    ref_seq *s = ref_seq_new(&p, len);
    float *k = malloc(sizeof(float) * (size_t)(len * p.d)), *v = malloc(sizeof(float) * (size_t)(len * p.d));
    for (int64_t i = 0; i < len * p.d; i++) {
        k[i] = (float)ref_rng_normal(&r);
        v[i] = (float)ref_rng_normal(&r);
    }
    ref_write_kv(&p, s, 0, 0, len, k, v, 0);
    double q[64], got[64];
    for (int j = 0; j < p.d; j++)
        q[j] = 1.5 * ref_rng_normal(&r);
    const int64_t B = ref_rng_range(&r, 0, nb - 1);
    int32_t *list = malloc(sizeof(int32_t) * (size_t)(nb + 1));
    for (int pass = 0; pass < 3; pass++) {
        /* 0: without B; 1: B twice; 2: every block once */
        int64_t n = 0;
        for (int64_t b = 0; b < nb; b++) {
            if (b != B || pass != 0)
                list[n++] = (int32_t)b;
            if (b == B && pass == 1)
                list[n++] = (int32_t)b;
        }
        ref_attend(&p, s, 0, 0, q, len, list, n, got);
        for (int64_t b = 0; b < nb; b++) /* the full list, as the backend was given */
            list[b] = (int32_t)b;
        double alpha = 0, share = 0;
        int64_t blk = ref_explain_block(&p, s, 0, 0, q, len, list, nb, got, &alpha, &share);
        if (pass == 0)
            TCHECK(blk == B && fabs(alpha - 1) < 1e-6 && share > 1 - 1e-9,
                   "without block %lld: block %lld, alpha %.9f, share %.12f", (long long)B,
                   (long long)blk, alpha, share);
        else if (pass == 1)
            TCHECK(blk == B && alpha < -0.5 && alpha > -1 && share > 1 - 1e-9,
                   "block %lld twice: block %lld, alpha %.9f, share %.12f", (long long)B,
                   (long long)blk, alpha, share);
        else
            TCHECK(blk == -1, "the exact row: block %lld (share %g)", (long long)blk, share);
    }
    free(list);
    free(k);
    free(v);
    ref_seq_free(s);
}
END_TEST

/* The selection really matters: with r small and planted blocks, the sparse
 * output differs from the dense output (so the comparison above can fail). */
START_TEST(test_sparse_differs_from_dense)
{
    ref_params p;
    ref_params_default(&p);
    p.d = 64;
    p.hq = 2;
    p.hkv = 1;
    p.fraction = 0.05;
    p.min_blocks = 1;
    th t;
    th_init(&t, "sparse_differs_from_dense", &p, NULL);
    th_seq s;
    th_seq_create(&t, &s);
    th_prefill(&t, &s, 1600, 1600, 1);
    void *q = malloc((size_t)p.hq * (size_t)p.d * 4), *k = malloc((size_t)p.d * 4),
         *v = malloc((size_t)p.d * 4), *out = malloc((size_t)p.hq * (size_t)p.d * 4);
    th_fill(&t, q, (size_t)p.hq * (size_t)p.d, 1.5);
    th_fill(&t, k, (size_t)p.d, 1.0);
    th_fill(&t, v, (size_t)p.d, 1.0);
    int32_t mode = RESA_MODE_DECODE, n = 1;
    TOK(t.ctx, resa_ctx_step_begin(t.ctx, 1, &s.id, &mode, &n, 0));
    TOK(t.ctx, resa_ctx_step_attend(t.ctx, 0, q, k, v, out, 0));
    TOK(t.ctx, resa_ctx_step_end(t.ctx, 0));
    ref_write_kv(&p, s.r, 0, s.r->len, 1, k, v, 0);
    double qv[64], dense[64], num = 0, den = 0;
    for (int32_t h = 0; h < p.hq; h++) {
        for (int32_t j = 0; j < p.d; j++)
            qv[j] = ref_load(p.io_dtype, q, (size_t)h * (size_t)p.d + (size_t)j);
        ref_attend(&p, s.r, 0, 0, qv, s.r->len + 1, NULL, 0, dense);
        for (int32_t j = 0; j < p.d; j++) {
            double o = ref_load(p.io_dtype, out, (size_t)h * (size_t)p.d + (size_t)j);
            num += (o - dense[j]) * (o - dense[j]);
            den += dense[j] * dense[j];
        }
    }
    TCHECK(num / den > 1e-6, "sparse decode over 5%% of 101 blocks equals dense attention "
                             "(relative difference %.3g)", num / den);
    free(q), free(k), free(v), free(out);
    ref_seq_free(s.r);
    th_fini(&t);
}
END_TEST

/* A custom softmax scale, changed between steps. */
START_TEST(test_softmax_scale)
{
    ref_params p;
    ref_params_default(&p);
    p.d = 64;
    p.hq = 4;
    p.hkv = 2;
    p.min_blocks = 3;
    th t;
    th_init(&t, "softmax_scale", &p, NULL);
    th_seq s;
    th_seq_create(&t, &s);
    th_prefill(&t, &s, 100, 50, 0);
    static const double scales[] = {0.02, 0.5, 0.0, 1.7};
    for (int i = 0; i < 4; i++) {
        t.p.scale = scales[i];
        th_push_method(&t);
        double eff = -1;
        TOK(t.ctx, resa_ctx_get_param_f64(t.ctx, RESA_PARAM_SOFTMAX_SCALE, &eff));
        TCHECK(eff == ref_scale(&t.p), "effective scale %.9g, expected %.9g", eff,
               ref_scale(&t.p));
        th_one(&t, &s, RESA_MODE_DECODE, 1);
        th_one(&t, &s, RESA_MODE_APPEND, 5);
    }
    ref_seq_free(s.r);
    th_fini(&t);
}
END_TEST

/* NUM_THREADS 1, 3 and 0 (online CPUs). */
START_TEST(test_threads)
{
    static const int64_t nt[] = {1, 3, 0};
    ref_params p;
    ref_params_default(&p);
    p.d = 128;
    p.hq = 8;
    p.hkv = 2;
    p.n_layers = 2;
    p.min_blocks = 4;
    th_opts o;
    th_opts_default(&o);
    o.threads = nt[_i];
    th t;
    char name[32];
    snprintf(name, sizeof name, "threads_%d", _i);
    th_init(&t, name, &p, &o);
    th_seq a, b;
    th_seq_create(&t, &a);
    th_seq_create(&t, &b);
    th_prefill(&t, &a, 300, 150, 0);
    th_prefill(&t, &b, 90, 90, 0);
    for (int i = 0; i < 3; i++) {
        th_entry e[2] = {{&a, RESA_MODE_DECODE, 1}, {&b, RESA_MODE_DECODE, 1}};
        th_step(&t, 2, e);
    }
    ref_seq_free(a.r);
    ref_seq_free(b.r);
    th_fini(&t);
}
END_TEST

/* The selection is recorded per layer and KV head; a sequence that never
 * decoded reports 0 blocks. */
START_TEST(test_selection_per_head)
{
    ref_params p;
    ref_params_default(&p);
    p.d = 64;
    p.hq = 6;
    p.hkv = 3;
    p.n_layers = 3;
    p.min_blocks = 2;
    th t;
    th_init(&t, "selection_per_head", &p, NULL);
    th_seq s, u;
    th_seq_create(&t, &s);
    th_seq_create(&t, &u);
    th_prefill(&t, &s, 400, 400, 1);
    th_prefill(&t, &u, 40, 40, 0);
    int64_t count = -1;
    TOK(t.ctx, resa_seq_selected_blocks(t.ctx, u.id, 1, 2, NULL, 0, &count));
    TCHECK(count == 0, "never decoded, yet %lld blocks recorded", (long long)count);
    t.planted = 1;
    for (int i = 0; i < 3; i++)
        th_one(&t, &s, RESA_MODE_DECODE, 1); /* harness checks every (layer, head) */
    /* capacity smaller than the count: min(count, capacity) written, full count returned */
    int32_t buf[8];
    for (int i = 0; i < 8; i++)
        buf[i] = -12345;
    TOK(t.ctx, resa_seq_selected_blocks(t.ctx, s.id, 2, 1, buf, 2, &count));
    int64_t M = ref_blocks(s.r->len, p.b);
    TCHECK(count == ref_budget(M, p.fraction, p.min_blocks, p.local_blocks, p.sink_blocks),
           "count %lld", (long long)count);
    TCHECK(buf[0] >= 0 && buf[1] > buf[0] && buf[2] == -12345,
           "capacity 2: wrote [%d, %d, %d]", buf[0], buf[1], buf[2]);
    ref_seq_free(s.r);
    ref_seq_free(u.r);
    th_fini(&t);
}
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("decode");
    TCase *tc = tcase_create("decode");
    tcase_set_timeout(tc, 600);
    tcase_add_loop_test(tc, test_decode_case, 0, 3 * N_CASES);
    tcase_add_loop_test(tc, test_budget_random, 0, 2);
    tcase_add_test(tc, test_budget_exact_decimal);
    tcase_add_test(tc, test_fraction_one_is_dense);
    tcase_add_test(tc, test_explain_block);
    tcase_add_test(tc, test_sparse_differs_from_dense);
    tcase_add_test(tc, test_softmax_scale);
    tcase_add_loop_test(tc, test_threads, 0, 3);
    tcase_add_test(tc, test_selection_per_head);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    return th_run_suite(suite(), 1);
}
