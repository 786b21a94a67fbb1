/* SPDX-License-Identifier: MIT */
/* Context lifecycle, the backend choice and the lock that turns parameters
 * into a pool.  Allocation hooks: alloc.c; the last-error text: error.c. */
#include <math.h>
#include <string.h>

#include "backend.h"
#include "internal.h"

/* ---- backends ---- */

int32_t resa_backend_available(resa_backend backend)
{
    resa_status why;
    const char *detail;
    switch (backend) {
    case RESA_BACKEND_CPU:
    case RESA_BACKEND_AUTO:
        return 1;
    case RESA_BACKEND_CUDA: {
        const resa_backend_ops *ops = resa_cuda_backend(&why, &detail);
        return ops && ops->available() ? 1 : 0;
    }
    }
    return 0;
}

resa_status resa_ctx_create(resa_backend backend, const resa_allocator *host_alloc,
                            resa_ctx **out)
{
    if (!out)
        return RESA_ERR_INVALID_ARGUMENT;
    *out = NULL;
    if (backend != RESA_BACKEND_CPU && backend != RESA_BACKEND_CUDA &&
        backend != RESA_BACKEND_AUTO)
        return RESA_ERR_INVALID_ARGUMENT;
    if (host_alloc && (!host_alloc->alloc || !host_alloc->free))
        return RESA_ERR_INVALID_ARGUMENT;

    const resa_backend_ops *ops = NULL;
    resa_backend chosen = RESA_BACKEND_CPU;
    if (backend != RESA_BACKEND_CPU) {
        resa_status why = RESA_ERR_NOT_SUPPORTED;
        const char *detail = NULL;
        ops = resa_cuda_backend(&why, &detail);
        if (ops && !ops->available()) {
            ops = NULL;
            why = RESA_ERR_NO_DEVICE;
        }
        if (ops)
            chosen = RESA_BACKEND_CUDA;
        else if (backend == RESA_BACKEND_CUDA)
            return why;
    }
    if (!ops)
        ops = resa_cpu_backend();

    resa_allocator a = host_alloc ? *host_alloc : resa_default_allocator();
    resa_ctx *ctx = a.alloc(a.user, sizeof *ctx, 64);
    if (!ctx)
        return RESA_ERR_OUT_OF_MEMORY;
    memset(ctx, 0, sizeof *ctx);
    ctx->alloc = a;
    ctx->requested = backend;
    ctx->backend = chosen;
    ctx->ops = ops;
    resa_config_defaults(&ctx->cfg);
    resa_status s = ops->ctx_init(ctx);
    if (s != RESA_OK && backend == RESA_BACKEND_AUTO && chosen == RESA_BACKEND_CUDA) {
        ctx->backend = RESA_BACKEND_CPU; /* AUTO: a GPU that cannot start means the CPU */
        ctx->ops = resa_cpu_backend();
        s = ctx->ops->ctx_init(ctx);
    }
    if (s != RESA_OK) {
        a.free(a.user, ctx);
        return s;
    }
    *out = ctx;
    return RESA_OK;
}

/* Frees the host tables of a lock (each may be NULL). */
static void free_tables(resa_ctx *ctx)
{
    resa_free(ctx, ctx->pool.free_list);
    resa_free(ctx, ctx->pool.refcount);
    resa_free(ctx, ctx->seqs);
    resa_free(ctx, ctx->page_tables);
    resa_free(ctx, ctx->step_entries);
    resa_free(ctx, ctx->step_new_pages);
    resa_free(ctx, ctx->layer_done);
    resa_free(ctx, ctx->scratch_slots);
    resa_free(ctx, ctx->page_marks);
    memset(&ctx->pool, 0, sizeof ctx->pool);
    memset(&ctx->lo, 0, sizeof ctx->lo);
    ctx->seqs = NULL;
    ctx->page_tables = NULL;
    ctx->step_entries = NULL;
    ctx->step_new_pages = NULL;
    ctx->layer_done = NULL;
    ctx->scratch_slots = NULL;
    ctx->page_marks = NULL;
}

/* Frees the pool and all per-lock state; the context returns to "unlocked". */
static void unlock(resa_ctx *ctx)
{
    if (!ctx->locked)
        return;
    /* ids handed out after the next lock start past every generation used
     * so far, so ids from before a session reset stay unknown */
    int32_t top = ctx->id_epoch;
    for (int32_t i = 0; i < ctx->lo.max_seqs; i++)
        if (((ctx->seqs[i].generation - ctx->id_epoch) & 0x7fff) >
            ((top - ctx->id_epoch) & 0x7fff))
            top = ctx->seqs[i].generation;
    ctx->id_epoch = (top + 1) & 0x7fff;
    ctx->ops->pool_destroy(ctx);
    free_tables(ctx);
    ctx->step_open = 0;
    ctx->locked = 0;
    memset(ctx->captured, 0, sizeof ctx->captured);
    ctx->captured_next = 0;
}

void resa_ctx_destroy(resa_ctx *ctx)
{
    if (!ctx)
        return;
    unlock(ctx);
    ctx->ops->ctx_fini(ctx);
    resa_allocator a = ctx->alloc;
    a.free(a.user, ctx);
}

resa_status resa_ctx_reset(resa_ctx *ctx, uint32_t what)
{
    if (!ctx)
        return RESA_ERR_INVALID_ARGUMENT;
    resa_clear_error(ctx);
    if (ctx->device_lost)
        return resa_refuse_lost(ctx, "reset");
    if (what == 0 || (what & ~(RESA_RESET_SESSION | RESA_RESET_PARAMS)))
        return resa_fail(ctx, RESA_ERR_INVALID_ARGUMENT,
                         "reset: what = 0x%x; use RESA_RESET_SESSION and/or RESA_RESET_PARAMS",
                         what);
    if ((what & RESA_RESET_PARAMS) && !(what & RESA_RESET_SESSION) && ctx->locked)
        return resa_fail(ctx, RESA_ERR_BAD_STATE,
                         "reset: RESA_RESET_PARAMS needs an unlocked context; "
                         "add RESA_RESET_SESSION");
    if (what & RESA_RESET_SESSION) {
        if (ctx->locked) {
            /* Pending device work may still read the pool. */
            resa_status s = ctx->ops->synchronize(ctx);
            if (s != RESA_OK)
                return s;
        }
        unlock(ctx);
    }
    if (what & RESA_RESET_PARAMS)
        resa_config_defaults(&ctx->cfg);
    return RESA_OK;
}

resa_status resa_ctx_get_backend(const resa_ctx *ctx, resa_backend *backend)
{
    if (!ctx)
        return RESA_ERR_INVALID_ARGUMENT;
    resa_clear_error((resa_ctx *)ctx);
    if (!backend)
        return resa_fail((resa_ctx *)ctx, RESA_ERR_INVALID_ARGUMENT, "get_backend: backend is NULL");
    *backend = ctx->backend;
    return RESA_OK;
}

resa_status resa_ctx_set_stream(resa_ctx *ctx, void *stream)
{
    if (!ctx)
        return RESA_ERR_INVALID_ARGUMENT;
    resa_clear_error(ctx);
    if (ctx->device_lost)
        return resa_refuse_lost(ctx, "set_stream");
    if (ctx->step_open)
        return resa_fail(ctx, RESA_ERR_BAD_STATE, "set_stream: a step is open");
    resa_status s = ctx->ops->set_stream(ctx, stream);
    if (s == RESA_OK)
        ctx->stream = stream;
    return s;
}

resa_status resa_ctx_synchronize(resa_ctx *ctx)
{
    if (!ctx)
        return RESA_ERR_INVALID_ARGUMENT;
    resa_clear_error(ctx);
    if (ctx->device_lost)
        return resa_refuse_lost(ctx, "synchronize");
    return ctx->ops->synchronize(ctx);
}

/* ---- the lock: parameters -> layout -> pool ---- */

static int log2_exact(int64_t v)
{
    int l = 0;
    while ((1ll << l) < v)
        l++;
    return l;
}

static resa_status layout_from_config(resa_ctx *ctx, resa_layout *lo)
{
    const resa_config *c = &ctx->cfg;
    if (c->n_q_heads % c->n_kv_heads != 0)
        return resa_fail(ctx, RESA_ERR_INVALID_ARGUMENT,
                         "lock: RESA_PARAM_NUM_Q_HEADS (%lld) is not a multiple of "
                         "RESA_PARAM_NUM_KV_HEADS (%lld)",
                         (long long)c->n_q_heads, (long long)c->n_kv_heads);
    int64_t max_seq_tokens = c->max_seq_tokens ? c->max_seq_tokens : c->max_tokens;
    if (max_seq_tokens > c->max_tokens)
        return resa_fail(ctx, RESA_ERR_INVALID_ARGUMENT,
                         "lock: RESA_PARAM_MAX_SEQ_TOKENS (%lld) exceeds RESA_PARAM_MAX_TOKENS (%lld)",
                         (long long)max_seq_tokens, (long long)c->max_tokens);
    int64_t n_pages = (c->max_tokens + c->block_size - 1) / c->block_size;
    if (n_pages > INT32_MAX / 2)
        return resa_fail(ctx, RESA_ERR_INVALID_ARGUMENT,
                         "lock: RESA_PARAM_MAX_TOKENS / RESA_PARAM_BLOCK_SIZE = %lld pages is too many",
                         (long long)n_pages);
    memset(lo, 0, sizeof *lo);
    lo->n_layers = (int32_t)c->n_layers;
    lo->hq = (int32_t)c->n_q_heads;
    lo->hkv = (int32_t)c->n_kv_heads;
    lo->group = lo->hq / lo->hkv;
    lo->d = (int32_t)c->head_dim;
    lo->b = (int32_t)c->block_size;
    lo->log2_b = log2_exact(c->block_size);
    lo->n_pages = (int32_t)n_pages;
    lo->max_seqs = (int32_t)c->max_seqs;
    lo->max_seq_blocks = (int32_t)((max_seq_tokens + c->block_size - 1) / c->block_size);
    lo->sel_words = (lo->max_seq_blocks + 31) / 32;
    lo->max_step_tokens = c->max_step_tokens;
    lo->kv_dtype = (resa_dtype)c->kv_dtype;
    lo->io_dtype = (resa_dtype)c->io_dtype;
    lo->kv_elt = resa_dtype_size(lo->kv_dtype);
    lo->io_elt = resa_dtype_size(lo->io_dtype);
    lo->kv_fp8 = lo->kv_dtype == RESA_DTYPE_FP8_E4M3;
    lo->val_dtype = lo->kv_fp8 ? lo->io_dtype : lo->kv_dtype;
    lo->sum_fp8 = c->summary_format == RESA_SUMMARY_FP8_E4M3;
    lo->sum_elt = lo->sum_fp8 ? 1 : resa_dtype_size(lo->val_dtype);
    return RESA_OK;
}

RESA_HIDDEN resa_status resa_ctx_lock(resa_ctx *ctx);
resa_status resa_ctx_lock(resa_ctx *ctx)
{
    if (ctx->locked)
        return RESA_OK;
    /* A host that forgot the model's shape would otherwise get 1 layer, 1/1
     * heads and d 128, and its buffers read as that: refuse instead. */
    for (int i = 0; i <= RESA_PARAM_HEAD_DIM - RESA_PARAM_NUM_LAYERS; i++)
        if (!(ctx->cfg.shape_set & (1u << i)))
            return resa_fail(ctx, RESA_ERR_BAD_STATE,
                             "seq_create: %s was never set; set the model's shape (NUM_LAYERS, "
                             "NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM) before the first sequence",
                             resa_param_name((resa_param)(RESA_PARAM_NUM_LAYERS + i)));
    resa_layout lo;
    resa_status s = layout_from_config(ctx, &lo);
    if (s != RESA_OK)
        return s;
    s = ctx->ops->check_config(ctx, &lo);
    if (s == RESA_ERR_NOT_SUPPORTED && ctx->requested == RESA_BACKEND_AUTO &&
        ctx->backend == RESA_BACKEND_CUDA) {
        /* AUTO: a configuration the GPU backend cannot run goes to the CPU */
        const resa_backend_ops *cpu = resa_cpu_backend();
        void *gpu_impl = ctx->impl;
        s = cpu->ctx_init(ctx);
        if (s == RESA_OK) {
            void *cpu_impl = ctx->impl;
            ctx->impl = gpu_impl;
            ctx->ops->ctx_fini(ctx);
            ctx->impl = cpu_impl;
            ctx->ops = cpu;
            ctx->backend = RESA_BACKEND_CPU;
            resa_clear_error(ctx);
            s = cpu->check_config(ctx, &lo);
        } else {
            ctx->impl = gpu_impl;
        }
    }
    if (s != RESA_OK)
        return s;
    ctx->lo = lo;
    size_t seqs = (size_t)lo.max_seqs;
    ctx->pool.n_pages = lo.n_pages;
    ctx->pool.free_list = resa_alloc(ctx, sizeof(int32_t) * (size_t)lo.n_pages);
    ctx->pool.refcount = resa_alloc(ctx, sizeof(int32_t) * (size_t)lo.n_pages);
    ctx->seqs = resa_alloc(ctx, sizeof(resa_seq) * seqs);
    ctx->page_tables = resa_alloc(ctx, sizeof(int32_t) * seqs * (size_t)lo.max_seq_blocks);
    ctx->step_entries = resa_alloc(ctx, sizeof(resa_step_entry) * seqs);
    ctx->step_new_pages = resa_alloc(ctx, sizeof(int32_t) * seqs);
    ctx->layer_done = resa_alloc(ctx, (size_t)lo.n_layers);
    ctx->scratch_slots = resa_alloc(ctx, sizeof(int32_t) * seqs);
    ctx->page_marks = resa_alloc(ctx, sizeof(int32_t) * (size_t)lo.n_pages);
    if (!ctx->pool.free_list || !ctx->pool.refcount || !ctx->seqs || !ctx->page_tables ||
        !ctx->step_entries || !ctx->step_new_pages || !ctx->layer_done || !ctx->scratch_slots ||
        !ctx->page_marks) {
        free_tables(ctx);
        return resa_fail(ctx, RESA_ERR_OUT_OF_MEMORY,
                         "lock: host allocation of the page tables failed");
    }
    for (int32_t i = 0; i < lo.n_pages; i++)
        ctx->pool.free_list[i] = lo.n_pages - 1 - i; /* pop gives page 0 first */
    ctx->pool.n_free = lo.n_pages;
    for (size_t i = 0; i < seqs; i++) {
        ctx->seqs[i].pages = ctx->page_tables + i * (size_t)lo.max_seq_blocks;
        ctx->seqs[i].generation = ctx->id_epoch;
    }
    ctx->locked = 1;
    s = ctx->ops->pool_create(ctx);
    if (s != RESA_OK) {
        /* pool_destroy frees whatever pool_create got.  No id was handed out
         * under this lock, so the id epoch stays: the retried call gives the
         * ids it would have given without the failure. */
        int32_t epoch = ctx->id_epoch;
        unlock(ctx);
        ctx->id_epoch = epoch;
    }
    return s;
}
