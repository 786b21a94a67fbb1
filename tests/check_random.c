/* SPDX-License-Identifier: MIT */
/*
 * Randomized sessions (white-box): random shapes, dtypes (the fp8 cache
 * included), block sizes and
 * method parameters; random batches of APPEND / DECODE / RECTIFY / APPEND_KV
 * over several sequences with forks and releases in between.  Every output is
 * checked by the harness; every sequence's stored K/V and summaries are
 * compared with the reference at the end of each round.
 */
#include <stdlib.h>

#include "wb.h"

#define MAXQ 6

START_TEST(test_random_session)
{
    static const int32_t ds[] = {64, 128, 256};
    static const int32_t gs[] = {1, 2, 4, 7, 8};
    static const int32_t bs[] = {1, 2, 4, 8, 16, 32, 64};
    static const resa_dtype dts[] = {RESA_DTYPE_F32, RESA_DTYPE_F16, RESA_DTYPE_BF16,
                                     RESA_DTYPE_FP8_E4M3}; /* fp8: KV_DTYPE only */
    char name[32];
    snprintf(name, sizeof name, "random_session_%d", _i);
    ref_rng pick = {th_test_seed(name) ^ 0x5eedull};
    ref_params p;
    ref_params_default(&p);
    p.d = ds[ref_rng_range(&pick, 0, 2)];
    int32_t g = gs[ref_rng_range(&pick, 0, 4)];
    p.hkv = (int32_t)ref_rng_range(&pick, 1, p.d == 256 ? 1 : 2);
    p.hq = p.hkv * g;
    p.n_layers = (int32_t)ref_rng_range(&pick, 1, 3);
    p.b = bs[ref_rng_range(&pick, 0, 6)];
    p.kv_dtype = dts[ref_rng_range(&pick, 0, 3)];
    p.io_dtype = dts[ref_rng_range(&pick, 0, 2)];
    p.min_blocks = ref_rng_range(&pick, 0, 6);
    p.fraction = ref_rng_range(&pick, 0, 30) / 100.0;
    p.local_blocks = ref_rng_range(&pick, 1, 3);
    p.sink_blocks = ref_rng_range(&pick, 0, 2);
    p.interval = ref_rng_range(&pick, 0, 12);
    p.summary_fp8 = (int32_t)ref_rng_range(&pick, 0, 1);
    th_opts o;
    th_opts_default(&o);
    o.max_seqs = MAXQ;
    o.max_tokens = 8192;
    o.threads = ref_rng_range(&pick, 1, 3);
    th t;
    th_init(&t, name, &p, &o);
    t.planted = (int)ref_rng_range(&pick, 0, 1);
    th_seq s[MAXQ];
    int live[MAXQ] = {0};
    th_seq_create(&t, &s[0]);
    live[0] = 1;
    th_prefill(&t, &s[0], ref_rng_range(&t.rng, 1, 300), 128, (int)ref_rng_range(&t.rng, 0, 1));
    for (int round = 0; round < 8; round++) {
        /* lifecycle: create, fork or release */
        int slot = -1;
        for (int i = 0; i < MAXQ; i++)
            if (!live[i]) {
                slot = i;
                break;
            }
        double u = ref_rng_uniform(&t.rng);
        if (slot >= 0 && u < 0.35) {
            int parent = -1;
            for (int i = 0; i < MAXQ; i++)
                if (live[i] && (parent < 0 || ref_rng_uniform(&t.rng) < 0.5))
                    parent = i;
            th_seq_fork(&t, &s[parent], &s[slot]);
            live[slot] = 1;
        } else if (slot >= 0 && u < 0.6) {
            th_seq_create(&t, &s[slot]);
            live[slot] = 1;
        } else if (u < 0.75) {
            int n_live = 0, victim = -1;
            for (int i = 0; i < MAXQ; i++)
                n_live += live[i];
            for (int i = 0; i < MAXQ && n_live > 1; i++)
                if (live[i] && ref_rng_uniform(&t.rng) < 0.4) {
                    victim = i;
                    break;
                }
            if (victim >= 0) {
                th_seq_release(&t, &s[victim]);
                live[victim] = 0;
            }
        }
        /* a few steps of random batches */
        for (int step = 0; step < 6; step++) {
            th_entry e[MAXQ];
            int32_t n = 0;
            for (int i = 0; i < MAXQ; i++) {
                if (!live[i] || ref_rng_uniform(&t.rng) < 0.25)
                    continue;
                double v = ref_rng_uniform(&t.rng);
                int32_t mode, cnt = 1;
                int64_t pend = ref_seq_pending(s[i].r);
                int due = t.p.interval > 0 && pend >= t.p.interval;
                if (pend > 0 && (due || v < 0.1)) {
                    mode = RESA_MODE_RECTIFY; /* all pending, or the oldest part */
                    cnt = ref_rng_uniform(&t.rng) < 0.6 ? (int32_t)pend
                                                         : (int32_t)ref_rng_range(&t.rng, 1, pend);
                }
                else if (v < 0.75)
                    mode = RESA_MODE_DECODE;
                else if (v < 0.9)
                    mode = RESA_MODE_APPEND, cnt = (int32_t)ref_rng_range(&t.rng, 1, 48);
                else
                    mode = RESA_MODE_APPEND_KV, cnt = (int32_t)ref_rng_range(&t.rng, 1, 48);
                if (mode != RESA_MODE_RECTIFY && s[i].r->len + cnt > 700)
                    continue;
                e[n].s = &s[i];
                e[n].mode = mode;
                e[n].n = cnt;
                n++;
            }
            if (n > 0)
                th_step(&t, n, e);
        }
        /* method parameters may change between steps */
        if (ref_rng_uniform(&t.rng) < 0.5) {
            t.p.fraction = ref_rng_range(&t.rng, 0, 100) / 100.0;
            t.p.min_blocks = ref_rng_range(&t.rng, 0, 8);
            t.p.sink_blocks = ref_rng_range(&t.rng, 0, 2);
            t.p.local_blocks = ref_rng_range(&t.rng, 1, 3);
            th_push_method(&t);
        }
        for (int i = 0; i < MAXQ; i++)
            if (live[i])
                wb_check_cache(&t, &s[i]);
    }
    for (int i = 0; i < MAXQ; i++)
        if (live[i])
            ref_seq_free(s[i].r);
    th_fini(&t);
}
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("random");
    TCase *tc = tcase_create("random");
    tcase_set_timeout(tc, 600);
    tcase_add_loop_test(tc, test_random_session, 0, 12);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    return th_run_suite(suite(), 1);
}
