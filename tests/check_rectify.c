/* SPDX-License-Identifier: MIT */
/*
 * Rectification (white-box): a RECTIFY overwrites exactly the pending tokens
 * (every stored K/V compared with the reference; other sequences byte-identical),
 * block summaries equal a from-scratch recomputation over the stored keys,
 * pending returns to 0, rectify_due at f; when nothing becomes pending;
 * step_cancel around RECTIFY and APPEND.  Each with an fp8 cache too
 * (KV_DTYPE FP8_E4M3): its stored bytes and scales read back as the test's own
 * quantizer's values, 0 ulp (wb.c).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "wb.h"

static void setup(th *t, const char *name, resa_dtype kv, resa_dtype io, int32_t layers)
{
    ref_params p;
    ref_params_default(&p);
    p.n_layers = layers;
    p.d = 64;
    p.hq = 4;
    p.hkv = 2;
    p.kv_dtype = kv;
    p.io_dtype = io;
    p.fraction = 0.1;
    p.min_blocks = 2;
    p.interval = 5;
    th_init(t, name, &p, NULL);
}

START_TEST(test_rectify_overwrites_pending)
{
    static const resa_dtype kvs[] = {RESA_DTYPE_F32, RESA_DTYPE_F16, RESA_DTYPE_BF16,
                                     RESA_DTYPE_FP8_E4M3, RESA_DTYPE_FP8_E4M3};
    static const resa_dtype ios[] = {RESA_DTYPE_F32, RESA_DTYPE_F32, RESA_DTYPE_F16,
                                     RESA_DTYPE_F32, RESA_DTYPE_BF16};
    th t;
    char name[32];
    snprintf(name, sizeof name, "rectify_overwrites_%d", _i);
    setup(&t, name, kvs[_i], ios[_i], 2);
    th_seq s, x;
    th_seq_create(&t, &s);
    th_seq_create(&t, &x);
    th_prefill(&t, &x, 50, 50, 0);
    th_prefill(&t, &s, 180, 180, 1);
    th_prefill(&t, &s, 20, 20, 0);
    wb_check_cache(&t, &s);
    /* sparse decodes: pending 1..4 (not due), 5 (due at f = 5) */
    for (int i = 1; i <= 5; i++) {
        th_one(&t, &s, RESA_MODE_DECODE, 1); /* th_check_state: pending == i, due == (i >= 5) */
        TCHECK(ref_seq_pending(s.r) == i, "pending should be %d", i);
    }
    /* tokens stored after a sparse decode join the span, dense or not */
    th_one(&t, &s, RESA_MODE_APPEND, 3);
    th_one(&t, &s, RESA_MODE_APPEND_KV, 9);
    TCHECK(ref_seq_pending(s.r) == 17, "pending should be 17 (span crosses blocks 12..13)");
    wb_check_cache(&t, &s);
    wb_snap xs;
    wb_snap_take(t.ctx, x.id, &xs);
    /* new keys 20x smaller: the block min/max must shrink, not only grow */
    t.k_scale = 0.05;
    th_one(&t, &s, RESA_MODE_RECTIFY, 0);
    t.k_scale = 1.0;
    wb_check_cache(&t, &s); /* every position: the new values in the span, the old elsewhere */
    wb_snap_check(t.ctx, &xs, "RECTIFY of another sequence");
    wb_snap_free(&xs);
    /* after rectification: decode again (selection uses the refreshed summaries) */
    for (int i = 0; i < 3; i++)
        th_one(&t, &s, RESA_MODE_DECODE, 1);
    th_one(&t, &s, RESA_MODE_RECTIFY, 0);
    wb_check_cache(&t, &s);
    wb_check_cache(&t, &x);
    ref_seq_free(s.r);
    ref_seq_free(x.r);
    th_fini(&t);
}
END_TEST

/* The pending span starts exactly at the first sparse decode (not at a dense one). */
START_TEST(test_pending_starts_at_first_sparse)
{
    th t;
    setup(&t, "pending_starts_at_first_sparse", RESA_DTYPE_F32, RESA_DTYPE_F32, 1);
    t.p.min_blocks = 4;
    th_push_method(&t);
    th_seq s;
    th_seq_create(&t, &s);
    th_prefill(&t, &s, 47, 47, 0);
    /* M = 3, 4 blocks: dense (M <= n_min), nothing pending */
    for (int i = 0; i < 17; i++)
        th_one(&t, &s, RESA_MODE_DECODE, 1);
    TCHECK(ref_seq_pending(s.r) == 0, "dense decodes made tokens pending");
    /* at 64 tokens the next decode is in block 5 of 5: M = 5 > 4 = n */
    th_one(&t, &s, RESA_MODE_DECODE, 1);
    TCHECK(ref_seq_pending(s.r) == 1, "the first sparse decode must start the span");
    /* a dense decode (r = 1) after it joins the span */
    t.p.fraction = 1.0;
    th_push_method(&t);
    th_one(&t, &s, RESA_MODE_DECODE, 1);
    TCHECK(ref_seq_pending(s.r) == 2, "a dense decode after a sparse one joins the span");
    th_one(&t, &s, RESA_MODE_RECTIFY, 0);
    /* with r = 1 nothing becomes pending again */
    for (int i = 0; i < 5; i++)
        th_one(&t, &s, RESA_MODE_DECODE, 1);
    TCHECK(ref_seq_pending(s.r) == 0, "r = 1 made tokens pending");
    int32_t mode = RESA_MODE_RECTIFY, n = 1;
    TFAIL(t.ctx, RESA_ERR_BAD_STATE, NULL, resa_ctx_step_begin(t.ctx, 1, &s.id, &mode, &n, 0));
    wb_check_cache(&t, &s);
    ref_seq_free(s.r);
    th_fini(&t);
}
END_TEST

/* rectify_due: never with f = 0; f may change between steps. */
START_TEST(test_rectify_due_interval)
{
    th t;
    setup(&t, "rectify_due_interval", RESA_DTYPE_F32, RESA_DTYPE_F32, 1);
    t.p.interval = 0;
    th_push_method(&t);
    th_seq s;
    th_seq_create(&t, &s);
    th_prefill(&t, &s, 100, 100, 1);
    for (int i = 0; i < 40; i++)
        th_one(&t, &s, RESA_MODE_DECODE, 1); /* due stays 0: checked by the harness */
    TCHECK(ref_seq_pending(s.r) == 40, "pending 40 expected");
    static const int64_t fs[] = {41, 40, 39, 1, 32, 0};
    for (int i = 0; i < 6; i++) {
        t.p.interval = fs[i];
        th_push_method(&t);
        th_check_state(&t, &s);
    }
    t.p.interval = 32;
    th_push_method(&t);
    th_one(&t, &s, RESA_MODE_RECTIFY, 0);
    ref_seq_free(s.r);
    th_fini(&t);
}
END_TEST

/* RECTIFY with a count outside [1, pending] fails and changes nothing. */
START_TEST(test_rectify_wrong_count)
{
    th t;
    setup(&t, "rectify_wrong_count", RESA_DTYPE_F16, RESA_DTYPE_F32, 2);
    th_seq s;
    th_seq_create(&t, &s);
    th_prefill(&t, &s, 120, 120, 1);
    for (int i = 0; i < 4; i++)
        th_one(&t, &s, RESA_MODE_DECODE, 1);
    TCHECK(ref_seq_pending(s.r) == 4, "setup: 4 pending expected");
    wb_snap ss;
    wb_snap_take(t.ctx, s.id, &ss);
    int32_t mode = RESA_MODE_RECTIFY;
    int32_t bad[] = {5, 0, -4, 124, INT32_MIN};
    for (int i = 0; i < 5; i++)
        TFAIL(t.ctx, RESA_ERR_INVALID_ARGUMENT, "n_tokens",
              resa_ctx_step_begin(t.ctx, 1, &s.id, &mode, &bad[i], 0));
    wb_snap_check(t.ctx, &ss, "failed RECTIFY begin");
    wb_snap_free(&ss);
    th_one(&t, &s, RESA_MODE_RECTIFY, 0);
    wb_check_cache(&t, &s);
    ref_seq_free(s.r);
    th_fini(&t);
}
END_TEST

/* A long span rectified in several steps, oldest first: each RECTIFY of n
 * overwrites exactly positions [len - pending, len - pending + n), its rows
 * attend causally (the newer pending tokens are not visible), pending drops
 * by n, and tokens decoded in between join the rest of the span. */
START_TEST(test_rectify_partial)
{
    th t;
    static const resa_dtype kvs[] = {RESA_DTYPE_F32, RESA_DTYPE_BF16, RESA_DTYPE_FP8_E4M3};
    setup(&t, "rectify_partial", kvs[_i], RESA_DTYPE_F32, 2);
    t.p.interval = 10;
    th_push_method(&t);
    th_seq s, x;
    th_seq_create(&t, &s);
    th_seq_create(&t, &x);
    th_prefill(&t, &s, 150, 150, 1);
    th_prefill(&t, &x, 20, 20, 0);
    for (int i = 0; i < 23; i++)
        th_one(&t, &s, RESA_MODE_DECODE, 1); /* pending 150..172, due */
    wb_snap xs;
    wb_snap_take(t.ctx, x.id, &xs);
    t.k_scale = 0.05;
    th_one(&t, &s, RESA_MODE_RECTIFY, 7);  /* 150..156: pending 16, still due */
    wb_check_cache(&t, &s);
    th_one(&t, &s, RESA_MODE_RECTIFY, 1);  /* 157 */
    th_one(&t, &s, RESA_MODE_DECODE, 1);   /* joins: pending 16 */
    th_one(&t, &s, RESA_MODE_RECTIFY, 9);  /* 158..166: pending 7, not due */
    wb_check_cache(&t, &s);
    wb_snap_check(t.ctx, &xs, "partial RECTIFY of another sequence");
    wb_snap_free(&xs);
    th_entry e[2] = {{&s, RESA_MODE_RECTIFY, 3}, {&x, RESA_MODE_APPEND, 5}};
    th_step(&t, 2, e);
    t.k_scale = 1.0;
    th_one(&t, &s, RESA_MODE_RECTIFY, 0);  /* the rest */
    TCHECK(ref_seq_pending(s.r) == 0, "all rectified");
    wb_check_cache(&t, &s);
    wb_check_cache(&t, &x);
    th_one(&t, &s, RESA_MODE_DECODE, 1);
    ref_seq_free(s.r);
    ref_seq_free(x.r);
    th_fini(&t);
}
END_TEST

/* step_cancel after a RECTIFY attended one layer: K/V of that layer stay
 * rewritten, the tokens stay pending, summaries stay consistent. */
START_TEST(test_cancel_rectify)
{
    th t;
    setup(&t, "cancel_rectify", _i ? RESA_DTYPE_FP8_E4M3 : RESA_DTYPE_BF16, RESA_DTYPE_F32, 2);
    th_seq s;
    th_seq_create(&t, &s);
    th_prefill(&t, &s, 150, 150, 1);
    for (int i = 0; i < 7; i++)
        th_one(&t, &s, RESA_MODE_DECODE, 1);
    int64_t pend = ref_seq_pending(s.r);
    int32_t mode = RESA_MODE_RECTIFY, n = (int32_t)pend;
    size_t qn = (size_t)n * 4 * 64, kn = (size_t)n * 2 * 64;
    void *q = malloc(qn * 4), *k = malloc(kn * 4), *v = malloc(kn * 4), *out = malloc(qn * 4);
    th_fill(&t, q, qn, 1.0);
    th_fill(&t, k, kn, 0.1);
    th_fill(&t, v, kn, 1.0);
    TOK(t.ctx, resa_ctx_step_begin(t.ctx, 1, &s.id, &mode, &n, 0));
    TOK(t.ctx, resa_ctx_step_attend(t.ctx, 1, q, k, v, out, 0));
    TOK(t.ctx, resa_ctx_step_cancel(t.ctx));
    ref_write_kv(&t.p, s.r, 1, s.r->rect_start, n, k, v, 0);
    th_check_state(&t, &s); /* still pending */
    wb_check_cache(&t, &s);
    th_one(&t, &s, RESA_MODE_DECODE, 1);
    th_one(&t, &s, RESA_MODE_RECTIFY, 0);
    wb_check_cache(&t, &s);
    free(q), free(k), free(v), free(out);
    ref_seq_free(s.r);
    th_fini(&t);
}
END_TEST

/* step_cancel after an APPEND into a partial block: lengths, pages and
 * summaries as before (the summaries of the partial block cover only the
 * tokens that remain). */
START_TEST(test_cancel_append)
{
    th t;
    setup(&t, "cancel_append", _i ? RESA_DTYPE_FP8_E4M3 : RESA_DTYPE_F32, RESA_DTYPE_F32, 2);
    th_seq s, x;
    th_seq_create(&t, &s);
    th_seq_create(&t, &x);
    th_prefill(&t, &s, 70, 70, 0);
    th_prefill(&t, &x, 33, 33, 0);
    int64_t free0 = -1, free1 = -1;
    TOK(t.ctx, resa_ctx_free_tokens(t.ctx, &free0));
    int32_t ids[2] = {s.id, x.id}, modes[2] = {RESA_MODE_APPEND, RESA_MODE_DECODE},
            n[2] = {40, 1};
    size_t rows = 41, qn = rows * 4 * 64, kn = rows * 2 * 64;
    void *q = malloc(qn * 4), *k = malloc(kn * 4), *v = malloc(kn * 4), *out = malloc(qn * 4);
    th_fill(&t, q, qn, 1.0);
    th_fill(&t, k, kn, 40.0); /* huge keys: stale summaries would be visible */
    th_fill(&t, v, kn, 1.0);
    TOK(t.ctx, resa_ctx_step_begin(t.ctx, 2, ids, modes, n, 0));
    TOK(t.ctx, resa_ctx_step_attend(t.ctx, 0, q, k, v, out, 0));
    TOK(t.ctx, resa_ctx_step_attend(t.ctx, 1, q, k, v, out, 0));
    TOK(t.ctx, resa_ctx_step_cancel(t.ctx));
    TOK(t.ctx, resa_ctx_free_tokens(t.ctx, &free1));
    TCHECK(free1 == free0, "step_cancel: free tokens %lld, before the step %lld",
           (long long)free1, (long long)free0);
    th_check_state(&t, &s);
    th_check_state(&t, &x);
    wb_check_cache(&t, &s);
    wb_check_cache(&t, &x);
    /* the context keeps working, with the same selection as the reference */
    t.p.min_blocks = 1;
    th_push_method(&t);
    th_entry e[2] = {{&s, RESA_MODE_DECODE, 1}, {&x, RESA_MODE_DECODE, 1}};
    th_step(&t, 2, e);
    wb_check_cache(&t, &s);
    free(q), free(k), free(v), free(out);
    ref_seq_free(s.r);
    ref_seq_free(x.r);
    th_fini(&t);
}
END_TEST

/* Pages come back from released sequences with old summaries: a new
 * sequence must not inherit them. */
START_TEST(test_reused_pages_summaries)
{
    th t;
    setup(&t, "reused_pages_summaries", _i ? RESA_DTYPE_FP8_E4M3 : RESA_DTYPE_F16,
          RESA_DTYPE_F32, 1);
    th_seq a, b;
    th_seq_create(&t, &a);
    t.k_scale = 50.0;
    th_prefill(&t, &a, 200, 200, 1);
    th_seq_release(&t, &a);
    th_seq_create(&t, &b);
    t.k_scale = 1.0;
    for (int i = 0; i < 3; i++)
        th_one(&t, &b, RESA_MODE_APPEND_KV, 7);
    for (int i = 0; i < 60; i++)
        th_one(&t, &b, RESA_MODE_DECODE, 1);
    wb_check_cache(&t, &b);
    ref_seq_free(b.r);
    th_fini(&t);
}
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("rectify");
    TCase *tc = tcase_create("rectify");
    tcase_set_timeout(tc, 600);
    tcase_add_loop_test(tc, test_rectify_overwrites_pending, 0, 5);
    tcase_add_test(tc, test_pending_starts_at_first_sparse);
    tcase_add_test(tc, test_rectify_due_interval);
    tcase_add_test(tc, test_rectify_wrong_count);
    tcase_add_loop_test(tc, test_rectify_partial, 0, 3);
    tcase_add_loop_test(tc, test_cancel_rectify, 0, 2);
    tcase_add_loop_test(tc, test_cancel_append, 0, 2);
    tcase_add_loop_test(tc, test_reused_pages_summaries, 0, 2);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    return th_run_suite(suite(), 1);
}
