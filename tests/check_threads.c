/* SPDX-License-Identifier: MIT */
/*
 * Distinct contexts are independent: several threads, each with its own
 * context, run the same session at the same time; every output equals the
 * output of the same session run alone (and that one is checked against the
 * reference by the other tests).  Assertions happen in the main thread only.
 * One context with several workers (NUM_THREADS > 1) gives bit for bit the
 * outputs and selections of the same session with one thread.  .ci/run also
 * runs this under ThreadSanitizer (docs/THREADING.md).
 */
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "harness.h"

#define D 64
#define HQ 4
#define HKV 2
#define LAYERS 2
#define PROMPT 500
#define DECODES 40
#define N_THREADS 4

typedef struct job {
    uint64_t seed;
    float *outs;          /* [DECODES + rect rows][LAYERS][HQ][D], generous */
    size_t n_out;
    resa_status status;
    int where;
} job;

static void fill(ref_rng *r, float *x, size_t n)
{
    for (size_t i = 0; i < n; i++)
        x[i] = (float)ref_rng_normal(r);
}

#define TRY(w, call)                                                          \
    do {                                                                      \
        resa_status s_ = (call);                                              \
        if (s_ != RESA_OK) {                                                  \
            j->status = s_;                                                   \
            j->where = (w);                                                   \
            goto done;                                                        \
        }                                                                     \
    } while (0)

static void *session(void *arg)
{
    job *j = arg;
    ref_rng r = {j->seed};
    resa_ctx *c = NULL;
    float *q = malloc(sizeof(float) * PROMPT * HQ * D);
    float *k = malloc(sizeof(float) * PROMPT * HKV * D);
    float *v = malloc(sizeof(float) * PROMPT * HKV * D);
    float *out = malloc(sizeof(float) * PROMPT * HQ * D);
    j->status = RESA_OK;
    j->n_out = 0;
    TRY(1, resa_ctx_create(RESA_BACKEND_CPU, NULL, &c));
    TRY(2, resa_ctx_set_param(c, RESA_PARAM_HEAD_DIM, D));
    TRY(3, resa_ctx_set_param(c, RESA_PARAM_NUM_Q_HEADS, HQ));
    TRY(4, resa_ctx_set_param(c, RESA_PARAM_NUM_KV_HEADS, HKV));
    TRY(5, resa_ctx_set_param(c, RESA_PARAM_NUM_LAYERS, LAYERS));
    TRY(6, resa_ctx_set_param(c, RESA_PARAM_MAX_TOKENS, 2048));
    TRY(7, resa_ctx_set_param(c, RESA_PARAM_NUM_THREADS, 2));
    TRY(8, resa_ctx_set_param(c, RESA_PARAM_SELECT_MIN_BLOCKS, 2));
    TRY(9, resa_ctx_set_param(c, RESA_PARAM_RECTIFY_INTERVAL, 8));
    int32_t s;
    TRY(10, resa_seq_create(c, &s));
    int32_t mode = RESA_MODE_APPEND_KV, n = PROMPT;
    TRY(11, resa_ctx_step_begin(c, 1, &s, &mode, &n, 0));
    for (int32_t l = 0; l < LAYERS; l++) {
        fill(&r, k, (size_t)PROMPT * HKV * D);
        fill(&r, v, (size_t)PROMPT * HKV * D);
        TRY(12, resa_ctx_step_attend(c, l, q, k, v, NULL, 0));
    }
    TRY(13, resa_ctx_step_end(c, 0));
    for (int step = 0; step < DECODES; step++) {
        int32_t due = 0;
        int64_t pend = 0;
        TRY(14, resa_seq_rectify_due(c, s, &due));
        TRY(15, resa_seq_pending(c, s, &pend));
        mode = due ? RESA_MODE_RECTIFY : RESA_MODE_DECODE;
        n = due ? (int32_t)pend : 1;
        TRY(16, resa_ctx_step_begin(c, 1, &s, &mode, &n, 0));
        for (int32_t l = 0; l < LAYERS; l++) {
            fill(&r, q, (size_t)n * HQ * D);
            fill(&r, k, (size_t)n * HKV * D);
            fill(&r, v, (size_t)n * HKV * D);
            TRY(17, resa_ctx_step_attend(c, l, q, k, v, out, 0));
            memcpy(j->outs + j->n_out, out, sizeof(float) * (size_t)n * HQ * D);
            j->n_out += (size_t)n * HQ * D;
        }
        TRY(18, resa_ctx_step_end(c, 0));
    }
done:
    resa_ctx_destroy(c);
    free(q), free(k), free(v), free(out);
    return NULL;
}

START_TEST(test_independent_contexts)
{
    uint64_t seed = th_test_seed("independent_contexts");
    size_t cap = (size_t)DECODES * 8 * LAYERS * HQ * D;
    job alone = {seed, malloc(sizeof(float) * cap), 0, RESA_OK, 0};
    session(&alone);
    TCHECK(alone.status == RESA_OK, "session alone failed at %d: %s", alone.where,
           resa_status_name(alone.status));
    TCHECK(alone.n_out > 0, "no output");
    job jobs[N_THREADS];
    pthread_t tid[N_THREADS];
    for (int i = 0; i < N_THREADS; i++) {
        jobs[i] = (job){seed, malloc(sizeof(float) * cap), 0, RESA_OK, 0};
        TCHECK(pthread_create(&tid[i], NULL, session, &jobs[i]) == 0, "pthread_create");
    }
    for (int i = 0; i < N_THREADS; i++)
        pthread_join(tid[i], NULL);
    for (int i = 0; i < N_THREADS; i++) {
        TCHECK(jobs[i].status == RESA_OK, "thread %d failed at %d: %s", i, jobs[i].where,
               resa_status_name(jobs[i].status));
        TCHECK(jobs[i].n_out == alone.n_out, "thread %d: %zu outputs, alone %zu", i,
               jobs[i].n_out, alone.n_out);
        double num = 0, den = 0;
        for (size_t x = 0; x < alone.n_out; x++) {
            double a = alone.outs[x], b = jobs[i].outs[x];
            TCHECK(isfinite(b), "thread %d: output %zu is not finite", i, x);
            num += (a - b) * (a - b);
            den += a * a;
        }
        TCHECK(sqrt(num / den) <= 1e-6, "thread %d: outputs differ from the session alone "
                                        "(relative %.3g)", i, sqrt(num / den));
        free(jobs[i].outs);
    }
    free(alone.outs);
}
END_TEST

/* One context, a batch of three sequences (prompts, decodes, rectification,
 * a fork) with n_workers threads; every output and selection appended to out. */
#define W_SEQS 3
#define W_STEPS 24
#define W_ROWS 512 /* the prompts' step; later steps have at most 5 rows a sequence */
static size_t worker_session(int32_t n_workers, uint64_t seed, float *outs, size_t cap)
{
    ref_rng r = {seed};
    resa_ctx *c = NULL;
    size_t n_out = 0;
    float *q = malloc(sizeof(float) * W_ROWS * HQ * D);
    float *k = malloc(sizeof(float) * W_ROWS * HKV * D);
    float *v = malloc(sizeof(float) * W_ROWS * HKV * D);
    float *out = malloc(sizeof(float) * W_ROWS * HQ * D);
    TCHECK(q && k && v && out, "out of memory");
    TOK(c, resa_ctx_create(RESA_BACKEND_CPU, NULL, &c));
    TOK(c, resa_ctx_set_param(c, RESA_PARAM_HEAD_DIM, D));
    TOK(c, resa_ctx_set_param(c, RESA_PARAM_NUM_Q_HEADS, HQ));
    TOK(c, resa_ctx_set_param(c, RESA_PARAM_NUM_KV_HEADS, HKV));
    TOK(c, resa_ctx_set_param(c, RESA_PARAM_NUM_LAYERS, LAYERS));
    TOK(c, resa_ctx_set_param(c, RESA_PARAM_MAX_TOKENS, 4096));
    TOK(c, resa_ctx_set_param(c, RESA_PARAM_NUM_THREADS, n_workers));
    TOK(c, resa_ctx_set_param(c, RESA_PARAM_RECORD_SELECTION, 1));
    TOK(c, resa_ctx_set_param(c, RESA_PARAM_SELECT_MIN_BLOCKS, 2));
    TOK(c, resa_ctx_set_param(c, RESA_PARAM_RECTIFY_INTERVAL, 5));
    int32_t seqs[W_SEQS + 1], modes[W_SEQS + 1], counts[W_SEQS + 1];
    const int32_t prompt[W_SEQS] = {300, 130, 17};
    int32_t n_seqs = W_SEQS;
    for (int i = 0; i < W_SEQS; i++) {
        TOK(c, resa_seq_create(c, &seqs[i]));
        modes[i] = RESA_MODE_APPEND;
        counts[i] = prompt[i];
    }
    for (int step = -1; step < W_STEPS; step++) {
        if (step == W_STEPS / 2) { /* a fork joins the batch */
            TOK(c, resa_seq_fork(c, seqs[0], &seqs[n_seqs]));
            n_seqs++;
        }
        int32_t rows = 0;
        for (int i = 0; step >= 0 && i < n_seqs; i++) {
            int32_t due = 0;
            int64_t pend = 0;
            TOK(c, resa_seq_rectify_due(c, seqs[i], &due));
            TOK(c, resa_seq_pending(c, seqs[i], &pend));
            modes[i] = due ? RESA_MODE_RECTIFY : RESA_MODE_DECODE;
            counts[i] = due ? (int32_t)pend : 1;
        }
        for (int i = 0; i < n_seqs; i++)
            rows += counts[i];
        TCHECK(rows <= W_ROWS, "step of %d rows", rows);
        TOK(c, resa_ctx_step_begin(c, n_seqs, seqs, modes, counts, 0));
        for (int32_t l = 0; l < LAYERS; l++) {
            fill(&r, q, (size_t)rows * HQ * D);
            fill(&r, k, (size_t)rows * HKV * D);
            fill(&r, v, (size_t)rows * HKV * D);
            TOK(c, resa_ctx_step_attend(c, l, q, k, v, out, 0));
            size_t n = (size_t)rows * HQ * D;
            TCHECK(n_out + n <= cap, "output record too small");
            memcpy(outs + n_out, out, sizeof(float) * n);
            n_out += n;
        }
        TOK(c, resa_ctx_step_end(c, 0));
        for (int i = 0; i < n_seqs; i++)
            for (int32_t l = 0; l < LAYERS; l++)
                for (int32_t h = 0; h < HKV; h++) {
                    int32_t blocks[64];
                    int64_t count = 0;
                    TOK(c, resa_seq_selected_blocks(c, seqs[i], l, h, blocks, 64, &count));
                    TCHECK(count <= 64 && n_out + 1 + (size_t)count <= cap, "selection record");
                    outs[n_out++] = (float)count;
                    for (int64_t j = 0; j < count; j++)
                        outs[n_out++] = (float)blocks[j];
                }
    }
    resa_ctx_destroy(c);
    free(q), free(k), free(v), free(out);
    return n_out;
}

START_TEST(test_workers_of_one_context)
{
    uint64_t seed = th_test_seed("workers_of_one_context");
    size_t cap = (size_t)LAYERS * HQ * D * (W_ROWS + W_STEPS * 5 * (W_SEQS + 1)) +
                 (size_t)(W_STEPS + 1) * (W_SEQS + 1) * LAYERS * HKV * 65;
    float *one = malloc(sizeof(float) * cap), *many = malloc(sizeof(float) * cap);
    TCHECK(one && many, "out of memory");
    size_t n1 = worker_session(1, seed, one, cap);
    const int32_t workers[] = {2, 4};
    for (size_t w = 0; w < sizeof workers / sizeof workers[0]; w++) {
        size_t n = worker_session(workers[w], seed, many, cap);
        TCHECK(n == n1 && memcmp(one, many, sizeof(float) * n) == 0,
               "NUM_THREADS %d: outputs or selections differ from NUM_THREADS 1", workers[w]);
    }
    free(one);
    free(many);
}
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("threads");
    TCase *tc = tcase_create("threads");
    tcase_set_timeout(tc, 300);
    tcase_add_test(tc, test_independent_contexts);
    tcase_add_test(tc, test_workers_of_one_context);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    return th_run_suite(suite(), 1);
}
