/* SPDX-License-Identifier: MIT */
/*
 * resa-bench: decode-step attention time of dense vs ReSA, per layer.
 *
 * For each context length it fills one layer's cache of `batch` sequences
 * with random K/V (RESA_MODE_APPEND_KV), then times, as the median of many
 * repetitions with rotated random inputs:
 *   dense   one RESA_MODE_APPEND step of 1 token per sequence (dense decode)
 *   sparse  one RESA_MODE_DECODE step (ReSA block-sparse decode)
 *   rectify one RESA_MODE_RECTIFY step over f pending tokens per sequence
 *   resa    sparse + rectify / f: the amortized ReSA decode step
 * Each timed step is cancelled afterwards so the cache stays the same size.
 * Progress goes to stderr, the table to stdout (--csv for machines).
 */
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <resa.h>

typedef struct opts {
    resa_backend backend;
    int64_t contexts[32];
    int n_contexts;
    int32_t batch, hq, hkv, d, reps, threads, interval;
    double fraction;
    resa_dtype dtype;
    int csv;
} opts;

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static float rnd(void)
{
    rng_state = rng_state * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((rng_state >> 40) & 0xffffff) / (float)0x1000000 * 2.0f - 1.0f;
}
static void fill(float *x, size_t n)
{
    for (size_t i = 0; i < n; i++)
        x[i] = rnd();
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

#define CHECK(call)                                                                       \
    do {                                                                                  \
        resa_status s_ = (call);                                                          \
        if (s_ != RESA_OK) {                                                              \
            fprintf(stderr, "resa-bench: %s failed: %s (%s)\n", #call, resa_status_name(s_), \
                    resa_ctx_last_error(ctx));                                            \
            exit(1);                                                                      \
        }                                                                                 \
    } while (0)

/* One timed step of `mode` for every sequence, cancelled afterwards.  Returns seconds. */
static double timed_step(resa_ctx *ctx, const opts *o, const int32_t *seqs, int32_t mode,
                         int32_t n, float *q, float *k, float *v, float *out)
{
    int32_t modes[256], counts[256];
    for (int32_t i = 0; i < o->batch; i++) {
        modes[i] = mode;
        counts[i] = n;
    }
    double t0 = now_s();
    CHECK(resa_ctx_step_begin(ctx, o->batch, seqs, modes, counts, 0));
    CHECK(resa_ctx_step_attend(ctx, 0, q, k, v, out, 0));
    CHECK(resa_ctx_synchronize(ctx));
    double t = now_s() - t0;
    CHECK(resa_ctx_step_cancel(ctx));
    return t;
}

static double median_step(resa_ctx *ctx, const opts *o, const int32_t *seqs, int32_t mode,
                          int32_t n, float **qs, float *k, float *v, float *out, int reps)
{
    double *t = malloc(sizeof(double) * (size_t)reps);
    for (int r = 0; r < reps; r++)
        t[r] = timed_step(ctx, o, seqs, mode, n, qs[r % 4], k, v, out);
    qsort(t, (size_t)reps, sizeof(double), cmp_double);
    double m = t[reps / 2];
    free(t);
    return m;
}

static void run_context(const opts *o, int64_t ctx_len)
{
    resa_ctx *ctx = NULL;
    resa_status st = resa_ctx_create(o->backend, NULL, &ctx);
    if (st != RESA_OK) {
        fprintf(stderr, "resa-bench: resa_ctx_create: %s\n", resa_status_name(st));
        exit(1);
    }
    int32_t f = o->interval > 0 ? o->interval : 32;
    int64_t per_seq = ctx_len + f + 64;
    CHECK(resa_ctx_set_param(ctx, RESA_PARAM_NUM_Q_HEADS, o->hq));
    CHECK(resa_ctx_set_param(ctx, RESA_PARAM_NUM_KV_HEADS, o->hkv));
    CHECK(resa_ctx_set_param(ctx, RESA_PARAM_HEAD_DIM, o->d));
    CHECK(resa_ctx_set_param(ctx, RESA_PARAM_KV_DTYPE, o->dtype));
    CHECK(resa_ctx_set_param(ctx, RESA_PARAM_MAX_SEQUENCES, o->batch));
    CHECK(resa_ctx_set_param(ctx, RESA_PARAM_MAX_TOKENS, per_seq * o->batch));
    CHECK(resa_ctx_set_param(ctx, RESA_PARAM_MAX_SEQ_TOKENS, per_seq));
    CHECK(resa_ctx_set_param(ctx, RESA_PARAM_NUM_THREADS, o->threads));
    CHECK(resa_ctx_set_param(ctx, RESA_PARAM_RECTIFY_INTERVAL, f));
    CHECK(resa_ctx_set_param_f64(ctx, RESA_PARAM_SELECT_FRACTION, o->fraction));

    int32_t seqs[256];
    for (int32_t i = 0; i < o->batch; i++)
        CHECK(resa_seq_create(ctx, &seqs[i]));

    /* fill the cache: K/V only, in chunks */
    const int32_t chunk = 4096;
    size_t kv_row = (size_t)o->hkv * o->d, q_row = (size_t)o->hq * o->d;
    float *k = malloc(sizeof(float) * kv_row * chunk);
    float *v = malloc(sizeof(float) * kv_row * chunk);
    fill(k, kv_row * chunk);
    fill(v, kv_row * chunk);
    for (int32_t i = 0; i < o->batch; i++)
        for (int64_t done = 0; done < ctx_len; done += chunk) {
            int32_t n = (int32_t)(ctx_len - done < chunk ? ctx_len - done : chunk);
            int32_t mode = RESA_MODE_APPEND_KV;
            fill(k, kv_row * (size_t)n); /* fresh keys: summaries must differ per block */
            CHECK(resa_ctx_step_begin(ctx, 1, &seqs[i], &mode, &n, 0));
            CHECK(resa_ctx_step_attend(ctx, 0, NULL, k, v, NULL, 0));
            CHECK(resa_ctx_step_end(ctx, 0));
        }
    float *qs[4];
    size_t rows = (size_t)o->batch * f;
    for (int i = 0; i < 4; i++) {
        qs[i] = malloc(sizeof(float) * q_row * rows);
        fill(qs[i], q_row * rows);
    }
    float *out = malloc(sizeof(float) * q_row * rows);

    fprintf(stderr, "resa-bench: context %lld: timing dense, sparse, rectify\n",
            (long long)ctx_len);
    int reps = o->reps;
    double dense = median_step(ctx, o, seqs, RESA_MODE_APPEND, 1, qs, k, v, out, reps);
    double sparse = median_step(ctx, o, seqs, RESA_MODE_DECODE, 1, qs, k, v, out, reps);
    /* make f tokens pending: f committed sparse decode steps */
    for (int32_t t = 0; t < f; t++) {
        int32_t modes[256], counts[256];
        for (int32_t i = 0; i < o->batch; i++)
            modes[i] = RESA_MODE_DECODE, counts[i] = 1;
        CHECK(resa_ctx_step_begin(ctx, o->batch, seqs, modes, counts, 0));
        CHECK(resa_ctx_step_attend(ctx, 0, qs[t % 4], k, v, out, 0));
        CHECK(resa_ctx_step_end(ctx, 0));
    }
    int64_t pending = 0;
    CHECK(resa_seq_pending(ctx, seqs[0], &pending));
    double rect = NAN, resa = sparse;
    if (pending > 0) {
        rect = median_step(ctx, o, seqs, RESA_MODE_RECTIFY, (int32_t)pending, qs, k, v, out,
                           reps / 4 + 1);
        resa = sparse + rect / (double)f;
    }
    if (o->csv)
        printf("%lld,%d,%d,%d,%d,%.6f,%.6f,%.6f,%.6f,%.3f\n", (long long)ctx_len, o->batch,
               o->hq, o->hkv, o->d, dense * 1e3, sparse * 1e3, rect * 1e3, resa * 1e3,
               dense / resa);
    else
        printf("%9lld %6d %10.3f %10.3f %10.3f %10.3f %8.2fx\n", (long long)ctx_len, o->batch,
               dense * 1e3, sparse * 1e3, rect * 1e3, resa * 1e3, dense / resa);
    fflush(stdout);
    for (int i = 0; i < 4; i++)
        free(qs[i]);
    free(out);
    free(k);
    free(v);
    resa_ctx_destroy(ctx);
}

static void usage(void)
{
    fprintf(stderr,
            "usage: resa-bench [--backend cpu|cuda|auto] [--contexts 4096,16384,65536]\n"
            "                  [--batch N] [--heads HQ/HKV] [--dim D] [--dtype f32|f16|bf16]\n"
            "                  [--fraction R] [--interval F] [--reps N] [--threads N] [--csv]\n");
    exit(2);
}

int main(int argc, char **argv)
{
    opts o = {RESA_BACKEND_CPU, {4096, 16384, 65536}, 3, 1, 32, 8, 128, 21, 0, 32, 0.1,
              RESA_DTYPE_F32, 0};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *val = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--csv")) {
            o.csv = 1;
            continue;
        }
        if (!val)
            usage();
        i++;
        if (!strcmp(a, "--backend"))
            o.backend = !strcmp(val, "cuda") ? RESA_BACKEND_CUDA
                        : !strcmp(val, "auto") ? RESA_BACKEND_AUTO : RESA_BACKEND_CPU;
        else if (!strcmp(a, "--contexts")) {
            o.n_contexts = 0;
            for (char *p = (char *)val; *p && o.n_contexts < 32;) {
                o.contexts[o.n_contexts++] = strtoll(p, &p, 10);
                if (*p == ',')
                    p++;
            }
        } else if (!strcmp(a, "--batch"))
            o.batch = atoi(val);
        else if (!strcmp(a, "--heads"))
            sscanf(val, "%d/%d", &o.hq, &o.hkv);
        else if (!strcmp(a, "--dim"))
            o.d = atoi(val);
        else if (!strcmp(a, "--dtype"))
            o.dtype = !strcmp(val, "f16") ? RESA_DTYPE_F16
                      : !strcmp(val, "bf16") ? RESA_DTYPE_BF16 : RESA_DTYPE_F32;
        else if (!strcmp(a, "--fraction"))
            o.fraction = atof(val);
        else if (!strcmp(a, "--interval"))
            o.interval = atoi(val);
        else if (!strcmp(a, "--reps"))
            o.reps = atoi(val);
        else if (!strcmp(a, "--threads"))
            o.threads = atoi(val);
        else
            usage();
    }
    if (o.batch < 1 || o.batch > 256 || o.reps < 1 || o.hq < 1 || o.hkv < 1 || o.d < 1)
        usage();
    if (o.csv)
        printf("context,batch,hq,hkv,d,dense_ms,sparse_ms,rectify_ms,resa_ms,speedup\n");
    else
        printf("# resa-bench %s, backend %s, heads %d/%d, d %d, %s KV, r %.3g, f %d, per layer\n"
               "%9s %6s %10s %10s %10s %10s %9s\n",
               resa_version_string(), o.backend == RESA_BACKEND_CPU ? "cpu" : "cuda/auto", o.hq,
               o.hkv, o.d, o.dtype == RESA_DTYPE_F32 ? "f32" : o.dtype == RESA_DTYPE_F16 ? "f16" : "bf16",
               o.fraction, o.interval, "context", "batch", "dense_ms", "sparse_ms", "rectify_ms",
               "resa_ms", "speedup");
    for (int i = 0; i < o.n_contexts; i++)
        run_context(&o, o.contexts[i]);
    return 0;
}
