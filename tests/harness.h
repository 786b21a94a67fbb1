/* SPDX-License-Identifier: MIT */
/*
 * The test harness: a context configured from a ref_params, sequences paired
 * with their reference model, and th_step(), which runs one complete step
 * (begin, every layer in a shuffled order, end) on fresh random inputs and
 * checks every output, every selection and every length/pending count
 * against the reference.
 */
#ifndef RESA_TEST_HARNESS_H
#define RESA_TEST_HARNESS_H

#include <check.h>
#include <stdio.h>

#include "ref.h"
#include "resa.h"

/* Seeds: RESA_TEST_SEED=<n> in the environment fixes the base seed;
 * otherwise it comes from the clock.  Every test mixes in its own name. */
uint64_t th_test_seed(const char *test_name);
void th_print_seed(void);

/* An assertion that prints the seed when it fails. */
#define TCHECK(cond, ...)                                                     \
    do {                                                                      \
        if (!(cond)) {                                                        \
            th_print_seed();                                                  \
            ck_assert_msg(0, __VA_ARGS__);                                    \
        }                                                                     \
    } while (0)

/* A call that must return RESA_OK. */
#define TOK(ctx, call)                                                        \
    do {                                                                      \
        resa_status s_ = (call);                                              \
        TCHECK(s_ == RESA_OK, "%s returned %s (%s)", #call, resa_status_name(s_), \
               resa_ctx_last_error(ctx));                                     \
    } while (0)

/* A call that must fail with `want` and set a non-empty error text that
 * names `needle` as a whole word (case-insensitive; alternatives separated
 * by '|'; NULL: only non-empty). */
#define TFAIL(ctx, want, needle, call)                                        \
    do {                                                                      \
        resa_status s_ = (call);                                              \
        TCHECK(s_ == (want), "%s returned %s, expected %s (%s)", #call,       \
               resa_status_name(s_), resa_status_name(want),                  \
               resa_ctx_last_error(ctx));                                     \
        th_check_error_text((ctx), (needle), #call);                          \
    } while (0)

void th_check_error_text(const resa_ctx *ctx, const char *needle, const char *what);

typedef struct th_opts {
    int64_t max_tokens;       /* default 16384 */
    int64_t max_seqs;         /* default 8 */
    int64_t max_seq_tokens;   /* default 0 */
    int64_t max_step_tokens;  /* default 8192 */
    int64_t threads;          /* default 2 */
    int record;               /* default 1 (RECORD_SELECTION) */
    resa_backend backend;     /* default RESA_BACKEND_CPU; CUDA: inputs are copied to
                                 device memory around every step_attend */
} th_opts;
void th_opts_default(th_opts *o);

typedef struct th {
    resa_ctx *ctx;
    ref_params p;
    th_opts o;
    ref_rng rng;
    double tol;               /* relative error allowed for outputs */
    double k_scale;           /* multiplies the random keys (default 1) */
    double v_scale;           /* multiplies the random values (default 1) */
    int planted;              /* plant "needle" blocks that align with the queries */
    int64_t steps;            /* steps run */
} th;

/* Creates the context and sets every parameter (o may be NULL). */
void th_init(th *t, const char *test_name, const ref_params *p, const th_opts *o);
void th_fini(th *t);
/* Pushes the method parameters (fraction, n_min, local, sink, f, scale) of t->p. */
void th_push_method(th *t);

/* A sequence and its reference. */
typedef struct th_seq {
    int32_t id;
    ref_seq *r;
} th_seq;
void th_seq_create(th *t, th_seq *s);
void th_seq_fork(th *t, const th_seq *parent, th_seq *child);
void th_seq_release(th *t, th_seq *s);
/* Length, pending and rectify_due equal the reference. */
void th_check_state(th *t, const th_seq *s);

typedef struct th_entry {
    th_seq *s;
    int32_t mode;
    int32_t n;     /* RECTIFY: 0 = every pending token, else the oldest n */
} th_entry;

/* Where each entry of a step sits: its first row, positions and, for DECODE,
 * blocks M and budget n_sel, from the reference before the step. */
typedef struct th_plan {
    int64_t row, start, n, old_len;
    int64_t M, n_sel;
} th_plan;
/* Plans a step of n entries (a RECTIFY entry of 0 tokens takes every pending
 * one, written back into e[i].n) and fills ids, modes and token counts for
 * resa_ctx_step_begin.  Returns the step's rows. */
int64_t th_plan_step(const th *t, int32_t n, th_entry *e, int32_t *ids, int32_t *modes,
                     int32_t *ntok, th_plan *pl);
/* One complete, checked step. */
void th_step(th *t, int32_t n, th_entry *e);
/* Convenience: one entry. */
void th_one(th *t, th_seq *s, int32_t mode, int32_t n);
/* Appends `n` tokens in chunks of at most `chunk` (APPEND, or APPEND_KV if kv_only). */
void th_prefill(th *t, th_seq *s, int64_t n, int32_t chunk, int kv_only);

/* Random inputs in the IO dtype (exactly the values the reference reads). */
void th_fill(th *t, void *buf, size_t n, double scale);

/* Runs a suite (forking each test when fork is 1, in-process when 0) and
 * returns the process exit status: EXIT_SUCCESS when nothing failed. */
int th_run_suite(Suite *s, int fork);

/* Adds the loop test `fn` for _i in [lo, hi), or, with RESA_TEST_SHARD=k/n set,
 * only the tests of shard k: every n-th test counted over all th_add_loop
 * calls of the process, from the k-th (a long suite in n processes at once).
 * A malformed RESA_TEST_SHARD ends the process with status 2.
 * RESA_TEST_ONLY=name keeps only the test function of that name; th_run_suite
 * then fails when none matched, so that a misspelt name cannot pass. */
void th_add_loop(TCase *tc, const TTest *fn, int lo, int hi);

/* The level of RESA_TEST_QUICK: 0 when unset or "0", its value when it is a
 * number above 1, else 1.  Nonzero: a smaller set of the same kernels and
 * paths, for runs under compute-sanitizer (docs/reliability.md); a test may
 * shrink further at 2 (check_nonfinite: one case a configuration, for
 * racecheck). */
int th_quick(void);

/* 1 when RESA_TEST_VERBOSE is set and not "0": th_step prints every output
 * check's relative error and tolerance to stderr (how near its bound a
 * backend runs). */
int th_verbose(void);

/* 1 when the CUDA backend and libcudart are usable here (GPU tests skip otherwise). */
int th_cuda_usable(void);

/* Poisons an output buffer with NaN bytes. */
void th_poison(void *buf, size_t bytes);

#endif
