/* SPDX-License-Identifier: MIT */
/*
 * Host allocation failures, every one of them.  A scripted CPU session
 * (create, lock with the first resa_seq_create, prefill, decodes,
 * rectification, fork, a cancelled step, the selection record, release,
 * reset, lock again with other parameters, reset of everything) runs through
 * a counting resa_allocator that fails its N-th allocation, for N = 1, 2, ...
 * until the session completes without reaching N.  At the injected failure:
 *   - the call returns RESA_ERR_OUT_OF_MEMORY with an error text;
 *   - everything the API shows is as before the call (parameters, backend,
 *     free tokens, whether the shape is locked or a step is open, length,
 *     pending and due of every sequence id the session was ever given, the
 *     recorded selections) and the context holds no more memory than before;
 *   - the same call, retried, succeeds.
 * Every session then produces bit-for-bit the outputs, ids and selections of
 * a session without injection (NUM_THREADS fixed), and at resa_ctx_destroy
 * the allocator has freed every allocation it made (count and bytes), with
 * no free of a pointer it did not hand out.
 */
#include <stdlib.h>
#include <string.h>

#include "harness.h"

/* ---- the counting, failing allocator ---- */

typedef struct live_block {
    void *p;
    size_t n;
} live_block;

typedef struct fault_alloc {
    int64_t fail_at;          /* the fail_at-th counted allocation returns NULL; 0: never */
    int64_t counted;          /* allocations counted toward fail_at */
    int paused;               /* the test's own queries: neither counted nor failed */
    int64_t fired;            /* injected failures so far */
    int64_t n_alloc, n_free;  /* successful allocations, frees of them */
    uint64_t bytes_alloc, bytes_free;
    int64_t bad_free;         /* frees of pointers this allocator never handed out */
    int64_t bad_align;        /* alignments that are not a power of two */
    live_block *live;
    size_t n_live, cap;
} fault_alloc;

static void *fa_alloc(void *user, size_t size, size_t align)
{
    fault_alloc *fa = user;
    if (!fa->paused && ++fa->counted == fa->fail_at) {
        fa->fired++;
        return NULL;
    }
    if (align == 0 || (align & (align - 1)) != 0) {
        fa->bad_align++;
        return NULL;
    }
    size_t a = align < sizeof(void *) ? sizeof(void *) : align;
    void *p = aligned_alloc(a, (size + a) / a * a); /* C11: a multiple of the alignment */
    if (!p)
        return NULL;
    memset(p, 0xa5, size); /* the library must not expect zeroed memory from the hook */
    if (fa->n_live == fa->cap) {
        size_t cap = fa->cap ? 2 * fa->cap : 64;
        live_block *t = realloc(fa->live, cap * sizeof *t);
        if (!t) {
            free(p);
            return NULL;
        }
        fa->live = t;
        fa->cap = cap;
    }
    fa->live[fa->n_live++] = (live_block){p, size};
    fa->n_alloc++;
    fa->bytes_alloc += size;
    return p;
}

static void fa_free(void *user, void *ptr)
{
    fault_alloc *fa = user;
    if (!ptr)
        return;
    for (size_t i = 0; i < fa->n_live; i++)
        if (fa->live[i].p == ptr) {
            fa->n_free++;
            fa->bytes_free += fa->live[i].n;
            fa->live[i] = fa->live[--fa->n_live];
            free(ptr);
            return;
        }
    fa->bad_free++;
}

/* ---- the session's record (outputs, ids, selections), compared bit for bit ---- */

typedef struct record {
    unsigned char *b;
    size_t n, cap;
} record;

static void rec_put(record *r, const void *p, size_t n)
{
    if (r->n + n > r->cap) {
        size_t cap = r->cap ? r->cap : 4096;
        while (cap < r->n + n)
            cap *= 2;
        r->b = realloc(r->b, cap);
        TCHECK(r->b != NULL, "out of memory in the test itself");
        r->cap = cap;
    }
    memcpy(r->b + r->n, p, n);
    r->n += n;
}

/* ---- the session ---- */

#define LAYERS 2
#define HQ 4
#define HKV 2
#define D 16
#define MAX_ROWS 64
#define MAX_IDS 8
#define SEL_CAP 9000 /* more than any sequence's blocks below */

typedef struct session {
    fault_alloc fa;
    resa_ctx *ctx;
    record rec;
    ref_rng rng;
    int32_t ids[MAX_IDS];     /* every id the session was given, live or released */
    int n_ids;
    int64_t points;           /* injected failures met (and retried) */
    float q[MAX_ROWS * HQ * D], k[MAX_ROWS * HKV * D], v[MAX_ROWS * HKV * D];
    float out[MAX_ROWS * HQ * D];
    int32_t sel[SEL_CAP];
} session;

/* Everything the API shows about a context. */
#define N_INT_PARAMS 18
#define N_REAL_PARAMS 3
static const resa_param int_params[N_INT_PARAMS] = {
    RESA_PARAM_NUM_LAYERS,       RESA_PARAM_NUM_Q_HEADS,       RESA_PARAM_NUM_KV_HEADS,
    RESA_PARAM_HEAD_DIM,         RESA_PARAM_KV_DTYPE,          RESA_PARAM_IO_DTYPE,
    RESA_PARAM_MAX_TOKENS,       RESA_PARAM_MAX_SEQUENCES,     RESA_PARAM_MAX_SEQ_TOKENS,
    RESA_PARAM_MAX_STEP_TOKENS,  RESA_PARAM_SUMMARY_FORMAT,    RESA_PARAM_BLOCK_SIZE,
    RESA_PARAM_SELECT_MIN_BLOCKS, RESA_PARAM_LOCAL_BLOCKS,     RESA_PARAM_SINK_BLOCKS,
    RESA_PARAM_RECTIFY_INTERVAL, RESA_PARAM_NUM_THREADS,       RESA_PARAM_RECORD_SELECTION,
};
static const resa_param real_params[N_REAL_PARAMS] = {
    RESA_PARAM_SELECT_FRACTION, RESA_PARAM_SOFTMAX_SCALE, RESA_PARAM_SCORE_WIDTH,
};

typedef struct seq_view {
    resa_status s_len, s_pend, s_due;
    int64_t len, pend;
    int32_t due;
    resa_status s_sel[LAYERS][HKV];
    int64_t sel_count[LAYERS][HKV];
    uint64_t sel_hash[LAYERS][HKV];
} seq_view;

typedef struct snapshot {
    int64_t live_allocs;
    uint64_t live_bytes;
    resa_status s_backend;
    resa_backend backend;
    resa_status s_int[N_INT_PARAMS], s_real[N_REAL_PARAMS];
    int64_t ints[N_INT_PARAMS];
    double reals[N_REAL_PARAMS];
    resa_status s_free;
    int64_t free_tokens;
    resa_status locked_probe;     /* setting MAX_TOKENS to its own value */
    resa_status step_open_probe;  /* resa_ctx_set_stream(ctx, NULL) */
    seq_view seq[MAX_IDS];
} snapshot;

static void take_snapshot(session *S, snapshot *z)
{
    resa_ctx *c = S->ctx;
    memset(z, 0, sizeof *z);
    S->fa.paused = 1;
    z->live_allocs = S->fa.n_alloc - S->fa.n_free;
    z->live_bytes = S->fa.bytes_alloc - S->fa.bytes_free;
    z->s_backend = resa_ctx_get_backend(c, &z->backend);
    for (int i = 0; i < N_INT_PARAMS; i++)
        z->s_int[i] = resa_ctx_get_param(c, int_params[i], &z->ints[i]);
    for (int i = 0; i < N_REAL_PARAMS; i++)
        z->s_real[i] = resa_ctx_get_param_f64(c, real_params[i], &z->reals[i]);
    z->s_free = resa_ctx_free_tokens(c, &z->free_tokens);
    int64_t max_tokens = 0;
    if (resa_ctx_get_param(c, RESA_PARAM_MAX_TOKENS, &max_tokens) == RESA_OK)
        z->locked_probe = resa_ctx_set_param(c, RESA_PARAM_MAX_TOKENS, max_tokens);
    z->step_open_probe = resa_ctx_set_stream(c, NULL);
    for (int i = 0; i < S->n_ids; i++) {
        seq_view *w = &z->seq[i];
        w->s_len = resa_seq_length(c, S->ids[i], &w->len);
        w->s_pend = resa_seq_pending(c, S->ids[i], &w->pend);
        w->s_due = resa_seq_rectify_due(c, S->ids[i], &w->due);
        for (int32_t l = 0; l < LAYERS; l++)
            for (int32_t h = 0; h < HKV; h++) {
                int64_t n = 0;
                w->s_sel[l][h] = resa_seq_selected_blocks(c, S->ids[i], l, h, S->sel, SEL_CAP, &n);
                uint64_t x = 1469598103934665603ull;
                for (int64_t j = 0; w->s_sel[l][h] == RESA_OK && j < n && j < SEL_CAP; j++)
                    x = (x ^ (uint64_t)S->sel[j]) * 1099511628211ull;
                w->sel_count[l][h] = n;
                w->sel_hash[l][h] = x;
            }
    }
    S->fa.paused = 0;
}

static void same_snapshot(const snapshot *a, const snapshot *b, const char *call)
{
    TCHECK(a->live_allocs == b->live_allocs && a->live_bytes == b->live_bytes,
           "%s failed but kept memory: %lld blocks / %llu bytes live before, %lld / %llu after",
           call, (long long)a->live_allocs, (unsigned long long)a->live_bytes,
           (long long)b->live_allocs, (unsigned long long)b->live_bytes);
    TCHECK(a->s_backend == b->s_backend && a->backend == b->backend,
           "%s failed but changed the backend", call);
    for (int i = 0; i < N_INT_PARAMS; i++)
        TCHECK(a->s_int[i] == b->s_int[i] && a->ints[i] == b->ints[i],
               "%s failed but changed parameter %d: %lld -> %lld", call, (int)int_params[i],
               (long long)a->ints[i], (long long)b->ints[i]);
    for (int i = 0; i < N_REAL_PARAMS; i++)
        TCHECK(a->s_real[i] == b->s_real[i] && memcmp(&a->reals[i], &b->reals[i],
                                                      sizeof(double)) == 0,
               "%s failed but changed parameter %d: %g -> %g", call, (int)real_params[i],
               a->reals[i], b->reals[i]);
    TCHECK(a->s_free == b->s_free && a->free_tokens == b->free_tokens,
           "%s failed but changed the free tokens: %lld -> %lld", call,
           (long long)a->free_tokens, (long long)b->free_tokens);
    TCHECK(a->locked_probe == b->locked_probe,
           "%s failed but locked or unlocked the shape: setting MAX_TOKENS gave %s, now %s", call,
           resa_status_name(a->locked_probe), resa_status_name(b->locked_probe));
    TCHECK(a->step_open_probe == b->step_open_probe,
           "%s failed but opened or closed a step: set_stream gave %s, now %s", call,
           resa_status_name(a->step_open_probe), resa_status_name(b->step_open_probe));
    for (int i = 0; i < MAX_IDS; i++) {
        const seq_view *x = &a->seq[i], *y = &b->seq[i];
        TCHECK(x->s_len == y->s_len && x->len == y->len && x->s_pend == y->s_pend &&
                   x->pend == y->pend && x->s_due == y->s_due && x->due == y->due,
               "%s failed but sequence #%d changed: length %lld -> %lld, pending %lld -> %lld, "
               "due %d -> %d (%s -> %s)", call, i, (long long)x->len, (long long)y->len,
               (long long)x->pend, (long long)y->pend, x->due, y->due,
               resa_status_name(x->s_len), resa_status_name(y->s_len));
        for (int l = 0; l < LAYERS; l++)
            for (int h = 0; h < HKV; h++)
                TCHECK(x->s_sel[l][h] == y->s_sel[l][h] &&
                           x->sel_count[l][h] == y->sel_count[l][h] &&
                           x->sel_hash[l][h] == y->sel_hash[l][h],
                       "%s failed but the selection record of sequence #%d, layer %d, head %d "
                       "changed", call, i, l, h);
    }
}

/*
 * One API call: when the allocator failed inside it, the call must have
 * returned RESA_ERR_OUT_OF_MEMORY with a message and changed nothing the
 * API shows; it is then retried.  Either way it must succeed in the end.
 */
#define CALL(S, expr)                                                                  \
    do {                                                                               \
        snapshot before_, after_;                                                      \
        take_snapshot((S), &before_);                                                  \
        int64_t fired_ = (S)->fa.fired;                                                \
        resa_status s_ = (expr);                                                       \
        if ((S)->fa.fired != fired_) {                                                 \
            TCHECK(s_ == RESA_ERR_OUT_OF_MEMORY,                                       \
                   "allocation %lld failed inside %s, which returned %s (%s)",         \
                   (long long)(S)->fa.fail_at, #expr, resa_status_name(s_),            \
                   resa_ctx_last_error((S)->ctx));                                     \
            th_check_error_text((S)->ctx, NULL, #expr);                                \
            take_snapshot((S), &after_);                                               \
            same_snapshot(&before_, &after_, #expr);                                   \
            (S)->points++;                                                             \
            s_ = (expr);                                                               \
        }                                                                              \
        TCHECK(s_ == RESA_OK, "%s returned %s (%s); injected allocation %lld", #expr, \
               resa_status_name(s_), resa_ctx_last_error((S)->ctx),                    \
               (long long)(S)->fa.fail_at);                                            \
    } while (0)

static void fill(session *S, float *x, size_t n)
{
    for (size_t i = 0; i < n; i++)
        x[i] = (float)ref_rng_normal(&S->rng);
}

static void new_id(session *S, int32_t id)
{
    TCHECK(S->n_ids < MAX_IDS, "too many sequences in the script");
    S->ids[S->n_ids++] = id;
    rec_put(&S->rec, &id, sizeof id);
}

/* One step over n entries: begin, every layer (fresh inputs, outputs
 * recorded), end; or, with cancel_after >= 0, cancel after that many layers. */
static void step(session *S, int32_t n, const int32_t *seqs, const int32_t *modes,
                 const int32_t *counts, int cancel_after)
{
    int32_t rows = 0, dense_out = 0;
    for (int32_t i = 0; i < n; i++) {
        rows += counts[i];
        dense_out |= modes[i] != RESA_MODE_APPEND_KV;
    }
    TCHECK(rows <= MAX_ROWS, "script step too large");
    CALL(S, resa_ctx_step_begin(S->ctx, n, seqs, modes, counts, 0));
    for (int32_t l = 0; l < LAYERS; l++) {
        if (l == cancel_after) {
            CALL(S, resa_ctx_step_cancel(S->ctx));
            return;
        }
        fill(S, S->q, (size_t)rows * HQ * D);
        fill(S, S->k, (size_t)rows * HKV * D);
        fill(S, S->v, (size_t)rows * HKV * D);
        memset(S->out, 0, sizeof S->out);
        CALL(S, resa_ctx_step_attend(S->ctx, l, S->q, S->k, S->v, S->out, 0));
        if (dense_out)
            rec_put(&S->rec, S->out, sizeof(float) * (size_t)rows * HQ * D);
    }
    CALL(S, resa_ctx_step_end(S->ctx, 0));
    for (int32_t i = 0; i < n; i++) {
        int64_t len = 0, pend = 0;
        CALL(S, resa_seq_length(S->ctx, seqs[i], &len));
        CALL(S, resa_seq_pending(S->ctx, seqs[i], &pend));
        rec_put(&S->rec, &len, sizeof len);
        rec_put(&S->rec, &pend, sizeof pend);
    }
}

static void one(session *S, int32_t seq, int32_t mode, int32_t count)
{
    step(S, 1, &seq, &mode, &count, -1);
}

/* Every (layer, head) selection of seq, into the record. */
static void record_selection(session *S, int32_t seq)
{
    for (int32_t l = 0; l < LAYERS; l++)
        for (int32_t h = 0; h < HKV; h++) {
            int64_t n = 0;
            CALL(S, resa_seq_selected_blocks(S->ctx, seq, l, h, S->sel, SEL_CAP, &n));
            TCHECK(n <= SEL_CAP, "selection larger than the test's buffer");
            rec_put(&S->rec, &n, sizeof n);
            rec_put(&S->rec, S->sel, sizeof(int32_t) * (size_t)n);
        }
}

/* DECODE, or RECTIFY of everything pending when it is due. */
static void decode_or_rectify(session *S, int32_t seq, int32_t *mode, int32_t *count)
{
    int32_t due = 0;
    int64_t pend = 0;
    CALL(S, resa_seq_rectify_due(S->ctx, seq, &due));
    CALL(S, resa_seq_pending(S->ctx, seq, &pend));
    *mode = due ? RESA_MODE_RECTIFY : RESA_MODE_DECODE;
    *count = due ? (int32_t)pend : 1;
}

static void set_shape(session *S)
{
    resa_ctx *c = S->ctx;
    CALL(S, resa_ctx_set_param(c, RESA_PARAM_NUM_LAYERS, LAYERS));
    CALL(S, resa_ctx_set_param(c, RESA_PARAM_NUM_Q_HEADS, HQ));
    CALL(S, resa_ctx_set_param(c, RESA_PARAM_NUM_KV_HEADS, HKV));
    CALL(S, resa_ctx_set_param(c, RESA_PARAM_HEAD_DIM, D));
}

/* The whole script; fail_at = 0 runs it without injection. */
static void run_session(session *S, uint64_t seed, int64_t fail_at)
{
    memset(S, 0, sizeof *S);
    S->fa.fail_at = fail_at;
    S->rng.s = seed;
    resa_allocator hooks = {fa_alloc, fa_free, &S->fa};

    /* create: no context yet, so only the status, *out and the memory */
    resa_status s = resa_ctx_create(RESA_BACKEND_CPU, &hooks, &S->ctx);
    if (S->fa.fired) {
        TCHECK(s == RESA_ERR_OUT_OF_MEMORY && S->ctx == NULL,
               "allocation %lld failed inside resa_ctx_create, which returned %s",
               (long long)fail_at, resa_status_name(s));
        TCHECK(S->fa.n_alloc == S->fa.n_free && S->fa.bytes_alloc == S->fa.bytes_free,
               "a failed resa_ctx_create kept %lld allocations",
               (long long)(S->fa.n_alloc - S->fa.n_free));
        S->points++;
        s = resa_ctx_create(RESA_BACKEND_CPU, &hooks, &S->ctx);
    }
    TCHECK(s == RESA_OK && S->ctx, "resa_ctx_create returned %s", resa_status_name(s));
    resa_ctx *c = S->ctx;

    /* first session: fp16 cache, fp8 summaries, selection record, 2 workers,
     * more than 8192 blocks per sequence (the selection query allocates) */
    CALL(S, resa_ctx_set_preset(c, RESA_PRESET_PAPER));
    set_shape(S);
    CALL(S, resa_ctx_set_param(c, RESA_PARAM_KV_DTYPE, RESA_DTYPE_F16));
    CALL(S, resa_ctx_set_param(c, RESA_PARAM_IO_DTYPE, RESA_DTYPE_F32));
    CALL(S, resa_ctx_set_param(c, RESA_PARAM_BLOCK_SIZE, 4));
    CALL(S, resa_ctx_set_param(c, RESA_PARAM_MAX_TOKENS, 4 * 8256));
    CALL(S, resa_ctx_set_param(c, RESA_PARAM_MAX_SEQUENCES, 4));
    CALL(S, resa_ctx_set_param(c, RESA_PARAM_MAX_STEP_TOKENS, 256));
    CALL(S, resa_ctx_set_param(c, RESA_PARAM_SUMMARY_FORMAT, RESA_SUMMARY_FP8_E4M3));
    CALL(S, resa_ctx_set_param(c, RESA_PARAM_NUM_THREADS, 2));
    CALL(S, resa_ctx_set_param(c, RESA_PARAM_RECORD_SELECTION, 1));
    CALL(S, resa_ctx_set_param(c, RESA_PARAM_SELECT_MIN_BLOCKS, 2));
    CALL(S, resa_ctx_set_param(c, RESA_PARAM_SINK_BLOCKS, 1));
    CALL(S, resa_ctx_set_param(c, RESA_PARAM_RECTIFY_INTERVAL, 6));
    CALL(S, resa_ctx_set_param_f64(c, RESA_PARAM_SCORE_WIDTH, 0.5));
    CALL(S, resa_ctx_set_stream(c, NULL));

    int32_t a, b, fork_child, d;
    CALL(S, resa_seq_create(c, &a)); /* locks: the pool, tables, threads, scratch */
    new_id(S, a);
    one(S, a, RESA_MODE_APPEND, 37);
    one(S, a, RESA_MODE_APPEND_KV, 23);
    CALL(S, resa_seq_create(c, &b));
    new_id(S, b);
    {
        int32_t seqs[2] = {a, b}, modes[2] = {RESA_MODE_DECODE, RESA_MODE_APPEND},
                counts[2] = {1, 9};
        step(S, 2, seqs, modes, counts, -1);
    }
    for (int i = 0; i < 9; i++) {
        int32_t seqs[2] = {a, b}, modes[2], counts[2];
        decode_or_rectify(S, a, &modes[0], &counts[0]);
        decode_or_rectify(S, b, &modes[1], &counts[1]);
        step(S, 2, seqs, modes, counts, -1);
    }
    record_selection(S, a);
    record_selection(S, b);
    CALL(S, resa_seq_fork(c, a, &fork_child));
    new_id(S, fork_child);
    {
        int32_t seqs[2] = {fork_child, a}, modes[2] = {RESA_MODE_DECODE, RESA_MODE_DECODE},
                counts[2] = {1, 1};
        step(S, 2, seqs, modes, counts, -1);
        /* a step cancelled after one layer: nothing of it stays */
        int32_t mode = RESA_MODE_APPEND, count = 5;
        step(S, 1, &fork_child, &mode, &count, 1);
    }
    {
        int64_t pend = 0;
        CALL(S, resa_seq_pending(c, fork_child, &pend));
        TCHECK(pend > 0, "the script expects tokens pending rectification after the fork");
        /* rectifying the child copies the pages it shares with its parent */
        one(S, fork_child, RESA_MODE_RECTIFY, (int32_t)pend);
    }
    record_selection(S, fork_child);
    record_selection(S, a);
    CALL(S, resa_seq_release(c, b));
    CALL(S, resa_seq_release(c, fork_child));
    CALL(S, resa_ctx_synchronize(c));
    CALL(S, resa_ctx_reset(c, RESA_RESET_SESSION));

    /* second session: other pool, kv-dtype summaries, 3 workers */
    CALL(S, resa_ctx_set_param(c, RESA_PARAM_SUMMARY_FORMAT, RESA_SUMMARY_KV_DTYPE));
    CALL(S, resa_ctx_set_param(c, RESA_PARAM_MAX_TOKENS, 1024));
    CALL(S, resa_ctx_set_param(c, RESA_PARAM_NUM_THREADS, 3));
    CALL(S, resa_ctx_set_preset(c, RESA_PRESET_DEFAULT));
    CALL(S, resa_ctx_set_param(c, RESA_PARAM_SELECT_MIN_BLOCKS, 1));
    CALL(S, resa_seq_create(c, &d)); /* locks again */
    new_id(S, d);
    one(S, d, RESA_MODE_APPEND, 50);
    for (int i = 0; i < 3; i++)
        one(S, d, RESA_MODE_DECODE, 1);
    record_selection(S, d);
    CALL(S, resa_seq_release(c, d));
    CALL(S, resa_ctx_reset(c, RESA_RESET_SESSION | RESA_RESET_PARAMS));
    set_shape(S);
    CALL(S, resa_ctx_set_param(c, RESA_PARAM_MAX_TOKENS, 256));
    CALL(S, resa_ctx_set_param(c, RESA_PARAM_NUM_THREADS, 1));
    CALL(S, resa_seq_create(c, &d)); /* and once more, one thread, defaults */
    new_id(S, d);
    one(S, d, RESA_MODE_APPEND, 20);

    resa_ctx_destroy(c);
    S->ctx = NULL;
    TCHECK(S->fa.bad_free == 0, "%lld frees of pointers the allocator never handed out",
           (long long)S->fa.bad_free);
    TCHECK(S->fa.bad_align == 0, "%lld allocations with an alignment that is not a power of two",
           (long long)S->fa.bad_align);
    TCHECK(S->fa.n_alloc == S->fa.n_free && S->fa.bytes_alloc == S->fa.bytes_free,
           "at destroy: %lld allocations (%llu bytes), %lld frees (%llu bytes); injected %lld",
           (long long)S->fa.n_alloc, (unsigned long long)S->fa.bytes_alloc,
           (long long)S->fa.n_free, (unsigned long long)S->fa.bytes_free, (long long)fail_at);
    free(S->fa.live);
    S->fa.live = NULL;
}

START_TEST(test_every_allocation_fails_once)
{
    uint64_t seed = th_test_seed("alloc_faults");
    session *ref = calloc(1, sizeof *ref), *S = calloc(1, sizeof *S);
    TCHECK(ref && S, "out of memory in the test itself");
    run_session(ref, seed, 0);
    int64_t total = ref->fa.counted;
    TCHECK(ref->points == 0 && total > 0, "the reference session allocated nothing");
    int64_t n;
    for (n = 1;; n++) {
        run_session(S, seed, n);
        if (S->fa.fired == 0)
            break; /* the session made fewer than n allocations: every one was failed */
        TCHECK(S->fa.fired == 1 && S->points == 1,
               "allocation %lld: %lld failures injected, %lld met", (long long)n,
               (long long)S->fa.fired, (long long)S->points);
        TCHECK(S->rec.n == ref->rec.n && memcmp(S->rec.b, ref->rec.b, ref->rec.n) == 0,
               "allocation %lld failed and was retried: the session's outputs, ids or "
               "selections differ from the session without failures (%zu vs %zu bytes)",
               (long long)n, S->rec.n, ref->rec.n);
        free(S->rec.b);
    }
    free(S->rec.b);
    TCHECK(n - 1 == total, "%lld allocations failed in turn, the session makes %lld",
           (long long)(n - 1), (long long)total);
    printf("check_alloc_faults: %lld host allocation points, each failed once and retried\n",
           (long long)total);
    fflush(stdout);
    free(ref->rec.b);
    free(ref);
    free(S);
}
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("alloc_faults");
    TCase *tc = tcase_create("alloc_faults");
    tcase_set_timeout(tc, 600);
    tcase_add_test(tc, test_every_allocation_fails_once);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    return th_run_suite(suite(), 1);
}
