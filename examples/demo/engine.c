/* SPDX-License-Identifier: MIT */
/* A demo variant: libresa context, one sequence, the host's step protocol. */
#include "engine.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static resa_status fail(demo_engine *e, resa_status st, const char *what)
{
    const char *detail = e->ctx ? resa_ctx_last_error(e->ctx) : "";
    snprintf(e->err, sizeof e->err, "%s: %s (%s)%s%s", what, resa_status_name(st),
             resa_status_string(st), detail[0] ? ": " : "", detail);
    return st;
}

static resa_status set_int(demo_engine *e, resa_param p, int64_t value, const char *name)
{
    resa_status st = resa_ctx_set_param(e->ctx, p, value);
    if (st != RESA_OK) {
        char what[96];
        snprintf(what, sizeof what, "resa_ctx_set_param(%s, %lld)", name, (long long)value);
        return fail(e, st, what);
    }
    return RESA_OK;
}

resa_status demo_engine_init(demo_engine *e, const demo_model *m, demo_kind kind,
                             resa_backend backend, const demo_method *method, int record,
                             char *note, size_t note_len)
{
    memset(e, 0, sizeof *e);
    e->model = m;
    e->kind = kind;
    e->record = record;
    e->seq = -1;
    if (note_len > 0)
        note[0] = '\0';
    const demo_config *c = &m->cfg;

    if (demo_state_init(&e->state, c, c->seq_len) != 0) {
        snprintf(e->err, sizeof e->err, "out of memory (model scratch buffers)");
        return RESA_ERR_OUT_OF_MEMORY;
    }
    e->hist = malloc((size_t)c->seq_len * sizeof(int32_t));
    e->sel_cap = (c->seq_len + method->block_size - 1) / method->block_size + 1;
    e->sel = malloc((size_t)e->sel_cap * sizeof(int32_t));
    if (!e->hist || !e->sel) {
        snprintf(e->err, sizeof e->err, "out of memory");
        return RESA_ERR_OUT_OF_MEMORY;
    }

    resa_status st = resa_ctx_create(backend, NULL, &e->ctx);
    if (st != RESA_OK)
        return fail(e, st,
                    backend == RESA_BACKEND_CUDA
                        ? "resa_ctx_create(RESA_BACKEND_CUDA) (is libresa-cuda.so built and "
                          "found? try --backend cpu)"
                        : "resa_ctx_create");
    resa_backend got = RESA_BACKEND_CPU;
    st = resa_ctx_get_backend(e->ctx, &got);
    if (st != RESA_OK)
        return fail(e, st, "resa_ctx_get_backend");
    if (got == RESA_BACKEND_CUDA) {
        /* This host engine runs on the CPU: q/k/v/out live in host memory,
         * which the CUDA backend does not take, and head_dim 8 is below its
         * kernels' sizes.  AUTO falls back to the CPU backend. */
        if (backend == RESA_BACKEND_AUTO) {
            resa_ctx_destroy(e->ctx);
            e->ctx = NULL;
            st = resa_ctx_create(RESA_BACKEND_CPU, NULL, &e->ctx);
            if (st != RESA_OK)
                return fail(e, st, "resa_ctx_create(CPU)");
            snprintf(note, note_len,
                     "--backend auto found CUDA but uses CPU: this demo's model runs on the "
                     "host (q/k/v/out in host memory) and head_dim is %d",
                     (int)c->head_dim);
        } else {
            snprintf(e->err, sizeof e->err,
                     "the CUDA backend is available but not usable by resa-demo: its model "
                     "runs on the host and passes host pointers (the CUDA backend takes "
                     "device pointers), and head_dim %d is not a CUDA kernel size "
                     "(64/128/256); use --backend cpu",
                     (int)c->head_dim);
            return RESA_ERR_NOT_SUPPORTED;
        }
    }

    if ((st = set_int(e, RESA_PARAM_NUM_LAYERS, c->n_layers, "NUM_LAYERS")) ||
        (st = set_int(e, RESA_PARAM_NUM_Q_HEADS, c->n_heads, "NUM_Q_HEADS")) ||
        (st = set_int(e, RESA_PARAM_NUM_KV_HEADS, c->n_kv_heads, "NUM_KV_HEADS")) ||
        (st = set_int(e, RESA_PARAM_HEAD_DIM, c->head_dim, "HEAD_DIM")) ||
        (st = set_int(e, RESA_PARAM_KV_DTYPE, RESA_DTYPE_F32, "KV_DTYPE")) ||
        (st = set_int(e, RESA_PARAM_IO_DTYPE, RESA_DTYPE_F32, "IO_DTYPE")) ||
        (st = set_int(e, RESA_PARAM_MAX_SEQUENCES, 1, "MAX_SEQUENCES")) ||
        (st = set_int(e, RESA_PARAM_MAX_TOKENS, c->seq_len, "MAX_TOKENS")) ||
        (st = set_int(e, RESA_PARAM_MAX_SEQ_TOKENS, c->seq_len, "MAX_SEQ_TOKENS")) ||
        (st = set_int(e, RESA_PARAM_MAX_STEP_TOKENS, c->seq_len, "MAX_STEP_TOKENS")) ||
        (st = set_int(e, RESA_PARAM_BLOCK_SIZE, method->block_size, "BLOCK_SIZE")) ||
        (st = set_int(e, RESA_PARAM_SELECT_MIN_BLOCKS, method->min_blocks,
                      "SELECT_MIN_BLOCKS")) ||
        (st = set_int(e, RESA_PARAM_RECTIFY_INTERVAL, kind == DEMO_RESA ? method->interval : 0,
                      "RECTIFY_INTERVAL")) ||
        (st = set_int(e, RESA_PARAM_NUM_THREADS, method->threads, "NUM_THREADS")) ||
        (st = set_int(e, RESA_PARAM_RECORD_SELECTION, record, "RECORD_SELECTION")))
        return st;
    st = resa_ctx_set_param_f64(e->ctx, RESA_PARAM_SELECT_FRACTION, method->fraction);
    if (st != RESA_OK)
        return fail(e, st, "resa_ctx_set_param_f64(SELECT_FRACTION)");
    return RESA_OK;
}

void demo_engine_free(demo_engine *e)
{
    resa_ctx_destroy(e->ctx); /* releases any live sequence */
    e->ctx = NULL;
    demo_state_free(&e->state);
    free(e->hist);
    free(e->sel);
    e->hist = NULL;
    e->sel = NULL;
}

resa_status demo_engine_begin(demo_engine *e)
{
    resa_status st = resa_seq_create(e->ctx, &e->seq);
    if (st != RESA_OK) {
        e->seq = -1;
        return fail(e, st, "resa_seq_create");
    }
    e->len = 0;
    return RESA_OK;
}

resa_status demo_engine_finish(demo_engine *e)
{
    if (e->seq < 0)
        return RESA_OK;
    resa_status st = resa_seq_release(e->ctx, e->seq);
    e->seq = -1;
    e->len = 0;
    if (st != RESA_OK)
        return fail(e, st, "resa_seq_release");
    return RESA_OK;
}

/* Checks that libresa's length agrees with ours (a cheap protocol check). */
static resa_status check_length(demo_engine *e)
{
    int64_t len = -1;
    resa_status st = resa_seq_length(e->ctx, e->seq, &len);
    if (st != RESA_OK)
        return fail(e, st, "resa_seq_length");
    if (len != e->len) {
        snprintf(e->err, sizeof e->err,
                 "resa_seq_length says %lld tokens, the host stored %lld (library bug?)",
                 (long long)len, (long long)e->len);
        return RESA_ERR_INTERNAL;
    }
    return RESA_OK;
}

static resa_status forward(demo_engine *e, resa_mode mode, const int32_t *tokens, int32_t n,
                           int64_t pos0, float *logits, int all_rows, const char *what)
{
    resa_status st = demo_forward(e->model, &e->state, e->ctx, e->seq, mode, tokens, n, pos0,
                                  logits, all_rows);
    if (st != RESA_OK)
        return fail(e, st, what);
    return RESA_OK;
}

resa_status demo_engine_prefill(demo_engine *e, const int32_t *tokens, int32_t n,
                                float *logits, int all_rows)
{
    if (n <= 0 || e->len + n > e->model->cfg.seq_len) {
        snprintf(e->err, sizeof e->err, "prefill of %d tokens exceeds the context of %d",
                 (int)n, (int)e->model->cfg.seq_len);
        return RESA_ERR_CAPACITY;
    }
    resa_status st = forward(e, RESA_MODE_APPEND, tokens, n, e->len, logits, all_rows,
                             "prefill step (RESA_MODE_APPEND)");
    if (st != RESA_OK)
        return st;
    memcpy(e->hist + e->len, tokens, (size_t)n * sizeof(int32_t));
    e->len += n;
    return check_length(e);
}

static resa_status record_selection(demo_engine *e)
{
    const demo_config *c = &e->model->cfg;
    int64_t b = 0;
    resa_status st = resa_ctx_get_param(e->ctx, RESA_PARAM_BLOCK_SIZE, &b);
    if (st != RESA_OK)
        return fail(e, st, "resa_ctx_get_param(BLOCK_SIZE)");
    int64_t blocks = (e->len + b - 1) / b; /* M, including the current block */
    for (int32_t l = 0; l < c->n_layers; l++) {
        for (int32_t h = 0; h < c->n_kv_heads; h++) {
            int64_t count = 0;
            st = resa_seq_selected_blocks(e->ctx, e->seq, l, h, e->sel, e->sel_cap, &count);
            if (st != RESA_OK)
                return fail(e, st, "resa_seq_selected_blocks");
            if (count < 1 || count > blocks) {
                snprintf(e->err, sizeof e->err,
                         "resa_seq_selected_blocks: %lld blocks selected of %lld (library bug?)",
                         (long long)count, (long long)blocks);
                return RESA_ERR_INTERNAL;
            }
            e->attended_sum += (double)count / (double)blocks;
            e->attended_n++;
        }
    }
    return RESA_OK;
}

static double now_s(void)
{
    struct timespec ts;
    timespec_get(&ts, TIME_UTC);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static resa_status rectify_if_due(demo_engine *e)
{
    int32_t due = 0;
    resa_status st = resa_seq_rectify_due(e->ctx, e->seq, &due);
    if (st != RESA_OK)
        return fail(e, st, "resa_seq_rectify_due");
    if (!due)
        return RESA_OK;
    int64_t pending = 0;
    st = resa_seq_pending(e->ctx, e->seq, &pending);
    if (st != RESA_OK)
        return fail(e, st, "resa_seq_pending");
    if (pending <= 0 || pending > e->len) {
        snprintf(e->err, sizeof e->err,
                 "rectification due with %lld pending tokens of %lld (library bug?)",
                 (long long)pending, (long long)e->len);
        return RESA_ERR_INTERNAL;
    }
    /* Re-encode exactly the pending tokens at their original positions; the
     * logits of this pass are not needed (the sampled tokens stay). */
    int64_t start = e->len - pending;
    double t0 = now_s();
    st = forward(e, RESA_MODE_RECTIFY, e->hist + start, (int32_t)pending, start, NULL, 0,
                 "rectification step (RESA_MODE_RECTIFY)");
    if (st != RESA_OK)
        return st;
    e->rectify_seconds += now_s() - t0;
    e->n_rectify++;
    e->rectified_tokens += pending;
    st = resa_seq_pending(e->ctx, e->seq, &pending);
    if (st != RESA_OK)
        return fail(e, st, "resa_seq_pending");
    if (pending != 0) {
        snprintf(e->err, sizeof e->err,
                 "%lld tokens still pending right after a rectification (library bug?)",
                 (long long)pending);
        return RESA_ERR_INTERNAL;
    }
    return check_length(e);
}

resa_status demo_engine_decode(demo_engine *e, int32_t token, float *logits)
{
    if (e->len + 1 > e->model->cfg.seq_len) {
        snprintf(e->err, sizeof e->err, "decoding past the context of %d tokens",
                 (int)e->model->cfg.seq_len);
        return RESA_ERR_CAPACITY;
    }
    resa_mode mode = e->kind == DEMO_DENSE ? RESA_MODE_APPEND : RESA_MODE_DECODE;
    resa_status st = forward(e, mode, &token, 1, e->len, logits, 0,
                             mode == RESA_MODE_APPEND ? "dense decode step (RESA_MODE_APPEND)"
                                                      : "decode step (RESA_MODE_DECODE)");
    if (st != RESA_OK)
        return st;
    e->hist[e->len++] = token;
    if (mode == RESA_MODE_DECODE) {
        e->n_decode++;
        if (e->record && (st = record_selection(e)) != RESA_OK)
            return st;
    }
    if (e->kind == DEMO_RESA)
        return rectify_if_due(e);
    return RESA_OK;
}
