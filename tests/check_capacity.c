/* SPDX-License-Identifier: MIT */
/*
 * Capacity (white-box): exhaust pool pages, sequence slots, MAX_STEP_TOKENS
 * and MAX_SEQ_TOKENS; RESA_ERR_CAPACITY changes nothing (every sequence
 * byte-identical, lengths, pending and free tokens unchanged) and the
 * context keeps working.
 */
#include <stdlib.h>

#include "wb.h"

#define MAXS 6

typedef struct world {
    th t;
    th_seq s[MAXS];
    int n;
    wb_snap snaps[MAXS];
    int64_t free_tokens;
} world;

static void snap_all(world *w)
{
    for (int i = 0; i < w->n; i++)
        wb_snap_take(w->t.ctx, w->s[i].id, &w->snaps[i]);
    TOK(w->t.ctx, resa_ctx_free_tokens(w->t.ctx, &w->free_tokens));
}

static void check_all(world *w, const char *why)
{
    for (int i = 0; i < w->n; i++) {
        wb_snap_check(w->t.ctx, &w->snaps[i], why);
        wb_snap_free(&w->snaps[i]);
        th_check_state(&w->t, &w->s[i]);
    }
    int64_t f = -1;
    TOK(w->t.ctx, resa_ctx_free_tokens(w->t.ctx, &f));
    TCHECK(f == w->free_tokens, "%s: free tokens %lld -> %lld", why, (long long)w->free_tokens,
           (long long)f);
}

static void setup(world *w, const char *name, int64_t max_tokens, int64_t max_seqs,
                  int64_t max_seq_tokens, int64_t max_step)
{
    ref_params p;
    ref_params_default(&p);
    p.n_layers = 2;
    p.d = 64;
    p.hq = 2;
    p.hkv = 1;
    p.kv_dtype = RESA_DTYPE_F16;
    p.min_blocks = 1;
    p.interval = 4;
    th_opts o;
    th_opts_default(&o);
    o.max_tokens = max_tokens;
    o.max_seqs = max_seqs;
    o.max_seq_tokens = max_seq_tokens;
    o.max_step_tokens = max_step;
    th_init(&w->t, name, &p, &o);
    w->n = 0;
}

static void teardown(world *w)
{
    for (int i = 0; i < w->n; i++)
        ref_seq_free(w->s[i].r);
    th_fini(&w->t);
}

static resa_status begin(world *w, int n, const int *which, const int32_t *modes,
                         const int32_t *ntok)
{
    int32_t ids[MAXS];
    for (int i = 0; i < n; i++)
        ids[i] = w->s[which[i]].id;
    return resa_ctx_step_begin(w->t.ctx, n, ids, modes, ntok, 0);
}

/* Pool pages: 8 pages of 16 tokens. */
START_TEST(test_pool_pages)
{
    world w;
    setup(&w, "pool_pages", 128, 4, 0, 1024);
    th *t = &w.t;
    th_seq_create(t, &w.s[0]);
    th_seq_create(t, &w.s[1]);
    th_seq_create(t, &w.s[2]);
    w.n = 3;
    th_prefill(t, &w.s[0], 70, 70, 0);  /* 5 pages */
    th_prefill(t, &w.s[1], 32, 32, 0);  /* 2 pages */
    th_prefill(t, &w.s[2], 10, 10, 0);  /* 1 page: pool full */
    for (int i = 0; i < 3; i++)
        th_one(t, &w.s[0], RESA_MODE_DECODE, 1); /* pending on s0 */
    int64_t f = -1;
    TOK(t->ctx, resa_ctx_free_tokens(t->ctx, &f));
    TCHECK(f == 0, "pool should be full, %lld free tokens", (long long)f);
    /* every failing shape, each leaving everything as it was */
    int which1[1] = {1};
    int32_t m_dec[3] = {RESA_MODE_DECODE, RESA_MODE_DECODE, RESA_MODE_DECODE};
    int32_t one[3] = {1, 1, 1};
    snap_all(&w);
    TFAIL(t->ctx, RESA_ERR_CAPACITY, NULL, begin(&w, 1, which1, m_dec, one)); /* s1 full page */
    check_all(&w, "DECODE into a new page, pool empty");
    int which3[3] = {0, 2, 1};
    snap_all(&w);
    TFAIL(t->ctx, RESA_ERR_CAPACITY, NULL, begin(&w, 3, which3, m_dec, one)); /* last one fails */
    check_all(&w, "batch whose last entry needs a page");
    int32_t m_app[2] = {RESA_MODE_APPEND, RESA_MODE_APPEND_KV};
    int32_t n_app[2] = {10, 7};
    int which02[2] = {0, 2};
    snap_all(&w);
    TFAIL(t->ctx, RESA_ERR_CAPACITY, NULL, begin(&w, 2, which02, m_app, n_app));
    check_all(&w, "APPEND past the last page");
    /* fork of a partial sequence needs a page */
    int32_t child = 12345;
    snap_all(&w);
    TFAIL(t->ctx, RESA_ERR_CAPACITY, NULL, resa_seq_fork(t->ctx, w.s[2].id, &child));
    check_all(&w, "fork without a page for the partial copy");
    /* fork of a full sequence needs none */
    th_seq_fork(t, &w.s[1], &w.s[3]);
    w.n = 4;
    th_seq_release(t, &w.s[3]);
    w.n = 3;
    /* what fits still runs: s0 and s2 decode within their partial pages */
    th_entry e[2] = {{&w.s[0], RESA_MODE_DECODE, 1}, {&w.s[2], RESA_MODE_APPEND, 6}};
    th_step(t, 2, e);
    /* release frees pages; the failed step now fits */
    th_seq_release(t, &w.s[2]);
    w.n = 2;
    th_one(t, &w.s[1], RESA_MODE_DECODE, 1);
    th_one(t, &w.s[0], RESA_MODE_RECTIFY, 0);
    wb_check_cache(t, &w.s[0]);
    wb_check_cache(t, &w.s[1]);
    teardown(&w);
}
END_TEST

/* RECTIFY needing copy-on-write pages when the pool is empty. */
START_TEST(test_pool_cow)
{
    world w;
    setup(&w, "pool_cow", 128, 4, 0, 1024);
    th *t = &w.t;
    th_seq_create(t, &w.s[0]);
    w.n = 1;
    th_prefill(t, &w.s[0], 32, 32, 1);
    for (int i = 0; i < 32; i++)
        th_one(t, &w.s[0], RESA_MODE_DECODE, 1); /* 64 tokens, blocks 2 and 3 pending, full */
    th_seq_fork(t, &w.s[0], &w.s[1]);            /* shares 4 pages */
    w.n = 2;
    th_seq_create(t, &w.s[2]);
    w.n = 3;
    th_prefill(t, &w.s[2], 64, 64, 1);           /* 4 pages: pool full */
    int64_t f = -1;
    TOK(t->ctx, resa_ctx_free_tokens(t->ctx, &f));
    TCHECK(f == 0, "pool should be full, %lld free tokens", (long long)f);
    int which[1] = {1};
    int32_t mode = RESA_MODE_RECTIFY, n = 32;
    snap_all(&w);
    TFAIL(t->ctx, RESA_ERR_CAPACITY, NULL, begin(&w, 1, which, &mode, &n));
    check_all(&w, "RECTIFY of shared pages without free pages");
    /* one page free is not enough for two copies */
    th_seq_release(t, &w.s[2]);
    th_seq_create(t, &w.s[2]);
    th_prefill(t, &w.s[2], 48, 48, 1);           /* 3 pages: one free */
    snap_all(&w);
    TFAIL(t->ctx, RESA_ERR_CAPACITY, NULL, begin(&w, 1, which, &mode, &n));
    check_all(&w, "RECTIFY of two shared pages with one free page");
    /* the oldest 16 pending tokens lie on one shared page: one copy fits */
    int32_t half = 16;
    TOK(t->ctx, begin(&w, 1, which, &mode, &half));
    TOK(t->ctx, resa_ctx_step_cancel(t->ctx));
    th_check_state(t, &w.s[0]);
    th_check_state(t, &w.s[1]);
    th_one(t, &w.s[1], RESA_MODE_RECTIFY, 16);
    th_seq_release(t, &w.s[2]);
    w.n = 2;
    th_one(t, &w.s[1], RESA_MODE_RECTIFY, 0);
    th_one(t, &w.s[0], RESA_MODE_RECTIFY, 0);
    wb_check_cache(t, &w.s[0]);
    wb_check_cache(t, &w.s[1]);
    teardown(&w);
}
END_TEST

/* Sequence slots. */
START_TEST(test_slots)
{
    world w;
    setup(&w, "slots", 1024, 3, 0, 1024);
    th *t = &w.t;
    for (int i = 0; i < 3; i++) {
        th_seq_create(t, &w.s[i]);
        th_prefill(t, &w.s[i], 5 + 16 * i, 64, 0);
    }
    w.n = 3;
    int32_t id = 777;
    snap_all(&w);
    TFAIL(t->ctx, RESA_ERR_CAPACITY, NULL, resa_seq_create(t->ctx, &id));
    check_all(&w, "seq_create without a slot");
    snap_all(&w);
    TFAIL(t->ctx, RESA_ERR_CAPACITY, NULL, resa_seq_fork(t->ctx, w.s[1].id, &id));
    check_all(&w, "seq_fork without a slot");
    int32_t old = w.s[0].id;
    th_seq_release(t, &w.s[0]);
    th_seq_create(t, &w.s[0]);
    /* the released id is unknown, even though its slot was reused */
    int64_t len;
    TFAIL(t->ctx, RESA_ERR_INVALID_ARGUMENT, NULL, resa_seq_length(t->ctx, old, &len));
    th_entry e[3] = {{&w.s[0], RESA_MODE_APPEND, 9}, {&w.s[1], RESA_MODE_DECODE, 1},
                     {&w.s[2], RESA_MODE_DECODE, 1}};
    th_step(t, 3, e);
    teardown(&w);
}
END_TEST

/* MAX_STEP_TOKENS over all entries of a step. */
START_TEST(test_step_tokens)
{
    world w;
    setup(&w, "step_tokens", 1024, 4, 0, 32);
    th *t = &w.t;
    th_seq_create(t, &w.s[0]);
    th_seq_create(t, &w.s[1]);
    w.n = 2;
    th_prefill(t, &w.s[0], 40, 32, 0);
    int which[2] = {0, 1};
    int32_t modes[2] = {RESA_MODE_APPEND, RESA_MODE_APPEND_KV};
    int32_t n[2] = {20, 13};
    snap_all(&w);
    TFAIL(t->ctx, RESA_ERR_CAPACITY, NULL, begin(&w, 2, which, modes, n));
    check_all(&w, "step over MAX_STEP_TOKENS");
    int32_t n1[1] = {33};
    snap_all(&w);
    TFAIL(t->ctx, RESA_ERR_CAPACITY, NULL, begin(&w, 1, which, modes, n1));
    check_all(&w, "one entry over MAX_STEP_TOKENS");
    th_entry e[2] = {{&w.s[0], RESA_MODE_APPEND, 20}, {&w.s[1], RESA_MODE_APPEND_KV, 12}};
    th_step(t, 2, e);
    teardown(&w);
}
END_TEST

/* MAX_SEQ_TOKENS per sequence. */
START_TEST(test_seq_tokens)
{
    world w;
    setup(&w, "seq_tokens", 1024, 4, 48, 1024);
    th *t = &w.t;
    th_seq_create(t, &w.s[0]);
    th_seq_create(t, &w.s[1]);
    w.n = 2;
    th_prefill(t, &w.s[0], 40, 40, 0);
    th_prefill(t, &w.s[1], 3, 3, 0);
    int which[2] = {1, 0};
    int32_t modes[2] = {RESA_MODE_APPEND, RESA_MODE_APPEND};
    int32_t n[2] = {2, 9};
    snap_all(&w);
    TFAIL(t->ctx, RESA_ERR_CAPACITY, NULL, begin(&w, 2, which, modes, n));
    check_all(&w, "append over MAX_SEQ_TOKENS");
    th_one(t, &w.s[0], RESA_MODE_APPEND, 7);
    th_one(t, &w.s[0], RESA_MODE_DECODE, 1); /* 48 tokens: the limit */
    int which0[1] = {0};
    int32_t dec = RESA_MODE_DECODE, kvm = RESA_MODE_APPEND_KV, one = 1;
    snap_all(&w);
    TFAIL(t->ctx, RESA_ERR_CAPACITY, NULL, begin(&w, 1, which0, &dec, &one));
    TFAIL(t->ctx, RESA_ERR_CAPACITY, NULL, begin(&w, 1, which0, &kvm, &one));
    check_all(&w, "decode at MAX_SEQ_TOKENS");
    /* a full sequence may still rectify */
    if (ref_seq_pending(w.s[0].r) > 0)
        th_one(t, &w.s[0], RESA_MODE_RECTIFY, 0);
    th_one(t, &w.s[1], RESA_MODE_DECODE, 1);
    wb_check_cache(t, &w.s[0]);
    teardown(&w);
}
END_TEST

/* step_cancel gives the growth pages back. */
START_TEST(test_cancel_returns_pages)
{
    world w;
    setup(&w, "cancel_returns_pages", 256, 4, 0, 1024);
    th *t = &w.t;
    th_seq_create(t, &w.s[0]);
    th_seq_create(t, &w.s[1]);
    w.n = 2;
    th_prefill(t, &w.s[0], 20, 20, 0);
    int which[2] = {0, 1};
    int32_t modes[2] = {RESA_MODE_APPEND_KV, RESA_MODE_APPEND};
    int32_t n[2] = {100, 30};
    snap_all(&w);
    TOK(t->ctx, begin(&w, 2, which, modes, n));
    int64_t during = -1;
    TOK(t->ctx, resa_ctx_free_tokens(t->ctx, &during));
    TCHECK(during < w.free_tokens, "begin reserved no pages");
    TOK(t->ctx, resa_ctx_step_cancel(t->ctx));
    check_all(&w, "step_cancel right after begin");
    th_entry e[2] = {{&w.s[0], RESA_MODE_DECODE, 1}, {&w.s[1], RESA_MODE_APPEND, 30}};
    th_step(t, 2, e);
    teardown(&w);
}
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("capacity");
    TCase *tc = tcase_create("capacity");
    tcase_set_timeout(tc, 300);
    tcase_add_test(tc, test_pool_pages);
    tcase_add_test(tc, test_pool_cow);
    tcase_add_test(tc, test_slots);
    tcase_add_test(tc, test_step_tokens);
    tcase_add_test(tc, test_seq_tokens);
    tcase_add_test(tc, test_cancel_returns_pages);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    return th_run_suite(suite(), 1);
}
