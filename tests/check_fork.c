/* SPDX-License-Identifier: MIT */
/*
 * Fork isolation (white-box): parent and child share full pages, the partial
 * page is copied; they diverge and each matches its own reference; writes to
 * one never change the other's bytes; RECTIFY of a shared page copies it
 * first; release of either keeps the other intact.  Each also with an fp8
 * cache (KV_DTYPE FP8_E4M3), whose per-token scales must travel with their
 * pages.
 */
#include <stdlib.h>

#include "wb.h"

static void setup(th *t, const char *name, resa_dtype kv)
{
    ref_params p;
    ref_params_default(&p);
    p.n_layers = 2;
    p.d = 64;
    p.hq = 2;
    p.hkv = 2;
    p.kv_dtype = kv;
    p.min_blocks = 2;
    p.interval = 8;
    th_init(t, name, &p, NULL);
}

static int64_t free_tokens(th *t)
{
    int64_t f = -1;
    TOK(t->ctx, resa_ctx_free_tokens(t->ctx, &f));
    return f;
}

START_TEST(test_fork_partial_and_full)
{
    static const int64_t lens[] = {50, 64, 0, 1};
    int64_t len = lens[_i % 4];
    th t;
    char name[32];
    snprintf(name, sizeof name, "fork_len_%lld_%d", (long long)len, _i);
    setup(&t, name, _i >= 4 ? RESA_DTYPE_FP8_E4M3 : _i % 2 ? RESA_DTYPE_F16 : RESA_DTYPE_F32);
    int32_t b = t.p.b;
    th_seq P, C;
    th_seq_create(&t, &P);
    if (len > 0)
        th_prefill(&t, &P, len, 64, 0);
    int64_t f0 = free_tokens(&t);
    th_seq_fork(&t, &P, &C); /* checks length and pending */
    int64_t f1 = free_tokens(&t);
    int64_t full = len / b, partial = len % b != 0;
    TCHECK(f0 - f1 == partial * b, "fork of %lld tokens took %lld free tokens, expected %lld",
           (long long)len, (long long)(f0 - f1), (long long)(partial * b));
    for (int64_t blk = 0; blk < full; blk++) {
        int32_t pp = wb_page(t.ctx, P.id, blk), cp = wb_page(t.ctx, C.id, blk);
        TCHECK(pp == cp && wb_refcount(t.ctx, pp) == 2,
               "full block %lld: parent page %d, child page %d, refcount %d", (long long)blk, pp,
               cp, wb_refcount(t.ctx, pp));
    }
    if (partial)
        TCHECK(wb_page(t.ctx, P.id, full) != wb_page(t.ctx, C.id, full),
               "the partial last page must be copied, not shared");
    wb_check_cache(&t, &P);
    wb_check_cache(&t, &C);
    /* diverge: each step on one side leaves the other's bytes unchanged */
    for (int round = 0; round < 6; round++) {
        th_seq *w = round % 2 ? &C : &P, *o = round % 2 ? &P : &C;
        wb_snap os;
        wb_snap_take(t.ctx, o->id, &os);
        int32_t mode = round % 3 == 0 ? RESA_MODE_APPEND : RESA_MODE_DECODE;
        th_one(&t, w, mode, mode == RESA_MODE_APPEND ? (int32_t)ref_rng_range(&t.rng, 1, 20) : 1);
        wb_snap_check(t.ctx, &os, "a step of the other side of a fork");
        wb_snap_free(&os);
    }
    /* both in one step */
    th_entry e[2] = {{&P, RESA_MODE_APPEND, 17}, {&C, RESA_MODE_APPEND, 3}};
    th_step(&t, 2, e);
    wb_check_cache(&t, &P);
    wb_check_cache(&t, &C);
    /* release the parent: the child keeps its cache */
    th_seq_release(&t, &P);
    wb_check_cache(&t, &C);
    th_one(&t, &C, RESA_MODE_DECODE, 1);
    wb_check_cache(&t, &C);
    for (int64_t blk = 0; blk < ref_blocks(C.r->len, b); blk++)
        TCHECK(wb_refcount(t.ctx, wb_page(t.ctx, C.id, blk)) == 1,
               "after the parent's release block %lld still has refcount %d", (long long)blk,
               wb_refcount(t.ctx, wb_page(t.ctx, C.id, blk)));
    th_seq_release(&t, &C);
    int64_t all = -1;
    TOK(t.ctx, resa_ctx_free_tokens(t.ctx, &all));
    TCHECK(all == ref_blocks(t.o.max_tokens, b) * b, "all released: %lld free tokens of %lld",
           (long long)all, (long long)t.o.max_tokens);
    th_fini(&t);
}
END_TEST

/* RECTIFY of pages shared with a fork copies them first. */
START_TEST(test_fork_cow_rectify)
{
    static const resa_dtype kvs[] = {RESA_DTYPE_F32, RESA_DTYPE_BF16, RESA_DTYPE_FP8_E4M3};
    th t;
    setup(&t, "fork_cow_rectify", kvs[_i]);
    int32_t b = t.p.b;
    th_seq P, C;
    th_seq_create(&t, &P);
    th_prefill(&t, &P, 160, 160, 1);
    for (int i = 0; i < 48; i++)
        th_one(&t, &P, RESA_MODE_DECODE, 1); /* pending: positions 160..207, blocks 10..12, all full */
    TCHECK(ref_seq_pending(P.r) == 48, "setup: 48 pending expected, %lld",
           (long long)ref_seq_pending(P.r));
    int64_t f0 = free_tokens(&t);
    th_seq_fork(&t, &P, &C);
    TCHECK(free_tokens(&t) == f0, "fork of full pages must not copy");
    wb_snap ps;
    wb_snap_take(t.ctx, P.id, &ps);
    th_one(&t, &C, RESA_MODE_RECTIFY, 0);
    wb_snap_check(t.ctx, &ps, "RECTIFY of the fork child");
    wb_snap_free(&ps);
    TCHECK(f0 - free_tokens(&t) == 3 * b, "RECTIFY over 3 shared pages used %lld tokens",
           (long long)(f0 - free_tokens(&t)));
    for (int64_t blk = 0; blk < 13; blk++) {
        int32_t pp = wb_page(t.ctx, P.id, blk), cp = wb_page(t.ctx, C.id, blk);
        if (blk < 10)
            TCHECK(pp == cp && wb_refcount(t.ctx, pp) == 2, "block %lld should stay shared",
                   (long long)blk);
        else
            TCHECK(pp != cp && wb_refcount(t.ctx, pp) == 1 && wb_refcount(t.ctx, cp) == 1,
                   "block %lld should be copied on write", (long long)blk);
    }
    wb_check_cache(&t, &P);
    wb_check_cache(&t, &C);
    /* the parent rectifies too: its pages are its own now, nothing copied */
    int64_t f2 = free_tokens(&t);
    wb_snap cs;
    wb_snap_take(t.ctx, C.id, &cs);
    th_one(&t, &P, RESA_MODE_RECTIFY, 0);
    wb_snap_check(t.ctx, &cs, "RECTIFY of the fork parent");
    wb_snap_free(&cs);
    TCHECK(free_tokens(&t) == f2, "RECTIFY of unshared pages took pages");
    /* both keep decoding on their own caches */
    th_entry e[2] = {{&P, RESA_MODE_DECODE, 1}, {&C, RESA_MODE_DECODE, 1}};
    th_step(&t, 2, e);
    th_step(&t, 2, e);
    wb_check_cache(&t, &P);
    wb_check_cache(&t, &C);
    ref_seq_free(P.r);
    ref_seq_free(C.r);
    th_fini(&t);
}
END_TEST

/* Parent and child rectify the same shared pages in one step: one copy per
 * page is enough (the last holder keeps the original), so the step fits in a
 * pool with exactly that many free pages; each ends with its own values. */
START_TEST(test_fork_both_rectify)
{
    ref_params p;
    ref_params_default(&p);
    p.n_layers = 2;
    p.d = 64;
    p.hq = 2;
    p.hkv = 1;
    p.min_blocks = 1;
    p.interval = 0;
    th_opts o;
    th_opts_default(&o);
    o.max_tokens = 9 * 16; /* 9 pages */
    th t;
    th_init(&t, "fork_both_rectify", &p, &o);
    th_seq P, C, F;
    th_seq_create(&t, &P);
    th_prefill(&t, &P, 32, 32, 1);
    for (int i = 0; i < 32; i++)
        th_one(&t, &P, RESA_MODE_DECODE, 1); /* 64 tokens: 4 pages, 2..3 pending */
    th_seq_fork(&t, &P, &C);
    th_seq_create(&t, &F);
    th_prefill(&t, &F, 48, 48, 1);           /* 3 pages: 2 free, 2 copies needed */
    int64_t ft = -1;
    TOK(t.ctx, resa_ctx_free_tokens(t.ctx, &ft));
    TCHECK(ft == 2 * 16, "setup: 2 free pages expected, %lld tokens free", (long long)ft);
    wb_snap fs;
    wb_snap_take(t.ctx, F.id, &fs);
    th_entry e[2] = {{&C, RESA_MODE_RECTIFY, 0}, {&P, RESA_MODE_RECTIFY, 0}};
    th_step(&t, 2, e);
    wb_snap_check(t.ctx, &fs, "RECTIFY of two sharers");
    wb_snap_free(&fs);
    for (int64_t blk = 0; blk < 4; blk++) {
        int32_t pp = wb_page(t.ctx, P.id, blk), cp = wb_page(t.ctx, C.id, blk);
        TCHECK((blk < 2) == (pp == cp), "block %lld: parent page %d, child page %d",
               (long long)blk, pp, cp);
    }
    wb_check_cache(&t, &P);
    wb_check_cache(&t, &C);
    th_seq_release(&t, &F); /* room for the next block of each */
    th_entry d[2] = {{&C, RESA_MODE_DECODE, 1}, {&P, RESA_MODE_DECODE, 1}};
    th_step(&t, 2, d);
    wb_check_cache(&t, &P);
    wb_check_cache(&t, &C);
    ref_seq_free(P.r);
    ref_seq_free(C.r);
    th_fini(&t);
}
END_TEST

/* RECTIFY of a span that starts inside a shared full page and ends in the
 * copied partial page; fork of a fork. */
START_TEST(test_fork_chain)
{
    th t;
    setup(&t, "fork_chain", _i ? RESA_DTYPE_FP8_E4M3 : RESA_DTYPE_F16);
    th_seq A, B, C;
    th_seq_create(&t, &A);
    th_prefill(&t, &A, 100, 100, 1);
    for (int i = 0; i < 13; i++)
        th_one(&t, &A, RESA_MODE_DECODE, 1); /* pending 100..112: blocks 6 (full after) and 7 */
    th_one(&t, &A, RESA_MODE_APPEND, 20);   /* 133 tokens, pending 33 */
    th_seq_fork(&t, &A, &B);
    th_one(&t, &B, RESA_MODE_DECODE, 1);
    th_seq_fork(&t, &B, &C);
    wb_snap as, bs;
    wb_snap_take(t.ctx, A.id, &as);
    wb_snap_take(t.ctx, B.id, &bs);
    th_one(&t, &C, RESA_MODE_RECTIFY, 0);
    wb_snap_check(t.ctx, &as, "RECTIFY of a grandchild (A)");
    wb_snap_check(t.ctx, &bs, "RECTIFY of a grandchild (B)");
    wb_snap_free(&as);
    wb_snap_free(&bs);
    th_entry e[3] = {{&A, RESA_MODE_RECTIFY, 0}, {&B, RESA_MODE_DECODE, 1},
                     {&C, RESA_MODE_APPEND, 5}};
    th_step(&t, 3, e);
    wb_check_cache(&t, &A);
    wb_check_cache(&t, &B);
    wb_check_cache(&t, &C);
    th_seq_release(&t, &B);
    th_one(&t, &C, RESA_MODE_DECODE, 1);
    th_one(&t, &A, RESA_MODE_DECODE, 1);
    wb_check_cache(&t, &A);
    wb_check_cache(&t, &C);
    ref_seq_free(A.r);
    ref_seq_free(C.r);
    th_fini(&t);
}
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("fork");
    TCase *tc = tcase_create("fork");
    tcase_set_timeout(tc, 600);
    tcase_add_loop_test(tc, test_fork_partial_and_full, 0, 8);
    tcase_add_loop_test(tc, test_fork_cow_rectify, 0, 3);
    tcase_add_loop_test(tc, test_fork_chain, 0, 2);
    tcase_add_test(tc, test_fork_both_rectify);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    return th_run_suite(suite(), 1);
}
