/* SPDX-License-Identifier: MIT */
/*
 * resa-bench: per-layer decode-step attention time of dense vs ReSA.
 *
 * For each context length it fills one layer's cache of `batch` sequences
 * with random K/V (RESA_MODE_APPEND_KV), then times, as the median of many
 * repetitions on rotated random queries:
 *   dense    RESA_MODE_DECODE with SELECT_FRACTION 1: exact attention over
 *            every block, through the same kernels (our dense decode)
 *   sparse   RESA_MODE_DECODE with the configured fraction (ReSA decode)
 *   rectify  RESA_MODE_RECTIFY over f pending tokens per sequence
 *   resa     sparse + rectify / f: the amortized ReSA decode step
 * CPU: wall clock around begin + attend.  CUDA: the layer's work is captured
 * in a CUDA graph once per measured step and its replays are timed with
 * events (no launch gaps, METHOD.md), inputs in device memory.
 * Each measured step is cancelled afterwards so the cache keeps its size.
 * Progress on stderr, a table on stdout (--csv for machines).
 */
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <resa.h>

#include "cuda_shim.h"

typedef struct opts {
    resa_backend backend;
    int64_t contexts[32];
    int n_contexts;
    int32_t batch, hq, hkv, d, reps, threads, interval;
    double fraction;
    int dtype; /* -1: backend default (f32 on CPU, bf16 on CUDA) */
    int csv;
} opts;

typedef struct bench {
    const opts *o;
    resa_ctx *ctx;
    int gpu;          /* inputs live in device memory */
    cuda_shim cu;
    void *stream;
    resa_dtype dt;
    size_t elt;
    int32_t seqs[256];
    void *q[4], *k, *v, *out; /* q: 4 rotated sets of batch*f rows */
    size_t q_bytes, kv_chunk_bytes;
} bench;

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

static uint16_t to_half_bits(float f, resa_dtype t)
{
    uint32_t x;
    memcpy(&x, &f, sizeof x);
    if (t == RESA_DTYPE_BF16)
        return (uint16_t)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
    /* f16 for |f| < 2 (our inputs): normal numbers only, round to nearest even */
    uint32_t sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
    if (ax < 0x38800000u)
        return (uint16_t)sign;
    ax += 0xc8000fffu + ((ax >> 13) & 1u);
    return (uint16_t)(sign | (ax >> 13));
}

/* Random values of the bench's dtype into dst (host or device). */
static void fill(bench *B, void *dst, size_t n)
{
    void *host = malloc(n * B->elt);
    for (size_t i = 0; i < n; i++) {
        float f = rnd();
        if (B->dt == RESA_DTYPE_F32)
            ((float *)host)[i] = f;
        else
            ((uint16_t *)host)[i] = to_half_bits(f, B->dt);
    }
    if (B->gpu)
        B->cu.Memcpy(dst, host, n * B->elt, 1);
    else
        memcpy(dst, host, n * B->elt);
    free(host);
}

static void *buffer(bench *B, size_t bytes)
{
    void *p = NULL;
    if (B->gpu) {
        if (B->cu.Malloc(&p, bytes) != 0) {
            fprintf(stderr, "resa-bench: cudaMalloc(%zu) failed\n", bytes);
            exit(1);
        }
    } else if (!(p = malloc(bytes))) {
        fprintf(stderr, "resa-bench: malloc(%zu) failed\n", bytes);
        exit(1);
    }
    return p;
}

static void release(bench *B, void *p)
{
    if (B->gpu)
        B->cu.Free(p);
    else
        free(p);
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

#define CHECK(call)                                                                          \
    do {                                                                                     \
        resa_status s_ = (call);                                                             \
        if (s_ != RESA_OK) {                                                                 \
            fprintf(stderr, "resa-bench: %s failed: %s (%s)\n", #call, resa_status_name(s_), \
                    resa_ctx_last_error(B->ctx));                                            \
            exit(1);                                                                         \
        }                                                                                    \
    } while (0)

static void begin(bench *B, int32_t mode, int32_t n)
{
    int32_t modes[256], counts[256];
    for (int32_t i = 0; i < B->o->batch; i++)
        modes[i] = mode, counts[i] = n;
    CHECK(resa_ctx_step_begin(B->ctx, B->o->batch, B->seqs, modes, counts, 0));
}

/* Median seconds of one layer of a `mode` step, cancelled afterwards. */
static double measure(bench *B, int32_t mode, int32_t n, int reps)
{
    double *t = malloc(sizeof(double) * (size_t)reps);
    if (!B->gpu) {
        for (int r = 0; r < reps; r++) {
            double t0 = now_s();
            begin(B, mode, n);
            CHECK(resa_ctx_step_attend(B->ctx, 0, B->q[r % 4], B->k, B->v, B->out, 0));
            t[r] = now_s() - t0;
            CHECK(resa_ctx_step_cancel(B->ctx));
        }
    } else {
        void *graph = NULL, *exec = NULL, *e0, *e1;
        B->cu.EventCreate(&e0);
        B->cu.EventCreate(&e1);
        begin(B, mode, n);
        /* q rotates by copying a fresh set into the buffer the graph reads */
        void *qbuf = B->q[0];
        B->cu.StreamBeginCapture(B->stream, 0);
        CHECK(resa_ctx_step_attend(B->ctx, 0, qbuf, B->k, B->v, B->out, 0));
        B->cu.StreamEndCapture(B->stream, &graph);
        if (!graph || B->cu.GraphInstantiate(&exec, graph, 0) != 0) {
            fprintf(stderr, "resa-bench: CUDA graph capture failed\n");
            exit(1);
        }
        for (int w = 0; w < 3; w++)
            B->cu.GraphLaunch(exec, B->stream);
        for (int r = 0; r < reps; r++) {
            B->cu.Memcpy(qbuf, B->q[1 + r % 3], B->q_bytes, 3);
            B->cu.EventRecord(e0, B->stream);
            B->cu.GraphLaunch(exec, B->stream);
            B->cu.EventRecord(e1, B->stream);
            B->cu.EventSynchronize(e1);
            float ms = 0;
            B->cu.EventElapsedTime(&ms, e0, e1);
            t[r] = ms * 1e-3;
        }
        CHECK(resa_ctx_synchronize(B->ctx));
        CHECK(resa_ctx_step_cancel(B->ctx));
        B->cu.GraphExecDestroy(exec);
        B->cu.GraphDestroy(graph);
        B->cu.EventDestroy(e0);
        B->cu.EventDestroy(e1);
    }
    qsort(t, (size_t)reps, sizeof(double), cmp_double);
    double m = t[reps / 2];
    free(t);
    return m;
}

/* Device copy bandwidth (bytes read + written per second), for the % column. */
static double copy_bandwidth(bench *B)
{
    size_t bytes = (size_t)1 << 30;
    void *a = buffer(B, bytes), *b = buffer(B, bytes), *e0, *e1;
    B->cu.Memset(a, 1, bytes);
    B->cu.EventCreate(&e0);
    B->cu.EventCreate(&e1);
    double best = 0;
    for (int r = 0; r < 6; r++) {
        B->cu.EventRecord(e0, NULL);
        B->cu.Memcpy(b, a, bytes, 3);
        B->cu.EventRecord(e1, NULL);
        B->cu.EventSynchronize(e1);
        float ms = 0;
        B->cu.EventElapsedTime(&ms, e0, e1);
        double bw = 2.0 * (double)bytes / (ms * 1e-3);
        best = bw > best ? bw : best;
    }
    B->cu.EventDestroy(e0);
    B->cu.EventDestroy(e1);
    release(B, a);
    release(B, b);
    return best;
}

static void run_context(const opts *o, int64_t ctx_len, double copy_bw)
{
    bench BB = {0}, *B = &BB;
    B->o = o;
    resa_status st = resa_ctx_create(o->backend, NULL, &B->ctx);
    if (st != RESA_OK) {
        fprintf(stderr, "resa-bench: resa_ctx_create: %s\n", resa_status_name(st));
        exit(1);
    }
    resa_backend actual;
    CHECK(resa_ctx_get_backend(B->ctx, &actual));
    B->gpu = actual == RESA_BACKEND_CUDA;
    if (B->gpu && cuda_shim_load(&B->cu) != 0) {
        fprintf(stderr, "resa-bench: the CUDA backend runs but libcudart cannot be loaded\n");
        exit(1);
    }
    if (B->gpu) {
        B->cu.StreamCreate(&B->stream);
        CHECK(resa_ctx_set_stream(B->ctx, B->stream));
    }
    B->dt = o->dtype >= 0 ? (resa_dtype)o->dtype : B->gpu ? RESA_DTYPE_BF16 : RESA_DTYPE_F32;
    B->elt = B->dt == RESA_DTYPE_F32 ? 4 : 2;
    int32_t f = o->interval > 0 ? o->interval : 32;
    int64_t per_seq = ctx_len + f + 64;
    CHECK(resa_ctx_set_param(B->ctx, RESA_PARAM_NUM_Q_HEADS, o->hq));
    CHECK(resa_ctx_set_param(B->ctx, RESA_PARAM_NUM_KV_HEADS, o->hkv));
    CHECK(resa_ctx_set_param(B->ctx, RESA_PARAM_HEAD_DIM, o->d));
    CHECK(resa_ctx_set_param(B->ctx, RESA_PARAM_KV_DTYPE, B->dt));
    CHECK(resa_ctx_set_param(B->ctx, RESA_PARAM_IO_DTYPE, B->dt));
    CHECK(resa_ctx_set_param(B->ctx, RESA_PARAM_MAX_SEQUENCES, o->batch));
    CHECK(resa_ctx_set_param(B->ctx, RESA_PARAM_MAX_TOKENS, per_seq * o->batch));
    CHECK(resa_ctx_set_param(B->ctx, RESA_PARAM_MAX_SEQ_TOKENS, per_seq));
    CHECK(resa_ctx_set_param(B->ctx, RESA_PARAM_NUM_THREADS, o->threads));
    CHECK(resa_ctx_set_param(B->ctx, RESA_PARAM_RECTIFY_INTERVAL, f));
    for (int32_t i = 0; i < o->batch; i++)
        CHECK(resa_seq_create(B->ctx, &B->seqs[i]));

    const int32_t chunk = 4096;
    size_t kv_row = (size_t)o->hkv * o->d, q_row = (size_t)o->hq * o->d;
    size_t rows = (size_t)o->batch * f;
    B->kv_chunk_bytes = kv_row * chunk * B->elt;
    B->q_bytes = q_row * rows * B->elt;
    B->k = buffer(B, B->kv_chunk_bytes);
    B->v = buffer(B, B->kv_chunk_bytes);
    B->out = buffer(B, B->q_bytes);
    for (int i = 0; i < 4; i++) {
        B->q[i] = buffer(B, B->q_bytes);
        fill(B, B->q[i], q_row * rows);
    }
    fill(B, B->v, kv_row * chunk);
    for (int32_t i = 0; i < o->batch; i++)
        for (int64_t done = 0; done < ctx_len; done += chunk) {
            int32_t n = (int32_t)(ctx_len - done < chunk ? ctx_len - done : chunk);
            int32_t mode = RESA_MODE_APPEND_KV;
            fill(B, B->k, kv_row * (size_t)n); /* fresh keys: every block's summary differs */
            CHECK(resa_ctx_step_begin(B->ctx, 1, &B->seqs[i], &mode, &n, 0));
            CHECK(resa_ctx_step_attend(B->ctx, 0, NULL, B->k, B->v, NULL, 0));
            CHECK(resa_ctx_step_end(B->ctx, 0));
            CHECK(resa_ctx_synchronize(B->ctx));
        }

    fprintf(stderr, "resa-bench: context %lld batch %d: timing\n", (long long)ctx_len, o->batch);
    int reps = o->reps;
    CHECK(resa_ctx_set_param_f64(B->ctx, RESA_PARAM_SELECT_FRACTION, 1.0));
    double dense = measure(B, RESA_MODE_DECODE, 1, reps);
    CHECK(resa_ctx_set_param_f64(B->ctx, RESA_PARAM_SELECT_FRACTION, o->fraction));
    double sparse = measure(B, RESA_MODE_DECODE, 1, reps);
    for (int32_t t = 0; t < f; t++) { /* f committed sparse steps make f tokens pending */
        begin(B, RESA_MODE_DECODE, 1);
        CHECK(resa_ctx_step_attend(B->ctx, 0, B->q[t % 4], B->k, B->v, B->out, 0));
        CHECK(resa_ctx_step_end(B->ctx, 0));
    }
    CHECK(resa_ctx_synchronize(B->ctx));
    int64_t pending = 0;
    CHECK(resa_seq_pending(B->ctx, B->seqs[0], &pending));
    double rect = NAN, resa = sparse;
    if (pending == f) {
        rect = measure(B, RESA_MODE_RECTIFY, f, reps / 2 + 1);
        resa = sparse + rect / (double)f;
    }
    /* bytes the sparse step must read: summaries of every block plus the chosen pages */
    int64_t M = (ctx_len + 1 + 15) / 16;
    int64_t n_sel = (int64_t)ceil(o->fraction * (double)M - 1e-9);
    if (n_sel < (M < 16 ? M : 16))
        n_sel = M < 16 ? M : 16;
    double bytes = (double)o->batch * o->hkv * (double)B->elt * o->d *
                   (2.0 * (double)M + 2.0 * 16.0 * (double)n_sel);
    double bw_pct = copy_bw > 0 ? 100.0 * bytes / sparse / copy_bw : NAN;
    if (o->csv)
        printf("%lld,%d,%d,%d,%d,%.4f,%.4f,%.4f,%.4f,%.3f,%.1f,%.1f\n", (long long)ctx_len,
               o->batch, o->hq, o->hkv, o->d, dense * 1e3, sparse * 1e3, rect * 1e3, resa * 1e3,
               dense / resa, bytes / sparse * 1e-9, bw_pct);
    else
        printf("%9lld %6d %10.4f %10.4f %11.4f %10.4f %8.2fx %9.1f %6.1f\n", (long long)ctx_len,
               o->batch, dense * 1e3, sparse * 1e3, rect * 1e3, resa * 1e3, dense / resa,
               bytes / sparse * 1e-9, bw_pct);
    fflush(stdout);
    for (int i = 0; i < 4; i++)
        release(B, B->q[i]);
    release(B, B->out);
    release(B, B->k);
    release(B, B->v);
    resa_ctx_destroy(B->ctx);
    if (B->gpu)
        B->cu.StreamDestroy(B->stream);
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
    opts o = {RESA_BACKEND_CPU, {4096, 16384, 65536}, 3, 1, 32, 8, 128, 21, 0, 32, 0.1, -1, 0};
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
        else if (!strcmp(a, "--heads")) {
            if (sscanf(val, "%d/%d", &o.hq, &o.hkv) != 2)
                usage();
        } else if (!strcmp(a, "--dim"))
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
    double copy_bw = 0;
    cuda_shim cu;
    if (o.backend != RESA_BACKEND_CPU && resa_backend_available(RESA_BACKEND_CUDA) &&
        cuda_shim_load(&cu) == 0) {
        bench tmp = {0};
        tmp.gpu = 1;
        tmp.cu = cu;
        copy_bw = copy_bandwidth(&tmp);
    }
    if (o.csv)
        printf("context,batch,hq,hkv,d,dense_ms,sparse_ms,rectify_ms,resa_ms,speedup,"
               "sparse_GBps,sparse_pct_copy_bw\n");
    else
        printf("# resa-bench %s, backend %s, heads %d/%d, d %d, r %.3g, f %d, one layer%s\n"
               "# dense = decode with r = 1 on the same kernels; resa = sparse + rectify/f\n"
               "%9s %6s %10s %10s %11s %10s %9s %9s %6s\n",
               resa_version_string(), o.backend == RESA_BACKEND_CPU ? "cpu" : "cuda/auto", o.hq,
               o.hkv, o.d, o.fraction, o.interval > 0 ? o.interval : 32,
               copy_bw > 0 ? "" : " (no GPU: no bandwidth column)", "context", "batch",
               "dense_ms", "sparse_ms", "rectify_ms", "resa_ms", "speedup", "GB/s", "%copy");
    if (copy_bw > 0 && !o.csv)
        printf("# device copy bandwidth (read + write): %.0f GB/s\n", copy_bw * 1e-9);
    for (int i = 0; i < o.n_contexts; i++)
        run_context(&o, o.contexts[i], copy_bw);
    return 0;
}
