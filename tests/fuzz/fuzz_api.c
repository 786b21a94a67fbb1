/* SPDX-License-Identifier: MIT */
/*
 * libFuzzer target: the input bytes become a session of API calls on a CPU
 * context (create, parameters, sequences, steps in every mode, queries,
 * selection record, reset, destroy, calls with NULL; since 0.3.0 also the
 * context-parallel calls: spans, the QUERY modes, block scores, thresholds,
 * step_attend_ex with lse and thresholds, the merges), and every status and
 * the visible state after every call are checked against the shadow model
 * (shadow.h).  Any disagreement, a leak through the allocator hooks or a
 * wrong attention output calls abort() with a message that names the call.
 *
 * Every buffer handed to the library is allocated with exactly the bytes the
 * call may touch, so an overrun is an AddressSanitizer report.  Sizes are
 * kept small (a lock that would allocate more than FZ_LOCK_BYTES is skipped)
 * and NUM_THREADS is 1 or 2, so one input runs in milliseconds.
 *
 * The same file builds without libFuzzer: replay_main.c feeds it the corpus
 * (tests/fuzz/corpus) as an ordinary test.  RESA_FUZZ_TRACE=1 prints every
 * call.  docs/fuzzing.md says how to run it.
 */
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <resa.h>

#include "shadow.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define FZ_LOCK_BYTES (24.0 * 1024 * 1024) /* larger locks are not attempted */
#define FZ_MAX_OPS 3000
#define FZ_MAX_LIST (1 << 16) /* candidate list slots ([n_entries][hkv][capacity]) at most */

/* ---- the allocator hooks: exact sizes, counted, optionally failing ---- */
typedef struct fz_alloc {
    int64_t live;        /* blocks handed out and not freed */
    int64_t calls;       /* alloc calls so far */
    int64_t fail_at;     /* the alloc call with this number fails (0: none) */
    int64_t failed;      /* failures injected so far */
    pthread_t owner;     /* the thread that makes the API calls */
    const char *bad;     /* a broken rule of docs/API.md ("Allocator") */
} fz_alloc;

static void *fz_alloc_fn(void *user, size_t size, size_t align)
{
    fz_alloc *a = user;
    if (align != 64)
        a->bad = "the library called alloc with align != 64";
    if (!pthread_equal(pthread_self(), a->owner))
        a->bad = "alloc called from a thread other than the caller's";
    if (++a->calls == a->fail_at) {
        a->failed++;
        return NULL;
    }
    void *p = NULL;
    if (posix_memalign(&p, 64, size ? size : 1) != 0)
        return NULL;
    memset(p, 0xa5, size); /* the library zero-fills what it gets */
    a->live++;
    return p;
}

static void fz_free_fn(void *user, void *ptr)
{
    fz_alloc *a = user;
    if (!ptr)
        a->bad = "free called with NULL";
    if (!pthread_equal(pthread_self(), a->owner))
        a->bad = "free called from a thread other than the caller's";
    a->live--;
    free(ptr);
}

/* ---- totals over all inputs of the process (RESA_FUZZ_STATS=1 prints them) ---- */
static struct fz_stats {
    int64_t inputs, calls, contexts, locks, injected;
    int64_t modes[7], cow, rows_checked, sparse_checked;
    int64_t lse_checked, split_entries, lists_checked, thresholds_checked, thr_selections;
    int64_t merge_rows_checked, poison_rows, qnan_rows, fp8_rows;
} stats;

static void print_stats(void)
{
    fprintf(stderr,
            "resa fuzz stats: %lld inputs, %lld API calls checked, %lld contexts, %lld locks, "
            "%lld injected allocation failures; step entries: %lld APPEND, %lld dense DECODE, "
            "%lld sparse DECODE, %lld RECTIFY, %lld APPEND_KV; %lld copy-on-write pages; "
            "%lld output rows compared with the reference (%lld sparse decodes)\n"
            "resa fuzz stats (context parallelism): step entries: %lld QUERY_DENSE, %lld "
            "QUERY_SPARSE, %lld on a split sequence; %lld lse values compared with the "
            "reference; %lld block_scores lists equal to the model's; %lld thresholds "
            "recomputed; %lld selections by a threshold predicted exactly; %lld merged rows "
            "compared with float64\n"
            "resa fuzz stats (fp8 cache, non-finite inputs): %lld of the rows compared over an fp8 "
            "cache; %lld rows with a NaN q (%lld) or that attend a non-finite V found "
            "non-finite\n",
            (long long)stats.inputs, (long long)stats.calls, (long long)stats.contexts,
            (long long)stats.locks, (long long)stats.injected, (long long)stats.modes[0],
            (long long)stats.modes[1], (long long)stats.modes[4], (long long)stats.modes[2],
            (long long)stats.modes[3], (long long)stats.cow, (long long)stats.rows_checked,
            (long long)stats.sparse_checked, (long long)stats.modes[5],
            (long long)stats.modes[6], (long long)stats.split_entries,
            (long long)stats.lse_checked, (long long)stats.lists_checked,
            (long long)stats.thresholds_checked, (long long)stats.thr_selections,
            (long long)stats.merge_rows_checked, (long long)stats.fp8_rows,
            (long long)stats.poison_rows, (long long)stats.qnan_rows);
}

/* ---- the session: up to two contexts, each with its model and hooks ---- */
typedef struct fz_ctx {
    resa_ctx *ctx;       /* NULL: none */
    shadow m;
    int custom_alloc;
    fz_alloc al;
} fz_ctx;

typedef struct fz {
    const uint8_t *p;
    size_t n, i;
    int op;
    const char *call;    /* the call being checked, for messages */
    int trace;
    int cuda_available;
    fz_ctx cx[2];        /* distinct contexts are independent: calls interleave */
    fz_ctx *c;           /* the one the next calls go to */
    uint64_t rng;
    char msg[1024];      /* the call, for messages */
    char detail[1024];   /* what the model found wrong */
    unsigned kind;       /* how the next step's K is drawn (grid_value) */
    int poison;          /* the next step_attend's V gets this SH_ code (0: none) */
    int poison_q;        /* the next step_attend's q gets a NaN */
} fz;

static uint8_t u8(fz *f)
{
    return f->i < f->n ? f->p[f->i++] : 0;
}
static int more(const fz *f)
{
    return f->i < f->n;
}

static uint64_t next_rand(fz *f)
{
    uint64_t z = (f->rng += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* One q, k or v element in [-8, 8] (the value is that / 8): uniform, or
 * from {-8, 0, 8} (score ties), or mostly 0 (narrow min/max boxes, so a
 * stale summary changes the ranking), or all 0 (every score ties). */
static int8_t grid_value(fz *f, unsigned kind)
{
    uint64_t r = next_rand(f);
    switch (kind % 8) {
    case 1: case 2: return (int8_t)(8 * (int)(r % 3) - 8);
    case 3: case 4: return (int8_t)(r % 8 ? 0 : r & 8 ? 8 : -8);
    case 5: return 0;
    default: return (int8_t)((int)(r % 17) - 8);
    }
}

static void fail(fz *f, const char *fmt, ...)
{
    va_list ap;
    fprintf(stderr, "resa fuzz: MISMATCH at op %d, input byte %zu, in %s: ", f->op, f->i,
            f->call ? f->call : "?");
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    if (f->c->ctx)
        fprintf(stderr, "\n  last error: \"%s\"", resa_ctx_last_error(f->c->ctx));
    fprintf(stderr, "\n");
    abort();
}

static void trace(fz *f, const char *fmt, ...)
{
    if (!f->trace)
        return;
    va_list ap;
    fprintf(stderr, "[%d] ", f->op);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fprintf(stderr, "\n");
}

/* A call on f->c->ctx returned `got`; the model says `want`.  An allocation
 * failure injected during the call may turn any status into
 * RESA_ERR_OUT_OF_MEMORY; returns 1 when that happened. */
static int expect(fz *f, const char *call, resa_status got, resa_status want, int64_t failed_before)
{
    f->call = call;
    stats.calls++;
    int injected = f->c->custom_alloc && f->c->al.failed != failed_before;
    stats.injected += injected;
    trace(f, "%s -> %s (model %s)%s", call, resa_status_name(got), resa_status_name(want),
          injected ? " [allocation failure injected]" : "");
    if (f->c->al.bad)
        fail(f, "allocator hooks: %s", f->c->al.bad);
    if (injected && got == RESA_OK)
        fail(f, "an allocation failed but the call returned RESA_OK");
    if (got != want && !(injected && got == RESA_ERR_OUT_OF_MEMORY))
        fail(f, "status %s, the model says %s", resa_status_name(got), resa_status_name(want));
    const char *e = resa_ctx_last_error(f->c->ctx);
    if (!e)
        fail(f, "resa_ctx_last_error returned NULL");
    size_t len = strnlen(e, 600);
    if (len > 511)
        fail(f, "last error longer than 511 characters");
    if (got == RESA_OK && len != 0)
        fail(f, "RESA_OK but the last error is \"%s\"", e);
    if (got != RESA_OK && len == 0)
        fail(f, "%s with an empty last error", resa_status_name(got));
    return injected && got == RESA_ERR_OUT_OF_MEMORY;
}

static void expect_names(fz *f, const char *what)
{
    if (!strstr(resa_ctx_last_error(f->c->ctx), what))
        fail(f, "the last error does not name %s", what);
}

/* ---- picking values ---- */

#define PICK(f, arr) ((arr)[u8(f) % (sizeof(arr) / sizeof((arr)[0]))])

static int64_t pick_int(fz *f, int p)
{
    static const int64_t layers[] = {1, 2, 3, 1, 2, 0, 4097, -1};
    static const int64_t qheads[] = {1, 2, 4, 8, 3, 6, 2, 0, 1025};
    static const int64_t kvheads[] = {1, 2, 1, 4, 3, 1, 0, 1025};
    static const int64_t head_dim[] = {1, 2, 3, 4, 8, 16, 5, 32, 2, 4, 64, 256, 0, 257};
    static const int64_t dtype[] = {0, 1, 2, 0, 1, 2, 3, -1};
    static const int64_t max_tokens[] = {1, 2, 3, 7, 16, 17, 32, 48, 64, 100, 128, 200, 256,
                                         300, 1ll << 38, 1ll << 40, 0, (1ll << 40) + 1, -5};
    static const int64_t max_seqs[] = {1, 2, 3, 4, 8, 3, 65535, 0, 65536};
    static const int64_t max_seq_tokens[] = {0, 1, 5, 16, 33, 64, 100, 256, 0, 1ll << 40, -1,
                                             (1ll << 40) + 1};
    static const int64_t max_step[] = {1, 2, 4, 8, 16, 33, 64, 512, 8192, 0, (1ll << 30) + 1};
    static const int64_t summary[] = {0, 1, 0, 1, 2, -1};
    static const int64_t block[] = {1, 2, 4, 8, 16, 32, 256, 2, 4, 3, 0, 512, 6};
    static const int64_t min_blocks[] = {0, 1, 2, 3, 16, 0, 1 << 30, -1, (1 << 30) + 1};
    static const int64_t local[] = {1, 2, 3, 1, 1 << 30, 0, -1};
    static const int64_t sink[] = {0, 1, 2, 0, 1 << 30, -1};
    static const int64_t interval[] = {0, 1, 2, 3, 4, 8, 32, 1 << 30, -1};
    static const int64_t group[] = {0, 1, 0, 1, 2, -1};
    static const int64_t threads[] = {1, 1, 1, 1, 1, 1, 1, 2, -1, 1025};
    static const int64_t record[] = {0, 1, 1, 2, -1};
    static const int64_t other[] = {0, 1, 2, -1, 16, INT64_MAX, INT64_MIN};
    switch (p) {
    case P_LAYERS: return PICK(f, layers);
    case P_QHEADS: return PICK(f, qheads);
    case P_KVHEADS: return PICK(f, kvheads);
    case P_HEAD_DIM: return PICK(f, head_dim);
    case P_KV_DTYPE: case P_IO_DTYPE: return PICK(f, dtype);
    case P_MAX_TOKENS: return PICK(f, max_tokens);
    case P_MAX_SEQS: return PICK(f, max_seqs);
    case P_MAX_SEQ_TOKENS: return PICK(f, max_seq_tokens);
    case P_MAX_STEP: return PICK(f, max_step);
    case P_SUMMARY: return PICK(f, summary);
    case P_BLOCK: return PICK(f, block);
    case P_MIN_BLOCKS: return PICK(f, min_blocks);
    case P_LOCAL: return PICK(f, local);
    case P_SINK: return PICK(f, sink);
    case P_INTERVAL: return PICK(f, interval);
    case P_GROUP: return PICK(f, group);
    case P_THREADS: return PICK(f, threads);
    case P_RECORD: return PICK(f, record);
    default: return PICK(f, other);
    }
}

static double pick_real(fz *f, int p)
{
    static const double fraction[] = {0, 0.1, 0.25, 0.5, 1, 0.07, 1e-7, 0.3333, -0.0, -0.01,
                                      1.01, NAN, INFINITY};
    static const double scale[] = {0, 0.125, 0.5, 1, 2, 0.3, 1e6, 1e-300, -1, 1000000.1, NAN,
                                   -INFINITY};
    static const double width[] = {0, 0.25, 0.5, 1, 0.3, 0.75, -0.1, 1.1, NAN};
    static const double other[] = {0, 1, 16, -1, 0.5, NAN};
    switch (p) {
    case P_FRACTION: return PICK(f, fraction);
    case P_SCALE: return PICK(f, scale);
    case P_WIDTH: return PICK(f, width);
    default: return PICK(f, other);
    }
}

/* A parameter id: mostly one of resa.h's, sometimes an unknown one. */
static int32_t pick_param(fz *f)
{
    static const int32_t unknown[] = {RESA_PARAM_EXPERIMENTAL_1, 99, 111, 209, 302, 0, -1};
    uint8_t c = u8(f);
    if (c < 240)
        return sh_params[c % SH_NPARAMS].id;
    return unknown[c % (sizeof unknown / sizeof unknown[0])];
}

static int32_t n_live(const fz *f)
{
    int32_t n = 0;
    for (int64_t i = 0; f->c->m.locked && i < f->c->m.iv[P_MAX_SEQS]; i++)
        n += f->c->m.seqs[i].live;
    return n;
}

static const sh_seq *live_seq(const fz *f, int32_t k) /* the k-th live sequence */
{
    for (int64_t i = 0; i < f->c->m.iv[P_MAX_SEQS]; i++)
        if (f->c->m.seqs[i].live && k-- == 0)
            return &f->c->m.seqs[i];
    return NULL;
}

/* A sequence id: mostly live, else one resa.h guarantees unknown. */
static int32_t pick_id(fz *f)
{
    uint8_t c = u8(f), x = u8(f);
    int32_t live = n_live(f);
    switch (c % 16) {
    case 11:
        if (f->c->m.n_stale)
            return f->c->m.stale[x % f->c->m.n_stale];
        break;
    case 12:
        return x & 1 ? -1 : INT32_MIN;
    case 13:
        return (int32_t)((uint32_t)(x & 0x7f) << 16) | 0xffff; /* slot past any MAX_SEQUENCES */
    case 14:
        if (live)
            return live_seq(f, x % live)->id ^ (1 << 16); /* the slot's other generation */
        break;
    case 15:
        for (int64_t i = 0; f->c->m.locked && i < f->c->m.iv[P_MAX_SEQS]; i++)
            if (!f->c->m.seqs[i].live)
                return (int32_t)((uint32_t)(x & 0x7f) << 16) | (int32_t)i; /* a free slot */
        break;
    default:
        if (live)
            return live_seq(f, x % live)->id;
    }
    return live ? live_seq(f, 0)->id : -7;
}

/* ---- the visible state against the model ---- */

static void check_state(fz *f)
{
    shadow *m = &f->c->m;
    for (int i = 0; i < SH_NPARAMS; i++) {
        f->call = sh_params[i].name;
        if (sh_params[i].real) {
            double v = -12345;
            resa_status s = resa_ctx_get_param_f64(f->c->ctx, (resa_param)sh_params[i].id, &v);
            if (s != RESA_OK || v != sh_get_real(m, i))
                fail(f, "get_param_f64 = %s, %.17g; the model has %.17g", resa_status_name(s), v,
                     sh_get_real(m, i));
        } else {
            int64_t v = -12345;
            resa_status s = resa_ctx_get_param(f->c->ctx, (resa_param)sh_params[i].id, &v);
            if (s != RESA_OK || v != sh_get_int(m, i))
                fail(f, "get_param = %s, %lld; the model has %lld", resa_status_name(s),
                     (long long)v, (long long)sh_get_int(m, i));
        }
    }
    f->call = "resa_ctx_free_tokens";
    int64_t t = -1;
    resa_status s = resa_ctx_free_tokens(f->c->ctx, &t);
    if (s != RESA_OK || t != sh_free_tokens(m))
        fail(f, "%s, %lld free tokens; the model has %lld", resa_status_name(s), (long long)t,
             (long long)sh_free_tokens(m));
    resa_backend b = RESA_BACKEND_AUTO;
    f->call = "resa_ctx_get_backend";
    if (resa_ctx_get_backend(f->c->ctx, &b) != RESA_OK || b != RESA_BACKEND_CPU)
        fail(f, "backend %d, not the CPU", (int)b);
    for (int64_t i = 0; m->locked && i < m->iv[P_MAX_SEQS]; i++) {
        const sh_seq *q = &m->seqs[i];
        if (!q->live)
            continue;
        int64_t len = -1, pending = -1;
        int32_t due = -1;
        f->call = "seq_length/seq_pending/seq_rectify_due";
        resa_status s1 = resa_seq_length(f->c->ctx, q->id, &len);
        resa_status s2 = resa_seq_pending(f->c->ctx, q->id, &pending);
        resa_status s3 = resa_seq_rectify_due(f->c->ctx, q->id, &due);
        int32_t want_due = m->iv[P_INTERVAL] > 0 && q->pending >= m->iv[P_INTERVAL];
        if (s1 || s2 || s3 || len != q->len || pending != q->pending || due != want_due)
            fail(f, "seq %d: %s/%s/%s length %lld pending %lld due %d; the model has %lld, %lld, "
                 "%d", q->id, resa_status_name(s1), resa_status_name(s2), resa_status_name(s3),
                 (long long)len, (long long)pending, due, (long long)q->len,
                 (long long)q->pending, want_due);
    }
    stats.calls += SH_NPARAMS + 2 + 3 * (int64_t)n_live(f) + (m->n_stale > 0);
    if (m->n_stale) { /* a released id stays unknown */
        int64_t len;
        f->call = "resa_seq_length (released id)";
        int32_t id = m->stale[m->n_stale - 1];
        if (resa_seq_length(f->c->ctx, id, &len) != RESA_ERR_INVALID_ARGUMENT)
            fail(f, "released id %d is live again", id);
    }
}

/* ---- contexts ---- */

static void destroy_ctx(fz *f)
{
    if (!f->c->ctx)
        return;
    trace(f, "resa_ctx_destroy");
    for (int i = 0; i < 7; i++)
        stats.modes[i] += f->c->m.n_entries_by_mode[i];
    stats.lse_checked += f->c->m.n_lse_checked;
    stats.split_entries += f->c->m.n_split_entries;
    stats.lists_checked += f->c->m.n_lists_checked;
    stats.thresholds_checked += f->c->m.n_thresholds_checked;
    stats.thr_selections += f->c->m.n_thr_selections;
    stats.cow += f->c->m.n_cow_copies;
    stats.rows_checked += f->c->m.n_rows_checked;
    stats.sparse_checked += f->c->m.n_sparse_checked;
    stats.poison_rows += f->c->m.n_poison_rows;
    stats.fp8_rows += f->c->m.n_fp8_rows;
    stats.qnan_rows += f->c->m.n_qnan_rows;
    stats.calls++;
    resa_ctx_destroy(f->c->ctx);
    f->c->ctx = NULL;
    sh_free(&f->c->m);
    f->call = "resa_ctx_destroy";
    if (f->c->al.bad)
        fail(f, "allocator hooks: %s", f->c->al.bad);
    if (f->c->custom_alloc && f->c->al.live != 0)
        fail(f, "%lld allocations not freed at destroy", (long long)f->c->al.live);
}

/* Creation: sometimes with wrong arguments first (those must fail and set
 * *out to NULL), then a CPU (or AUTO) context, maybe with the hooks. */
static void create_ctx(fz *f)
{
    uint8_t c = u8(f), a = u8(f);
    resa_ctx *ctx = (resa_ctx *)(void *)f; /* not NULL: failures must clear it */
    resa_status s;
    f->call = "resa_ctx_create";
    switch (c % 8) {
    case 0: /* out NULL */
        if (resa_ctx_create(RESA_BACKEND_CPU, NULL, NULL) != RESA_ERR_INVALID_ARGUMENT)
            fail(f, "out = NULL accepted");
        break;
    case 1: { /* unknown backend */
        int32_t bad = c & 8 ? 3 : -1;
        s = resa_ctx_create((resa_backend)bad, NULL, &ctx);
        if (s != RESA_ERR_INVALID_ARGUMENT || ctx)
            fail(f, "backend %d: %s", bad, resa_status_name(s));
        break;
    }
    case 2: { /* hooks without alloc or free */
        resa_allocator bad = {c & 8 ? fz_alloc_fn : NULL, c & 8 ? NULL : fz_free_fn, NULL};
        s = resa_ctx_create(RESA_BACKEND_CPU, &bad, &ctx);
        if (s != RESA_ERR_INVALID_ARGUMENT || ctx)
            fail(f, "an allocator without %s: %s", c & 8 ? "free" : "alloc",
                 resa_status_name(s));
        break;
    }
    case 3: /* CUDA where it is not available */
        if (!f->cuda_available) {
            s = resa_ctx_create(RESA_BACKEND_CUDA, NULL, &ctx);
            if ((s != RESA_ERR_NOT_SUPPORTED && s != RESA_ERR_NO_DEVICE &&
                 s != RESA_ERR_VERSION_MISMATCH) || ctx)
                fail(f, "CUDA without a usable GPU: %s", resa_status_name(s));
        }
        break;
    default:
        break;
    }
    resa_backend backend = (c % 8 == 4 && !f->cuda_available) ? RESA_BACKEND_AUTO
                                                              : RESA_BACKEND_CPU;
    memset(&f->c->al, 0, sizeof f->c->al);
    f->c->al.owner = pthread_self();
    f->c->custom_alloc = a & 1;
    resa_allocator hooks = {fz_alloc_fn, fz_free_fn, &f->c->al};
    if (f->c->custom_alloc && (a & 6) == 6)
        f->c->al.fail_at = 1 + (a >> 3) % 3; /* one of the first allocations fails */
    for (;;) {
        ctx = (resa_ctx *)(void *)f;
        int64_t before = f->c->al.failed;
        s = resa_ctx_create(backend, f->c->custom_alloc ? &hooks : NULL, &ctx);
        trace(f, "resa_ctx_create(%d, %s) -> %s", (int)backend, f->c->custom_alloc ? "hooks" : "NULL",
              resa_status_name(s));
        if (s == RESA_ERR_OUT_OF_MEMORY && f->c->al.failed != before && !ctx) {
            if (f->c->al.live != 0)
                fail(f, "a failed resa_ctx_create leaked %lld allocations", (long long)f->c->al.live);
            continue; /* the injected failure: try again */
        }
        if (s != RESA_OK || !ctx)
            fail(f, "resa_ctx_create: %s", resa_status_name(s));
        break;
    }
    f->c->ctx = ctx;
    stats.contexts++;
    sh_init(&f->c->m);
    check_state(f);
}

/* ---- calls, each checked against the model ---- */

static void do_set_param(fz *f, int32_t id, int64_t v)
{
    int64_t before = f->c->al.failed;
    resa_status want = sh_set_param(&f->c->m, id, v, 0);
    resa_status got = resa_ctx_set_param(f->c->ctx, (resa_param)id, v);
    snprintf(f->msg, sizeof f->msg, "resa_ctx_set_param(%d, %lld)", id, (long long)v);
    expect(f, f->msg, got, want, before);
    if (got == RESA_OK)
        sh_set_param(&f->c->m, id, v, 1);
}

static void do_set_param_f64(fz *f, int32_t id, double v)
{
    int64_t before = f->c->al.failed;
    resa_status want = sh_set_param_f64(&f->c->m, id, v, 0);
    resa_status got = resa_ctx_set_param_f64(f->c->ctx, (resa_param)id, v);
    snprintf(f->msg, sizeof f->msg, "resa_ctx_set_param_f64(%d, %g)", id, v);
    expect(f, f->msg, got, want, before);
    if (got == RESA_OK)
        sh_set_param_f64(&f->c->m, id, v, 1);
}

static void op_set_param(fz *f)
{
    int32_t id = pick_param(f);
    int i = sh_param_index(id);
    uint8_t c = u8(f);
    if (c & 1) { /* the other setter, or the right one with a value for that parameter */
        double v = i >= 0 ? pick_real(f, i) : 1.0;
        if (i >= 0 && !sh_params[i].real && (c & 2))
            v = (double)pick_int(f, i);
        do_set_param_f64(f, id, v);
    } else {
        do_set_param(f, id, i >= 0 ? pick_int(f, i) : pick_int(f, -1));
    }
}

static void op_get_param(fz *f)
{
    int32_t id = pick_param(f);
    uint8_t c = u8(f);
    int real = c & 1, null_out = (c & 6) == 6;
    int64_t before = f->c->al.failed, iv = 0;
    double dv = 0;
    resa_status want = sh_get_param(&f->c->m, id, real, null_out), got;
    if (real)
        got = resa_ctx_get_param_f64(f->c->ctx, (resa_param)id, null_out ? NULL : &dv);
    else
        got = resa_ctx_get_param(f->c->ctx, (resa_param)id, null_out ? NULL : &iv);
    snprintf(f->msg, sizeof f->msg, "resa_ctx_get_param%s(%d%s)", real ? "_f64" : "", id,
             null_out ? ", NULL" : "");
    expect(f, f->msg, got, want, before);
    if (got == RESA_OK) {
        int i = sh_param_index(id);
        if (real ? dv != sh_get_real(&f->c->m, i) : iv != sh_get_int(&f->c->m, i))
            fail(f, "read back %lld / %g", (long long)iv, dv);
    } else if (null_out && sh_param_index(id) >= 0 && sh_params[sh_param_index(id)].real == real) {
        expect_names(f, "value");
    }
}

static void op_bounds(fz *f)
{
    int32_t id = pick_param(f);
    uint8_t c = u8(f);
    int real = c & 1, null_lo = (c & 6) == 2, null_hi = (c & 6) == 4;
    int i = sh_param_index(id);
    resa_status want = (i < 0 || sh_params[i].real != real || null_lo || null_hi)
                           ? RESA_ERR_INVALID_ARGUMENT : RESA_OK, got;
    int64_t lo = 0, hi = 0;
    double dlo = 0, dhi = 0;
    f->call = "resa_param_bounds";
    if (real)
        got = resa_param_bounds_f64((resa_param)id, null_lo ? NULL : &dlo, null_hi ? NULL : &dhi);
    else
        got = resa_param_bounds((resa_param)id, null_lo ? NULL : &lo, null_hi ? NULL : &hi);
    trace(f, "resa_param_bounds%s(%d) -> %s", real ? "_f64" : "", id, resa_status_name(got));
    if (got != want)
        fail(f, "param %d: %s, the model says %s", id, resa_status_name(got),
             resa_status_name(want));
    if (got == RESA_OK && (real ? (dlo != sh_params[i].lo || dhi != sh_params[i].hi)
                                : (lo != (int64_t)sh_params[i].lo ||
                                   hi != (int64_t)sh_params[i].hi)))
        fail(f, "%s: bounds differ from resa.h", sh_params[i].name);
}

static void op_preset(fz *f)
{
    static const int32_t presets[] = {RESA_PRESET_DEFAULT, RESA_PRESET_PAPER, 2, -1};
    int32_t p = PICK(f, presets);
    int64_t before = f->c->al.failed;
    resa_status want = sh_set_preset(&f->c->m, p, 0);
    resa_status got = resa_ctx_set_preset(f->c->ctx, (resa_preset)p);
    snprintf(f->msg, sizeof f->msg, "resa_ctx_set_preset(%d)", p);
    expect(f, f->msg, got, want, before);
    if (got == RESA_OK)
        sh_set_preset(&f->c->m, p, 1);
}

static void op_reset(fz *f)
{
    static const uint32_t whats[] = {RESA_RESET_SESSION, RESA_RESET_SESSION, RESA_RESET_PARAMS,
                                     RESA_RESET_SESSION | RESA_RESET_PARAMS, 0, 4, 0x80000001u};
    uint32_t what = PICK(f, whats);
    int64_t before = f->c->al.failed;
    resa_status want = sh_reset(&f->c->m, what, 0);
    resa_status got = resa_ctx_reset(f->c->ctx, what);
    snprintf(f->msg, sizeof f->msg, "resa_ctx_reset(0x%x)", what);
    expect(f, f->msg, got, want, before);
    if (got == RESA_OK)
        sh_reset(&f->c->m, what, 1);
}

/* resa_seq_create; returns 1 when a sequence was created. */
static int do_create(fz *f, int null_out)
{
    int first_unset;
    int32_t slot;
    resa_status want = sh_seq_create(&f->c->m, null_out, &first_unset, &slot);
    if (want == RESA_OK && !f->c->m.locked) {
        if (f->c->m.iv[P_THREADS] != 1 && f->c->m.iv[P_THREADS] != 2)
            do_set_param(f, RESA_PARAM_NUM_THREADS, 1); /* not one thread per CPU */
        if (sh_lock_bytes(&f->c->m) > FZ_LOCK_BYTES)
            return 0; /* too big for a fast input: not attempted */
    }
    int32_t id = -99;
    int64_t before = f->c->al.failed;
    resa_status got = resa_seq_create(f->c->ctx, null_out ? NULL : &id);
    snprintf(f->msg, sizeof f->msg, "resa_seq_create(%s) = %d", null_out ? "NULL" : "&id", id);
    if (expect(f, f->msg, got, want, before))
        return 0;
    if (got != RESA_OK) {
        if (first_unset >= 0)
            expect_names(f, sh_params[first_unset].name);
        return 0;
    }
    if (id < 0 || (id & 0xffff) != slot || sh_is_stale(&f->c->m, id) || sh_slot(&f->c->m, id) >= 0)
        fail(f, "new id %d: not >= 0, not in the lowest free slot %d, or not new", id, slot);
    stats.locks += !f->c->m.locked;
    sh_seq_created(&f->c->m, slot, id);
    return 1;
}

static void op_release(fz *f)
{
    int32_t id = pick_id(f);
    int64_t before = f->c->al.failed;
    resa_status want = sh_seq_release(&f->c->m, id, 0);
    resa_status got = resa_seq_release(f->c->ctx, id);
    snprintf(f->msg, sizeof f->msg, "resa_seq_release(%d)", id);
    expect(f, f->msg, got, want, before);
    if (got == RESA_OK)
        sh_seq_release(&f->c->m, id, 1);
}

static void op_fork(fz *f)
{
    int32_t parent = pick_id(f), slot, child = -99;
    int null_out = (u8(f) & 15) == 15;
    int64_t before = f->c->al.failed;
    resa_status want = sh_seq_fork(&f->c->m, parent, null_out, &slot);
    resa_status got = resa_seq_fork(f->c->ctx, parent, null_out ? NULL : &child);
    snprintf(f->msg, sizeof f->msg, "resa_seq_fork(%d) = %d", parent, child);
    expect(f, f->msg, got, want, before);
    if (got != RESA_OK) {
        if (null_out && sh_slot(&f->c->m, parent) >= 0 && !f->c->m.step_open)
            expect_names(f, "child");
        return;
    }
    if (child < 0 || (child & 0xffff) != slot || sh_is_stale(&f->c->m, child) ||
        sh_slot(&f->c->m, child) >= 0)
        fail(f, "child id %d: not >= 0, not in the lowest free slot %d, or not new", child, slot);
    sh_seq_forked(&f->c->m, parent, slot, child);
}

static void op_query(fz *f)
{
    int32_t id = pick_id(f);
    uint8_t c = u8(f);
    int which = c % 3, null_out = (c & 0x38) == 0x38;
    static const char *names[] = {"length", "pending", "due"};
    int64_t v = -99;
    int32_t due = -99;
    int64_t before = f->c->al.failed;
    resa_status want = sh_query(&f->c->m, id, null_out), got;
    if (which == 0)
        got = resa_seq_length(f->c->ctx, id, null_out ? NULL : &v);
    else if (which == 1)
        got = resa_seq_pending(f->c->ctx, id, null_out ? NULL : &v);
    else
        got = resa_seq_rectify_due(f->c->ctx, id, null_out ? NULL : &due);
    snprintf(f->msg, sizeof f->msg, "resa_seq_%s(%d%s)", which == 2 ? "rectify_due" : names[which],
             id, null_out ? ", NULL" : "");
    expect(f, f->msg, got, want, before);
    if (got != RESA_OK) {
        if (null_out && sh_slot(&f->c->m, id) >= 0)
            expect_names(f, names[which]);
        return;
    }
    const sh_seq *q = &f->c->m.seqs[sh_slot(&f->c->m, id)];
    int32_t want_due = f->c->m.iv[P_INTERVAL] > 0 && q->pending >= f->c->m.iv[P_INTERVAL];
    if ((which == 0 && v != q->len) || (which == 1 && v != q->pending) ||
        (which == 2 && due != want_due))
        fail(f, "value %lld / %d", (long long)v, due);
}

static void op_free_tokens(fz *f)
{
    int null_out = u8(f) & 1;
    int64_t t = -1, before = f->c->al.failed;
    resa_status got = resa_ctx_free_tokens(f->c->ctx, null_out ? NULL : &t);
    expect(f, null_out ? "resa_ctx_free_tokens(NULL)" : "resa_ctx_free_tokens", got,
           null_out ? RESA_ERR_INVALID_ARGUMENT : RESA_OK, before);
    if (null_out)
        expect_names(f, "tokens");
    else if (t != sh_free_tokens(&f->c->m))
        fail(f, "%lld, the model has %lld", (long long)t, (long long)sh_free_tokens(&f->c->m));
}

static void op_stream(fz *f)
{
    uint8_t c = u8(f);
    int64_t before = f->c->al.failed;
    if (c & 1) {
        expect(f, "resa_ctx_synchronize", resa_ctx_synchronize(f->c->ctx), RESA_OK, before);
        return;
    }
    void *stream = (c & 2) ? (void *)f : NULL;
    resa_status want = f->c->m.step_open ? RESA_ERR_BAD_STATE
                       : stream       ? RESA_ERR_NOT_SUPPORTED : RESA_OK;
    expect(f, stream ? "resa_ctx_set_stream(non-NULL)" : "resa_ctx_set_stream(NULL)",
           resa_ctx_set_stream(f->c->ctx, stream), want, before);
}

static void op_selected(fz *f)
{
    int32_t id = pick_id(f);
    uint8_t c = u8(f), x = u8(f);
    int32_t layers = (int32_t)f->c->m.iv[P_LAYERS], hkv = (int32_t)f->c->m.iv[P_KVHEADS];
    int32_t layer = c & 0x80 ? (c & 1 ? -1 : layers) : (int32_t)(x % layers);
    int32_t head = c & 0x40 ? (c & 1 ? hkv : -1) : (int32_t)((x >> 4) % hkv);
    int slot = sh_slot(&f->c->m, id);
    int64_t full = 0;
    if (slot >= 0 && layer >= 0 && layer < layers && head >= 0 && head < hkv &&
        f->c->m.seqs[slot].rec[layer].has)
        full = f->c->m.seqs[slot].rec[layer].cnt_lo[head];
    int64_t capacity;
    switch ((c >> 1) & 7) {
    case 0: capacity = 0; break;
    case 1: capacity = 1; break;
    case 2: capacity = full > 0 ? full - 1 : 0; break;
    case 3: capacity = full + 1; break;
    case 4: capacity = c & 1 ? -1 : 300; break;
    default: capacity = full; break;
    }
    int blocks_null = (c & 0x31) == 0x31, count_null = (c & 0x31) == 0x30;
    int32_t *blocks = NULL;
    if (!blocks_null && capacity > 0)
        blocks = malloc(sizeof(int32_t) * (size_t)capacity);
    int64_t count = -99, before = f->c->al.failed;
    resa_status want = sh_selected(&f->c->m, id, layer, head, blocks == NULL, capacity, count_null);
    resa_status got = resa_seq_selected_blocks(f->c->ctx, id, layer, head, blocks, capacity,
                                               count_null ? NULL : &count);
    snprintf(f->msg, sizeof f->msg, "resa_seq_selected_blocks(%d, layer %d, head %d, %s, %lld)",
             id, layer, head, blocks ? "blocks" : "NULL", (long long)capacity);
    expect(f, f->msg, got, want, before);
    if (got == RESA_OK) {
        const char *bad = sh_check_selected(&f->c->m, id, layer, head, blocks, capacity, count,
                                            f->detail, sizeof f->detail);
        if (bad)
            fail(f, "%s", bad);
    } else if (count_null && slot >= 0) {
        expect_names(f, "count");
    }
    free(blocks);
}

/* ---- the step ---- */

static void do_begin(fz *f, int32_t n, const int32_t *ids, const int32_t *modes,
                     const int32_t *nt, uint32_t flags, int null_which)
{
    int32_t *a = NULL, *b = NULL, *c = NULL; /* exactly n elements each */
    if (n > 0 && n <= 64) {
        a = malloc(sizeof(int32_t) * (size_t)n);
        b = malloc(sizeof(int32_t) * (size_t)n);
        c = malloc(sizeof(int32_t) * (size_t)n);
        memcpy(a, ids, sizeof(int32_t) * (size_t)n);
        memcpy(b, modes, sizeof(int32_t) * (size_t)n);
        memcpy(c, nt, sizeof(int32_t) * (size_t)n);
    }
    const int32_t *pa = null_which == 1 ? NULL : a, *pb = null_which == 2 ? NULL : b;
    const int32_t *pc = null_which == 3 ? NULL : c;
    int64_t before = f->c->al.failed;
    resa_status want = sh_step_begin(&f->c->m, n, pa, pb, pc, flags, 0);
    resa_status got = resa_ctx_step_begin(f->c->ctx, n, pa, pb, pc, flags);
    int len = snprintf(f->msg, sizeof f->msg, "resa_ctx_step_begin(n %d, flags 0x%x:", n, flags);
    for (int32_t i = 0; i < n && i < 8 && pa && pb && pc && len < 900; i++)
        len += snprintf(f->msg + len, sizeof f->msg - (size_t)len, " [%d %d %d]", pa[i], pb[i],
                        pc[i]);
    snprintf(f->msg + len, sizeof f->msg - (size_t)len, ")");
    expect(f, f->msg, got, want, before);
    if (got == RESA_OK)
        sh_step_begin(&f->c->m, n, pa, pb, pc, flags, 1);
    free(a);
    free(b);
    free(c);
}

/* ---- context parallelism: spans, the two-phase selection, merges ---- */

static void do_set_span(fz *f, int32_t id, int64_t first, int64_t glen)
{
    int64_t before = f->c->al.failed;
    resa_status want = sh_set_span(&f->c->m, id, first, glen, 0);
    resa_status got = resa_seq_set_span(f->c->ctx, id, first, glen);
    snprintf(f->msg, sizeof f->msg, "resa_seq_set_span(%d, %lld, %lld)", id, (long long)first,
             (long long)glen);
    expect(f, f->msg, got, want, before);
    if (got == RESA_OK)
        sh_set_span(&f->c->m, id, first, glen, 1);
}

static void op_set_span(fz *f)
{
    int32_t id = pick_id(f);
    uint8_t c = u8(f), x = u8(f);
    int slot = sh_slot(&f->c->m, id);
    const sh_seq *q = slot >= 0 ? &f->c->m.seqs[slot] : NULL;
    int64_t b = f->c->m.iv[P_BLOCK], limit = ((int64_t)1 << 30) * b;
    int64_t first0 = q ? q->first : 0, end = q ? q->first + q->len : 0;
    int64_t firsts[] = {first0, 0, b, 2 * b, 5 * b, 64 * b, first0 + b, b / 2, b + 1, -b,
                        limit - b, limit, first0};
    int64_t first = firsts[c % 13];
    if (first != first0 || !q)
        end = first + (q ? q->len : 0);
    int64_t glens[] = {-1, -1, end, end + 1, end + b - 1, end + b, end + 3 * b + 1, end + 40 * b,
                       end - 1, -2, limit - b - 1, limit - b, limit - 1, limit, INT64_MAX,
                       INT64_MIN};
    do_set_span(f, id, first, glens[x % 16]);
}

/* One q, k or v value for a list: a grid score (multiple of 1/16) or a
 * special one. */
static float pick_score(fz *f, uint8_t c)
{
    static const float special[] = {-INFINITY, INFINITY, NAN, 0.0f, -0.0f, 1.0f, -1.0f, 0.5f};
    if (c >= 232)
        return special[c % 8];
    return (float)((int)(next_rand(f) % 129) - 64) / 16.0f;
}

/* resa_ctx_step_block_scores with these buffers ([n_entries][hkv][capacity]
 * and [n_entries][hkv], filled with 0xff); returns the status. */
static resa_status do_block_scores(fz *f, int32_t layer, const void *q, const int8_t *qg,
                                   int64_t capacity, float *scores, int32_t *blocks,
                                   int32_t *counts, uint32_t flags)
{
    shadow *m = &f->c->m;
    int64_t before = f->c->al.failed;
    resa_status want = sh_block_scores(m, layer, !q, capacity, !scores, !blocks, !counts, flags);
    resa_status got = resa_ctx_step_block_scores(f->c->ctx, layer, q, capacity, scores, blocks,
                                                 counts, flags);
    snprintf(f->msg, sizeof f->msg, "resa_ctx_step_block_scores(layer %d, %s, capacity %lld, "
             "%s, %s, %s, 0x%x)", layer, q ? "q" : "NULL", (long long)capacity,
             scores ? "scores" : "NULL", blocks ? "blocks" : "NULL", counts ? "counts" : "NULL",
             flags);
    expect(f, f->msg, got, want, before);
    if (got == RESA_OK) {
        const char *bad = sh_check_block_scores(m, layer, qg, capacity, scores, blocks, counts,
                                                f->detail, sizeof f->detail);
        if (bad)
            fail(f, "%s", bad);
    }
    return got;
}

static resa_status do_thresholds(fz *f, int32_t n_ranks, int64_t capacity, const float *scores,
                                 const int32_t *blocks, const int32_t *counts, float *ts,
                                 int32_t *tb, uint32_t flags)
{
    shadow *m = &f->c->m;
    int64_t before = f->c->al.failed;
    resa_status want = sh_thresholds(m, n_ranks, capacity, !scores, !blocks, !counts, !ts, !tb,
                                     flags);
    resa_status got = resa_ctx_step_thresholds(f->c->ctx, n_ranks, capacity, scores, blocks,
                                               counts, ts, tb, flags);
    snprintf(f->msg, sizeof f->msg, "resa_ctx_step_thresholds(%d ranks, capacity %lld, %s, %s, "
             "%s, %s, %s, 0x%x)", n_ranks, (long long)capacity, scores ? "scores" : "NULL",
             blocks ? "blocks" : "NULL", counts ? "counts" : "NULL", ts ? "ts" : "NULL",
             tb ? "tb" : "NULL", flags);
    expect(f, f->msg, got, want, before);
    if (got == RESA_OK) {
        const char *bad = sh_check_thresholds(m, n_ranks, capacity, scores, blocks, counts, ts,
                                              tb, f->detail, sizeof f->detail);
        if (bad)
            fail(f, "%s", bad);
    }
    return got;
}

/* Phase 1 and the thresholds of one layer as a rank of a context-parallel
 * group would run them: this context's lists (block_scores on the layer's q),
 * gathered with the lists of 0 to 2 made-up ranks (ties with this one's
 * scores, special scores, any blocks), then resa_ctx_step_thresholds.  On
 * success *ts and *tb ([n_entries][hkv]) are the thresholds. */
static void two_phase(fz *f, int32_t layer, const void *q, const int8_t *qg, uint8_t arg,
                      float **ts_out, int32_t **tb_out)
{
    shadow *m = &f->c->m;
    m->thr_self = 0;
    *ts_out = NULL;
    *tb_out = NULL;
    size_t nx = (size_t)m->n_entries * (size_t)m->iv[P_KVHEADS];
    int64_t cap = sh_max_kpick(m) + (arg & 0x40 ? (arg >> 7) + 1 : 0);
    size_t nl = nx * (size_t)cap;
    if (nl > FZ_MAX_LIST / 3)
        return; /* K_i of a sequence near 2^30 blocks: no buffer that large */
    float *sc = malloc(nl ? nl * 4 : 1);
    int32_t *bl = malloc(nl ? nl * 4 : 1), *cn = malloc(nx * 4);
    memset(sc, 0xff, nl ? nl * 4 : 1);
    memset(bl, 0xff, nl ? nl * 4 : 1);
    memset(cn, 0xff, nx * 4);
    if (do_block_scores(f, layer, q, qg, cap, nl ? sc : NULL, nl ? bl : NULL, cn, 0) != RESA_OK) {
        free(sc);
        free(bl);
        free(cn);
        return;
    }
    int32_t n_ranks = 1 + arg % 3, own = (int32_t)((arg >> 2) % (uint8_t)n_ranks);
    size_t ng = (size_t)n_ranks * nl;
    float *gs = malloc(ng ? ng * 4 : 1);
    int32_t *gb = malloc(ng ? ng * 4 : 1);
    int32_t *gc = malloc((size_t)n_ranks * nx * 4);
    for (int32_t r = 0; r < n_ranks; r++) {
        if (r == own) {
            memcpy(gs + (size_t)r * nl, sc, nl * 4);
            memcpy(gb + (size_t)r * nl, bl, nl * 4);
            memcpy(gc + (size_t)r * nx, cn, nx * 4);
            continue;
        }
        for (size_t x = 0; x < nx; x++) {
            const sh_entry *e = &m->entries[x / (size_t)m->iv[P_KVHEADS]];
            int32_t k = SH_SPARSE(e->mode) ? e->kpick : 0;
            int32_t c = k > 0 ? (int32_t)(next_rand(f) % (uint64_t)(k + 1)) : 0;
            gc[(size_t)r * nx + x] = c;
            for (int64_t j = 0; j < cap; j++) {
                size_t at = (size_t)r * nl + x * (size_t)cap + (size_t)j;
                uint64_t z = next_rand(f);
                if (j >= c) { /* past the count: never read */
                    gs[at] = NAN;
                    gb[at] = -5;
                } else if (z % 4 == 0 && cn[x] > 0) { /* a tie with this rank */
                    gs[at] = sc[x * (size_t)cap + (size_t)(z >> 8) % (size_t)cn[x]];
                    gb[at] = (int32_t)((z >> 20) % (uint64_t)(e->m + 2));
                } else {
                    gs[at] = pick_score(f, (uint8_t)(z >> 32));
                    gb[at] = (int32_t)((z >> 20) % (uint64_t)(e->m + 2));
                }
            }
        }
    }
    float *ts = malloc(nx * 4);
    int32_t *tb = malloc(nx * 4);
    if (do_thresholds(f, n_ranks, cap, nl ? gs : NULL, nl ? gb : NULL, gc, ts, tb, 0) == RESA_OK) {
        *ts_out = ts;
        *tb_out = tb;
        m->thr_self = n_ranks == 1;
    } else {
        free(ts);
        free(tb);
    }
    free(sc);
    free(bl);
    free(cn);
    free(gs);
    free(gb);
    free(gc);
}

/* A merge call (resa_ctx_merge_states when ctx_version, else
 * resa_merge_states) on exactly sized buffers, checked against a float64
 * merge of the same parts: m = max lse_i, w_i = exp(lse_i - m) (0 for -inf,
 * whose row is not read), out = sum w_i out_i / sum w_i, lse = m + log sum
 * w_i; every part -inf: out NaN, lse -inf; a NaN lse_i (or +inf): NaN.
 * `nulls` bits: parts_out, parts_lse, out, lse. */
static void do_merge(fz *f, int ctx_version, int32_t dtype, int32_t n_parts, int64_t n_rows,
                     int32_t d, const void *parts, const float *plse, unsigned nulls,
                     uint32_t flags)
{
    shadow *m = &f->c->m;
    int32_t dt = ctx_version ? (int32_t)m->iv[P_IO_DTYPE] : dtype;
    int32_t hd = ctx_version ? (int32_t)m->iv[P_HEAD_DIM] : d;
    int ok_shape = (dt >= 0 && dt <= 2) && n_rows >= 0 && hd >= 1 && hd <= 256;
    size_t elt = sh_dtype_size(dt), n_out = ok_shape ? (size_t)n_rows * (size_t)hd : 0;
    void *out = malloc(n_out ? n_out * elt : 1);
    float *lse = malloc(ok_shape && n_rows ? (size_t)n_rows * 4 : 1);
    memset(out, 0xff, n_out ? n_out * elt : 1);
    memset(lse, 0xff, ok_shape && n_rows ? (size_t)n_rows * 4 : 1);
    const void *pp = nulls & 1 ? NULL : parts;
    const float *pl = nulls & 2 ? NULL : plse;
    void *po = nulls & 4 ? NULL : out;
    float *pL = nulls & 8 ? NULL : lse;
    resa_status want = sh_merge(m, ctx_version, dtype, n_parts, n_rows, d, !pp, !pl, !po, flags);
    resa_status got;
    if (ctx_version) {
        int64_t before = f->c->al.failed;
        got = resa_ctx_merge_states(f->c->ctx, n_parts, n_rows, pp, pl, po, pL, flags);
        snprintf(f->msg, sizeof f->msg, "resa_ctx_merge_states(%d parts, %lld rows, nulls 0x%x, "
                 "0x%x)", n_parts, (long long)n_rows, nulls, flags);
        expect(f, f->msg, got, want, before);
    } else {
        got = resa_merge_states((resa_dtype)dtype, n_parts, n_rows, d, pp, pl, po, pL, flags);
        f->call = "resa_merge_states";
        stats.calls++;
        trace(f, "resa_merge_states(dtype %d, %d parts, %lld rows, d %d, nulls 0x%x, 0x%x) -> %s",
              dtype, n_parts, (long long)n_rows, d, nulls, flags, resa_status_name(got));
        if (got != want)
            fail(f, "status %s, the model says %s", resa_status_name(got),
                 resa_status_name(want));
    }
    if (got == RESA_OK) {
        double tol = dt == RESA_DTYPE_F32 ? 2e-4 : dt == RESA_DTYPE_F16 ? 2e-3 : 1e-2;
        for (int64_t r = 0; r < n_rows; r++) {
            double mx = -INFINITY, sum = 0;
            int nan = 0;
            for (int32_t i = 0; i < n_parts; i++) {
                double x = plse[(size_t)i * (size_t)n_rows + (size_t)r];
                nan |= isnan(x) || x == INFINITY;
                mx = x > mx ? x : mx;
            }
            for (int32_t i = 0; i < n_parts && !nan; i++) {
                double x = plse[(size_t)i * (size_t)n_rows + (size_t)r];
                if (x != -INFINITY)
                    sum += exp(x - mx);
            }
            double want_lse = nan ? NAN : sum == 0 ? -INFINITY : mx + log(sum);
            if (pL) {
                double l = lse[r];
                int good = isnan(want_lse) ? isnan(l)
                           : isinf(want_lse) ? l == want_lse
                                             : fabs(l - want_lse) <= 2e-5 * (1 + fabs(want_lse));
                if (!good)
                    fail(f, "row %lld: lse %.9g, float64 says %.9g", (long long)r, l, want_lse);
            }
            for (int32_t j = 0; j < hd; j++) {
                double acc = 0;
                for (int32_t i = 0; i < n_parts && !nan && sum > 0; i++) {
                    double x = plse[(size_t)i * (size_t)n_rows + (size_t)r];
                    if (x != -INFINITY)
                        acc += exp(x - mx) *
                               sh_decode(dt, parts, ((size_t)i * (size_t)n_rows + (size_t)r) *
                                                        (size_t)hd + (size_t)j);
                }
                double o = sh_decode(dt, out, (size_t)r * (size_t)hd + (size_t)j);
                int good = nan || sum == 0 ? isnan(o) : fabs(o - acc / sum) <= tol;
                if (!good)
                    fail(f, "row %lld element %d: out %.9g, float64 says %.9g", (long long)r, j,
                         o, nan || sum == 0 ? NAN : acc / sum);
            }
            stats.merge_rows_checked++;
        }
    } else {
        const unsigned char *o = out;
        for (size_t i = 0; i < (n_out ? n_out * elt : 1); i++)
            if (o[i] != 0xff)
                fail(f, "a failed merge wrote out");
    }
    free(out);
    free(lse);
}

/* lse of a merge part: mostly finite, some -inf (the part's row then holds
 * NaN: it must not be read), rarely NaN or +inf. */
static float pick_lse(fz *f, uint8_t c)
{
    uint64_t z = next_rand(f);
    if (c % 8 == 0)
        return -INFINITY;
    if (c >= 250)
        return c & 1 ? NAN : INFINITY;
    if (c % 8 == 1)
        return (float)((int)(z % 2001) - 1000) / 8.0f; /* far apart: weights underflow */
    return (float)((int)(z % 161) - 80) / 16.0f;
}

/* Merges the rows just written (out, lse of one attend_ex) with a made-up
 * second (and third) part, through resa_ctx_merge_states. */
static void merge_with(fz *f, const void *out, const float *lse, int64_t n_rows, uint8_t arg)
{
    shadow *m = &f->c->m;
    int32_t io = (int32_t)m->iv[P_IO_DTYPE], d = (int32_t)m->iv[P_HEAD_DIM];
    int32_t n_parts = 2 + (arg & 1);
    size_t elt = sh_dtype_size(io), row = (size_t)d * elt;
    size_t n = (size_t)n_parts * (size_t)n_rows;
    char *parts = malloc(n * row);
    float *plse = malloc(n * 4);
    int8_t *g = malloc((size_t)d);
    int own = (arg >> 1) % (uint8_t)n_parts;
    for (int32_t i = 0; i < n_parts; i++)
        for (int64_t r = 0; r < n_rows; r++) {
            size_t at = (size_t)i * (size_t)n_rows + (size_t)r;
            if (i == own) {
                memcpy(parts + at * row, (const char *)out + (size_t)r * row, row);
                plse[at] = lse[r];
                continue;
            }
            plse[at] = pick_lse(f, (uint8_t)next_rand(f));
            if (plse[at] == -INFINITY) {
                memset(parts + at * row, 0xff, row); /* NaN: never read */
            } else {
                for (int32_t j = 0; j < d; j++)
                    g[j] = grid_value(f, 0);
                sh_encode(io, g, (size_t)d, parts + at * row);
            }
        }
    do_merge(f, 1, io, n_parts, n_rows, d, parts, plse, 0, 0);
    free(parts);
    free(plse);
    free(g);
}

/* What attend adds as resa_ctx_step_attend_ex. */
typedef struct fz_ex {
    int lse;       /* pass an lse buffer */
    int thr;       /* thresholds: 0 none, 1 from two_phase, 2 made up, 3 scores only,
                      4 blocks only */
    int merge;     /* merge out and lse with made-up parts afterwards */
    uint8_t arg;   /* a byte for two_phase and the merge */
} fz_ex;

/* step_attend (ex NULL) or step_attend_ex of one layer with exactly sized
 * buffers; `nulls` bits: q, k, v, out. */
static void do_attend_x(fz *f, int32_t layer, unsigned nulls, uint32_t flags, const fz_ex *ex)
{
    shadow *m = &f->c->m;
    size_t T = m->step_open ? (size_t)m->rows : 0;
    size_t hq = m->locked ? (size_t)m->iv[P_QHEADS] : 1, hkv = m->locked ? (size_t)m->iv[P_KVHEADS] : 1;
    size_t d = m->locked ? (size_t)m->iv[P_HEAD_DIM] : 1;
    int32_t io = m->locked ? (int32_t)m->iv[P_IO_DTYPE] : 0;
    size_t elt = sh_dtype_size(io), nq = T * hq * d, nk = T * hkv * d;
    int8_t *qg = malloc(nq + 1), *kg = malloc(nk + 1), *vg = malloc(nk + 1);
    unsigned kind = f->kind; /* how K is drawn: ties and narrow boxes too */
    for (size_t i = 0; i < nq; i++)
        qg[i] = grid_value(f, kind & 1 ? 1 : 0);
    for (size_t i = 0; i < nk; i++) {
        kg[i] = grid_value(f, kind);
        vg[i] = grid_value(f, 0);
    }
    /* op_arm_poison, q: a NaN in one element of one row's q (not where the
     * two-phase selection lists scores from it: what a NaN score lists as is
     * not specified) */
    if (f->poison_q && nq && !(ex && ex->thr == 1)) {
        uint64_t z = next_rand(f);
        size_t at = (size_t)(z % nq);
        qg[at] = SH_NAN;
        trace(f, "  q poisoned (NaN) at step row %zu, query head %zu", at / (hq * d), at / d % hq);
        f->poison_q = 0;
    }
    if (f->poison && nk) { /* op_arm_poison: one element, or one head vector, of V */
        uint64_t z = next_rand(f);
        size_t row = (size_t)(z % T), h = (size_t)((z >> 20) % hkv), j = (size_t)((z >> 40) % d);
        for (size_t x = 0; x < d; x++)
            if (x == j || (z >> 63))
                vg[(row * hkv + h) * d + x] = (int8_t)f->poison;
        trace(f, "  V poisoned (%s) at step row %zu, KV head %zu, %s", f->poison == SH_NAN ? "NaN"
              : f->poison == SH_PINF ? "+inf" : "-inf", row, h, z >> 63 ? "every element" : "one element");
        f->poison = 0;
    }
    /* exactly T rows (a step with no rows open gets 1-byte buffers: untouchable) */
    void *q = malloc(nq ? nq * elt : 1), *k = malloc(nk ? nk * elt : 1);
    void *v = malloc(nk ? nk * elt : 1), *out = malloc(nq ? nq * elt : 1);
    void *q0 = malloc(nq ? nq * elt : 1), *k0 = malloc(nk ? nk * elt : 1);
    void *v0 = malloc(nk ? nk * elt : 1);
    sh_encode(io, qg, nq, q);
    sh_encode(io, kg, nk, k);
    sh_encode(io, vg, nk, v);
    memcpy(q0, q, nq * elt);
    memcpy(k0, k, nk * elt);
    memcpy(v0, v, nk * elt);
    memset(out, 0xff, nq ? nq * elt : 1);
    const void *pq = nulls & 1 ? NULL : q, *pk = nulls & 2 ? NULL : k, *pv = nulls & 4 ? NULL : v;
    void *po = nulls & 8 ? NULL : out;
    /* attend_ex: lse [T][hq], thresholds [n_entries][hkv] */
    size_t nl = T * hq, nx = m->step_open ? (size_t)m->n_entries * hkv : 0;
    float *lse = NULL, *ts = NULL;
    int32_t *tb = NULL;
    if (ex && ex->lse) {
        lse = malloc(nl ? nl * 4 : 1);
        memset(lse, 0xff, nl ? nl * 4 : 1);
    }
    if (ex && ex->thr == 1 && m->step_open)
        two_phase(f, layer, pq, qg, ex->arg, &ts, &tb);
    else if (ex && ex->thr >= 2) {
        ts = malloc(nx ? nx * 4 : 1);
        tb = malloc(nx ? nx * 4 : 1);
        for (size_t x = 0; x < nx; x++) {
            const sh_entry *e = &m->entries[x / hkv];
            uint64_t z = next_rand(f);
            ts[x] = pick_score(f, (uint8_t)z);
            int32_t bs[] = {-1, 0, (int32_t)e->fb, (int32_t)e->fb + 1, e->m - 1, e->m,
                            INT32_MAX, (int32_t)((z >> 16) % (uint64_t)(e->m + 1))};
            tb[x] = bs[(z >> 8) % 8];
        }
        if (ex->thr == 3) {
            free(tb);
            tb = NULL;
        } else if (ex->thr == 4) {
            free(ts);
            ts = NULL;
        }
    }
    int64_t before = f->c->al.failed;
    resa_status want = sh_step_attend(m, layer, !pq, !pk, !pv, !po, !ts, !tb, flags), got;
    if (ex) {
        got = resa_ctx_step_attend_ex(f->c->ctx, layer, pq, pk, pv, po, lse, ts, tb, flags);
        snprintf(f->msg, sizeof f->msg, "resa_ctx_step_attend_ex(layer %d, nulls 0x%x, lse %s, "
                 "thresholds %d, flags 0x%x)", layer, nulls, lse ? "yes" : "NULL", ex->thr,
                 flags);
    } else {
        got = resa_ctx_step_attend(f->c->ctx, layer, pq, pk, pv, po, flags);
        snprintf(f->msg, sizeof f->msg, "resa_ctx_step_attend(layer %d, nulls 0x%x, flags 0x%x)",
                 layer, nulls, flags);
    }
    expect(f, f->msg, got, want, before);
    if (got != RESA_OK)
        m->thr_self = 0;
    if (memcmp(q, q0, nq * elt) || memcmp(k, k0, nk * elt) || memcmp(v, v0, nk * elt))
        fail(f, "the library wrote into q, k or v");
    if (got == RESA_OK) {
        const char *bad = sh_attended(m, layer, qg, kg, vg, po, lse, ts, tb, f->detail,
                                      sizeof f->detail);
        m->thr_self = 0;
        if (bad)
            fail(f, "%s", bad);
        /* the merges' float64 check wants finite parts */
        if (ex && ex->merge && po && lse && nl && m->last_nonfinite_rows == 0)
            merge_with(f, po, lse, (int64_t)nl, ex->arg);
    } else {
        const unsigned char *o = out;
        for (size_t i = 0; i < (nq ? nq * elt : 1); i++)
            if (o[i] != 0xff)
                fail(f, "a failed step_attend wrote out");
        for (size_t i = 0; lse && i < nl * 4; i++)
            if (((const unsigned char *)lse)[i] != 0xff)
                fail(f, "a failed step_attend_ex wrote lse");
    }
    free(qg);
    free(kg);
    free(vg);
    free(q);
    free(k);
    free(v);
    free(out);
    free(q0);
    free(k0);
    free(v0);
    free(lse);
    free(ts);
    free(tb);
}

static void do_attend(fz *f, int32_t layer, unsigned nulls, uint32_t flags)
{
    do_attend_x(f, layer, nulls, flags, NULL);
}

static void do_end(fz *f, uint32_t flags)
{
    int64_t before = f->c->al.failed;
    resa_status want = sh_step_end(&f->c->m, flags, 0);
    resa_status got = resa_ctx_step_end(f->c->ctx, flags);
    snprintf(f->msg, sizeof f->msg, "resa_ctx_step_end(0x%x)", flags);
    expect(f, f->msg, got, want, before);
    if (got == RESA_OK)
        sh_step_end(&f->c->m, flags, 1);
}

static void do_cancel(fz *f)
{
    int64_t before = f->c->al.failed;
    resa_status want = sh_step_cancel(&f->c->m, 0);
    resa_status got = resa_ctx_step_cancel(f->c->ctx);
    expect(f, "resa_ctx_step_cancel", got, want, before);
    if (got == RESA_OK)
        sh_step_cancel(&f->c->m, 1);
}

static int32_t pick_tokens(fz *f, int32_t mode, const sh_seq *q)
{
    int64_t b = f->c->m.iv[P_BLOCK];
    uint8_t c = u8(f);
    if (c >= 240) { /* wrong counts */
        static const int32_t bad[] = {0, -1, INT32_MAX, INT32_MIN, 2};
        return bad[c % 5];
    }
    switch (mode) {
    case RESA_MODE_DECODE:
    case RESA_MODE_QUERY_SPARSE:
        return 1;
    case RESA_MODE_RECTIFY: {
        int64_t p = q ? q->pending : 1;
        if (p < 1)
            return 1;
        return (int32_t)(c & 1 ? p : 1 + (int64_t)(c >> 1) % p);
    }
    default: {
        int32_t sizes[] = {1, 2, 3, (int32_t)b - 1, (int32_t)b, (int32_t)b + 1, 5, 17,
                           2 * (int32_t)b + 1};
        int32_t n = sizes[c % 9];
        return n < 1 ? 1 : n;
    }
    }
}

/* A batch from the input: mostly good, sometimes wrong in one place. */
static void op_begin(fz *f)
{
    int32_t live = n_live(f);
    uint8_t c = u8(f);
    int32_t n;
    if (c < 232) {
        n = 1 + c % (live < 1 ? 1 : live < 4 ? live : 4);
    } else {
        int32_t bad[] = {0, -1, (int32_t)f->c->m.iv[P_MAX_SEQS] + 1, INT32_MAX};
        n = bad[c % 4];
    }
    int32_t ids[64], modes[64], nt[64];
    for (int32_t i = 0; i < n && i < 64; i++) {
        uint8_t x = u8(f);
        if ((x & 0xc0) == 0xc0 || !live) {
            ids[i] = pick_id(f); /* maybe unknown, maybe twice */
        } else { /* distinct live sequences */
            const sh_seq *q = live_seq(f, (int32_t)((x + i) % live));
            ids[i] = q->id;
            for (int32_t j = 0; j < i; j++)
                if (ids[j] == ids[i]) {
                    ids[i] = live_seq(f, (int32_t)((x + i + 1) % live))->id;
                    break;
                }
        }
        uint8_t mm = u8(f);
        /* 6: the first value that is no resa_mode */
        modes[i] = mm < 232 ? mm % 4 : mm < 248 ? 4 + (mm & 1) : (mm & 1 ? 6 : -1);
        int slot = sh_slot(&f->c->m, ids[i]);
        nt[i] = pick_tokens(f, modes[i], slot >= 0 ? &f->c->m.seqs[slot] : NULL);
    }
    uint8_t fl = u8(f);
    uint32_t flags = fl < 240 ? 0 : fl & 1 ? RESA_STEP_REPLAY : fl & 2 ? 2u : 0x80000000u;
    int null_which = fl >= 236 && fl < 240 ? fl - 235 : 0;
    do_begin(f, n, ids, modes, nt, flags, null_which);
}

static void op_attend(fz *f)
{
    uint8_t c = u8(f), x = u8(f);
    int32_t layers = (int32_t)f->c->m.iv[P_LAYERS], layer = x % layers;
    if (c >= 248)
        layer = c & 1 ? -1 : layers;
    else /* the first layer not yet attended, mostly */
        for (int32_t l = 0; f->c->m.step_open && l < layers && (c & 3); l++)
            if (!f->c->m.layer_done[l]) {
                layer = l;
                break;
            }
    unsigned nulls = c >= 232 && c < 248 ? c & 15 : 0;
    if (f->c->m.step_open && !f->c->m.has_output && (x & 0x80))
        nulls |= 1 | 8; /* APPEND_KV only: q and out may be NULL */
    uint8_t seed = u8(f);
    f->rng ^= (uint64_t)seed << 17;
    f->kind = seed >> 5;
    do_attend(f, layer, nulls, (x & 0x7f) == 0x7f ? 1u : 0u);
}

/* Live sequences for a new step, after creating one if there is none; 0 when
 * none can be created or a step is already open. */
static int32_t live_for_step(fz *f)
{
    if (n_live(f) == 0 && !do_create(f, 0))
        return 0;
    return f->c->m.step_open ? 0 : n_live(f);
}

/* A whole step that makes progress: a good batch, every layer, end. */
static void op_full_step(fz *f)
{
    int32_t live = live_for_step(f);
    if (live == 0)
        return;
    uint8_t c = u8(f);
    int32_t n = 1 + c % (live < 3 ? live : 3);
    int32_t ids[3], modes[3], nt[3], k = 0;
    int64_t max_len = sh_get_int(&f->c->m, P_MAX_SEQ_TOKENS), b = f->c->m.iv[P_BLOCK];
    for (int32_t i = 0; i < n; i++) {
        const sh_seq *q = live_seq(f, (int32_t)((c / 4 + i) % live));
        uint8_t r = u8(f);
        int32_t due = f->c->m.iv[P_INTERVAL] > 0 && q->pending >= f->c->m.iv[P_INTERVAL];
        int32_t mode, cnt;
        if (q->glen >= 0 && q->glen != q->first + q->len) { /* not the tail: queries only */
            mode = r & 1 ? RESA_MODE_QUERY_SPARSE : RESA_MODE_QUERY_DENSE;
            cnt = mode == RESA_MODE_QUERY_SPARSE ? 1 : 1 + (int32_t)((r >> 3) % (b + 1));
        } else if (q->pending > 0 && (due || r % 8 < 2)) {
            mode = RESA_MODE_RECTIFY;
            cnt = (int32_t)(r & 0x80 && q->pending > 1 ? 1 + (r >> 3) % q->pending : q->pending);
        } else if (q->len == 0 || r % 8 == 2 || r % 8 == 3) {
            mode = q->len == 0 || r % 8 == 2 ? RESA_MODE_APPEND : RESA_MODE_APPEND_KV;
            cnt = 1 + (int32_t)((r >> 3) % (2 * b + 1));
            if (q->len + cnt > max_len)
                cnt = (int32_t)(max_len - q->len);
        } else {
            mode = RESA_MODE_DECODE;
            cnt = q->len < max_len ? 1 : 0;
        }
        if (cnt < 1)
            continue; /* full sequence */
        ids[k] = q->id;
        modes[k] = mode;
        nt[k++] = cnt;
    }
    if (k == 0)
        return;
    do_begin(f, k, ids, modes, nt, 0, 0);
    if (!f->c->m.step_open)
        return;
    int32_t layers = (int32_t)f->c->m.iv[P_LAYERS];
    uint8_t order = u8(f);
    f->rng ^= (uint64_t)order << 29;
    f->kind = order >> 5;
    for (int32_t l = 0; l < layers; l++)
        do_attend(f, order & 1 ? layers - 1 - l : l, 0, 0);
    if ((order & 6) == 6)
        do_attend(f, 0, 0, 0); /* again: the last call wins */
    if ((order & 0x18) == 0x18)
        do_cancel(f);
    else
        do_end(f, 0);
}

/* A context-parallel step that makes progress: maybe a span first (a first
 * token on an empty sequence, a global length past this context's tokens,
 * back to the tail), then one or two entries (QUERY modes where the context
 * does not hold the tail, else rectify, append or decode), every layer with
 * step_attend_ex (lse; thresholds from the two-phase calls, made up, or
 * none; a merge of the result), then end or cancel. */
static void op_cp_step(fz *f)
{
    int32_t live = live_for_step(f);
    if (live == 0)
        return;
    shadow *m = &f->c->m;
    uint8_t c = u8(f), s = u8(f);
    int64_t b = m->iv[P_BLOCK], max_len = sh_get_int(m, P_MAX_SEQ_TOKENS);
    const sh_seq *q = live_seq(f, c % live);
    static const int64_t firsts[] = {1, 2, 3, 5, 16, 0};
    int64_t extras[] = {0, 1, b - 1, b, 2 * b + 1, 5 * b, 17, 64 * b};
    switch (s & 3) {
    case 1:
        if (q->len == 0)
            do_set_span(f, q->id, b * firsts[(s >> 2) % 6], -1);
        break;
    case 2:
        do_set_span(f, q->id, q->first, q->first + q->len + extras[(s >> 2) % 8]);
        break;
    case 3:
        do_set_span(f, q->id, q->first, -1);
        break;
    default:
        break;
    }
    int32_t n = 1 + ((c >> 6) & 1 && live > 1), ids[2], modes[2], nt[2];
    for (int32_t i = 0; i < n; i++) {
        q = live_seq(f, (c + i) % live);
        uint8_t r = u8(f);
        int tail = q->glen < 0 || q->glen == q->first + q->len;
        ids[i] = q->id;
        nt[i] = 1;
        if (!tail || r % 4 < 2) {
            modes[i] = r % 2 ? RESA_MODE_QUERY_SPARSE : RESA_MODE_QUERY_DENSE;
            if (modes[i] == RESA_MODE_QUERY_DENSE)
                nt[i] = 1 + (int32_t)((r >> 2) % (b + 2));
        } else if (q->pending > 0) {
            modes[i] = RESA_MODE_RECTIFY;
            nt[i] = (int32_t)q->pending;
        } else if (q->len == 0 || r % 4 == 2) {
            modes[i] = RESA_MODE_APPEND;
            nt[i] = 1 + (int32_t)((r >> 2) % (2 * b + 1));
            if (q->len + nt[i] > max_len)
                nt[i] = (int32_t)(max_len - q->len);
        } else {
            modes[i] = RESA_MODE_DECODE;
        }
        if (nt[i] < 1)
            modes[i] = RESA_MODE_QUERY_SPARSE, nt[i] = 1; /* full */
    }
    do_begin(f, n, ids, modes, nt, 0, 0);
    if (!m->step_open)
        return;
    int32_t layers = (int32_t)m->iv[P_LAYERS];
    uint8_t o = u8(f), arg = u8(f);
    f->rng ^= (uint64_t)o << 29;
    f->kind = o >> 5;
    fz_ex ex = {!(o & 1) || (o & 6) == 0, (o >> 1) % 4 == 3 ? 2 : (o >> 1) % 4 == 0 ? 0 : 1,
                (o & 0x10) != 0, arg};
    for (int32_t l = 0; l < layers; l++)
        do_attend_x(f, l, 0, 0, &ex);
    if ((o & 0x18) == 0x18 && (arg & 1))
        do_cancel(f);
    else
        do_end(f, 0);
}

/* One of the context-parallel calls with arguments from the input, good or
 * wrong: block scores, thresholds, attend_ex, the merges, a span. */
static void op_cp(fz *f)
{
    shadow *m = &f->c->m;
    uint8_t c = u8(f), x = u8(f), y = u8(f);
    int32_t layers = m->locked ? (int32_t)m->iv[P_LAYERS] : 1;
    int32_t layer = x >= 248 ? (x & 1 ? -1 : layers) : x % layers;
    uint32_t flags = (y & 0xf0) == 0xf0 ? 1u + (y & 1) : 0;
    size_t hkv = (size_t)m->iv[P_KVHEADS], nx = m->step_open ? (size_t)m->n_entries * hkv : 0;
    int32_t kmax = sh_max_kpick(m);
    int64_t caps[] = {kmax, kmax, kmax + 1, kmax - 1, 0, -1, kmax + 3, 1};
    int64_t cap = caps[y % 8];
    if (cap > 0 && nx * (size_t)cap > FZ_MAX_LIST / 3)
        cap = y & 1 ? 0 : -1; /* no buffer of K_i near 2^30: the capacity errors only */
    size_t nl = cap > 0 ? nx * (size_t)cap : 0;
    switch (c % 6) {
    case 0: { /* block scores */
        size_t T = m->step_open ? (size_t)m->rows : 0;
        size_t nq = T * (size_t)m->iv[P_QHEADS] * (size_t)m->iv[P_HEAD_DIM];
        int32_t io = (int32_t)m->iv[P_IO_DTYPE];
        int8_t *qg = malloc(nq + 1);
        for (size_t i = 0; i < nq; i++)
            qg[i] = grid_value(f, x >> 5);
        void *q = malloc(nq ? nq * sh_dtype_size(io) : 1);
        sh_encode(io, qg, nq, q);
        float *sc = malloc(nl ? nl * 4 : 1);
        int32_t *bl = malloc(nl ? nl * 4 : 1), *cn = malloc(nx ? nx * 4 : 1);
        memset(sc, 0xff, nl ? nl * 4 : 1);
        memset(bl, 0xff, nl ? nl * 4 : 1);
        unsigned nulls = (c >> 3) & 0x1f; /* q, scores, blocks, counts: mostly none */
        nulls = nulls < 16 ? 0 : nulls & 15;
        do_block_scores(f, layer, nulls & 1 ? NULL : q, qg, cap, nulls & 2 ? NULL : sc,
                        nulls & 4 ? NULL : bl, nulls & 8 ? NULL : cn, flags);
        free(qg);
        free(q);
        free(sc);
        free(bl);
        free(cn);
        break;
    }
    case 1: { /* thresholds from made-up lists */
        int32_t n_ranks = x >= 248 ? (x & 1 ? 0 : -1) : 1 + x % 3;
        size_t nr = n_ranks > 0 ? (size_t)n_ranks : 0;
        size_t ng = nr * nl, nc = nr * nx;
        float *sc = malloc(ng ? ng * 4 : 1), *ts = malloc(nx ? nx * 4 : 1);
        int32_t *bl = malloc(ng ? ng * 4 : 1), *cn = malloc(nc ? nc * 4 : 1);
        int32_t *tb = malloc(nx ? nx * 4 : 1);
        for (size_t i = 0; i < nr * nx; i++) {
            const sh_entry *e = &m->entries[(i % nx) / hkv];
            int64_t k = SH_SPARSE(e->mode) ? e->kpick : 0;
            k = k < cap ? k : cap;
            cn[i] = k > 0 ? (int32_t)(next_rand(f) % (uint64_t)(k + 1)) : 0;
            for (int64_t j = 0; j < cap; j++) {
                uint64_t z = next_rand(f);
                sc[i * (size_t)cap + (size_t)j] = pick_score(f, (uint8_t)z);
                bl[i * (size_t)cap + (size_t)j] = (int32_t)((z >> 20) % (uint64_t)(e->m + 2));
            }
        }
        unsigned nulls = (c >> 3) & 0x1f; /* scores, blocks, counts, ts, tb */
        nulls = nulls < 16 ? 0 : 1u << (nulls % 5);
        do_thresholds(f, n_ranks, cap, nulls & 1 ? NULL : sc, nulls & 2 ? NULL : bl,
                      nulls & 4 ? NULL : cn, nulls & 8 ? NULL : ts, nulls & 16 ? NULL : tb,
                      flags);
        free(sc);
        free(bl);
        free(cn);
        free(ts);
        free(tb);
        break;
    }
    case 2: { /* attend_ex */
        uint8_t seed = u8(f);
        f->rng ^= (uint64_t)seed << 17;
        f->kind = seed >> 5;
        unsigned nulls = (c >> 3) >= 24 ? (c >> 3) & 15 : 0;
        if (m->step_open && !m->has_kv && (y & 8))
            nulls |= 2 | 4; /* queries only: k and v may be NULL */
        fz_ex ex = {y & 1, (y >> 1) % 5, (y & 0x40) != 0, seed};
        do_attend_x(f, layer, nulls, flags, &ex);
        break;
    }
    case 3: case 4: { /* merges: the context's, or the context-free one */
        static const int32_t dtypes[] = {0, 1, 2, 0, 1, 2, 3, -1};
        static const int32_t dims[] = {1, 2, 3, 8, 16, 0, 257, 256};
        static const int32_t parts[] = {1, 2, 3, 2, 4, 0, -1, 1};
        static const int64_t rows[] = {1, 2, 3, 5, 0, 1, -1, 7};
        int ctx_version = c % 6 == 3;
        int32_t dt = ctx_version ? (int32_t)m->iv[P_IO_DTYPE] : dtypes[x % 8];
        int32_t d = ctx_version ? (int32_t)m->iv[P_HEAD_DIM] : dims[(x >> 3) % 8];
        int32_t np = parts[y % 8];
        int64_t nr = rows[(y >> 3) % 8];
        int ok = dt >= 0 && dt <= 2 && d >= 1 && d <= 256 && np >= 1 && nr >= 1;
        size_t n = ok ? (size_t)np * (size_t)nr : 0, elt = sh_dtype_size(dt);
        char *pp = malloc(n ? n * (size_t)d * elt : 1);
        float *pl = malloc(n ? n * 4 : 1);
        int8_t *g = malloc(ok ? (size_t)d : 1);
        for (size_t i = 0; i < n; i++) {
            pl[i] = pick_lse(f, (uint8_t)next_rand(f));
            if (pl[i] == -INFINITY) {
                memset(pp + i * (size_t)d * elt, 0xff, (size_t)d * elt);
                continue;
            }
            for (int32_t j = 0; j < d; j++)
                g[j] = grid_value(f, 0);
            sh_encode(dt, g, (size_t)d, pp + i * (size_t)d * elt);
        }
        unsigned nulls = (c >> 3) >= 28 ? (c >> 3) & 15 : (y & 0x40) ? 8 : 0;
        do_merge(f, ctx_version, dt, np, nr, d, pp, pl, nulls, flags);
        free(pp);
        free(pl);
        free(g);
        break;
    }
    default:
        op_set_span(f);
        break;
    }
}

/* The model's shape and small sizes, so that most inputs get going. */
static void op_quick_setup(fz *f)
{
    static const int64_t heads[][2] = {{1, 1}, {2, 1}, {4, 2}, {2, 2}, {4, 1}, {8, 2}, {3, 1},
                                       {6, 2}};
    static const int64_t dims[] = {1, 2, 4, 8, 16, 3, 32, 64};
    static const int64_t tokens[] = {64, 128, 256, 32, 16, 100};
    static const int64_t blocks[] = {1, 2, 4, 8, 16, 2};
    static const int64_t min_blocks[] = {0, 1, 2, 16};
    static const double fractions[] = {0.1, 0.25, 0, 0.5};
    uint8_t c = u8(f), x = u8(f), y = u8(f);
    const int64_t *h = heads[c % 8];
    do_set_param(f, RESA_PARAM_NUM_LAYERS, 1 + (c >> 3) % 3);
    do_set_param(f, RESA_PARAM_NUM_Q_HEADS, h[0]);
    do_set_param(f, RESA_PARAM_NUM_KV_HEADS, h[1]);
    do_set_param(f, RESA_PARAM_HEAD_DIM, dims[x % 8]);
    do_set_param(f, RESA_PARAM_MAX_TOKENS, tokens[(x >> 3) % 6]);
    do_set_param(f, RESA_PARAM_BLOCK_SIZE, blocks[y % 6]);
    do_set_param(f, RESA_PARAM_MAX_SEQUENCES, 2 + (y >> 3) % 7);
    do_set_param(f, RESA_PARAM_NUM_THREADS, (y & 0xc7) == 0xc7 ? 2 : 1);
    if (c & 0x20) { /* the KV dtype f32, f16, bf16 or fp8 (3); IO one of the first three */
        do_set_param(f, RESA_PARAM_KV_DTYPE, x >> 6);
        do_set_param(f, RESA_PARAM_IO_DTYPE, (y >> 6) % 3);
    }
    if (c & 0x40) {
        do_set_param(f, RESA_PARAM_SELECT_MIN_BLOCKS, min_blocks[(x >> 4) % 4]);
        do_set_param_f64(f, RESA_PARAM_SELECT_FRACTION, fractions[(y >> 4) % 4]);
        do_set_param(f, RESA_PARAM_RECTIFY_INTERVAL, (int64_t)((c >> 1) % 9));
        /* summaries in the KV dtype (the default is fp8 since 0.3.0): the
         * model then predicts selections and listed scores exactly */
        if ((x ^ y) & 1)
            do_set_param(f, RESA_PARAM_SUMMARY_FORMAT, RESA_SUMMARY_KV_DTYPE);
    }
    if (c & 0x80)
        do_set_param(f, RESA_PARAM_RECORD_SELECTION, 1);
}

/* Calls with a NULL context: INVALID_ARGUMENT, nothing else happens. */
static void op_null_ctx(fz *f)
{
    int64_t i64;
    int32_t i32;
    double dbl;
    resa_backend b;
    const int32_t one = 1;
    resa_status s[18];
    int n = 0;
    f->call = "calls with ctx NULL";
    s[n++] = resa_ctx_reset(NULL, RESA_RESET_SESSION);
    s[n++] = resa_ctx_get_backend(NULL, &b);
    s[n++] = resa_ctx_set_param(NULL, RESA_PARAM_NUM_LAYERS, 1);
    s[n++] = resa_ctx_get_param(NULL, RESA_PARAM_NUM_LAYERS, &i64);
    s[n++] = resa_ctx_set_param_f64(NULL, RESA_PARAM_SELECT_FRACTION, 0.5);
    s[n++] = resa_ctx_get_param_f64(NULL, RESA_PARAM_SELECT_FRACTION, &dbl);
    s[n++] = resa_ctx_set_preset(NULL, RESA_PRESET_PAPER);
    s[n++] = resa_ctx_set_stream(NULL, NULL);
    s[n++] = resa_ctx_synchronize(NULL);
    s[n++] = resa_seq_create(NULL, &i32);
    s[n++] = resa_seq_release(NULL, 0);
    s[n++] = resa_seq_fork(NULL, 0, &i32);
    s[n++] = resa_seq_length(NULL, 0, &i64);
    s[n++] = resa_seq_pending(NULL, 0, &i64);
    s[n++] = resa_seq_rectify_due(NULL, 0, &i32);
    s[n++] = resa_ctx_free_tokens(NULL, &i64);
    s[n++] = resa_ctx_step_begin(NULL, 1, &one, &one, &one, 0);
    s[n++] = resa_ctx_step_attend(NULL, 0, &dbl, &dbl, &dbl, &dbl, 0);
    for (int k = 0; k < n; k++)
        if (s[k] != RESA_ERR_INVALID_ARGUMENT)
            fail(f, "call %d of the list returned %s", k, resa_status_name(s[k]));
    float fl = 0;
    if (resa_seq_set_span(NULL, 0, 0, -1) != RESA_ERR_INVALID_ARGUMENT ||
        resa_ctx_step_block_scores(NULL, 0, &dbl, 1, &fl, &i32, &i32, 0) !=
            RESA_ERR_INVALID_ARGUMENT ||
        resa_ctx_step_thresholds(NULL, 1, 1, &fl, &i32, &i32, &fl, &i32, 0) !=
            RESA_ERR_INVALID_ARGUMENT ||
        resa_ctx_step_attend_ex(NULL, 0, &dbl, &dbl, &dbl, &dbl, &fl, NULL, NULL, 0) !=
            RESA_ERR_INVALID_ARGUMENT ||
        resa_ctx_merge_states(NULL, 1, 1, &dbl, &fl, &dbl, &fl, 0) != RESA_ERR_INVALID_ARGUMENT)
        fail(f, "a context-parallel call accepted ctx NULL");
    if (resa_ctx_step_end(NULL, 0) != RESA_ERR_INVALID_ARGUMENT ||
        resa_ctx_step_cancel(NULL) != RESA_ERR_INVALID_ARGUMENT ||
        resa_seq_selected_blocks(NULL, 0, 0, 0, NULL, 0, &i64) != RESA_ERR_INVALID_ARGUMENT)
        fail(f, "step_end, step_cancel or seq_selected_blocks accepted NULL");
    const char *e = resa_ctx_last_error(NULL);
    if (!e || !e[0])
        fail(f, "resa_ctx_last_error(NULL) is not a static text");
    resa_ctx_destroy(NULL);
}

/* Context-free functions: thread-safe constants. */
static void op_constants(fz *f)
{
    int32_t code = (int32_t)u8(f) - 2; /* -2 .. 253 */
    const char *name = resa_status_name((resa_status)code);
    const char *text = resa_status_string((resa_status)code);
    f->call = "resa_status_name/string";
    if (!name || !text || !text[0])
        fail(f, "NULL or empty for %d", code);
    static const char *names[] = {"RESA_OK", "RESA_ERR_INVALID_ARGUMENT", "RESA_ERR_BAD_STATE",
                                  "RESA_ERR_OUT_OF_MEMORY", "RESA_ERR_DEVICE_OUT_OF_MEMORY",
                                  "RESA_ERR_CAPACITY", "RESA_ERR_NOT_SUPPORTED",
                                  "RESA_ERR_NO_DEVICE", "RESA_ERR_BACKEND",
                                  "RESA_ERR_VERSION_MISMATCH", "RESA_ERR_INTERNAL"};
    if (code >= 0 && code <= 10 ? strcmp(name, names[code]) != 0
                                : (strcmp(name, "RESA_ERR_UNKNOWN") != 0 ||
                                   strcmp(text, "unknown status code") != 0))
        fail(f, "status %d is named %s", code, name);
    f->call = "version and constants";
    if (resa_version_number() != RESA_VERSION_NUMBER ||
        strcmp(resa_version_string(), RESA_VERSION_STRING) != 0 ||
        resa_abi_version() != RESA_ABI_VERSION || resa_block_size() != RESA_DEFAULT_BLOCK_SIZE ||
        resa_max_head_dim() != RESA_MAX_HEAD_DIM)
        fail(f, "a constant differs from resa.h");
    if (resa_backend_available(RESA_BACKEND_CPU) != 1 ||
        resa_backend_available(RESA_BACKEND_AUTO) != 1 ||
        resa_backend_available((resa_backend)3) != 0 ||
        resa_backend_available((resa_backend)-1) != 0)
        fail(f, "resa_backend_available");
}

static void op_arm_failure(fz *f)
{
    uint8_t c = u8(f);
    if (f->c->custom_alloc)
        f->c->al.fail_at = f->c->al.calls + 1 + c % 24; /* one of the next allocations fails */
}

/* The next step_attend stores NaN, +inf or -inf in V, or gets a NaN in q
 * (docs/API.md, "Non-finite values"); the model follows a V poison through
 * the cache, and a NaN query through its group's selection. */
static void op_arm_poison(fz *f)
{
    static const int codes[3] = {SH_NAN, SH_PINF, SH_NINF};
    uint8_t c = u8(f);
    if (c & 0x80)
        f->poison_q = 1;
    else
        f->poison = codes[c % 3];
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static int cuda = -1, trace_env = -1;
    if (cuda < 0) {
        cuda = resa_backend_available(RESA_BACKEND_CUDA);
        const char *t = getenv("RESA_FUZZ_TRACE");
        trace_env = t && t[0] && t[0] != '0';
        const char *st = getenv("RESA_FUZZ_STATS");
        if (st && st[0] && st[0] != '0')
            atexit(print_stats);
    }
    stats.inputs++;
    fz *f = calloc(1, sizeof *f);
    if (!f)
        return 0;
    f->p = data;
    f->n = size;
    f->trace = trace_env;
    f->cuda_available = cuda;
    f->rng = 0x5eed;
    for (size_t i = 0; i < size && i < 8; i++)
        f->rng = f->rng * 131 + data[i];
    f->c = &f->cx[0];
    create_ctx(f);
    if (u8(f) & 1)
        op_quick_setup(f);
    check_state(f);
    while (more(f) && f->op < FZ_MAX_OPS) {
        f->op++;
        uint8_t op = u8(f);
        switch (op % 40) {
        case 0: case 1: case 2: op_set_param(f); break;
        case 3: op_get_param(f); break;
        case 4: op_bounds(f); break;
        case 5: op_preset(f); break;
        case 6: op_reset(f); break;
        case 7: case 8: case 9: do_create(f, (op & 0xc0) == 0xc0); break;
        case 10: op_release(f); break;
        case 11: case 12: op_fork(f); break;
        case 13: op_query(f); break;
        case 14: op_free_tokens(f); break;
        case 15: op_stream(f); break;
        case 16: op_selected(f); break;
        case 17: case 18: op_begin(f); break;
        case 19: case 20: op_attend(f); break;
        case 21: do_end(f, (op & 0xc0) == 0xc0 ? 4u : 0u); break;
        case 22: do_cancel(f); break;
        case 23: op_quick_setup(f); break;
        case 24: op_null_ctx(f); break;
        case 25: op_constants(f); break;
        case 26:
            if ((op & 0xc0) == 0xc0)
                op_arm_poison(f);
            else
                op_arm_failure(f);
            break;
        case 27:
            if ((op & 0xc0) == 0xc0) { /* a new context */
                destroy_ctx(f);
                create_ctx(f);
            } else if ((op & 0xc0) == 0x80) { /* the other context (created if need be) */
                f->c = &f->cx[f->c == &f->cx[0]];
                if (!f->c->ctx)
                    create_ctx(f);
            } else {
                op_selected(f);
            }
            break;
        case 28: op_cp_step(f); break;
        case 29: op_cp(f); break;
        default: op_full_step(f); break;
        }
        check_state(f);
    }
    destroy_ctx(f);
    f->c = &f->cx[f->c == &f->cx[0]];
    destroy_ctx(f);
    free(f);
    return 0;
}
