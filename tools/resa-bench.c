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
    int32_t batches[16];
    int n_batches;
    int32_t shapes[8][3]; /* hq, hkv, d */
    int n_shapes;
    int32_t batch, hq, hkv, d, reps, threads, interval; /* the point being measured */
    double fraction;
    int32_t sink;     /* RESA_PARAM_SINK_BLOCKS of the sparse steps (-1: the default) */
    double width;     /* RESA_PARAM_SCORE_WIDTH of the sparse steps (-1: the default) */
    int32_t group;    /* RESA_PARAM_GROUP_SCORE of the sparse steps (-1: the default) */
    int dtype; /* -1: backend default (f32 on CPU, bf16 on CUDA) */
    int kv_fp8; /* --kv-dtype fp8: KV_DTYPE RESA_DTYPE_FP8_E4M3 (I/O stays --dtype) */
    int summary; /* RESA_PARAM_SUMMARY_FORMAT */
    int csv, json;
    int cold; /* --cold: L2 overwritten before each timed CUDA replay */
    const char *plot;
    int modes; /* bits: 1 dense, 2 sparse, 4 rectify */
} opts;

/* One measured point. */
typedef struct result {
    int64_t context;
    int32_t batch, hq, hkv, d;
    const char *backend, *dtype, *summary, *kv_dtype;
    double fraction;
    int32_t interval;
    double dense_ms, sparse_ms, rectify_ms, resa_ms;
    double dense_bytes, sparse_bytes;  /* bytes each step must read */
    double dense_gbps, sparse_gbps, dense_pct, sparse_pct; /* pct of copy bandwidth, or -1 */
} result;

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
    void *flush;      /* --cold: a buffer larger than any L2, written before each replay */
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
        /* --cold: 256 MB written (the legacy stream orders it before the replay,
         * B->stream being a blocking stream) leave none of the step's bytes in
         * L2, as in an engine where the next layer reads other K/V; without it
         * a step that reads less than L2 holds (1 x 32K: 24 MB) is timed warm */
        const size_t flush_bytes = (size_t)256 << 20;
        if (B->o->cold && !B->flush && B->cu.Malloc(&B->flush, flush_bytes) != 0) {
            fprintf(stderr, "resa-bench: --cold: cudaMalloc of 256 MB failed\n");
            exit(1);
        }
        for (int r = 0; r < reps; r++) {
            B->cu.Memcpy(qbuf, B->q[1 + r % 3], B->q_bytes, 3);
            if (B->flush)
                B->cu.Memset(B->flush, r & 0xff, flush_bytes);
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

static void run_context(const opts *o, int64_t ctx_len, double copy_bw, result *res)
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
    CHECK(resa_ctx_set_param(B->ctx, RESA_PARAM_NUM_LAYERS, 1));
    CHECK(resa_ctx_set_param(B->ctx, RESA_PARAM_NUM_Q_HEADS, o->hq));
    CHECK(resa_ctx_set_param(B->ctx, RESA_PARAM_NUM_KV_HEADS, o->hkv));
    CHECK(resa_ctx_set_param(B->ctx, RESA_PARAM_HEAD_DIM, o->d));
    CHECK(resa_ctx_set_param(B->ctx, RESA_PARAM_KV_DTYPE,
                             o->kv_fp8 ? RESA_DTYPE_FP8_E4M3 : B->dt));
    CHECK(resa_ctx_set_param(B->ctx, RESA_PARAM_IO_DTYPE, B->dt));
    CHECK(resa_ctx_set_param(B->ctx, RESA_PARAM_MAX_SEQUENCES, o->batch));
    CHECK(resa_ctx_set_param(B->ctx, RESA_PARAM_MAX_TOKENS, per_seq * o->batch));
    CHECK(resa_ctx_set_param(B->ctx, RESA_PARAM_MAX_SEQ_TOKENS, per_seq));
    CHECK(resa_ctx_set_param(B->ctx, RESA_PARAM_NUM_THREADS, o->threads));
    CHECK(resa_ctx_set_param(B->ctx, RESA_PARAM_RECTIFY_INTERVAL, f));
    CHECK(resa_ctx_set_param(B->ctx, RESA_PARAM_SUMMARY_FORMAT, o->summary));
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

    fprintf(stderr, "resa-bench: context %lld, batch %d, heads %d/%d, d %d: timing\n",
            (long long)ctx_len, o->batch, o->hq, o->hkv, o->d);
    int reps = o->reps;
    double dense = NAN, sparse = NAN;
    if (o->modes & 1) {
        CHECK(resa_ctx_set_param_f64(B->ctx, RESA_PARAM_SELECT_FRACTION, 1.0));
        dense = measure(B, RESA_MODE_DECODE, 1, reps);
    }
    CHECK(resa_ctx_set_param_f64(B->ctx, RESA_PARAM_SELECT_FRACTION, o->fraction));
    if (o->sink >= 0) /* else the library's default */
        CHECK(resa_ctx_set_param(B->ctx, RESA_PARAM_SINK_BLOCKS, o->sink));
    if (o->width >= 0)
        CHECK(resa_ctx_set_param_f64(B->ctx, RESA_PARAM_SCORE_WIDTH, o->width));
    if (o->group >= 0)
        CHECK(resa_ctx_set_param(B->ctx, RESA_PARAM_GROUP_SCORE, o->group));
    if (o->modes & 2)
        sparse = measure(B, RESA_MODE_DECODE, 1, reps);
    for (int32_t t = 0; (o->modes & 4) && t < f; t++) { /* f sparse steps: f tokens pending */
        begin(B, RESA_MODE_DECODE, 1);
        CHECK(resa_ctx_step_attend(B->ctx, 0, B->q[t % 4], B->k, B->v, B->out, 0));
        CHECK(resa_ctx_step_end(B->ctx, 0));
    }
    CHECK(resa_ctx_synchronize(B->ctx));
    int64_t pending = 0;
    CHECK(resa_seq_pending(B->ctx, B->seqs[0], &pending));
    double rect = NAN, resa = sparse;
    if (!(o->modes & 4))
        resa = NAN; /* the ReSA step includes rectification: not measured */
    if ((o->modes & 4) && pending == f) {
        rect = measure(B, RESA_MODE_RECTIFY, f, reps / 2 + 1);
        resa = sparse + rect / (double)f;
    }
    /* bytes each step must read: dense, every K/V row; sparse, the summaries of
     * every block plus the chosen pages (the budget rule of the library) */
    int64_t M = (ctx_len + 1 + 15) / 16;
    int64_t n_sel = (int64_t)ceil(o->fraction * (double)M - 1e-9);
    if (n_sel < (M < 16 ? M : 16))
        n_sel = M < 16 ? M : 16;
    double per_head = (double)B->elt * o->d * o->batch * o->hkv;
    /* K/V bytes per token and head: elements, or fp8 bytes plus one fp32 scale */
    double kv_head = o->kv_fp8 ? (o->d + 4.0) * o->batch * o->hkv : per_head;
    res->context = ctx_len;
    res->batch = o->batch;
    res->hq = o->hq;
    res->hkv = o->hkv;
    res->d = o->d;
    res->backend = B->gpu ? "cuda" : "cpu";
    res->dtype = B->dt == RESA_DTYPE_F32 ? "f32" : B->dt == RESA_DTYPE_F16 ? "f16" : "bf16";
    res->dense_ms = dense * 1e3;
    res->sparse_ms = sparse * 1e3;
    res->rectify_ms = rect * 1e3;
    res->resa_ms = resa * 1e3;
    res->kv_dtype = o->kv_fp8 ? "fp8" : res->dtype;
    res->dense_bytes = kv_head * 2.0 * (double)(ctx_len + 1);
    /* summaries: kmin and kmax in the KV dtype (fp8 cache: the I/O dtype), or fp8
     * bytes plus one exponent */
    double sum_bytes = o->summary == RESA_SUMMARY_FP8_E4M3
                           ? (2.0 * o->d + 1.0) * o->batch * o->hkv * (double)M
                           : per_head * 2.0 * (double)M;
    res->sparse_bytes = sum_bytes + kv_head * 2.0 * 16.0 * (double)n_sel;
    res->summary = o->summary == RESA_SUMMARY_FP8_E4M3 ? "fp8" : "kv";
    res->fraction = o->fraction;
    res->interval = f;
    res->dense_gbps = res->dense_bytes / dense * 1e-9;
    res->sparse_gbps = res->sparse_bytes / sparse * 1e-9;
    res->dense_pct = copy_bw > 0 ? 100.0 * res->dense_bytes / dense / copy_bw : -1;
    res->sparse_pct = copy_bw > 0 ? 100.0 * res->sparse_bytes / sparse / copy_bw : -1;
    for (int i = 0; i < 4; i++)
        release(B, B->q[i]);
    release(B, B->out);
    release(B, B->k);
    release(B, B->v);
    resa_ctx_destroy(B->ctx);
    if (B->gpu)
        B->cu.StreamDestroy(B->stream);
    if (B->flush)
        B->cu.Free(B->flush);
    B->flush = NULL;
}

static void print_table_header(const opts *o, double copy_bw)
{
    printf("# resa-bench %s, backend %s, r %.3g, f %d, summaries %s, one layer, medians of %d\n"
           "# dense = RESA_MODE_DECODE with r = 1 on the same kernels; resa = sparse + "
           "rectify/f;\n# %%copy = bytes the step must read / time / device copy bandwidth%s\n",
           resa_version_string(), o->backend == RESA_BACKEND_CPU ? "cpu" : "cuda/auto",
           o->fraction, o->interval > 0 ? o->interval : 32,
           o->summary == RESA_SUMMARY_FP8_E4M3 ? "fp8" : "kv", o->reps,
           copy_bw > 0 ? "" : " (no GPU: not measured)");
    if (copy_bw > 0)
        printf("# device copy bandwidth (read + write): %.0f GB/s\n", copy_bw * 1e-9);
    if (o->cold && o->backend != RESA_BACKEND_CPU)
        printf("# --cold: L2 overwritten before each timed CUDA replay\n");
    printf("%9s %5s %9s %5s %10s %10s %11s %10s %8s %8s %6s %8s %6s\n", "context", "batch",
           "heads", "d", "dense_ms", "sparse_ms", "rectify_ms", "resa_ms", "speedup",
           "dns_GB/s", "%copy", "spr_GB/s", "%copy");
}

/* A measured value in fmt, or `none` when it was not measured (NaN, or -1
 * for a bandwidth share without a GPU). */
static const char *num(char *buf, size_t cap, double v, const char *fmt, const char *none)
{
    if (v != v || v < 0)
        return none;
    snprintf(buf, cap, fmt, v);
    return buf;
}

static void print_row(const result *r)
{
    char heads[16], b[9][32];
    snprintf(heads, sizeof heads, "%d/%d", r->hq, r->hkv);
    printf("%9lld %5d %9s %5d %10s %10s %11s %10s %8s %8s %6s %8s %6s\n",
           (long long)r->context, r->batch, heads, r->d,
           num(b[0], 32, r->dense_ms, "%.4f", "-"), num(b[1], 32, r->sparse_ms, "%.4f", "-"),
           num(b[2], 32, r->rectify_ms, "%.4f", "-"), num(b[3], 32, r->resa_ms, "%.4f", "-"),
           num(b[4], 32, r->dense_ms / r->resa_ms, "%.2fx", "-"),
           num(b[5], 32, r->dense_gbps, "%.1f", "-"), num(b[6], 32, r->dense_pct, "%.1f", "-"),
           num(b[7], 32, r->sparse_gbps, "%.1f", "-"), num(b[8], 32, r->sparse_pct, "%.1f", "-"));
    fflush(stdout);
}

static const char *csv_header =
    "context,batch,hq,hkv,d,backend,dtype,dense_ms,sparse_ms,rectify_ms,resa_ms,speedup,"
    "dense_bytes,sparse_bytes,dense_GBps,sparse_GBps,dense_pct_copy_bw,sparse_pct_copy_bw,"
    "summary,fraction,interval,kv_dtype";

/* Unmeasured values are empty fields. */
static void print_csv(FILE *f, const result *r)
{
    char b[9][32];
    fprintf(f, "%lld,%d,%d,%d,%d,%s,%s,%s,%s,%s,%s,%s,%.0f,%.0f,%s,%s,%s,%s,%s,%g,%d,%s\n",
            (long long)r->context, r->batch, r->hq, r->hkv, r->d, r->backend, r->dtype,
            num(b[0], 32, r->dense_ms, "%.4f", ""), num(b[1], 32, r->sparse_ms, "%.4f", ""),
            num(b[2], 32, r->rectify_ms, "%.4f", ""), num(b[3], 32, r->resa_ms, "%.4f", ""),
            num(b[4], 32, r->dense_ms / r->resa_ms, "%.3f", ""),
            r->dense_bytes, r->sparse_bytes,
            num(b[5], 32, r->dense_gbps, "%.1f", ""), num(b[6], 32, r->sparse_gbps, "%.1f", ""),
            num(b[7], 32, r->dense_pct, "%.1f", ""), num(b[8], 32, r->sparse_pct, "%.1f", ""),
            r->summary, r->fraction, r->interval, r->kv_dtype);
    fflush(f);
}

/* A JSON number, or null when not measured. */
static const char *jnum(char *buf, size_t cap, double v, const char *fmt)
{
    return num(buf, cap, v, fmt, "null");
}

static void print_json(const opts *o, const result *r, int n, double copy_bw)
{
    printf("{\"tool\": \"resa-bench\", \"version\": \"%s\", \"fraction\": %g, \"interval\": %d,"
           " \"copy_GBps\": %.1f, \"points\": [\n",
           resa_version_string(), o->fraction, o->interval > 0 ? o->interval : 32,
           copy_bw * 1e-9);
    for (int i = 0; i < n; i++) {
        char b[8][32];
        printf("  {\"context\": %lld, \"batch\": %d, \"hq\": %d, \"hkv\": %d, \"d\": %d, "
               "\"backend\": \"%s\", \"dtype\": \"%s\", \"kv_dtype\": \"%s\", \"summary\": \"%s\", "
               "\"dense_ms\": %s, \"sparse_ms\": %s, "
               "\"rectify_ms\": %s, \"resa_ms\": %s, \"speedup\": %s, "
               "\"dense_GBps\": %s, \"sparse_GBps\": %s, \"sparse_pct_copy_bw\": %s}%s\n",
               (long long)r[i].context, r[i].batch, r[i].hq, r[i].hkv, r[i].d, r[i].backend,
               r[i].dtype, r[i].kv_dtype, r[i].summary, jnum(b[0], 32, r[i].dense_ms, "%.4f"),
               jnum(b[1], 32, r[i].sparse_ms, "%.4f"), jnum(b[2], 32, r[i].rectify_ms, "%.4f"),
               jnum(b[3], 32, r[i].resa_ms, "%.4f"),
               jnum(b[4], 32, r[i].dense_ms / r[i].resa_ms, "%.3f"),
               jnum(b[5], 32, r[i].dense_gbps, "%.1f"), jnum(b[6], 32, r[i].sparse_gbps, "%.1f"),
               jnum(b[7], 32, r[i].sparse_pct, "%.1f"), i + 1 < n ? "," : "");
    }
    printf("]}\n");
}

/* --plot: speedup and sparse bandwidth against context length, drawn by
 * python3 + matplotlib when they are there (the CSV goes through a pipe). */
static void plot(const char *file, const result *r, int n)
{
    static const char *script =
        "import csv, sys\n"
        "try:\n"
        "    import matplotlib\n"
        "    matplotlib.use('Agg')\n"
        "    import matplotlib.pyplot as plt\n"
        "except ImportError:\n"
        "    sys.exit('resa-bench: --plot needs matplotlib')\n"
        "rows = list(csv.DictReader(sys.stdin))\n"
        "fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))\n"
        "for key in sorted({(r['batch'], r['hq'], r['hkv'], r['d']) for r in rows}):\n"
        "    pts = [r for r in rows if (r['batch'], r['hq'], r['hkv'], r['d']) == key]\n"
        "    x = [int(r['context']) for r in pts]\n"
        "    lab = 'batch %s, %s/%s heads, d %s' % key\n"
        "    a.plot(x, [float(r['speedup']) for r in pts], 'o-', label=lab)\n"
        "    b.plot(x, [float(r['sparse_GBps']) for r in pts], 'o-', label=lab)\n"
        "for ax, t in ((a, 'ReSA speedup over dense decode'), (b, 'sparse decode GB/s')):\n"
        "    ax.set_xscale('log', base=2); ax.set_xlabel('context (tokens)'); ax.set_title(t)\n"
        "    ax.grid(True, alpha=0.3); ax.legend(fontsize=7)\n"
        "fig.tight_layout(); fig.savefig(sys.argv[1], dpi=120)\n";
    char cmd[4096];
    FILE *tmp = fopen("/tmp/resa-bench-plot.py", "w");
    if (!tmp) {
        fprintf(stderr, "resa-bench: --plot: cannot write its script\n");
        return;
    }
    fputs(script, tmp);
    fclose(tmp);
    snprintf(cmd, sizeof cmd, "python3 /tmp/resa-bench-plot.py '%s'", file);
    FILE *py = popen(cmd, "w");
    if (!py) {
        fprintf(stderr, "resa-bench: --plot: python3 is not available\n");
        return;
    }
    fprintf(py, "%s\n", csv_header);
    for (int i = 0; i < n; i++)
        print_csv(py, &r[i]);
    int rc = pclose(py);
    if (rc == 0)
        fprintf(stderr, "resa-bench: plot written to %s\n", file);
}

/* The usage text, with every option's real default. */
static void print_usage(FILE *f)
{
    fprintf(f,
            "usage: resa-bench [OPTION]...\n"
            "Times one layer's decode-step attention, dense vs ReSA, per context length.\n"
            "Progress goes to stderr, results to stdout (a table, --csv or --json).\n"
            "\n"
            "  --backend cpu|cuda|auto    backend to time (default cpu)\n"
            "  --contexts N,N,...         context lengths in tokens (default 4096,16384,65536)\n"
            "  --batch B,B,...            sequences per step, 1 to 256 (default 1)\n"
            "  --heads HQ/HKV             query and KV heads (default 32/8)\n"
            "  --dim D                    head dimension (default 128)\n"
            "  --shapes HQ/HKVxD,...      several head shapes, e.g. 32/8x128,28/4x128;\n"
            "                             replaces --heads and --dim (default 32/8x128)\n"
            "  --dtype f32|f16|bf16       K/V and I/O type (default f32 on cpu, bf16 on cuda)\n"
            "  --kv-dtype fp8             an fp8 KV cache (I/O stays --dtype)\n"
            "  --fraction R               SELECT_FRACTION of the sparse steps (default 0.1)\n"
            "  --interval F               rectification interval f (default 32)\n"
            "  --summary kv|fp8           block summaries in the K/V type or fp8 (default kv)\n"
            "  --sink N                   SINK_BLOCKS of the sparse steps (default: the library's)\n"
            "  --width W                  SCORE_WIDTH of the sparse steps (default: the library's)\n"
            "  --group-score pooled|head-share  GROUP_SCORE of the sparse steps (default: the library's)\n"
            "  --reps N                   repetitions per measured median (default 21)\n"
            "  --threads N                CPU worker threads (default 0: one per online CPU)\n"
            "  --modes dense,sparse,rectify  what to measure (default all three)\n"
            "  --cold                     CUDA: overwrite L2 (256 MB) before each timed replay\n"
            "  --csv                      CSV on stdout instead of the table\n"
            "  --json                     JSON on stdout instead of the table\n"
            "  --plot FILE.png            also plot speedup and GB/s (needs matplotlib)\n"
            "  -h, --help                 print this help on stdout and exit\n"
            "\n"
            "Values that were not measured print as empty CSV fields, '-' in the table\n"
            "and null in JSON.\n");
}

static void usage(void)
{
    print_usage(stderr);
    exit(2);
}

/* A bad or unknown option: named on stderr, then the usage, exit 2. */
static void bad_option(const char *what, const char *arg)
{
    fprintf(stderr, "resa-bench: %s: %s\n", what, arg);
    usage();
}

static int parse_list(const char *val, int64_t *out, int cap)
{
    int n = 0;
    for (char *p = (char *)val; *p && n < cap;) {
        char *end;
        out[n++] = strtoll(p, &end, 10);
        if (end == p)
            usage();
        p = end;
        if (*p == ',')
            p++;
    }
    return n;
}

int main(int argc, char **argv)
{
    opts o = {0};
    o.backend = RESA_BACKEND_CPU;
    o.contexts[0] = 4096, o.contexts[1] = 16384, o.contexts[2] = 65536, o.n_contexts = 3;
    o.batches[0] = 1, o.n_batches = 1;
    int32_t hq = 32, hkv = 8, d = 128;
    o.reps = 21;
    o.interval = 32;
    o.fraction = 0.1;
    o.sink = -1;   /* the library's defaults */
    o.width = -1.0;
    o.group = -1;
    o.dtype = -1;
    o.modes = 7;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *val = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--csv")) {
            o.csv = 1;
            continue;
        }
        if (!strcmp(a, "--json")) {
            o.json = 1;
            continue;
        }
        if (!strcmp(a, "--cold")) {
            o.cold = 1;
            continue;
        }
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            print_usage(stdout);
            return 0;
        }
        if (!val) {
            static const char *const valued[] = {
                "--backend", "--contexts", "--batch", "--heads", "--dim", "--shapes",
                "--dtype", "--kv-dtype", "--fraction", "--sink", "--width", "--group-score", "--summary", "--interval",
                "--reps", "--threads", "--plot", "--modes"};
            for (size_t j = 0; j < sizeof valued / sizeof valued[0]; j++)
                if (!strcmp(a, valued[j]))
                    bad_option("option needs a value", a);
            bad_option("unknown option", a);
        }
        i++;
        if (!strcmp(a, "--backend"))
            o.backend = !strcmp(val, "cuda") ? RESA_BACKEND_CUDA
                        : !strcmp(val, "auto") ? RESA_BACKEND_AUTO : RESA_BACKEND_CPU;
        else if (!strcmp(a, "--contexts"))
            o.n_contexts = parse_list(val, o.contexts, 32);
        else if (!strcmp(a, "--batch")) {
            int64_t b[16];
            o.n_batches = parse_list(val, b, 16);
            for (int j = 0; j < o.n_batches; j++)
                o.batches[j] = (int32_t)b[j];
        } else if (!strcmp(a, "--heads")) {
            if (sscanf(val, "%d/%d", &hq, &hkv) != 2)
                usage();
        } else if (!strcmp(a, "--dim"))
            d = atoi(val);
        else if (!strcmp(a, "--shapes")) {
            o.n_shapes = 0;
            for (const char *p = val; *p && o.n_shapes < 8;) {
                int used = 0;
                int32_t *sh = o.shapes[o.n_shapes];
                if (sscanf(p, "%d/%dx%d%n", &sh[0], &sh[1], &sh[2], &used) != 3)
                    usage();
                o.n_shapes++;
                p += used;
                if (*p == ',')
                    p++;
            }
        } else if (!strcmp(a, "--dtype"))
            o.dtype = !strcmp(val, "f16") ? RESA_DTYPE_F16
                      : !strcmp(val, "bf16") ? RESA_DTYPE_BF16 : RESA_DTYPE_F32;
        else if (!strcmp(a, "--kv-dtype")) {
            if (strcmp(val, "fp8") && strcmp(val, "io")) {
                fprintf(stderr, "resa-bench: --kv-dtype: fp8 or io, not '%s'\n", val);
                return 2;
            }
            o.kv_fp8 = !strcmp(val, "fp8");
        }
        else if (!strcmp(a, "--fraction"))
            o.fraction = atof(val);
        else if (!strcmp(a, "--sink"))
            o.sink = atoi(val);
        else if (!strcmp(a, "--width"))
            o.width = atof(val);
        else if (!strcmp(a, "--group-score")) {
            if (!strcmp(val, "pooled"))
                o.group = RESA_GROUP_SCORE_POOLED;
            else if (!strcmp(val, "head-share"))
                o.group = RESA_GROUP_SCORE_HEAD_SHARE;
            else {
                fprintf(stderr, "resa-bench: --group-score: pooled or head-share, not '%s'\n", val);
                return 2;
            }
        }
        else if (!strcmp(a, "--summary")) {
            if (strcmp(val, "kv") && strcmp(val, "fp8"))
                usage();
            o.summary = !strcmp(val, "fp8") ? RESA_SUMMARY_FP8_E4M3 : RESA_SUMMARY_KV_DTYPE;
        } else if (!strcmp(a, "--interval"))
            o.interval = atoi(val);
        else if (!strcmp(a, "--reps"))
            o.reps = atoi(val);
        else if (!strcmp(a, "--threads"))
            o.threads = atoi(val);
        else if (!strcmp(a, "--plot"))
            o.plot = val;
        else if (!strcmp(a, "--modes")) {
            o.modes = (strstr(val, "dense") ? 1 : 0) | (strstr(val, "sparse") ? 2 : 0) |
                      (strstr(val, "rectify") ? 4 : 0);
            if (!o.modes)
                usage();
        }
        else
            bad_option("unknown option", a);
    }
    if (o.n_shapes == 0) {
        o.shapes[0][0] = hq, o.shapes[0][1] = hkv, o.shapes[0][2] = d;
        o.n_shapes = 1;
    }
    for (int i = 0; i < o.n_batches; i++)
        if (o.batches[i] < 1 || o.batches[i] > 256)
            usage();
    for (int i = 0; i < o.n_shapes; i++)
        if (o.shapes[i][0] < 1 || o.shapes[i][1] < 1 || o.shapes[i][2] < 1 ||
            o.shapes[i][0] % o.shapes[i][1] != 0)
            usage();
    if (o.reps < 1 || o.n_contexts < 1 || (o.csv && o.json))
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
    int n_points = o.n_shapes * o.n_batches * o.n_contexts, n = 0;
    result *res = calloc((size_t)n_points, sizeof *res);
    if (o.csv)
        printf("%s\n", csv_header);
    else if (!o.json)
        print_table_header(&o, copy_bw);
    for (int s = 0; s < o.n_shapes; s++)
        for (int b = 0; b < o.n_batches; b++)
            for (int c = 0; c < o.n_contexts; c++) {
                o.hq = o.shapes[s][0], o.hkv = o.shapes[s][1], o.d = o.shapes[s][2];
                o.batch = o.batches[b];
                run_context(&o, o.contexts[c], copy_bw, &res[n]);
                if (o.csv)
                    print_csv(stdout, &res[n]);
                else if (!o.json)
                    print_row(&res[n]);
                n++;
            }
    if (o.json)
        print_json(&o, res, n, copy_bw);
    if (o.plot)
        plot(o.plot, res, n);
    free(res);
    return 0;
}
